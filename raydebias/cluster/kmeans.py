"""k_D rule and per-group k-means with faiss (Clustered DreamBooth, docs/methods/clustered_dreambooth.md)."""

from __future__ import annotations

import numpy as np


def k_rule(group_sizes: dict[int, int], k: int | str = "auto", k_max: int = 20, min_per_cluster: int = 20,
           min_images: int = 1) -> int:
    """k_D = min(M_gs / min_per_cluster, k_max) with M_gs the smallest group that gets its own model; >= 1."""
    if k != "auto":
        return max(1, int(k))
    sizes = [n for n in group_sizes.values() if n >= min_images]
    if not sizes:
        return 1
    return int(max(1, min(min(sizes) // min_per_cluster, k_max)))


def kmeans(embeddings: np.ndarray, k: int, seed: int = 0, niter: int = 25) -> np.ndarray:
    """Cluster L2-normalised ``embeddings`` into ``min(k, n)`` clusters (spherical k-means, faiss); returns ids.

    Clusters are renumbered by decreasing size so that cluster 0 is the largest (stable across runs)."""
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n = len(x)
    k = max(1, min(k, n))
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, nredo=5, seed=seed, spherical=True, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=max(256, n))
    km.train(x)
    _, assign = km.index.search(x, 1)
    assign = assign[:, 0].astype(np.int64)
    order = np.argsort(-np.bincount(assign, minlength=k), kind="stable")
    remap = np.empty(k, dtype=np.int64)
    remap[order] = np.arange(k)
    return remap[assign]
