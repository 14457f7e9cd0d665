"""CLIP-Score = α·CLIP-Label + (1−α)·CLIP-Centroid, top-q per group (docs/methods/clustered_dreambooth.md)."""

from __future__ import annotations

import numpy as np

from raydebias.generate.plan import describe


def clip_scores(img_emb: np.ndarray, groups: np.ndarray, label_emb: np.ndarray, labels: np.ndarray,
                centroids: dict[int, np.ndarray], alpha: float) -> np.ndarray:
    """Per synthetic image: α·cos(img, text(label)) + (1−α)·cos(img, centroid of its real group).

    Groups without a centroid (too few real images) use α = 1. Inputs are L2-normalised."""
    label_term = np.sum(img_emb * label_emb[labels], axis=1)
    out = label_term.copy()
    for g, c in centroids.items():
        m = groups == g
        if m.any():
            cn = c / max(np.linalg.norm(c), 1e-12)
            out[m] = alpha * label_term[m] + (1 - alpha) * (img_emb[m] @ cn)
    return out


def label_targets(template: str, class_names: list[str], bias_names: list[str] | None, y: np.ndarray,
                  a: np.ndarray) -> tuple[list[str], np.ndarray]:
    """CLIP-Label's texts and each image's row among them. The paper scores "a photo of a {class}": one text per
    class, index y. A ``template`` with ``{bias}`` (and a bias target for every image) gives one text per
    (class, bias) group, index y·B + a: the image is scored against the description of the group it was generated
    for, so the filter also checks the bias value the group asked for (BENCHMARKS.md, "Generation fidelity:
    findings")."""
    y, a = np.asarray(y, np.int64), np.asarray(a, np.int64)
    if not scores_groups(template, bias_names, a):
        return [describe(template, c, None) for c in class_names], y
    B = len(bias_names)
    return [describe(template, c, b) for c in class_names for b in bias_names], y * B + a


def scores_groups(template: str, bias_names: list[str] | None, a: np.ndarray) -> bool:
    """Whether :func:`label_targets` scores against group descriptions (index y·B + a) rather than class ones (y)."""
    a = np.asarray(a)
    return "{bias}" in template and bool(bias_names) and len(a) > 0 and not (a < 0).any()


def bias_match(img_emb: np.ndarray, text_emb: np.ndarray, y: np.ndarray, a: np.ndarray, num_bias: int) -> np.ndarray:
    """Zero-shot bias check: True where the image is closest, among its class's group descriptions
    (``text_emb`` row y·B + b, as :func:`label_targets` builds them), to the one its group asked for (``a``).
    Images without a bias target (a < 0) pass. Inputs are L2-normalised."""
    y, a = np.asarray(y, np.int64), np.asarray(a, np.int64)
    ok = np.ones(len(y), dtype=bool)
    known = a >= 0
    if known.any():
        rows = y[known, None] * num_bias + np.arange(num_bias)[None, :]  # (n, B): the class's B descriptions
        sims = np.einsum("nd,nbd->nb", img_emb[known], text_emb[rows])
        ok[known] = sims.argmax(1) == a[known]
    return ok


def top_q(scores: np.ndarray, groups: np.ndarray, keep: float) -> np.ndarray:
    """Boolean mask keeping the ceil(keep·n_g) best-scoring images of every group."""
    mask = np.zeros(len(scores), dtype=bool)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        k = int(np.ceil(keep * len(idx)))
        mask[idx[np.argsort(-scores[idx], kind="stable")[:k]]] = True
    return mask
