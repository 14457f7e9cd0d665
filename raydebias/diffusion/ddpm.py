"""``ddpm`` stage of Diffusing DeBias (docs/methods/diffusing_debias.md): a class-conditional diffusion model with classifier-free
guidance trained on the *biased* training split. Captions carry the class only, so the split needs no ``bias``
labels; because aligned samples dominate, the model learns p(x | y) ≈ p(x | y, b_aligned) and its samples are
bias-amplified — which is what the bias amplifier needs."""

from __future__ import annotations

import json
from pathlib import Path


def load_ddpm(run_dir: Path):
    from raydebias.models.diffusion import load_diffusion

    from raydebias.diffusion.base import model_path

    spec = json.loads((Path(run_dir) / "stages" / "ddpm" / "model.json").read_text())
    return load_diffusion(model_path(run_dir, spec), spec.get("dtype", "float32"), spec.get("revision"))


def run_ddpm(ctx):
    from raydebias._internal.io import atomic_write_json
    from raydebias.diffusion.base import run_train_task
    from raydebias.core import StageResult

    cfg = ctx.cfg
    d = cfg.ddb
    if cfg.models.source != "bootstrap":
        raise ValueError("diffusing_debias trains its class-conditional diffusion model on the biased training split "
                         "from scratch; set models.source=bootstrap (a pretrained text-to-image model is not "
                         "bias-amplified by construction)")
    out = ctx.stage_dir("ddpm")
    ctx.log(f"[ddpm] class-conditional diffusion on the biased train split: {d.steps} steps, batch {d.batch_size}, "
            f"captions {d.prompt_template!r}")
    stats = run_train_task(ctx, "ddpm", d.prompt_template, d.steps, d.batch_size, d.lr, d.num_cpus, use_bias=False)
    atomic_write_json(out / "model.json", {"path": ctx.rel(out / "model"), "run_relative": True})
    ctx.log(f"[ddpm] done: {stats}")
    return StageResult([ctx.rel(out / "model.json"), ctx.rel(out / "model")], stats)
