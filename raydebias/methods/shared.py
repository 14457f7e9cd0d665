"""The building-block stages methods share: data, CLIP, embeddings, clusters, the base text-to-image model, the
class-conditional ``ddpm`` model, evaluate and report. A method names the ones it needs in ``Method.shared``."""

from __future__ import annotations

from raydebias.cluster.stage import run_cluster
from raydebias.core import Stage
from raydebias.data.stage import data_key, run_data
from raydebias.diffusion.base import diffusion_weights, run_diffusion
from raydebias.diffusion.ddpm import run_ddpm
from raydebias.embed.stage import clip_key, run_clip, run_embed
from raydebias.evaluate.report import run_report
from raydebias.evaluate.stage import run_evaluate

DATA = Stage("data", "data", (), run_data, key=data_key)
SHARED = {
    "clip": Stage("clip", "clip", ("data",), run_clip, key=clip_key),
    "embed": Stage("embed", "embed", ("clip", "data"), run_embed, reads=("embed",)),
    "cluster": Stage("cluster", "cluster", ("embed",), run_cluster, reads=("cluster", "finetune.min_images", "seed")),
    "diffusion": Stage("diffusion", "diffusion", ("data",), run_diffusion, key=diffusion_weights,
                       reads=("models.diffusion", "models.source", "diffusion", "data.prompt_template", "seed")),
    # the class-conditional model of the biased split: Diffusing DeBias samples it per class; DiffInject and
    # GAMMA-FACE use it unconditionally (prompt "")
    "ddpm": Stage("ddpm", "ddpm", ("data",), run_ddpm, key=diffusion_weights,
                  reads=("ddb.prompt_template", "ddb.steps", "ddb.batch_size", "ddb.lr", "models.diffusion",
                         "models.source", "diffusion", "-diffusion.steps", "-diffusion.batch_size", "-diffusion.lr",
                         "seed")),
}


def evaluate(results: list[str]) -> Stage:
    """Scores the classifiers (and synthetic sets) of ``results``: the methods' result nodes."""
    return Stage("evaluate", "evaluate", ("data", *results), run_evaluate, reads=("evaluate",))


REPORT = Stage("report", "report", ("data", "evaluate"), run_report, reads=("report",))

# the config a classifier-training stage reads
TRAIN_READS = ("train", "models.classifier", "seed")
