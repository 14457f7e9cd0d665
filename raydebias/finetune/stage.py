"""``finetune`` stage: one DreamBooth-LoRA per cluster/group as independent Ray tasks (retried on failure),
saved in diffusers LoRA format (``pipe.load_lora_weights(dir)`` loads them). Finished adapters are skipped on
rerun, so a killed stage resumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raydebias._internal.io import as_path, atomic_write_json, atomic_write_text, remove_path, replace_path
from raydebias.core import StageResult
from raydebias.data.stream import take_ids
from raydebias.diffusion.base import load_base
from raydebias.finetune.dreambooth_lora import save_lora, train_lora
from raydebias.finetune.multi_lora import train_loras_batched
from raydebias.generate.plan import Unit, describe, plan_units
from raydebias.models.sampling import sample


def units_for(ctx, variant: str) -> list[Unit]:
    import pyarrow.parquet as pq

    info = ctx.data_info
    t = pq.read_table(str(ctx.run_dir / "stages" / "cluster" / "assignments.parquet"))
    B = info["num_bias"] or 1
    g = t.column("group").to_numpy()
    y, a = g // B, g % B
    cfg = ctx.cfg
    return plan_units(variant, np.asarray(t.column("id").to_pylist(), dtype=object), y, a,
                      t.column("cluster").to_numpy(), info["class_names"], info["bias_names"] or ["any"],
                      cfg.data.prompt_template, cfg.finetune.identifier, cfg.finetune.min_images, cfg.seed)


def _train_unit(run_dir: str, unit: dict, ft: dict, seed: int, image_size: int, out_dir: str) -> dict:
    """One adapter (runs as a Ray task): load the base model, train the LoRA on the unit's images, save."""
    import time

    import torch

    torch.set_num_threads(1)
    t0 = time.time()
    _, pixels = take_ids(as_path(run_dir) / "stages" / "data" / "train.parquet", unit["ids"], image_size)
    bundle = load_base(as_path(run_dir))
    prior = None
    if ft["prior_preservation"]:
        # DreamBooth prior preservation: the base model's own images of the class prompt (no [V]), drawn
        # before the adapter exists, keep the adapter from forgetting the class.

        n = min(len(pixels), 50)
        prior_prompts = [unit["class_prompt"]] * n
        prior = (sample(bundle, prior_prompts, seeds=[seed + i for i in range(n)]), prior_prompts)
    stats = train_lora(bundle, unit["name"], pixels, [unit["prompt"]] * len(pixels), steps=ft["steps"],
                       batch_size=ft["batch_size"], lr=ft["lr"], seed=seed, rank=ft["rank"], prior=prior,
                       prior_weight=ft["prior_weight"])
    save_lora(bundle, unit["name"], out_dir)
    return {"name": unit["name"], "images": len(pixels), "prior_images": 0 if prior is None else len(prior[1]),
            "seconds": round(time.time() - t0, 1),
            **{k: v for k, v in stats.items() if isinstance(v, (int, float))}}


def _train_pack(run_dir: str, units: list[dict], ft: dict, seed: int, image_size: int, out_dirs: list[str]) -> list:
    """Several adapters (one Ray task) in one batched pass (:func:`~raydebias.finetune.multi_lora.train_loras_batched`),
    each saved to its folder."""
    import time

    import torch

    torch.set_num_threads(max(1, int(ft["cpus_per_task"])))
    t0 = time.time()
    # the pack's images only (set order, as _train_unit reads them: the same batches)
    t, pixels = take_ids(as_path(run_dir) / "stages" / "data" / "train.parquet",
                         sorted({i for u in units for i in u["ids"]}), image_size)
    ids = np.asarray(t.column("id").to_pylist(), dtype=object)
    jobs = []
    for u in units:
        px = pixels[np.isin(ids, u["ids"])]
        jobs.append({"name": u["name"], "pixels": px, "prompts": [u["prompt"]] * len(px), "seed": seed})
    bundle = load_base(as_path(run_dir))
    stats = train_loras_batched(bundle, jobs, steps=ft["steps"], batch_size=ft["batch_size"], lr=ft["lr"],
                                rank=ft["rank"])
    for u, d in zip(units, out_dirs):
        save_lora(bundle, u["name"], d)
    secs = round(time.time() - t0, 1)
    return [{"name": j["name"], "images": len(j["pixels"]), "prior_images": 0, "seconds": secs,
             **{k: v for k, v in st.items() if isinstance(v, (int, float))}} for j, st in zip(jobs, stats)]


