"""``cluster`` stage: per-(y, a) k-means of the CLIP embeddings; cluster sizes go to the report.

The embeddings never reach the driver: a Ray Data ``groupby`` brings each group's rows to one task
(:func:`_cluster_group`), which clusters them; the driver reads the labels to size the groups and gets back
``id``, ``group`` and ``cluster`` per row."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydebias._internal.io import atomic_path, atomic_write_json
from raydebias.cluster.kmeans import k_rule, kmeans
from raydebias.core import StageResult
from raydebias.data.stream import parquet_parts
from raydebias.evaluate.metrics import group_ids


def _groups(t: pa.Table, num_bias: int) -> np.ndarray:
    """Each row's group, label × num_bias + bias (an unknown bias counts as 0)."""
    return group_ids(t.column("label").to_numpy(), np.maximum(t.column("bias").to_numpy(), 0), num_bias)


def _with_group(t: pa.Table, num_bias: int) -> pa.Table:
    """``id``, ``embedding`` and the row's ``group`` (:func:`_groups`)."""
    return t.select(["id", "embedding"]).append_column("group", pa.array(_groups(t, num_bias), pa.int64()))


def _cluster_group(t: pa.Table, k: int, min_images: int, seed: int, niter: int) -> pa.Table:
    """Ray Data ``map_groups`` UDF: one group's rows → their cluster ids (:func:`kmeans`; one cluster for a group
    smaller than ``min_images`` or k = 1). Rows are sorted by id first, so the clusters do not depend on the order
    the shuffle delivered them in."""
    t = t.sort_by("id")
    n = t.num_rows
    g = int(t.column("group")[0].as_py())
    clusters = np.zeros(n, np.int64)
    if n >= min_images and k > 1:
        emb = t.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(n, -1)
        clusters = kmeans(emb.astype(np.float32), min(k, n // 2 or 1), seed=seed + g, niter=niter)
    return pa.table({"id": t.column("id"), "group": t.column("group"), "cluster": pa.array(clusters, pa.int64())})


def run_cluster(ctx):
    import ray
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    cfg = ctx.cfg
    info = ctx.data_info
    ctx.ensure_ray()
    out = ctx.stage_dir("cluster")
    B = info["num_bias"] or 1
    parts = parquet_parts(ctx.run_dir / "stages" / "embed" / "train.parquet")
    groups = _groups(pa.concat_tables([pq.read_table(f, columns=["label", "bias"]) for f in parts]), B)
    sizes = {int(g): int(n) for g, n in zip(*np.unique(groups, return_counts=True))}
    k = k_rule(sizes, cfg.cluster.k, cfg.cluster.k_max, cfg.cluster.min_per_cluster, cfg.finetune.min_images)
    data_ctx = DataContext.get_current()
    before = data_ctx.shuffle_strategy
    data_ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED  # tasks, not aggregator actors (ingest)
    try:
        ds = ray.data.read_parquet(parts).select_columns(["id", "label", "bias", "embedding"]).map_batches(
            _with_group, fn_kwargs={"num_bias": B}, batch_format="pyarrow", batch_size=None)
        res = ds.groupby("group").map_groups(
            _cluster_group, fn_kwargs={"k": k, "min_images": cfg.finetune.min_images, "seed": cfg.seed,
                                       "niter": cfg.cluster.niter}, batch_format="pyarrow")
        tbl = pa.concat_tables(list(res.iter_batches(batch_format="pyarrow", batch_size=None)))
    finally:
        data_ctx.shuffle_strategy = before
    if tbl.num_rows != len(groups):
        raise RuntimeError(f"cluster: {tbl.num_rows} rows clustered, the embeddings have {len(groups)}")
    tbl = tbl.sort_by("id")
    with atomic_path(out / "assignments.parquet") as tmp:
        pq.write_table(tbl, tmp)
    g, c = tbl.column("group").to_numpy(), tbl.column("cluster").to_numpy()
    table = {str(x): np.bincount(c[g == x]).tolist() for x in sorted(sizes)}
    atomic_write_json(out / "clusters.json", {"k_D": k, "group_sizes": sizes, "cluster_sizes": table})
    ctx.log(f"[cluster] k_D = {k}; groups with their own model: "
            f"{sum(n >= cfg.finetune.min_images for n in sizes.values())} of {len(sizes)}")
    return StageResult([ctx.rel(out / "assignments.parquet"), ctx.rel(out / "clusters.json")], {"k_D": k})
