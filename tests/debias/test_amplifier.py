"""Diffusing DeBias: error-set quality, conflicting mask, pseudo-group GroupDRO in the train loop, and a tiny
end-to-end run on a contract dataset whose training split has no bias labels."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydebias.config import ColoredMNISTConfig, load_config
from raydebias.data.builtin.colored_mnist import build_colored_mnist
from raydebias.evaluate.metrics import conflicting_mask, error_set_quality
from raydebias.pipeline import run_pipeline


def test_error_set_quality_by_hand():
    correct = np.array([1, 0, 0, 1, 0, 1], bool)  # errors at 1, 2, 4
    conflicting = np.array([0, 1, 0, 0, 1, 1], bool)  # conflicting at 1, 4, 5
    q = error_set_quality(correct, conflicting)
    assert q["errors"] == 3 and q["conflicting"] == 3
    assert q["precision"] == pytest.approx(2 / 3) and q["recall"] == pytest.approx(2 / 3)
    assert q["f1"] == pytest.approx(2 / 3)
    none = error_set_quality(np.ones(4, bool), np.array([1, 0, 0, 0], bool))
    assert none["precision"] is None and none["recall"] == 0 and none["f1"] == 0.0


def test_conflicting_mask_uses_the_train_majority():
    counts = np.array([[9, 1], [2, 8]])  # class 0 aligned with bias 0, class 1 with bias 1
    y = np.array([0, 0, 1, 1])
    a = np.array([0, 1, 0, 1])
    assert conflicting_mask(y, a, counts).tolist() == [False, True, True, False]


def _no_train_bias_dataset(path):
    t = build_colored_mnist(ColoredMNISTConfig(n_train=400, n_val=10, n_test=10, aligned=0.9)).to_pydict()
    bias = [None if s == "train" else b for s, b in zip(t["split"], t["bias"])]
    pq.write_table(pa.table({"id": t["id"], "image": t["image"], "label": t["label"], "split": t["split"],
                             "bias": pa.array(bias, pa.int64())}), path)


@pytest.mark.slow
def test_diffusing_debias_end_to_end_without_train_bias_labels(ray_cluster, tmp_path):
    uri = tmp_path / "no_train_bias.parquet"
    _no_train_bias_dataset(uri)
    cfg = load_config(None, [
        f"run_dir={tmp_path / 'run'}", f"data.uri={uri}", "stages=[data, class_diffusion, amplifier, train, evaluate]",
        "method=diffusing_debias", "baselines=[diffusing_debias_lff, erm]", "train.num_workers=0",
        "diffusion.num_workers=0", "train.epochs=1", "train.batch_size=64",
        "models.classifier.width=8", "models.diffusion.block_out_channels=[16, 32]", "class_diffusion.steps=4",
        "class_diffusion.num_cpus=1",
        "ddb.images_per_class=3", "ddb.num_steps=2", "ddb.amplifier_epochs=1", "ddb.num_cpus=1",
    ])
    run_pipeline(cfg, log=lambda m: None)
    run = tmp_path / "run"
    syn = pq.read_table(run / "stages" / "amplifier" / "synthetic.parquet")
    assert syn.num_rows == 30 and sorted(set(syn.column("label").to_pylist())) == list(range(10))
    names = json.loads((run / "stages" / "data" / "info.json").read_text())["class_names"]
    assert all(p == f"a photo of a {names[y]}" for p, y in zip(syn.column("prompt").to_pylist(),
                                                               syn.column("label").to_pylist()))
    pg = pq.read_table(run / "stages" / "amplifier" / "pseudo_groups.parquet")
    train = pq.read_table(run / "stages" / "data" / "train.parquet")
    assert sorted(pg.column("id").to_pylist()) == sorted(train.column("id").to_pylist())
    stats = json.loads((run / "stages" / "amplifier" / "stats.json").read_text())
    assert "error_set_vs_conflicting" not in stats  # no bias labels on train: nothing to compare with
    assert sum(stats["pseudo_group_sizes"].values()) == train.num_rows
    meta = json.loads((run / "stages" / "class_diffusion" / "model" / "unet" / "config.json").read_text())
    assert meta["in_channels"] == 48
    rows = {r["method"]: r for r in json.loads((run / "metrics.json").read_text())["rows"]}
    assert set(rows) == {"diffusing_debias", "diffusing_debias_lff", "erm"}
    for m in ("diffusing_debias", "diffusing_debias_lff"):
        assert rows[m]["aga"] == pytest.approx(np.mean(list(rows[m]["per_group"].values())))
    amp = json.loads((run / "metrics.json").read_text())["generation"]["fidelity"]["sets"]["amplifier"]
    assert amp["target"] == "class" and amp["images"] == 30 and set(amp["per_class"]) == {str(c) for c in range(10)}
    # val has bias labels (a bias probe), train has none: no pairing is "the aligned one"
    assert sum(amp["bias_histogram"]) == 30 and amp["aligned_fraction"] is None
    meta_lff = json.loads((run / "stages" / "train" / "diffusing_debias_lff" / "meta.json").read_text())
    assert meta_lff["recipe"].startswith("II")