def reset_if_stale(out: Path, key: str | None) -> bool:
    """Finished adapters are reused only by a rerun with the same inputs (resume). When the node's key changed
    (new base model, new clusters, new settings) the old adapters are stale: remove them. Returns True if it did."""
    if key is None:
        return False
    marker = out / "inputs.key"
    if marker.exists() and marker.read_text() == key:
        return False
    stale = [d for d in out.iterdir() if d.is_dir()] if out.is_dir() else []
    for d in stale:
        remove_path(d)
    atomic_write_text(marker, key)
    return bool(stale)


def run_finetune(ctx, variant: str):
    import ray

    cfg = ctx.cfg
    out = ctx.stage_dir(f"finetune/{variant}")
    if reset_if_stale(out, getattr(ctx, "node_key", None)):
        ctx.log(f"[finetune/{variant}] inputs changed: removed adapters trained on the old inputs")
    units = units_for(ctx, variant)
    atomic_write_json(out / "units.json", [u.__dict__ for u in units])
    todo = [u for u in units if not (out / u.name / "pytorch_lora_weights.safetensors").exists()]
    if units:
        ctx.ensure_ray()
        ctx.log(f"[finetune/{variant}] {len(units)} adapter(s), {len(units) - len(todo)} already trained")
    ft = cfg.finetune
    opts = dict(num_cpus=ft.cpus_per_task, num_gpus=cfg.ray.num_gpus_per_worker or 0, max_retries=ft.max_retries,
                retry_exceptions=True)
    class_names = ctx.data_info["class_names"]
    args = (str(ctx.run_dir),)
    refs = {}
    if todo and ft.batched and not ft.prior_preservation:
        slots = max(1, int(ray.cluster_resources().get("CPU", 1) // ft.cpus_per_task))
        size = ft.adapters_per_task or -(-len(todo) // slots)
        task = ray.remote(**opts)(_train_pack)
        for i in range(0, len(todo), size):
            pack = todo[i : i + size]
            refs[task.remote(*args, [u.__dict__ for u in pack], ft.model_dump(), cfg.seed, ctx.data_info["image_size"],
                             [str(out / f".{u.name}.tmp") for u in pack])] = pack
        ctx.log(f"[finetune/{variant}] batched: {len(todo)} adapter(s) in {len(refs)} task(s)")
    elif todo:
        task = ray.remote(**opts)(_train_unit)
        for u in todo:
            unit = {**u.__dict__, "class_prompt": describe(cfg.data.prompt_template, class_names[u.y], None)}
            refs[task.remote(*args, unit, ft.model_dump(), cfg.seed, ctx.data_info["image_size"],
                             str(out / f".{u.name}.tmp"))] = [u]
    results = []
    while refs:
        done, _ = ray.wait(list(refs), num_returns=1)
        pack = refs.pop(done[0])
        r = ray.get(done[0])  # raises after max_retries: the stage fails loudly, finished adapters are kept
        for u, stats in zip(pack, r if isinstance(r, list) else [r]):
            replace_path(out / f".{u.name}.tmp", out / u.name)
            results.append(stats)
            ctx.log(f"[finetune/{variant}] {stats['name']}: {stats['images']} images, {stats['seconds']}s "
                    f"({len(results)}/{len(todo)})")
    outputs = [ctx.rel(out / "units.json")] + [ctx.rel(out / u.name) for u in units]
    return StageResult(outputs, {"adapters": len(units), "trained_now": len(results)})
