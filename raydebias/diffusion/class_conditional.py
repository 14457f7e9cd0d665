"""The ``class_diffusion`` stage (config block ``class_diffusion``; docs/methods/diffusing_debias.md): a
class-conditional diffusion model with classifier-free guidance trained on the *biased* training split. Captions carry the class only, so the split needs no ``bias``
labels; because aligned samples dominate, the model learns p(x | y) ≈ p(x | y, b_aligned) and its samples are
bias-amplified — which is what the bias amplifier needs."""

from __future__ import annotations

from pathlib import Path

from raydebias._internal.io import atomic_write_json
from raydebias.core import StageResult
from raydebias.diffusion.base import load_stage_model, run_train_task


def load_class_diffusion(run_dir: Path):
    return load_stage_model(run_dir, "class_diffusion")


def run_class_diffusion(ctx):
    cfg = ctx.cfg
    d = cfg.class_diffusion
    out = ctx.stage_dir("class_diffusion")
    if cfg.models.source != "bootstrap":  # a pretrained model is not bias-amplified: this one is trained by design
        ctx.log("[class_diffusion] models.source=pretrained: the class-conditional model is still trained from scratch on the "
                "biased split (the bootstrap architecture of models.diffusion), as Diffusing DeBias prescribes")
    ctx.log(f"[class_diffusion] class-conditional diffusion on the biased train split: {d.steps} steps, batch {d.batch_size}, "
            f"captions {d.prompt_template!r}")
    stats = run_train_task(ctx, "class_diffusion", d.prompt_template, d.steps, d.batch_size, d.lr, d.num_cpus, use_bias=False,
                           num_workers=cfg.diffusion.num_workers)
    atomic_write_json(out / "model.json", {"path": ctx.rel(out / "model"), "run_relative": True})
    ctx.log(f"[class_diffusion] done: {stats}")
    return StageResult([ctx.rel(out / "model.json"), ctx.rel(out / "model")], stats)
