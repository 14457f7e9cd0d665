"""Memorization guard: drop synthetic images that are near-duplicates of real training images (faiss)."""

from __future__ import annotations

import numpy as np


def max_similarity(queries: np.ndarray, corpus: np.ndarray) -> np.ndarray:
    """Highest cosine similarity of each (L2-normalised) query to the corpus (exact inner-product search)."""
    import faiss

    index = faiss.IndexFlatIP(corpus.shape[1])
    index.add(np.ascontiguousarray(corpus, dtype=np.float32))
    sims, _ = index.search(np.ascontiguousarray(queries, dtype=np.float32), 1)
    return sims[:, 0]
