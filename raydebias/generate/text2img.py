"""``generate`` stage: M images per (y, a) group from the fine-tuned adapters (or the base model), as a Ray Data
actor pool over fixed chunks of the plan. Each actor loads the base model once and switches adapters without
reloading, and writes each chunk atomically as its own Parquet part named by the chunk's row ids: a killed run
resumes by generating exactly the missing chunks, and a retried chunk rewrites the same file. The stage's output
``synthetic.parquet/`` links those parts in plan order; no image passes through the driver."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydebias._internal.io import as_path, atomic_write_json, atomic_write_table, link_parts
from raydebias.core import StageResult
from raydebias.data.transforms import resize_uint8
from raydebias.diffusion.base import load_base
from raydebias.embed.stage import load_clip
from raydebias.finetune.dreambooth_lora import load_lora, set_active
from raydebias.finetune.multi_lora import sample_mixed
from raydebias.generate.plan import Unit, plan_rows
from raydebias.models.sampling import sample

COLUMNS = ("row_id", "y", "a", "cluster", "adapter", "prompt", "seed", "transferred")


def chunk_name(row_ids: list[str]) -> str:
    """A chunk's part name: a hash of its row ids, so a rerun with the same plan finds its finished parts."""
    return hashlib.sha1("\n".join(row_ids).encode()).hexdigest()[:16]


class GenerateBatch:
    """Ray Data UDF: one base model per actor; adapters loaded on first use and switched per row group. Each
    image is also encoded by the run's CLIP here, where the accelerator is, so the filter reads its embeddings
    instead of encoding every synthetic image again on the driver."""

    def __init__(self, run_dir: str, variant: str, num_steps: int, guidance_scale: float, out_dir: str,
                 class_guidance_scale: float | None = None, mixed: bool = True):
        import torch

        torch.set_num_threads(1)
        self.run_dir, self.variant, self.out_dir = as_path(run_dir), variant, as_path(out_dir)
        self.bundle = load_base(self.run_dir)
        self.clip = load_clip(self.run_dir)
        self.size = json.loads((self.run_dir / "stages" / "data" / "info.json").read_text())["image_size"]
        self.loaded: set[str] = set()
        self.num_steps, self.guidance_scale = num_steps, guidance_scale
        self.class_guidance_scale = class_guidance_scale
        self.mixed = mixed

    def _load(self, adapter: str) -> None:
        """Attach ``adapter`` once per actor (it stays attached; later batches only switch or route to it)."""
        if adapter not in self.loaded:
            load_lora(self.bundle, self.run_dir / "stages" / "finetune" / self.variant / adapter, adapter)
            self.loaded.add(adapter)

    def _activate(self, adapter: str | None) -> None:
        if adapter is not None:
            self._load(adapter)
        set_active(self.bundle, None if adapter is None else [adapter])

    def __call__(self, chunks: dict) -> dict:
        """A batch of plan chunks (``rows``: each chunk's rows as JSON) → one Parquet part per chunk."""
        for rows in chunks["rows"]:
            rows = json.loads(str(rows))
            batch = {c: [r[c] for r in rows] for c in COLUMNS}
            if self.class_guidance_scale is not None:
                batch["partial_prompt"] = [r["partial_prompt"] for r in rows]
            self._write(batch)
        return {"chunk": chunks["chunk"]}

    def _write(self, batch: dict) -> None:
        n = len(batch["row_id"])
        adapters = [a if a else None for a in batch["adapter"]]
        prompts, seeds = [str(p) for p in batch["prompt"]], [int(s) for s in batch["seed"]]
        compose = self.class_guidance_scale is not None
        if self.mixed and not compose:  # the whole batch in one pass, each row through its own adapter

            for adapter in dict.fromkeys(a for a in adapters if a):
                self._load(adapter)
            imgs = sample_mixed(self.bundle, adapters, prompts, seeds, num_steps=self.num_steps,
                                guidance_scale=self.guidance_scale)
        else:  # one sampling call per adapter of the batch
            imgs = np.zeros((n, self.bundle.resolution, self.bundle.resolution, 3), np.uint8)
            for adapter in dict.fromkeys(adapters):
                idx = [i for i in range(n) if adapters[i] == adapter]
                self._activate(adapter)
                imgs[idx] = sample(self.bundle, [prompts[i] for i in idx], num_steps=self.num_steps,
                                   guidance_scale=self.guidance_scale, seeds=[seeds[i] for i in idx],
                                   partial_prompts=[str(batch["partial_prompt"][i]) for i in idx] if compose else None,
                                   partial_guidance_scale=self.class_guidance_scale)

        imgs = resize_uint8(imgs, self.size)  # the dataset's size, whatever the model's resolution
        emb = self.clip.encode_images(imgs).astype(np.float32)
        pixels = [np.ascontiguousarray(img, dtype=np.uint8).tobytes() for img in imgs]
        ids = [str(r) for r in batch["row_id"]]
        tbl = pa.table({"id": ids, "label": pa.array(batch["y"], pa.int64()), "bias": pa.array(batch["a"], pa.int64()),
                        "transferred": pa.array(batch["transferred"], pa.bool_()), "pixels": pixels,
                        "embedding": pa.array(list(emb), pa.list_(pa.float32(), emb.shape[1])),
                        "cluster": pa.array(batch["cluster"], pa.int64()), "adapter": [a or "" for a in adapters],
                        "prompt": [str(p) for p in batch["prompt"]], "seed": pa.array(batch["seed"], pa.int64())})
        atomic_write_table(self.out_dir / f"part-{chunk_name(ids)}.parquet", tbl)


