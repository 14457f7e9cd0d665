"""``clip`` stage (load pretrained CLIP or train the bootstrap one) and ``embed`` stage (CLIP image embeddings of
the train split through a Ray Data actor pool, written to Parquet)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydebias._internal.io import (
    as_path,
    atomic_path,
    atomic_write_json,
    atomic_write_table,
    local_weights_fingerprint,
    remove_path,
    replace_path,
)
from raydebias.config import ClipModelConfig, RunConfig
from raydebias.core import StageResult
from raydebias.data.stream import PartSet, buffer_rows, count_rows, parquet_parts, stream_epoch
from raydebias.data.transforms import pixels_from_column
from raydebias.models.clip import ClipEncoder, captions_for, create_clip, train_bootstrap_clip


def clip_key(cfg: RunConfig):
    return {"clip": cfg.models.clip.model_dump(), "source": cfg.models.source, "train": cfg.clip.model_dump(),
            "template": cfg.data.prompt_template, "seed": cfg.seed,
            "weights": local_weights_fingerprint(cfg.models.clip.pretrained)}


def load_clip(run_dir: Path):
    """The run's CLIP encoder (bootstrap weights from the run dir, or the configured pretrained model)."""
    d = as_path(run_dir) / "stages" / "clip"
    spec = json.loads((d / "clip.json").read_text())
    if spec["source"] == "bootstrap":
        return ClipEncoder.load(d / "model")
    return create_clip(ClipModelConfig(**spec["config"]), "pretrained", spec["image_size"])


def part_batches(files: list[str], image_size: int, buffer_rows: int, seed: int) -> Callable[[int], Iterator]:
    """A batch source for :func:`train_bootstrap_clip` that streams the Parquet parts ``files``: epoch after epoch,
    each row once per epoch, shuffled through a buffer of ``buffer_rows`` rows (``data/stream.py``); a last
    batch smaller than the batch size is dropped (the in-memory sampler starts a new permutation there too)."""
    data = PartSet.open(files, bias=False)

    def batches(batch_size: int) -> Iterator:
        for epoch in itertools.count():
            for idx, x in stream_epoch(data, np.ones(len(data.y), np.int64), image_size, batch_size,
                                       buffer_rows, [seed, epoch]):
                if len(idx) == batch_size:
                    yield idx, x

    return batches


def train_clip_task(run_dir: str, cfg_json: str, info: dict, out: str) -> dict:
    """Ray task: the bootstrap CLIP trained on the train split's (image, caption) pairs, streamed from its
    Parquet parts; saved under ``out``. Captions are made from the labels, the only columns read whole."""
    import torch

    torch.set_num_threads(1)  # measured: 1 thread beats 2 for this tiny model on a loaded 2-core machine
    cfg = RunConfig.model_validate_json(cfg_json)
    files = parquet_parts(as_path(run_dir) / "stages" / "data" / "train.parquet")
    labels = PartSet.open(files)
    caps = captions_for(labels.y, labels.a if info["num_bias"] is not None else None, info["class_names"],
                        info["bias_names"], cfg.data.prompt_template)
    source = part_batches(files, info["image_size"], buffer_rows(cfg.train.shuffle_buffer_mb, info["image_size"]),
                          cfg.seed)
    enc = create_clip(cfg.models.clip, "bootstrap", info["image_size"])
    summary = train_bootstrap_clip(enc, source, caps, steps=cfg.clip.steps, batch_size=cfg.clip.batch_size,
                                   lr=cfg.clip.lr, seed=cfg.seed, log=print)
    with atomic_path(out) as tmp:
        enc.save(tmp)
    return summary


def run_clip(ctx):
    import ray

    cfg = ctx.cfg
    info = ctx.data_info
    out = ctx.stage_dir("clip")
    spec = {"source": cfg.models.source, "config": cfg.models.clip.model_dump(), "image_size": info["image_size"]}
    outputs = [ctx.rel(out / "clip.json")]
    summary = {}
    if cfg.models.source == "bootstrap":
        ctx.ensure_ray()
        task = ray.remote(num_cpus=1, num_gpus=cfg.ray.num_gpus_per_worker or 0)(train_clip_task)
        summary = ray.get(task.remote(str(ctx.run_dir), cfg.model_dump_json(), info, str(out / "model")))
        outputs.append(ctx.rel(out / "model"))
        ctx.log(f"[clip] bootstrap CLIP trained: {summary}")
    atomic_write_json(out / "clip.json", spec)
    return StageResult(outputs, summary)


