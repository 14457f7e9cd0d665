"""Pure helpers of the train stage: per-rank epoch order, model-selection metric, batch augmentation."""

import numpy as np
import pytest
import torch

from raydebias.debias.groupdro import group_balanced_weights
from raydebias.data.stream import epoch_indices
from raydebias.debias.train import _augment, resolve_select_by


def shards(n, weights, seed, world):
    """Every rank's indices, each rank seeding its rng the same way (as the train loop does)."""
    return [epoch_indices(n, weights, np.random.default_rng([seed, 0]), r, world) for r in range(world)]


# ---------------------------------------------------------------- epoch_indices, uniform (permutation)


def test_permutation_single_rank_is_a_permutation():
    idx = epoch_indices(50, None, np.random.default_rng(0), 0, 1)
    assert idx.shape == (50,)
    assert sorted(idx.tolist()) == list(range(50))
    assert idx.tolist() != list(range(50))  # actually shuffled


@pytest.mark.parametrize("n,world", [(12, 3), (64, 4), (7, 1)])
def test_permutation_shards_are_disjoint_and_cover_every_index_once(n, world):
    parts = shards(n, None, seed=3, world=world)
    assert [len(p) for p in parts] == [n // world] * world
    for a in range(world):
        for b in range(a + 1, world):
            assert not set(parts[a].tolist()) & set(parts[b].tolist())
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(n))


