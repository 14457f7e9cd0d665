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

from raydebias._internal.io import as_path, atomic_path, atomic_write_json
from raydebias.config import RunConfig


def clip_key(cfg: RunConfig):
    from raydebias._internal.io import local_weights_fingerprint

    return {"clip": cfg.models.clip.model_dump(), "source": cfg.models.source, "train": cfg.clip.model_dump(),
            "template": cfg.data.prompt_template, "seed": cfg.seed,
            "weights": local_weights_fingerprint(cfg.models.clip.pretrained)}


def load_clip(run_dir: Path):
    """The run's CLIP encoder (bootstrap weights from the run dir, or the configured pretrained model)."""
    from raydebias.config import ClipModelConfig
    from raydebias.models.clip import ClipEncoder, create_clip

    d = as_path(run_dir) / "stages" / "clip"
    spec = json.loads((d / "clip.json").read_text())
    if spec["source"] == "bootstrap":
        return ClipEncoder.load(d / "model")
    return create_clip(ClipModelConfig(**spec["config"]), "pretrained", spec["image_size"])


def part_batches(files: list[str], image_size: int, buffer_rows: int, seed: int) -> Callable[[int], Iterator]:
    """A batch source for :func:`train_bootstrap_clip` that streams the Parquet parts ``files``: epoch after epoch,
    each row once per epoch, shuffled through a buffer of ``buffer_rows`` rows (``data/stream.py``); a last
    batch smaller than the batch size is dropped (the in-memory sampler starts a new permutation there too)."""
    from raydebias.data.stream import PartSet, stream_epoch

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

    from raydebias.data.stream import PartSet, buffer_rows, parquet_parts
    from raydebias.models.clip import captions_for, create_clip, train_bootstrap_clip

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

    from raydebias.core import StageResult

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
    """Ray Data UDF: one CLIP model per actor; a batch of decoded images → L2-normalised embeddings."""

    def __init__(self, run_dir: str, image_size: int):
        import torch

        torch.set_num_threads(1)
        self.encoder = load_clip(as_path(run_dir))
        self.size = image_size

    def __call__(self, batch: dict) -> dict:
        from raydebias.data.transforms import pixels_from_column

        x = pixels_from_column(list(batch["pixels"]), self.size)
        emb = self.encoder.encode_images(x)
        return {"id": batch["id"], "label": batch["label"], "bias": batch["bias"],
                "embedding": [e.astype(np.float32) for e in emb]}


def run_embed(ctx):
    """CLIP embeddings of the train split, computed by a Ray Data pool of :class:`EmbedImages` actors (on a GPU
    when ``ray.num_gpus_per_worker``), never on the driver; the input is split into enough blocks to keep every
    actor busy."""
    import ray

    from raydebias._internal.rows import exact_rows
    from raydebias.core import StageResult

    cfg, info = ctx.cfg, ctx.data_info
    ctx.ensure_ray()
    out = ctx.stage_dir("embed")
    path = ctx.run_dir / "stages" / "data" / "train.parquet"
    ids = pq.read_table(str(path), columns=["id"]).column("id").to_pylist()
    ds = ray.data.read_parquet(str(path))
    blocks = min(-(-len(ids) // cfg.embed.batch_size), 4 * cfg.embed.num_actors)
    if blocks > 1:
        ds = ds.repartition(blocks)
    emb = ds.map_batches(
        EmbedImages,
        fn_constructor_args=(str(ctx.run_dir), info["image_size"]),
        batch_size=cfg.embed.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.embed.num_actors),
        num_cpus=cfg.embed.cpus_per_actor,
        num_gpus=cfg.ray.num_gpus_per_worker or None,
    )
    tables = [pa.Table.from_pandas(b, preserve_index=False) for b in emb.iter_batches(batch_format="pandas")]
    # Exactly the train rows, each once, in id order: a retried block (a killed actor) may add copies, and Ray
    # Data's output order varies from run to run, which would change the k-means that reads this file.
    tbl = pa.concat_tables(tables).sort_by("id")
    keep, repaired = exact_rows(np.asarray(tbl.column("id").to_pylist(), dtype=object), set(map(str, ids)))
    if repaired["duplicates"] or repaired["extra"]:
        ctx.log(f"[embed] dropped {repaired['duplicates']} duplicated and {repaired['extra']} unknown rows")
    tbl = tbl.take(pa.array(keep))
    dim = len(tbl.column("embedding")[0].as_py())
    tbl = tbl.set_column(tbl.schema.get_field_index("embedding"), "embedding",
                         pa.array([np.asarray(e, np.float32) for e in tbl.column("embedding").to_pylist()],
                                  pa.list_(pa.float32(), dim)))
    with atomic_path(out / "train.parquet") as tmp:
        pq.write_table(tbl, tmp)
    ctx.log(f"[embed] {tbl.num_rows} train images → {dim}-d CLIP embeddings")
    return StageResult([ctx.rel(out / "train.parquet")], {"rows": tbl.num_rows, "dim": dim, **repaired})


def load_embeddings(run_dir: Path) -> dict[str, np.ndarray]:
    t = pq.read_table(str(as_path(run_dir) / "stages" / "embed" / "train.parquet"))
    return {"id": np.asarray(t.column("id").to_pylist(), dtype=object),
            "y": t.column("label").to_numpy(), "a": t.column("bias").to_numpy(),
            "emb": np.stack(t.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)}
