"""Generation fidelity: probes on val, per-group class/bias fidelity, CAS (raydebias.evaluate.fidelity)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from raydebias.config import ClassifierModelConfig, ColoredMNISTConfig
from raydebias.data.builtin.colored_mnist import build_colored_mnist
from raydebias.evaluate.fidelity import (ProbeEnsemble, cas, describe_unconditional, fit_backbone, group_fidelity,
                                         predict_labels, synthetic_sets, train_probes)

CFG = ClassifierModelConfig(arch="cnn", width=16)


@pytest.fixture(scope="module")
def data():
    t = build_colored_mnist(ColoredMNISTConfig(aligned=0.95, n_train=600, n_val=80, n_test=40, seed=3)).to_pydict()
    out = {}
    for s in ("train", "val", "test"):
        m = [i for i, sp in enumerate(t["split"]) if sp == s]
        out[s] = {"x": np.stack([np.asarray(Image.open(io.BytesIO(t["image"][i])).convert("RGB")) for i in m]),
                  "y": np.array([t["label"][i] for i in m]), "a": np.array([t["bias"][i] for i in m]),
                  "id": np.array([t["id"][i] for i in m], dtype=object)}
    counts = np.zeros((10, 10), np.int64)
    np.add.at(counts, (out["train"]["y"], out["train"]["a"]), 1)
    out["info"] = {"num_classes": 10, "num_bias": 10, "group_counts": {"train": counts.tolist()}}
    return out


@pytest.fixture(scope="module")
def probes(data):
    return train_probes(data["val"], data["test"], data["info"], CFG, epochs=8)


def test_probes_are_better_than_chance(probes):
    assert probes.accuracy["class"] > 0.5  # chance 0.1
    assert probes.accuracy["bias"] > 0.9


def test_real_test_images_score_the_probes_own_accuracy(data, probes):
    te = data["test"]
    res = group_fidelity(probes, te["x"], te["y"], te["a"])
    assert res["class_fidelity"] == pytest.approx(probes.accuracy["class"])
    assert res["bias_fidelity"] == pytest.approx(probes.accuracy["bias"])
    # every test digit is drawn in every colour: 100 groups, and the n-weighted group mean is the overall fraction
    groups = res["per_group"]
    assert len(groups) == 100
    n = np.array([g["n"] for g in groups.values()])
    assert n.sum() == len(te["y"])
    assert np.average([g["class"] for g in groups.values()], weights=n) == pytest.approx(res["class_fidelity"])
    kinds = [g["kind"] for g in groups.values()]
    assert kinds.count("aligned") == 10 and kinds.count("conflicting") == 90


def test_an_ensemble_probe_averages_its_members_softmax(data):
    import torch

    val, te = data["val"], data["test"]
    groups = val["y"] * 10 + val["a"]
    members = [fit_backbone(val["x"], val["y"], 10, CFG, groups=groups, epochs=2, seed=s) for s in (0, 10)]
    ens = ProbeEnsemble(members).eval()
    with torch.no_grad():
        from raydebias.data.transforms import to_model_input

        x = to_model_input(te["x"])
        mean = (torch.softmax(members[0](x), 1) + torch.softmax(members[1](x), 1)) / 2
    np.testing.assert_array_equal(predict_labels(ens, te["x"]), mean.argmax(1).numpy())
    # train_probes builds the same members (seeds seed, seed + 10) and says how many in its summary
    pr = train_probes(val, te, data["info"], CFG, epochs=2, seed=0, members=2)
    assert pr.summary()["members"] == 2 and isinstance(pr.class_probe, ProbeEnsemble)
    np.testing.assert_array_equal(predict_labels(pr.class_probe, te["x"]), predict_labels(ens, te["x"]))


def test_noise_scores_chance(data, probes):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(1000, 32, 32, 3), dtype=np.uint8)
    y, a = rng.integers(0, 10, 1000), rng.integers(0, 10, 1000)
    res = group_fidelity(probes, x, y, a)
    assert res["class_fidelity"] < 0.25 and res["bias_fidelity"] < 0.25


def test_images_that_ignore_the_bias_target_score_low_bias_fidelity(data, probes):
    """Aligned test images presented as made for a conflicting bias value: right class, wrong bias."""
    te = data["test"]
    aligned = te["a"] == te["y"]
    x, y = te["x"][aligned], te["y"][aligned]
    target = (y + 1 + np.arange(len(y)) % 9) % 10
    res = group_fidelity(probes, x, y, target)
    assert res["class_aligned"] is None and res["class_conflicting"] > 0.5
    assert res["bias_conflicting"] < 0.1


def test_class_only_and_unconditional_sets(data, probes):
    te = data["test"]
    res = group_fidelity(probes, te["x"], te["y"], None)
    assert res["class_fidelity"] == pytest.approx(probes.accuracy["class"]) and "per_group" not in res
    un = describe_unconditional(probes, te["x"], labels=te["y"])
    assert sum(un["class_histogram"]) == sum(un["bias_histogram"]) == len(te["y"])
    assert un["class_fidelity"] == pytest.approx(probes.accuracy["class"])
    assert 0.0 < un["aligned_fraction"] < 0.3  # a group-balanced set: 1 in 10 images is aligned


def test_without_bias_labels_in_val_the_bias_part_is_skipped(data):
    val = dict(data["val"], a=np.full(len(data["val"]["y"]), -1))
    p = train_probes(val, None, {**data["info"], "num_bias": 10}, CFG, epochs=1)
    assert p.bias_probe is None
    te = data["test"]
    res = group_fidelity(p, te["x"], te["y"], te["a"])
    assert "bias_conflicting" in res and res["bias_conflicting"] is None and "note" in res


def test_cas_separates_informative_from_shuffled_labels(data):
    va, te, info = data["val"], data["test"], data["info"]
    good = cas(va["x"], va["y"], te, info, CFG, epochs=6)
    bad = cas(va["x"], np.random.default_rng(0).permutation(va["y"]), te, info, CFG, epochs=6)
    assert good["aga"] > 0.5 and bad["aga"] < 0.25


def test_every_generating_method_has_a_measured_set():
    from raydebias.core import registered

    METHODS = registered()
    from raydebias.methods import get_method

    names = {s["method"] for s in synthetic_sets([get_method(m) for m in METHODS])}
    assert names == set(METHODS) - {"erm", "groupdro", "diffusing_debias_lff"} | {"diffusing_debias"}


def _stream(data, split, tmp_path, rows_per_part=23):
    from raydebias.data.stream import PartSet, write_parts

    d = data[split]
    ps = PartSet.open(write_parts(tmp_path / f"{split}.parquet", d, rows_per_part=rows_per_part))
    return {"x": ps, "y": ps.y, "a": ps.a}


def test_streamed_sets_give_the_array_predictions_and_probes_as_good(data, probes, tmp_path):
    """The evaluate stage streams val, test and the synthetic sets from Parquet parts: predictions on a stream equal
    those on the array, and probes trained on the streamed val (other batches: shuffle buffer) read test as well
    as the array-trained ones, within a few images."""
    te = _stream(data, "test", tmp_path)
    info = {**data["info"], "image_size": data["test"]["x"].shape[1]}
    np.testing.assert_array_equal(predict_labels(probes.class_probe, te["x"], image_size=info["image_size"]),
                                  predict_labels(probes.class_probe, data["test"]["x"]))
    streamed = train_probes(_stream(data, "val", tmp_path), te, info, CFG, epochs=8)
    assert streamed.accuracy["class"] > 0.5 and streamed.accuracy["bias"] > 0.9
    assert abs(streamed.accuracy["class"] - probes.accuracy["class"]) <= 0.2, (streamed.accuracy, probes.accuracy)
    res = group_fidelity(streamed, te["x"], te["y"], te["a"])
    assert res["class_fidelity"] == pytest.approx(streamed.accuracy["class"])