@pytest.mark.parametrize("n,world", [(10, 3), (11, 2), (2, 4), (101, 8)])
def test_uneven_permutation_shards_have_equal_length_and_still_cover_everything(n, world):
    """DDP needs the same number of steps on every rank: shards are padded to equal length."""
    parts = shards(n, None, seed=5, world=world)
    per_rank = -(-n // world)
    assert [len(p) for p in parts] == [per_rank] * world
    allidx = np.concatenate(parts)
    assert set(allidx.tolist()) == set(range(n))
    # only the padding repeats: total extra draws is exactly the shortfall
    counts = np.bincount(allidx, minlength=n)
    assert counts.sum() - n == per_rank * world - n
    assert counts.max() <= -(-per_rank * world // n)


def test_permutation_is_deterministic_per_seed():
    a = shards(40, None, seed=1, world=2)
    b = shards(40, None, seed=1, world=2)
    c = shards(40, None, seed=2, world=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_empty_dataset_gives_empty_shards():
    assert epoch_indices(0, None, np.random.default_rng(0), 1, 2).size == 0


# ---------------------------------------------------------------- epoch_indices, weighted draws


def test_weighted_draws_follow_the_weights():
    n = 30_000
    cls = np.arange(n) % 4  # four equally sized classes of items
    per_item = np.array([1.0, 2.0, 3.0, 0.0])[cls]  # class 3 has weight 0
    idx = epoch_indices(n, per_item, np.random.default_rng(7), 0, 1)
    assert idx.shape == (n,)
    frac = np.bincount(cls[idx], minlength=4) / n
    np.testing.assert_allclose(frac, [1 / 6, 2 / 6, 3 / 6, 0.0], atol=0.015)
    assert frac[3] == 0.0  # weight 0 is never drawn
    assert len(np.unique(idx)) < n  # with replacement


def test_weighted_draws_with_group_balanced_weights_balance_the_groups():
    groups = np.array([0] * 9000 + [1] * 900 + [2] * 100)
    idx = epoch_indices(len(groups), group_balanced_weights(groups), np.random.default_rng(11), 0, 1)
    frac = np.bincount(groups[idx], minlength=3) / len(groups)
    np.testing.assert_allclose(frac, 1 / 3, atol=0.03)


def test_weighted_shards_partition_one_shared_draw():
    n, world = 1000, 4
    w = np.linspace(0.1, 1.0, n)
    parts = shards(n, w, seed=9, world=world)
    full = epoch_indices(n, w, np.random.default_rng([9, 0]), 0, 1)
    assert [len(p) for p in parts] == [n // world] * world
    # interleaving the rank shards back gives exactly the single-rank draw
    merged = np.empty(n, dtype=full.dtype)
    for r, p in enumerate(parts):
        merged[r::world] = p
    np.testing.assert_array_equal(merged, full)


# ---------------------------------------------------------------- resolve_select_by


@pytest.mark.parametrize(
    "select_by,num_groups,expected",
    [("auto", 2, "wga"), ("auto", 8, "wga"), ("auto", 9, "aga"), ("auto", 100, "aga"),
     ("wga", 100, "wga"), ("aga", 2, "aga"), ("accuracy", 4, "accuracy")],
)
def test_resolve_select_by(select_by, num_groups, expected):
    assert resolve_select_by(select_by, num_groups) == expected


# ---------------------------------------------------------------- _augment


def shifted(x: torch.Tensor, sy: int, sx: int, fill: float = -1.0) -> torch.Tensor:
    """Reference translation: out[i, j] = x[i + sy, j + sx] where that lies inside the image, else ``fill``."""
    n, c, h, w = x.shape
    out = torch.full_like(x, fill)
    for i in range(h):
        for j in range(w):
            if 0 <= i + sy < h and 0 <= j + sx < w:
                out[:, :, i, j] = x[:, :, i + sy, j + sx]
    return out


def all_shifts(x, pad):
    return {(sy, sx): shifted(x, sy, sx) for sy in range(-pad, pad + 1) for sx in range(-pad, pad + 1)}


def find_shift(x, out, pad, refs=None):
    refs = refs or all_shifts(x, pad)
    return [s for s, ref in refs.items() if torch.equal(out, ref)]


@pytest.mark.parametrize("shape", [(3, 3, 8, 8), (2, 1, 6, 9)])
def test_augment_is_a_per_sample_pure_translation_with_black_fill(shape):
    gen_x = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=gen_x) * 1.8 - 0.9  # never exactly -1, all distinct
    x0 = x.clone()
    refs = all_shifts(x, 2)
    gen = torch.Generator().manual_seed(123)
    seen, differing = set(), 0
    for _ in range(200):
        out = _augment(x, gen)
        assert out.shape == x.shape and out.dtype == x.dtype
        shifts = []
        for i in range(shape[0]):  # each image is exactly one shift in [-2, 2]² of itself
            hits = [s for s, ref in refs.items() if torch.equal(out[i], ref[i])]
            assert len(hits) == 1, hits
            shifts.append(hits[0])
        seen.update(shifts)
        differing += len(set(shifts)) > 1
    assert len(seen) == 25  # every shift in [-2, 2]² is drawn
    assert differing > 100  # images of one batch are shifted independently
    assert torch.equal(x, x0)  # the input is not modified in place


def test_augment_content_preserved_in_the_overlap():
    x = torch.arange(2 * 3 * 10 * 10, dtype=torch.float32).reshape(2, 3, 10, 10) / 1000 - 0.5
    out = _augment(x, torch.Generator().manual_seed(4), pad=3)
    refs = all_shifts(x, 3)
    h = w = 10
    for i in range(2):
        (sy, sx), = [s for s, ref in refs.items() if torch.equal(out[i], ref[i])]
        # the overlapping window carries the input's pixels unchanged; the uncovered border is -1 (black)
        torch.testing.assert_close(
            out[i, :, max(0, -sy): h - max(0, sy), max(0, -sx): w - max(0, sx)],
            x[i, :, max(0, sy): h + min(0, sy), max(0, sx): w + min(0, sx)],
            rtol=0, atol=0,
        )
        n_fill = (out[i] == -1.0).sum().item()
        assert n_fill == 3 * (h * w - (h - abs(sy)) * (w - abs(sx)))


def test_augment_is_deterministic_given_the_generator_and_identity_without_padding():
    x = torch.rand(4, 3, 12, 12) * 2 - 1
    a = _augment(x, torch.Generator().manual_seed(42))
    b = _augment(x, torch.Generator().manual_seed(42))
    assert torch.equal(a, b)
    assert torch.equal(_augment(x, torch.Generator().manual_seed(0), pad=0), x)


# ---------------------------------------------------------------- unions of part sets (FT_mix: real ∪ synthetic)


def test_union_keeps_rows_in_order_and_marks_sets_without_bias_labels(tmp_path):
    from raydebias.data.stream import PartSet, iter_parts, write_parts

    real = {"x": np.zeros((3, 2, 2, 3), np.uint8), "y": np.array([0, 1, 1]), "a": np.array([0, 1, 1])}
    synth = {"x": np.ones((2, 2, 2, 3), np.uint8), "y": np.array([1, 0])}
    u = PartSet.union([PartSet.open(write_parts(tmp_path / "r", real, rows_per_part=2)),
                       PartSet.open(write_parts(tmp_path / "s", synth))])
    x = np.concatenate([x for _, x in iter_parts(u, 2)])
    assert x.shape == (5, 2, 2, 3) and x[3:].all() and not x[:3].any()
    assert u.y.tolist() == [0, 1, 1, 1, 0] and u.a.tolist() == [0, 1, 1, -1, -1] and len(u) == 5


def test_group_balanced_union_draws_a_group_seen_only_in_synthetic_rows_as_often_as_the_others(tmp_path):
    """At 99.9 % aligned a conflicting group has no real row; in the union its synthetic rows carry its share."""
    from raydebias.data.stream import PartSet, write_parts

    real = {"x": np.zeros((100, 1, 1, 3), np.uint8), "y": np.zeros(100, np.int64), "a": np.zeros(100, np.int64)}
    synth = {"x": np.zeros((10, 1, 1, 3), np.uint8), "y": np.zeros(10, np.int64), "a": np.ones(10, np.int64)}
    u = PartSet.union([PartSet.open(write_parts(tmp_path / "r", real)), PartSet.open(write_parts(tmp_path / "s", synth))])
    w = group_balanced_weights(u.y * 2 + u.a)
    assert w[:100].sum() == pytest.approx(w[100:].sum())
