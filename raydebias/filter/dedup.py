"""Memorization guard: drop synthetic images that are near-duplicates of real training images (faiss)."""

from __future__ import annotations

import numpy as np


def flat_index(corpus: np.ndarray):
    """An exact inner-product faiss index of the (L2-normalised) corpus rows."""
    import faiss

    index = faiss.IndexFlatIP(corpus.shape[1])
    index.add(np.ascontiguousarray(corpus, dtype=np.float32))
    return index


def max_similarity(queries: np.ndarray, corpus: np.ndarray, index=None) -> np.ndarray:
    """Highest cosine similarity of each (L2-normalised) query to the corpus (exact inner-product search);
    ``index``: the corpus's :func:`flat_index`, when it is already built."""
    index = flat_index(corpus) if index is None else index
    sims, _ = index.search(np.ascontiguousarray(queries, dtype=np.float32), 1)
    return sims[:, 0]


def self_similarity(corpus: np.ndarray) -> np.ndarray:
    """Each (L2-normalised) corpus row's cosine similarity to its nearest *other* row."""
    if len(corpus) < 2:
        return np.zeros(len(corpus), np.float32)
    x = np.ascontiguousarray(corpus, dtype=np.float32)
    sims, ids = flat_index(x).search(x, 2)
    # the row itself is normally the first hit; with exact duplicates it may come second
    return np.where(ids[:, 0] == np.arange(len(x)), sims[:, 1], sims[:, 0])


def duplicate_threshold(threshold: float, real_self_sim: np.ndarray, quantile: float) -> float:
    """The similarity above which a synthetic image counts as a copy of a real one: ``threshold``, raised to the
    ``quantile`` of how close distinct real images are to each other. An embedding that cannot tell real images
    apart (a tiny bootstrap CLIP on a few captions puts them all within 1e-4) otherwise flags every image."""
    if len(real_self_sim) == 0:
        return float(threshold)
    return float(max(threshold, np.quantile(real_self_sim, quantile)))
