import numpy as np

from raydebias.filter.clip_score import bias_match, clip_scores, label_targets, top_q
from raydebias.filter.dedup import duplicate_threshold, max_similarity, self_similarity


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


def test_label_targets_class_prompt_or_group_prompt():
    y, a = np.array([0, 1, 1]), np.array([1, 0, 1])
    texts, idx = label_targets("a photo of a {class}", ["zero", "one"], ["red", "blue"], y, a)
    assert texts == ["a photo of a zero", "a photo of a one"] and idx.tolist() == [0, 1, 1]  # the paper's
    texts, idx = label_targets("a photo of a {bias} {class}", ["zero", "one"], ["red", "blue"], y, a)
    assert [texts[i] for i in idx] == ["a photo of a blue zero", "a photo of a red one", "a photo of a blue one"]
    # no bias names, or an image without a bias target: class texts (the {bias} word dropped)
    for names, aa in ((None, a), (["red", "blue"], np.array([1, -1, 0]))):
        texts, idx = label_targets("a photo of a {bias} {class}", ["zero", "one"], names, y, aa)
        assert texts == ["a photo of a zero", "a photo of a one"] and idx.tolist() == [0, 1, 1]


def test_group_prompt_ranks_the_asked_bias_first():
    """Two images generated for (class 0, blue): the one whose embedding matches "blue zero" is kept by the group
    prompt; the class prompt cannot tell them apart (both match "zero" equally)."""
    texts, idx = label_targets("a photo of a {bias} {class}", ["zero"], ["red", "blue"], np.array([0, 0]),
                               np.array([1, 1]))
    assert texts == ["a photo of a red zero", "a photo of a blue zero"] and idx.tolist() == [1, 1]
    text_emb = unit([[1, 1, 0], [1, 0, 1]])
    img = unit([[1, 1, 0], [1, 0, 1]])  # image 0 shows red, image 1 shows blue
    groups = np.array([1, 1])
    keep = top_q(clip_scores(img, groups, text_emb, idx, {}, alpha=1.0), groups, 0.5)
    assert keep.tolist() == [False, True]
    class_emb = unit([[1, 0, 0]])
    s = clip_scores(img, groups, class_emb, np.array([0, 0]), {}, alpha=1.0)
    assert s[0] == s[1]


def test_bias_match_compares_only_the_asked_class_descriptions():
    """Texts y·B + b for 2 classes × 2 bias values. An image passes when, among its own class's two descriptions,
    the one of its asked bias value is the closer; the other class's texts never count; no target (−1) passes."""
    text_emb = unit([[1, 0, 0, 0], [0, 1, 0, 0],   # zero/red, zero/blue
                     [0, 0, 1, 0], [0, 0, 0, 1]])  # one/red, one/blue
    img = unit([[0.9, 0.1, 0, 0],   # class 0 asked blue: looks red → fails
                [0.1, 0.9, 0, 0],   # class 0 asked blue: looks blue → passes
                [0, 0.9, 0.1, 0],   # class 1 asked red: nearest text overall is zero/blue, among class 1's red → passes
                [0.5, 0, 0.1, 0.4],  # class 1 asked red: nearest overall zero/red, but among class 1's texts blue wins → fails
                [0, 0, 0, 1]])      # no bias target
    y, a = np.array([0, 0, 1, 1, 1]), np.array([1, 1, 0, 0, -1])
    assert bias_match(img, text_emb, y, a, num_bias=2).tolist() == [False, True, True, False, True]
    # the oracle: argmax over the class's rows of the full similarity matrix
    rng = np.random.default_rng(0)
    img, text_emb = unit(rng.normal(size=(40, 8))), unit(rng.normal(size=(3 * 4, 8)))
    y, a = rng.integers(0, 3, 40), rng.integers(0, 4, 40)
    sims = (img @ text_emb.T).reshape(40, 3, 4)[np.arange(40), y]
    assert bias_match(img, text_emb, y, a, num_bias=4).tolist() == (sims.argmax(1) == a).tolist()


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


def _unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_self_similarity_is_leave_one_out_and_matches_brute_force():
    rng = np.random.default_rng(1)
    x = _unit(rng.normal(size=(40, 8)))
    x[7] = x[3]  # an exact duplicate pair: each is the other's nearest neighbour at similarity 1
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    np.testing.assert_allclose(self_similarity(x), sims.max(1), atol=1e-5)
    assert abs(self_similarity(x)[3] - 1.0) < 1e-5 and self_similarity(x[:1]).tolist() == [0.0]


def test_duplicate_threshold_rises_with_a_collapsed_embedding():
    rng = np.random.default_rng(0)
    spread = _unit(rng.normal(size=(200, 16)))
    # distinct images far apart: the configured threshold stands
    assert duplicate_threshold(0.98, self_similarity(spread), 0.5) == 0.98
    # every real image within ~1e-4 of the others (a collapsed tiny CLIP): the threshold rises above 0.98 ...
    collapsed = _unit(np.ones((200, 16)) + 1e-3 * rng.normal(size=(200, 16)))
    real_nn = self_similarity(collapsed)
    t = duplicate_threshold(0.98, real_nn, 0.5)
    assert t == float(np.quantile(real_nn, 0.5)) > 0.98
    # ... so that synthetic images as close to the real set as real images are to each other are not all copies
    synth = _unit(np.ones((100, 16)) + 1e-3 * rng.normal(size=(100, 16)))
    dup = max_similarity(synth, collapsed) >= t
    assert (max_similarity(synth, collapsed) >= 0.98).all() and 0 < dup.mean() < 1
    assert duplicate_threshold(0.98, np.zeros(0), 0.5) == 0.98
