"""DiffInject and GAMMA-FACE end to end on a tiny Colored MNIST run (one shared ``class_diffusion`` model): mined
rows, injected pairs with content labels, resumable inject parts, the BIC-selected GMM with equal components,
pseudo-labels, and both methods' rows in ``metrics.json``."""

import json

import numpy as np
import pytest
import pyarrow.parquet as pq

from raydebias.config import load_config
from raydebias.pipeline import run_pipeline

pytestmark = pytest.mark.slow  # end-to-end: `pytest -m "not slow"` is the fast loop


def test_diffinject_and_gamma_face_end_to_end(ray_cluster, tmp_path):
    run = tmp_path / "run"
    overrides = [
        f"run_dir={run}", "data.builtin={aligned: 0.95, n_train: 300, n_val: 10, n_test: 10}", "data.image_size=32",
        "stages=[data, class_diffusion, mine, inject, train, gmm, evaluate, report]", "method=diffinject",
        "baselines=[gamma_face, erm]", "train.num_workers=0", "diffusion.num_workers=0", "train.epochs=1",
        "train.batch_size=64", "models.classifier.width=8",
        "models.diffusion.block_out_channels=[16, 32]", "class_diffusion.steps=4", "class_diffusion.num_cpus=1",
        "diffinject.biased_epochs=1", "diffinject.top_k=2", "diffinject.bias_conflict_ratio=0.05",
        "diffinject.num_steps=4", "diffinject.t_edit=500", "diffinject.t_boost=300", "diffinject.pairs_per_task=8",
        "gamma_face.num_latents=12", "gamma_face.num_steps=4", "gamma_face.k_max=3", "gamma_face.mix_ratio=0.05",
        "gamma_face.num_cpus=1",
    ]
    run_pipeline(load_config(None, overrides), log=lambda m: None)
    st = run / "stages"
    train = pq.read_table(st / "data" / "train.parquet")
    labels = dict(zip(train.column("id").to_pylist(), train.column("label").to_pylist()))

    mined = pq.read_table(st / "mine" / "mined.parquet")
    assert mined.num_rows == 20 and sorted(np.bincount(mined.column("label").to_numpy()).tolist()) == [2] * 10
    assert "mined_vs_conflicting" in json.loads((st / "mine" / "stats.json").read_text())

    syn = pq.read_table(st / "inject" / "synthetic.parquet")
    n = round(0.05 * (300 - 20))
    assert syn.num_rows == n and syn.column("row").to_pylist() == list(range(n))
    assert set(syn.column("content_id").to_pylist()) <= set(mined.column("id").to_pylist())
    assert not set(syn.column("style_id").to_pylist()) & set(mined.column("id").to_pylist())
    assert syn.column("label").to_pylist() == [labels[c] for c in syn.column("content_id").to_pylist()]
    assert len(list((st / "inject" / "cache").rglob("*.safetensors"))) >= n  # one inversion per distinct image

    gen = pq.read_table(st / "gmm" / "generated.parquet")
    bic = json.loads((st / "gmm" / "bic.json").read_text())
    assert len(bic["bic"]) == 3 and bic["chosen"] == int(np.argmin(bic["bic"])) + 1
    assert gen.num_rows == 15 and np.bincount(gen.column("component").to_numpy()).max() - \
        np.bincount(gen.column("component").to_numpy()).min() <= 1

    metrics = json.loads((run / "metrics.json").read_text())
    rows = {r["method"]: r for r in metrics["rows"]}
    assert set(rows) == {"diffinject", "gamma_face", "erm"} and all(r["aga"] is not None for r in rows.values())
    assert {"mine", "inject", "gmm", "fidelity"} <= set(metrics["generation"])
    fid = metrics["generation"]["fidelity"]["sets"]
    # DiffInject's target is (content's class, style's bias); GAMMA-FACE's samples have pseudo-labels only
    assert fid["inject"]["images"] == n and set(fid["inject"]["per_group"]) and "cas" in fid["inject"]
    assert fid["gmm"]["images"] == 15 and sum(fid["gmm"]["class_histogram"]) == 15
    assert rows["diffinject"]["synthetic_cas"] == fid["inject"]["cas"]["aga"]
    html = (run / "report.html").read_text()
    assert "<h3>DiffInject</h3>" in html and "GAMMA-FACE</h3><p>K = " in html and "Generation fidelity" in html

    # resume: lose one finished inject part and the merged output → only that part is regenerated, same rows
    before = syn.column("pixels").to_pylist()
    (st / "inject" / "parts" / "part-00001.parquet").unlink()
    cfg = load_config(None, overrides[:-1] + ["gamma_face.num_cpus=1", "stages=[data, class_diffusion, mine, inject]"])
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"]["inject"]["status"] = "failed"  # as if killed during the stage
    (run / "manifest.json").write_text(json.dumps(manifest))
    run_pipeline(cfg, log=lambda m: None)
    again = pq.read_table(st / "inject" / "synthetic.parquet")
    assert again.column("row").to_pylist() == list(range(n)) and again.column("pixels").to_pylist() == before
    assert json.loads((st / "inject" / "stats.json").read_text())["parts_reused"] == -(-n // 8) - 1
