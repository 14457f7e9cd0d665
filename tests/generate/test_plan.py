"""Fine-tuning units and generation rows per variant; severe-bias transfer never trains on conflicting images."""

import numpy as np
import pytest

from raydebias.generate.plan import describe, plan_rows, plan_units

CLASSES, BIASES = ["zero", "one", "two"], ["red", "green", "blue"]
T = "a photo of a {bias} {class}"


@pytest.fixture
def biased():
    # class c is aligned with bias c: 30 aligned images per class, 2 conflicting images for (0, 1), 1 for (2, 0)
    y = np.array([0] * 30 + [1] * 30 + [2] * 30 + [0, 0, 2])
    a = np.array([0] * 30 + [1] * 30 + [2] * 30 + [1, 1, 0])
    ids = np.array([f"r{i}" for i in range(len(y))], dtype=object)
    clusters = np.array([i % 2 for i in range(90)] + [0, 0, 0])
    return ids, y, a, clusters


def units(variant, biased, min_images=10):
    ids, y, a, clusters = biased
    return plan_units(variant, ids, y, a, clusters, CLASSES, BIASES, T, "sks", min_images)


def test_units_per_variant(biased):
    assert units("vanilla", biased) == []
    lora = units("lora", biased)
    assert [(u.y, u.a) for u in lora] == [(0, 0), (1, 1), (2, 2)]
    assert all(len(u.ids) == 30 and u.prompt == describe(T, CLASSES[u.y], BIASES[u.a]) for u in lora)
    db = units("dreambooth", biased)
    assert [u.prompt for u in db] == ["a photo of a red sks zero", "a photo of a green sks one", "a photo of a blue sks two"]
    cdb = units("clustered_dreambooth", biased)
    assert len(cdb) == 6 and sorted(len(u.ids) for u in cdb) == [15] * 6
    assert len({u.name for u in cdb}) == 6


def test_units_never_train_on_conflicting_images(biased):
    ids, y, a, _ = biased
    conflicting = set(ids[y != a].tolist())
    for variant in ("lora", "dreambooth", "clustered_dreambooth"):
        for u in units(variant, biased):
            assert not conflicting & set(u.ids), (variant, u.name)
            assert u.y == u.a  # only aligned groups are big enough here


@pytest.mark.parametrize("variant", ["vanilla", "lora", "dreambooth", "clustered_dreambooth"])
def test_rows_cover_every_group_with_stable_ids(biased, variant):
    ids, y, a, _ = biased
    us = units(variant, biased)
    rows = plan_rows(variant, us, y, a, CLASSES, BIASES, T, "sks", images_per_group=7, seed=0)
    assert len(rows) == 9 * 7 and len({r.row_id for r in rows}) == len(rows)
    for g in [(yy, aa) for yy in range(3) for aa in range(3)]:
        assert sum((r.y, r.a) == g for r in rows) == 7
    again = plan_rows(variant, us, y, a, CLASSES, BIASES, T, "sks", images_per_group=7, seed=0)
    assert [(r.row_id, r.seed) for r in again] == [(r.row_id, r.seed) for r in rows]
    other = plan_rows(variant, us, y, a, CLASSES, BIASES, T, "sks", images_per_group=7, seed=1)
    assert [r.seed for r in other] != [r.seed for r in rows]


def test_severe_bias_transfer_uses_the_aligned_model_and_the_target_description(biased):
    ids, y, a, _ = biased
    us = units("clustered_dreambooth", biased)
    rows = plan_rows("clustered_dreambooth", us, y, a, CLASSES, BIASES, T, "sks", images_per_group=6, seed=0)
    conflicting = [r for r in rows if r.y == 0 and r.a == 2]  # no real image at all
    assert conflicting and all(r.transferred for r in conflicting)
    assert {r.adapter for r in conflicting} == {u.name for u in us if u.y == 0}  # class 0's aligned clusters
    assert all(r.prompt == "a photo of a blue zero" and "sks" not in r.prompt for r in conflicting)
    assert all(r.partial_prompt == "a photo of a blue" for r in conflicting)  # the prompt without the class word
    own = [r for r in rows if r.y == 1 and r.a == 1]
    assert not any(r.transferred for r in own) and all(r.prompt == "a photo of a green sks one" for r in own)
    assert all(r.partial_prompt == "a photo of a green sks" for r in own)
    # M / k_D per cluster
    assert sorted(sum(r.adapter == n for r in own) for n in {r.adapter for r in own}) == [3, 3]


def test_describe_without_bias():
    assert describe(T, "cat", None) == "a photo of a cat"
    assert describe(T, "cat", "dark") == "a photo of a dark cat"