def plan_chunks(rows: list[dict], batch_size: int) -> list[list[dict]]:
    """The plan cut into chunks of ``batch_size`` rows, the rows of one adapter together (a chunk switches
    adapters rarely), in a fixed order: the same plan gives the same chunks, run after run."""
    rows = sorted(rows, key=lambda r: (r["adapter"] or "", r["row_id"]))
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def run_generate(ctx, variant: str):
    import ray

    cfg = ctx.cfg
    info = ctx.data_info
    out = ctx.stage_dir(f"generate/{variant}")
    # Row files live under the node's key: a rerun with the same inputs resumes them; new adapters or sampling
    # settings start a fresh directory instead of reusing stale images.
    rows_dir = out / "rows" / (getattr(ctx, "node_key", None) or "adhoc")[:16]
    rows_dir.mkdir(parents=True, exist_ok=True)
    units = [Unit(**u) for u in json.loads((ctx.run_dir / "stages" / "finetune" / variant / "units.json").read_text())] \
        if variant != "vanilla" else []
    tr = pq.read_table(str(ctx.run_dir / "stages" / "data" / "train.parquet"), columns=["label", "bias"])
    rows = plan_rows(variant, units, tr.column("label").to_numpy(), np.maximum(tr.column("bias").to_numpy(), 0),
                     info["class_names"], info["bias_names"] or ["any"], cfg.data.prompt_template,
                     cfg.finetune.identifier, cfg.generate.images_per_group, cfg.seed)
    chunks = plan_chunks([r.as_dict() for r in rows], cfg.generate.batch_size)
    names = [chunk_name([r["row_id"] for r in c]) for c in chunks]
    todo = [(n, c) for n, c in zip(names, chunks) if not (rows_dir / f"part-{n}.parquet").exists()]
    n_todo = sum(len(c) for _, c in todo)
    ctx.log(f"[generate/{variant}] {len(rows)} rows planned ({cfg.generate.images_per_group} per group), "
            f"{len(rows) - n_todo} already generated, {n_todo} to go")
    if todo:
        ctx.ensure_ray()
        items = [{"chunk": n, "rows": json.dumps([{**r, "adapter": r["adapter"] or ""} for r in c])} for n, c in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        res = ds.map_batches(
            GenerateBatch,
            fn_constructor_args=(str(ctx.run_dir), variant, cfg.generate.num_steps, cfg.generate.guidance_scale,
                                 str(rows_dir), cfg.generate.class_guidance_scale, cfg.generate.mixed_adapters),
            batch_size=1,
            batch_format="numpy",
            # a fixed pool: every actor starts at once (an autoscaling pool from 1 ran most of a short stage on one
            # actor; BENCHMARKS.md, "Many LoRA adapters")
            compute=ray.data.ActorPoolStrategy(size=max(1, min(cfg.generate.num_actors, len(items)))),
            num_cpus=cfg.generate.cpus_per_actor,
            num_gpus=cfg.ray.num_gpus_per_worker or None,
        )
        n = sum(len(b["chunk"]) for b in res.iter_batches(batch_format="numpy"))
        ctx.log(f"[generate/{variant}] generated {n} chunks")
    # the stage's output: exactly the planned rows, each once, in plan order (footers only are read here)
    parts = [rows_dir / f"part-{n}.parquet" for n in names]
    missing = [p.name for p, c in zip(parts, chunks) if not p.exists() or pq.ParquetFile(str(p)).metadata.num_rows != len(c)]
    if missing:
        raise RuntimeError(f"generate/{variant}: {len(missing)} chunks missing or incomplete, e.g. {missing[:3]}")
    link_parts(parts, out / "synthetic.parquet")
    atomic_write_json(out / "plan.json", {"rows": len(rows), "transferred_groups": len({(r.y, r.a) for r in rows if r.transferred}),
                                          "adapters": len(units)})
    return StageResult([ctx.rel(out / "synthetic.parquet"), ctx.rel(out / "plan.json")],
                       {"rows": len(rows), "generated_now": n_todo})
