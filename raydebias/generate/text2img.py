"""``generate`` stage: M images per (y, a) group from the fine-tuned adapters (or the base model), as a Ray Data
actor pool over prompt batches. Each actor loads the base model once and switches adapters without reloading.
Every batch is written atomically as its own Parquet file keyed by its row ids, so a killed run resumes by
generating exactly the missing rows (no duplicates)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydebias._internal.io import atomic_path, atomic_write_json
from raydebias._internal.rows import exact_rows
from raydebias.generate.plan import plan_rows

ROW_SCHEMA = pa.schema([("row_id", pa.string()), ("label", pa.int64()), ("bias", pa.int64()),
                        ("cluster", pa.int64()), ("adapter", pa.string()), ("prompt", pa.string()),
                        ("seed", pa.int64()), ("transferred", pa.bool_()), ("pixels", pa.binary()),
                        ("embedding", pa.list_(pa.float32()))])


class GenerateBatch:
    """Ray Data UDF: one base model per actor; adapters loaded on first use and switched per row group. Each
    image is also encoded by the run's CLIP here, where the accelerator is, so the filter reads its embeddings
    instead of encoding every synthetic image again on the driver."""

    def __init__(self, run_dir: str, variant: str, num_steps: int, guidance_scale: float, out_dir: str,
                 class_guidance_scale: float | None = None, mixed: bool = True):
        import torch

        from raydebias.diffusion.base import load_base
        from raydebias.embed.stage import load_clip

        torch.set_num_threads(1)
        self.run_dir, self.variant, self.out_dir = Path(run_dir), variant, Path(out_dir)
        self.bundle = load_base(self.run_dir)
        self.clip = load_clip(self.run_dir)
        self.size = json.loads((self.run_dir / "stages" / "data" / "info.json").read_text())["image_size"]
        self.loaded: set[str] = set()
        self.num_steps, self.guidance_scale = num_steps, guidance_scale
        self.class_guidance_scale = class_guidance_scale
        self.mixed = mixed

    def _load(self, adapter: str) -> None:
        """Attach ``adapter`` once per actor (it stays attached; later batches only switch or route to it)."""
        from raydebias.finetune.dreambooth_lora import load_lora

        if adapter not in self.loaded:
            load_lora(self.bundle, self.run_dir / "stages" / "finetune" / self.variant / adapter, adapter)
            self.loaded.add(adapter)

    def _activate(self, adapter: str | None) -> None:
        from raydebias.finetune.dreambooth_lora import set_active

        if adapter is not None:
            self._load(adapter)
        set_active(self.bundle, None if adapter is None else [adapter])

    def __call__(self, batch: dict) -> dict:
        from raydebias.models.sampling import sample

        n = len(batch["row_id"])
        adapters = [a if a else None for a in batch["adapter"]]
        prompts, seeds = [str(p) for p in batch["prompt"]], [int(s) for s in batch["seed"]]
        compose = self.class_guidance_scale is not None
        if self.mixed and not compose:  # the whole batch in one pass, each row through its own adapter
            from raydebias.finetune.multi_lora import sample_mixed

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
        from raydebias.data.transforms import resize_uint8

        imgs = resize_uint8(imgs, self.size)  # the dataset's size, whatever the model's resolution
        emb = self.clip.encode_images(imgs).astype(np.float32)
        pixels = [np.ascontiguousarray(img, dtype=np.uint8).tobytes() for img in imgs]
        tbl = pa.table({"row_id": [str(r) for r in batch["row_id"]], "label": batch["y"], "bias": batch["a"],
                        "cluster": batch["cluster"], "adapter": [a or "" for a in adapters],
                        "prompt": [str(p) for p in batch["prompt"]], "seed": batch["seed"],
                        "transferred": batch["transferred"], "pixels": pixels, "embedding": list(emb)},
                       schema=ROW_SCHEMA)
        name = hashlib.sha1("\n".join(tbl.column("row_id").to_pylist()).encode()).hexdigest()[:16]
        with atomic_path(self.out_dir / f"part-{name}.parquet") as tmp:
            pq.write_table(tbl, tmp)
        return {"row_id": batch["row_id"]}


def existing_rows(rows_dir: Path) -> set[str]:
    done: set[str] = set()
    for f in sorted(rows_dir.glob("part-*.parquet")):
        done.update(pq.read_table(f, columns=["row_id"]).column("row_id").to_pylist())
    return done


def load_generated(rows_dir: Path, size: int) -> dict[str, np.ndarray]:
    from raydebias.data.transforms import pixels_from_column

    files = sorted(Path(rows_dir).glob("part-*.parquet"))
    t = pa.concat_tables([pq.read_table(f) for f in files]) if files else ROW_SCHEMA.empty_table()
    t = t.sort_by("row_id")
    return {"id": np.asarray(t.column("row_id").to_pylist(), dtype=object),
            "x": pixels_from_column(t.column("pixels").to_pylist(), size),
            "y": t.column("label").to_numpy(), "a": t.column("bias").to_numpy(),
            "transferred": t.column("transferred").to_numpy(),
            "emb": np.asarray(t.column("embedding").to_pylist(), np.float32).reshape(t.num_rows, -1)
            if t.num_rows else np.zeros((0, 0), np.float32)}


def run_generate(ctx, variant: str):
    import ray

    from raydebias.generate.plan import Unit
    from raydebias.core import StageResult

    cfg = ctx.cfg
    info = ctx.data_info
    out = ctx.stage_dir(f"generate/{variant}")
    # Row files live under the node's key: a rerun with the same inputs resumes them; new adapters or sampling
    # settings start a fresh directory instead of reusing stale images.
    rows_dir = out / "rows" / (getattr(ctx, "node_key", None) or "adhoc")[:16]
    rows_dir.mkdir(parents=True, exist_ok=True)
    units = [Unit(**u) for u in json.loads((ctx.run_dir / "stages" / "finetune" / variant / "units.json").read_text())] \
        if variant != "vanilla" else []
    tr = pq.read_table(ctx.run_dir / "stages" / "data" / "train.parquet", columns=["label", "bias"])
    rows = plan_rows(variant, units, tr.column("label").to_numpy(), np.maximum(tr.column("bias").to_numpy(), 0),
                     info["class_names"], info["bias_names"] or ["any"], cfg.data.prompt_template,
                     cfg.finetune.identifier, cfg.generate.images_per_group, cfg.seed)
    planned = {r.row_id for r in rows}
    done = existing_rows(rows_dir) & planned
    todo = [r.as_dict() for r in rows if r.row_id not in done]
    # rows of one adapter together, so that a batch switches adapters rarely
    todo.sort(key=lambda r: (r["adapter"] or "", r["row_id"]))
    ctx.log(f"[generate/{variant}] {len(rows)} rows planned ({cfg.generate.images_per_group} per group), "
            f"{len(done)} already generated, {len(todo)} to go")
    if todo:
        ctx.ensure_ray()
        for r in todo:
            r["adapter"] = r["adapter"] or ""
        ds = ray.data.from_items(todo, override_num_blocks=max(1, len(todo) // cfg.generate.batch_size))
        res = ds.map_batches(
            GenerateBatch,
            fn_constructor_args=(str(ctx.run_dir), variant, cfg.generate.num_steps, cfg.generate.guidance_scale,
                                 str(rows_dir), cfg.generate.class_guidance_scale, cfg.generate.mixed_adapters),
            batch_size=cfg.generate.batch_size,
            batch_format="numpy",
            # a fixed pool: every actor starts at once (an autoscaling pool from 1 ran most of a short stage on one
            # actor; BENCHMARKS.md, "Many LoRA adapters")
            compute=ray.data.ActorPoolStrategy(size=max(1, min(cfg.generate.num_actors,
                                                               -(-len(todo) // cfg.generate.batch_size)))),
            num_cpus=cfg.generate.cpus_per_actor,
            num_gpus=cfg.ray.num_gpus_per_worker or None,
        )
        n = sum(len(b["row_id"]) for b in res.iter_batches(batch_format="numpy"))
        ctx.log(f"[generate/{variant}] generated {n} rows")
    # One canonical file for downstream stages: exactly the planned rows, each once (exact_rows names any missing).
    gen = load_generated(rows_dir, info["image_size"])
    keep, repaired = exact_rows(gen["id"], planned)
    if repaired["duplicates"] or repaired["extra"]:
        ctx.log(f"[generate/{variant}] dropped {repaired['duplicates']} duplicated rows (a retried batch writes its "
                f"rows again: same seeds, same images) and {repaired['extra']} rows not in the plan")
    tbl = pa.table({"id": gen["id"][keep].tolist(), "label": gen["y"][keep], "bias": gen["a"][keep],
                    "transferred": gen["transferred"][keep],
                    "pixels": [x.tobytes() for x in gen["x"][keep]],
                    "embedding": pa.array(list(gen["emb"][keep]), pa.list_(pa.float32(), gen["emb"].shape[1]))})
    with atomic_path(out / "synthetic.parquet") as tmp:
        pq.write_table(tbl, tmp)
    atomic_write_json(out / "plan.json", {"rows": len(rows), "transferred_groups": len({(r.y, r.a) for r in rows if r.transferred}),
                                          "adapters": len(units)})
    return StageResult([ctx.rel(out / "synthetic.parquet"), ctx.rel(out / "plan.json")],
                       {"rows": len(rows), "generated_now": len(todo), **repaired})
