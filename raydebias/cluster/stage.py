"""``cluster`` stage: per-(y, a) k-means of the CLIP embeddings; cluster sizes go to the report."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydebias._internal.io import atomic_path, atomic_write_json
from raydebias.cluster.kmeans import cluster_groups, k_rule
from raydebias.embed.stage import load_embeddings


def run_cluster(ctx):
    from raydebias.core import StageResult

    cfg = ctx.cfg
    info = ctx.data_info
    out = ctx.stage_dir("cluster")
    e = load_embeddings(ctx.run_dir)
    B = info["num_bias"] or 1
    groups = e["y"] * B + np.maximum(e["a"], 0)
    sizes = {int(g): int(n) for g, n in zip(*np.unique(groups, return_counts=True))}
    k = k_rule(sizes, cfg.cluster.k, cfg.cluster.k_max, cfg.cluster.min_per_cluster, cfg.finetune.min_images)
    clusters = cluster_groups(e["emb"], groups, k, cfg.finetune.min_images, seed=cfg.seed, niter=cfg.cluster.niter)
    tbl = pa.table({"id": e["id"].tolist(), "group": groups, "cluster": clusters})
    with atomic_path(out / "assignments.parquet") as tmp:
        pq.write_table(tbl, tmp)
    table = {str(g): np.bincount(clusters[groups == g]).tolist() for g in sorted(sizes)}
    atomic_write_json(out / "clusters.json", {"k_D": k, "group_sizes": sizes, "cluster_sizes": table})
    ctx.log(f"[cluster] k_D = {k}; groups with their own model: "
            f"{sum(n >= cfg.finetune.min_images for n in sizes.values())} of {len(sizes)}")
    return StageResult([ctx.rel(out / "assignments.parquet"), ctx.rel(out / "clusters.json")], {"k_D": k})