class EmbedImages:
    """Ray Data UDF (actors): one CLIP model per actor. Each call embeds whole Parquet parts of the train split
    ``batch_size`` images at a time and writes each as the part of the same name under ``out_dir`` (``id``,
    ``label``, ``bias``, L2-normalised ``embedding``, in the part's row order); returns the rows written. A retried
    call rewrites its own parts, so every train row is embedded exactly once."""

    def __init__(self, run_dir: str, image_size: int, batch_size: int, out_dir: str):
        import torch

        torch.set_num_threads(1)
        self.encoder = load_clip(as_path(run_dir))
        self.size, self.batch_size, self.out = image_size, batch_size, as_path(out_dir)

    def __call__(self, batch: dict) -> dict:
        rows = []
        for part in batch["part"]:
            t = pq.read_table(str(part), columns=["id", "label", "bias", "pixels"])
            pixels = t.column("pixels")
            emb = [self.encoder.encode_images(pixels_from_column(pixels.slice(i, self.batch_size).to_pylist(),
                                                                 self.size)).astype(np.float32)
                   for i in range(0, t.num_rows, self.batch_size)]
            emb = np.concatenate(emb) if emb else np.zeros((0, 1), np.float32)
            atomic_write_table(self.out / as_path(part).name, pa.table({
                "id": t.column("id"), "label": t.column("label"), "bias": t.column("bias"),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])}))
            rows.append(t.num_rows)
        return {"rows": np.asarray(rows, np.int64)}


def run_embed(ctx):
    """CLIP embeddings of the train split, computed by a Ray Data pool of :class:`EmbedImages` actors (on a GPU
    when ``ray.num_gpus_per_worker``) that write them part by part: ``embed/train.parquet`` is a folder of parts
    named and ordered as the data stage's, and the driver only counts rows."""
    import uuid

    import ray

    cfg, info = ctx.cfg, ctx.data_info
    ctx.ensure_ray()
    out = ctx.stage_dir("embed")
    parts = parquet_parts(ctx.run_dir / "stages" / "data" / "train.parquet")
    tmp = out / f".train.parquet.{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        written = ray.data.from_items([{"part": p} for p in parts]).map_batches(
            EmbedImages,
            fn_constructor_args=(str(ctx.run_dir), info["image_size"], cfg.embed.batch_size, str(tmp)),
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.embed.num_actors),
            num_cpus=cfg.embed.cpus_per_actor,
            num_gpus=cfg.ray.num_gpus_per_worker or None,
        )
        n = sum(int(b["rows"].sum()) for b in written.iter_batches(batch_format="numpy", batch_size=None))
        want = count_rows(parts)
        if n != want:
            raise RuntimeError(f"embed: {n} rows embedded, the train split has {want}")
        replace_path(tmp, out / "train.parquet")
    finally:
        remove_path(tmp)
    emb = parquet_parts(out / "train.parquet")
    dim = pq.read_schema(emb[0]).field("embedding").type.list_size if emb else 0
    ctx.log(f"[embed] {n} train images → {dim}-d CLIP embeddings")
    return StageResult([ctx.rel(out / "train.parquet")], {"rows": n, "dim": dim})


def load_embeddings(run_dir: Path) -> dict[str, np.ndarray]:
    """The embed stage's output as arrays, in the train split's row order."""
    t = pa.concat_tables([pq.read_table(f) for f in
                          parquet_parts(as_path(run_dir) / "stages" / "embed" / "train.parquet")])
    return {"id": np.asarray(t.column("id").to_pylist(), dtype=object),
            "y": t.column("label").to_numpy(), "a": t.column("bias").to_numpy(),
            "emb": np.stack(t.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)}
