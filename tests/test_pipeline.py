"""End-to-end tiny runs: every stage, metrics.json/report.html, resume, quarantine, an unseen contract dataset."""

import json
import os
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raydebias.cli import main
from raydebias.config import ColoredMNISTConfig, load_config
from raydebias.data.builtin.colored_mnist import build_colored_mnist
from raydebias.pipeline import PipelineError, RunDirLock, run_pipeline

pytestmark = pytest.mark.slow  # end-to-end: `pytest -m "not slow"` is the fast loop

# classifiers in Ray Train's local mode, as in the demo's config (test_local_mode_trains_the_same_classifiers
# compares them with a worker group's)
TINY = ["data.builtin.n_train=300", "data.builtin.n_val=10", "data.builtin.n_test=40", "data.builtin.aligned=0.9",
        "train.epochs=1", "train.batch_size=64", "models.classifier.width=8", "method=groupdro", "baselines=[erm]",
        "train.num_workers=0"]


def manifest(run_dir):
    return json.loads((run_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def tiny_run(ray_module, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(None, [*TINY, f"run_dir={run_dir}"])
    run_pipeline(cfg, log=lambda m: None)
    return run_dir


def test_end_to_end_outputs(tiny_run):
    report = json.loads((tiny_run / "metrics.json").read_text())
    assert report["headline"] == "aga"  # 100 groups → unbiased accuracy
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"groupdro", "erm"}
    from fairlearn.metrics import MetricFrame
    from sklearn.metrics import accuracy_score

    for name, r in rows.items():
        assert len(r["per_group"]) == 100 and set(r["per_group"]) == set(r["group_counts"])
        # the reported numbers, recomputed by fairlearn from the predictions the evaluate stage saved
        p = pq.read_table(tiny_run / "stages" / "evaluate" / f"predictions_{name}.parquet").to_pandas()
        by = MetricFrame(metrics=accuracy_score, y_true=p["label"], y_pred=p["pred"],
                         sensitive_features=p["label"].astype(str) + "," + p["bias"].astype(str)).by_group
        assert r["wga"] == pytest.approx(by.min()) and r["aga"] == pytest.approx(by.mean())
        assert r["accuracy"] == pytest.approx(float((p["label"] == p["pred"]).mean()))
        assert 0 <= r["val"]["aga"] <= 1
    html = (tiny_run / "report.html").read_text()
    assert "Per-group test accuracy" in html and "data:image/png;base64," in html and "groupdro" in html
    m = manifest(tiny_run)
    assert {s: e["status"] for s, e in m["stages"].items()} == {
        "data": "completed", "train/groupdro": "completed", "train/erm": "completed", "evaluate": "completed",
        "report": "completed"}
    assert all(e["last_action"] == "ran" for e in m["stages"].values())
    assert "ray" in m["versions"] and "torch" in m["versions"]
    assert (tiny_run / "config.yaml").exists()
    assert (tiny_run / "stages" / "train" / "erm" / "model.safetensors").exists()


def test_local_mode_trains_the_same_classifiers(tiny_run, tmp_path):
    """``train.num_workers=0`` (Ray Train's local mode in one Ray task, ``tiny_run``) trains the same weights, bit
    for bit, as a one-worker group: the same loop, seeds and thread count, without the worker group."""
    run_pipeline(load_config(None, [*TINY, f"run_dir={tmp_path}", "train.num_workers=1", "stages=[data,train]"]),
                 log=lambda m: None)
    for method in ("erm", "groupdro"):
        group = tmp_path / "stages" / "train" / method
        assert (group / "model.safetensors").read_bytes() == \
            (tiny_run / "stages" / "train" / method / "model.safetensors").read_bytes(), method
        assert json.loads((group / "meta.json").read_text())["best_epoch"] == 1
    for run in (tmp_path, tiny_run):  # both modes' checkpoints are cleaned up
        assert not any((run / "stages" / "train" / "_ray").iterdir())


def test_rerun_skips_everything(tiny_run):
    model = tiny_run / "stages" / "train" / "erm" / "model.safetensors"
    before = model.stat().st_mtime_ns
    logs = []
    run_pipeline(load_config(None, [*TINY, f"run_dir={tiny_run}"]), log=logs.append)
    assert all(e["last_action"] == "skipped" for e in manifest(tiny_run)["stages"].values())
    assert sum("skip" in line for line in logs) == 5
    assert model.stat().st_mtime_ns == before


_HOLD_LOCK = """
import sys
from pathlib import Path
from raydebias.pipeline import RunDirLock
lock = RunDirLock(Path(sys.argv[1])).__enter__()
print("held", flush=True)
sys.stdin.read()
"""


def _lock_holder(run_dir):
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_run_dir_lock(tiny_run):
    import signal

    lock = tiny_run / ".lock"
    holder = _lock_holder(tiny_run)
    try:
        with pytest.raises(PipelineError, match=f"in use by another run \\(pid {holder.pid} on "):
            run_pipeline(load_config(None, [*TINY, f"run_dir={tiny_run}"]), log=lambda m: None)
        assert json.loads(lock.read_text())["pid"] == holder.pid  # the holder's lock is left alone
        # the holder is SIGKILLed and not reaped (a zombie: its pid still answers kill(pid, 0)); once its last
        # thread has exited the kernel has closed its files and released the lock, so the next run takes it
        holder.send_signal(signal.SIGKILL)
        deadline = time.time() + 10
        while time.time() < deadline and not _zombie(holder.pid):
            time.sleep(0.05)
        assert _zombie(holder.pid)
        run_pipeline(load_config(None, [*TINY, f"run_dir={tiny_run}"]), log=lambda m: None)
    finally:
        holder.kill()
        holder.wait()
    assert not lock.exists()
    assert all(e["last_action"] == "skipped" for e in manifest(tiny_run)["stages"].values())


def test_run_dir_lock_ignores_a_stale_lock_file(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere", "since": "then"}))
    with RunDirLock(tmp_path) as lock:  # a file with no kernel lock on it holds nothing
        assert lock.held and json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
        with pytest.raises(PipelineError, match="in use by another run"):
            RunDirLock(tmp_path).__enter__()  # a second lock in this process (its own open file) is refused too
    assert not (tmp_path / ".lock").exists()


def _zombie(pid: int) -> bool:
    """``pid`` is a zombie whose threads have all exited (the leader turns Z before its other threads are gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state == "Z" and len(os.listdir(f"/proc/{pid}/task")) == 1
    except OSError:
        return False


def test_changed_block_reruns_only_dependents(tiny_run):
    # a new report setting reruns only the report
    run_pipeline(load_config(None, [*TINY, f"run_dir={tiny_run}", "report.samples_per_group=2"]), log=lambda m: None)
    actions = {s: e["last_action"] for s, e in manifest(tiny_run)["stages"].items()}
    assert actions == {"data": "skipped", "train/groupdro": "skipped", "train/erm": "skipped",
                       "evaluate": "skipped", "report": "ran"}
    # a damaged output is detected and its stage redone; downstream reruns only if the new output differs
    model = tiny_run / "stages" / "train" / "erm" / "model.safetensors"
    good = model.read_bytes()
    model.write_bytes(b"garbage")
    run_pipeline(load_config(None, [*TINY, f"run_dir={tiny_run}", "report.samples_per_group=2"]), log=lambda m: None)
    actions = {s: e["last_action"] for s, e in manifest(tiny_run)["stages"].items()}
    assert actions["train/erm"] == "ran" and actions["train/groupdro"] == "skipped"
    assert actions["data"] == "skipped"
    assert actions["evaluate"] == ("skipped" if model.read_bytes() == good else "ran")


def test_missing_upstream_is_a_clear_error(ray_cluster, tmp_path):
    cfg = load_config(None, [*TINY, f"run_dir={tmp_path}", "stages=[evaluate]"])
    with pytest.raises(PipelineError, match="needs 'data'"):
        run_pipeline(cfg, log=lambda m: None)


def test_run_cli_on_an_unseen_contract_dataset_with_corrupt_rows(ray_cluster, tmp_path, capfd):
    """A user dataset: 2 classes, 3 bias values, names from the config, three corrupt rows."""
    t = build_colored_mnist(ColoredMNISTConfig(n_train=300, n_val=10, n_test=10, aligned=0.9)).to_pydict()
    keep = [i for i, (y, a) in enumerate(zip(t["label"], t["bias"])) if y in (3, 8) and a in (3, 8, 0)]
    data = {k: [t[k][i] for i in keep] for k in ("id", "image", "split")}
    data["label"] = [{3: 0, 8: 1}[t["label"][i]] for i in keep]
    data["bias"] = [{3: 0, 8: 1, 0: 2}[t["bias"][i]] for i in keep]
    data["image"][0] = b"\x89PNG broken"
    data["label"][1] = 5
    data["bias"][2] = 9
    import pyarrow as pa

    uri = tmp_path / "users.parquet"
    pq.write_table(pa.table(data), uri)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text("method: groupdro\nbaselines: [erm]\ntrain: {epochs: 1, batch_size: 32, num_workers: 0}\n"
                        "models: {classifier: {width: 8}}\n")
    run_dir = tmp_path / "run"
    rc = main(["run", str(cfg_path), "--run-dir", str(run_dir), "--set", f"data.uri={uri}",
               "--set", "data.class_names=[three, eight]", "--set", "data.bias_names=[blue, lime, red]"])
    assert rc == 0
    out = capfd.readouterr().out
    assert "[1/5] data" in out and "[5/5] report" in out and "headline: WGA" in out, out
    q = pq.read_table(run_dir / "quarantine.parquet").to_pylist()
    assert [r["id"] for r in q] == data["id"][:3]
    assert "label 5 out of range" in q[1]["reason"] and "bias 9 out of range" in q[2]["reason"]
    report = json.loads((run_dir / "metrics.json").read_text())
    assert report["dataset"]["class_names"] == ["three", "eight"] and report["dataset"]["quarantined"] == 3
    assert report["headline"] == "wga"  # 6 groups → worst-group accuracy
    assert {r["method"] for r in report["rows"]} == {"groupdro", "erm"}
    assert all(len(r["per_group"]) == 6 for r in report["rows"])
