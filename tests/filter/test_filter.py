import numpy as np

from raydebias.filter.clip_score import clip_scores, top_q
from raydebias.filter.dedup import max_similarity


def unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_clip_score_golden():
    img = unit([[1, 0], [0, 1], [1, 1]])
    labels = np.array([0, 0, 1])
    label_emb = unit([[1, 0], [0, 1]])
    groups = np.array([0, 0, 5])
    centroids = {0: np.array([0.0, 2.0])}  # normalised inside → (0, 1)
    s = clip_scores(img, groups, label_emb, labels, centroids, alpha=0.25)
    # img0: label cos 1, centroid cos 0 → 0.25; img1: label 0, centroid 1 → 0.75; img2: group 5 has no centroid → α=1
    np.testing.assert_allclose(s, [0.25, 0.75, np.sqrt(0.5)], rtol=1e-6)


def test_top_q_per_group():
    scores = np.array([0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.7])
    groups = np.array([0, 0, 0, 0, 1, 1, 1])
    keep = top_q(scores, groups, 0.5)
    assert keep.tolist() == [False, True, True, False, True, False, True]  # ceil(0.5·4)=2, ceil(0.5·3)=2


def test_max_similarity_matches_brute_force():
    rng = np.random.default_rng(0)
    q, c = unit(rng.normal(size=(20, 6))), unit(rng.normal(size=(50, 6)))
    np.testing.assert_allclose(max_similarity(q, c), (q @ c.T).max(1), rtol=1e-5)
    assert max_similarity(c[:3], c)[0] > 0.9999  # an exact copy of a real image is caught
