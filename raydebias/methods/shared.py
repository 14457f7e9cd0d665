"""The building-block stages methods share: data, CLIP, embeddings, clusters, the base text-to-image model, the
class-conditional ``class_diffusion`` model, evaluate and report. A method names the ones it needs in ``Method.shared``."""

from __future__ import annotations

from raydebias.core import Stage, ref

# the stage functions, imported when a stage first runs (so that registering the methods imports none of them)
run_data, data_key = ref("raydebias.data.stage:run_data"), ref("raydebias.data.stage:data_key")
run_clip, clip_key = ref("raydebias.embed.stage:run_clip"), ref("raydebias.embed.stage:clip_key")
run_embed = ref("raydebias.embed.stage:run_embed")
run_cluster = ref("raydebias.cluster.stage:run_cluster")
run_diffusion = ref("raydebias.diffusion.base:run_diffusion")
diffusion_weights = ref("raydebias.diffusion.base:diffusion_weights")
run_class_diffusion = ref("raydebias.diffusion.class_conditional:run_class_diffusion")
run_evaluate = ref("raydebias.evaluate.stage:run_evaluate")
run_report = ref("raydebias.evaluate.report:run_report")

DATA = Stage("data", "data", (), run_data, key=data_key)
SHARED = {
    "clip": Stage("clip", "clip", ("data",), run_clip, key=clip_key),
    "embed": Stage("embed", "embed", ("clip", "data"), run_embed, reads=("embed",)),
    "cluster": Stage("cluster", "cluster", ("embed",), run_cluster, reads=("cluster", "finetune.min_images", "seed")),
    "diffusion": Stage("diffusion", "diffusion", ("data",), run_diffusion, key=diffusion_weights,
                       reads=("models.diffusion", "models.source", "diffusion", "data.prompt_template", "seed")),
    # the class-conditional model of the biased split: Diffusing DeBias samples it per class; DiffInject and
    # GAMMA-FACE use it unconditionally (prompt "")
    "class_diffusion": Stage("class_diffusion", "class_diffusion", ("data",), run_class_diffusion,
                             key=diffusion_weights,
                             reads=("class_diffusion", "models.diffusion", "models.source", "diffusion",
                                    "-diffusion.steps", "-diffusion.batch_size", "-diffusion.lr", "seed")),
}


def evaluate(results: list[str]) -> Stage:
    """Scores the classifiers (and synthetic sets) of ``results``: the methods' result nodes."""
    return Stage("evaluate", "evaluate", ("data", *results), run_evaluate, reads=("evaluate",))


REPORT = Stage("report", "report", ("data", "evaluate"), run_report, reads=("report",))

# the config a classifier-training stage reads
TRAIN_READS = ("train", "models.classifier", "seed")


def editing_base(cfg) -> str:
    """The stage whose model DiffInject and GAMMA-FACE invert and edit: the pretrained base model
    (``diffusion``) when the run has one, as in the papers (a diffusion model pretrained on the domain); with
    bootstrap models the class-conditional model trained on the split (``class_diffusion``), sampled unconditionally."""
    return "diffusion" if cfg.models.source == "pretrained" else "class_diffusion"
