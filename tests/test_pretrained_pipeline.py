"""The ``pretrained`` model source through the stages: a tiny random Stable-Diffusion-layout folder (UNet + VAE +
CLIP text encoder + tokenizer) and a tiny open_clip folder, saved to a temp dir and loaded with
``from_pretrained`` / ``open_clip.create_model`` exactly as real weights are (docs/bootstrap.md: two model
sources, one code path)."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raydebias.config import load_config
from raydebias.pipeline import run_pipeline

pytestmark = pytest.mark.slow  # end-to-end: `pytest -m "not slow"` is the fast loop

ROOT = Path(__file__).parents[1]

DEMO_STAGES = "stages=[data,clip,embed,cluster,diffusion,finetune,generate,filter,train,evaluate,report]"
FULL_STAGES = "stages=[data,diffusion,mine,inject,train,gmm,evaluate,report]"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from raydebias.models.testing import save_tiny_open_clip, save_tiny_stable_diffusion

    d = tmp_path_factory.mktemp("weights")
    return {"sd": save_tiny_stable_diffusion(d / "sd"), "clip": save_tiny_open_clip(d / "clip")}


def _pretrained(weights) -> list[str]:
    return ["models.source=pretrained", f"models.diffusion.pretrained={weights['sd']}",
            f"models.clip.pretrained={weights['clip']}"]


def test_demo_stages_run_on_pretrained_weights(ray_module, tmp_path, weights, tiny_generative):
    from diffusers import StableDiffusionPipeline

    run_dir = tmp_path / "run"
    cfg = load_config(ROOT / "configs" / "demo.yaml", [*tiny_generative, *_pretrained(weights), DEMO_STAGES,
                                            f"run_dir={run_dir}"])
    run_pipeline(cfg, log=lambda m: None)
    st = run_dir / "stages"
    assert json.loads((st / "clip" / "clip.json").read_text())["source"] == "pretrained"
    assert not (st / "clip" / "model").exists()  # nothing trained: the user's CLIP is used as is
    assert json.loads((st / "diffusion" / "model.json").read_text())["path"] == str(weights["sd"])
    assert not (st / "diffusion" / "model").exists()
    emb = pq.read_table(st / "embed" / "train.parquet")
    assert emb.num_rows == 300 and len(emb.column("embedding")[0].as_py()) == 32  # the open_clip folder's embed_dim
    # the adapters are plain diffusers LoRA files of the user's model
    units = json.loads((st / "finetune" / "clustered_dreambooth" / "units.json").read_text())
    assert units
    pipe = StableDiffusionPipeline.from_pretrained(str(weights["sd"]))
    pipe.load_lora_weights(str(st / "finetune" / "clustered_dreambooth" / units[0]["name"]), adapter_name="u0")
    assert "u0" in pipe.get_active_adapters()
    plan = json.loads((st / "generate" / "clustered_dreambooth" / "plan.json").read_text())
    syn = pq.read_table(st / "generate" / "clustered_dreambooth" / "synthetic.parquet")
    assert syn.num_rows == plan["rows"] == 200
    assert len(syn.column("pixels")[0].as_py()) == 32 * 32 * 3  # the dataset's size, whatever the model's
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["method"] for r in metrics["rows"]] == ["clustered_dreambooth", "erm", "groupdro"]
    assert (run_dir / "report.html").exists()


def test_full_methods_edit_the_pretrained_model(ray_module, tmp_path, weights, tiny_generative):
    """DiffInject inverts and injects, GAMMA-FACE fits its latents, on the pretrained base model (the ``diffusion``
    stage), not on a model trained in-run: no ``class_diffusion`` stage runs."""
    run_dir = tmp_path / "run"
    sets = [*tiny_generative, *_pretrained(weights), FULL_STAGES, "method=diffinject",
            "baselines=[gamma_face, erm]", "gamma_face.labeler=erm", "diffinject.biased_epochs=1",
            "diffinject.num_steps=4", "diffinject.t_edit=500", "diffinject.t_boost=250", "gamma_face.num_latents=40",
            "gamma_face.num_steps=4", "gamma_face.k_max=2", f"run_dir={run_dir}"]
    run_pipeline(load_config(ROOT / "configs" / "full.yaml", sets), log=lambda m: None)
    m = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert "class_diffusion" not in m
    assert "diffusion" in m["inject"]["inputs"] and "diffusion" in m["gmm"]["inputs"]
    inject = pq.read_table(run_dir / "stages" / "inject" / "synthetic.parquet")
    assert inject.num_rows == m["inject"]["summary"]["synthetic"] > 0
    assert len(inject.column("pixels")[0].as_py()) == 32 * 32 * 3
    gmm = pq.read_table(run_dir / "stages" / "gmm" / "generated.parquet")
    assert gmm.num_rows > 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {r["method"] for r in metrics["rows"]} == {"diffinject", "gamma_face", "erm"}
