"""Real kills: SIGKILL the driver's process tree mid-train, then rerun the same command (it resumes from the last
epoch checkpoint) or a changed one (training starts over: Ray Train's runs are keyed by the stage key)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import psutil
import pytest

pytestmark = pytest.mark.slow  # end-to-end: `pytest -m "not slow"` is the fast loop

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
# data → train/erm only, 8 small epochs: long enough to be killed in the middle
TINY = ["data.builtin.n_train=400", "data.builtin.n_val=20", "data.builtin.n_test=20", "data.builtin.aligned=0.9",
        "models.classifier.width=8", "train.batch_size=32", "train.epochs=8", "method=erm", "baselines=[]",
        "stages=[data,train]", "ray.include_dashboard=false", "ray.num_cpus=2"]
EPOCH = re.compile(r"\[train/erm\] erm epoch (\d+)/8")


def start(run_dir: Path | str, *sets: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    args = [str(BIN / "raydebias"), "run", "configs/demo.yaml", "--run-dir", str(run_dir), "--verbose"]
    for kv in (*TINY, *sets):
        args += ["--set", kv]
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **(env or {})}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and everything it started (its local Ray cluster included)."""
    try:
        tree = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        tree = [proc.pid]
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


def epochs_of(proc: subprocess.Popen, stop_after: int | None = None, timeout: float = 400) -> tuple[list[int], str]:
    """The erm epochs the run printed (each once), until it ends or (``stop_after``) prints that epoch."""
    seen, lines, deadline = [], [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        m = EPOCH.search(line)
        if m and int(m.group(1)) not in seen:
            seen.append(int(m.group(1)))
            if stop_after is not None and seen[-1] >= stop_after:
                return seen, "".join(lines)
        assert time.time() < deadline, "".join(lines[-40:])
    proc.wait(timeout=60)
    return seen, "".join(lines)


@pytest.mark.timeout(900)
def test_killed_driver_resumes_same_config_and_restarts_a_changed_one(tmp_path):
    run_dir = tmp_path / "run"
    # 1. killed after epoch 3 of 8
    p = start(run_dir)
    try:
        first, log = epochs_of(p, stop_after=3)
    finally:
        kill_tree(p)
    assert first[:3] == [1, 2, 3], log[-3000:]
    storage = run_dir / "stages" / "train" / "_ray"
    runs = [d.name for d in storage.iterdir()]
    assert len(runs) == 1 and runs[0].startswith("erm-"), runs  # one run, named by the stage key

    # 2. the same command: resumes after the last checkpointed epoch, does not start over
    p = start(run_dir)
    resumed, log = epochs_of(p)
    assert p.returncode == 0, log[-3000:]
    assert resumed and resumed[0] > 1 and resumed[-1] == 8, (resumed, log[-3000:])
    assert not storage.exists() or not any(storage.iterdir())  # Ray Train's copies removed on success

    # 3. killed again, then rerun with another lr: a stale checkpoint must not be continued
    p = start(tmp_path / "run2")
    try:
        epochs_of(p, stop_after=2)
    finally:
        kill_tree(p)
    p = start(tmp_path / "run2", "train.lr=0.003")
    changed, log = epochs_of(p)
    assert p.returncode == 0, log[-3000:]
    assert changed == list(range(1, 9)), (changed, log[-3000:])
    runs = [d.name for d in (tmp_path / "run2" / "stages" / "train" / "_ray").iterdir()]
    assert runs == [], runs  # the stale run was deleted, the finished one cleaned up
    meta = json.loads((tmp_path / "run2" / "stages" / "train" / "erm" / "meta.json").read_text())
    assert 1 <= meta["best_epoch"] <= 8 and meta["best_phase"] == "erm"


@pytest.mark.timeout(900)
def test_killed_driver_resumes_a_run_dir_on_s3(tmp_path, s3_server, s3_root):
    """The same kill and rerun with the run directory on an S3 API: the workers write the splits and the
    checkpoints there, the rerun waits out the dead driver's lease and resumes from the stored checkpoint, and
    nothing of the run lands on local disk."""
    fs, base = fsspec.filesystem("s3"), s3_root.removeprefix("s3://")
    env = {**s3_server, "RAYDEBIAS_LEASE_SECONDS": "5"}
    p = start(s3_root, env=env)
    try:
        first, log = epochs_of(p, stop_after=3)
    finally:
        kill_tree(p)
    assert first[:3] == [1, 2, 3], log[-3000:]
    assert fs.exists(f"{base}/.lock")  # the killed driver's lease is still there
    assert fs.find(f"{base}/stages/data/train.parquet") and fs.find(f"{base}/stages/train/_ray")

    t0 = time.time()
    p = start(s3_root, env=env)
    resumed, log = epochs_of(p)
    assert p.returncode == 0, log[-3000:]
    assert resumed and resumed[0] > 1 and resumed[-1] == 8, (resumed, log[-3000:])
    assert time.time() - t0 >= 5  # the lease was waited out, not ignored
    assert "skip data" in log  # the stored splits were reused
    manifest = json.loads(fs.cat_file(f"{base}/manifest.json"))
    assert {k: e["status"] for k, e in manifest["stages"].items()} == {"data": "completed", "train/erm": "completed"}
    meta = json.loads(fs.cat_file(f"{base}/stages/train/erm/meta.json"))
    assert 1 <= meta["best_epoch"] <= 8
    assert fs.exists(f"{base}/stages/train/erm/model.safetensors")
    assert not fs.exists(f"{base}/.lock")
    assert not [f for f in fs.find(f"{base}/stages/train/_ray") if "erm-" in f]  # the checkpoints removed on success
    assert not (ROOT / "s3:").exists()  # no path of the run was taken for a local one

    p = start(s3_root, env=env)  # a third run has nothing to do
    again, log = epochs_of(p)
    assert p.returncode == 0 and again == [] and "skip train/erm" in log, log[-3000:]


def run_killing_a_train_worker(args: list[str], trigger: str, workers: int, index: int,
                               marker: str = "RayTrainWorker"):
    """Run ``args``; when a line contains ``trigger``, SIGKILL Ray Train worker ``index`` of the ``workers`` it
    has (processes whose command line holds ``marker``: ``_fit_local`` finds the Ray task of local mode).
    Returns the process (ended), its whole output, the output after the kill and the killed pid."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    lines, after, killed = [], [], None
    try:
        for line in p.stdout:
            lines.append(line)
            if killed is not None:
                after.append(line)
            elif trigger in line:
                found = [c for c in psutil.Process(p.pid).children(recursive=True)
                         if marker in " ".join(c.cmdline())]
                assert len(found) == workers, f"expected {workers} Ray Train worker(s), found {len(found)}"
                killed = found[index].pid
                os.kill(killed, signal.SIGKILL)
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            kill_tree(p)
    return p, "".join(lines), "".join(after), killed


@pytest.mark.timeout(600)
@pytest.mark.parametrize("num_workers", [1, 0], ids=["worker-group", "local-mode"])
def test_killed_train_worker_resumes_diffusion_from_its_checkpoint(tmp_path, num_workers):
    """SIGKILL the process that trains the diffusion model mid-fit — the Ray Train worker, or in local mode the
    Ray task — : Ray Train restarts the worker (max_failures=1), Ray retries the task (max_retries=1), and either
    continues from the last checkpoint, not from step 0."""
    run_dir = tmp_path / "run"
    args = [str(BIN / "raydebias"), "run", "configs/demo.yaml", "--run-dir", str(run_dir), "--verbose"]
    for kv in ("data.builtin.n_train=400", "data.builtin.n_val=20", "data.builtin.n_test=20", "stages=[data,diffusion]",
               "models.diffusion.block_out_channels=[16, 32]", "diffusion.steps=400", "diffusion.batch_size=16",
               "diffusion.checkpoint_every=25", "diffusion.num_cpus=1", "ray.include_dashboard=false",
               f"diffusion.num_workers={num_workers}"):
        args += ["--set", kv]
    p, log, _, killed = run_killing_a_train_worker(args, "diffusion step 100/400", workers=1, index=0,
                                                   marker="RayTrainWorker" if num_workers else "_fit_local")
    assert killed and p.returncode == 0, log[-3000:]
    resumed = [int(m) for m in re.findall(r"diffusion: resumed at step (\d+)/400", log)]
    # a checkpoint taken before the kill (100, or an earlier one: Ray Train registers reported checkpoints
    # asynchronously, and at 25 it/s the last few may not be registered yet), never step 0
    assert resumed and 25 <= resumed[0] <= 100, log[-3000:]
    summary = json.loads((run_dir / "manifest.json").read_text())["stages"]["diffusion"]["summary"]
    assert summary["steps"] == 400 and summary["resumed_at"] == resumed[0]
    assert (run_dir / "stages" / "diffusion" / "model" / "unet").is_dir()


@pytest.mark.timeout(900)
def test_killed_train_worker_resumes_tiw_from_its_step_checkpoint(tmp_path):
    """SIGKILL one of TIW's two DDP workers in its second phase (the TIW-DSM model, after the discriminator): Ray
    Train restarts the group, which keeps the finished phase (the discriminator is not retrained) and continues
    the current one from its last step checkpoint."""
    run_dir = tmp_path / "run"
    args = [str(BIN / "raydebias"), "run", "configs/tiw.yaml", "--run-dir", str(run_dir), "--verbose"]
    for kv in ("data.builtin.n_train=400", "data.builtin.n_val=60", "data.builtin.n_test=20", "stages=[data,tiw]",
               "tiw.reference_size=40", "tiw.disc_steps=100", "tiw.steps=200", "tiw.batch_size=8", "tiw.objectives=[tiw_paper]",
               "tiw.block_out_channels=[16, 32]", "tiw.checkpoint_every=25", "tiw.num_samples=16",
               "tiw.sample_steps=3", "ray.include_dashboard=false"):
        args += ["--set", kv]
    p, log, tail, killed = run_killing_a_train_worker(args, "[tiw/tiw_paper] step 100", workers=2, index=1)
    assert killed and p.returncode == 0, log[-3000:]
    resumed = [int(m) for m in re.findall(r"\[tiw/tiw_paper\] resumed at step (\d+)", tail)]
    # a checkpoint taken before the kill (Ray Train registers them asynchronously), never step 0
    assert resumed and 25 <= resumed[0] <= 100, log[-3000:]
    assert "[tiw/disc] step" not in tail, tail[-3000:]  # the finished phase is kept
    summary = json.loads((run_dir / "stages" / "tiw" / "models" / "losses.json").read_text())
    assert summary["resumed"] == {"tiw_paper": resumed[0]}
    assert summary["tiw_paper"]["steps"] == 200 and summary["disc"]["steps"] == 100 and "dsm" not in summary
    assert (run_dir / "stages" / "tiw" / "stats.json").exists()
    assert not (run_dir / "stages" / "tiw" / "_ray").exists() or not any((run_dir / "stages" / "tiw" / "_ray").iterdir())


def _actors(pid: int, udf: str) -> list[psutil.Process]:
    """Live Ray Data actor processes (descendants of the driver) running the UDF class ``udf``."""
    out = []
    for c in psutil.Process(pid).children(recursive=True):
        try:
            if udf in " ".join(c.cmdline()):
                out.append(c)
        except psutil.Error:
            pass
    return out


def _stage_status(run_dir: Path, stage: str) -> str | None:
    try:
        return json.loads((run_dir / "manifest.json").read_text())["stages"].get(stage, {}).get("status")
    except (OSError, ValueError):
        return None


# data → generate for "Harnessing diffusion", with enough generate batches (200 rows of 4) and embed batches
# (300 rows of 8) to kill an actor in the middle of each
GEN = ["method=clustered_dreambooth", "stages=[data,clip,embed,cluster,diffusion,finetune,generate]",
       "generate.images_per_group=2",
       "generate.num_steps=8", "generate.batch_size=4", "embed.batch_size=8", "ray.include_dashboard=false",
       "ray.num_cpus=2"]


def _drain(p: subprocess.Popen):
    """Read the run's output in a thread (a full pipe would block the driver while the test polls)."""
    import threading

    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(p.stdout), daemon=True)
    reader.start()
    return out, reader


def _gen_rows(run_dir: Path) -> dict:
    import pyarrow.parquet as pq

    t = pq.read_table(run_dir / "stages" / "generate" / "clustered_dreambooth" / "synthetic.parquet")
    return dict(zip(t.column("id").to_pylist(), t.column("pixels").to_pylist()))


def _reset_generate(run_dir: Path) -> None:
    import shutil

    g = run_dir / "stages" / "generate" / "clustered_dreambooth"
    shutil.rmtree(g / "rows")
    shutil.rmtree(g / "synthetic.parquet")


@pytest.mark.timeout(1200)
def test_killed_actors_and_driver_mid_generate_give_exactly_the_planned_rows(tmp_path, tiny_generative):
    """SIGKILL one embed actor and one generate actor mid-stage: Ray Data restarts them and retries their
    batches, and each stage ends with exactly its rows (each once) equal to an uninterrupted run's. Then SIGKILL the
    driver's whole tree mid-generate: the same command generates only the missing rows, same pixels."""
    import numpy as np
    import pyarrow.parquet as pq

    run_dir = tmp_path / "run"
    sets = [*tiny_generative, *GEN]
    rows_glob = "stages/generate/clustered_dreambooth/rows/*/part-*.parquet"

    # 1. one kill of each actor kind, while the manifest says its stage is running
    p = start(run_dir, *sets)
    out, reader = _drain(p)
    killed: dict[str, int] = {}
    try:
        deadline = time.time() + 900
        while p.poll() is None and time.time() < deadline:
            for udf, stage, ready in (("EmbedImages", "embed", lambda: True),
                                      ("GenerateBatch", "generate/clustered_dreambooth",
                                       lambda: len(list(run_dir.glob(rows_glob))) >= 2)):
                if udf in killed or _stage_status(run_dir, stage) != "running" or not ready():
                    continue
                live = [a for a in _actors(p.pid, udf) if time.time() - a.create_time() > 0.5]
                if live:
                    os.kill(live[0].pid, signal.SIGKILL)
                    killed[udf] = live[0].pid
            time.sleep(0.05)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            kill_tree(p)
    reader.join(timeout=10)
    log = "".join(out)
    assert p.returncode == 0, log[-3000:]
    assert set(killed) == {"EmbedImages", "GenerateBatch"}, (killed, log[-3000:])

    # embed: exactly the train rows, each once, equal to the encoder applied in this process
    from raydebias.data.splits import load_split
    from raydebias.embed.stage import load_clip, load_embeddings

    info = json.loads((run_dir / "stages" / "data" / "info.json").read_text())
    tr = load_split(run_dir / "stages" / "data" / "train.parquet", info["image_size"])
    emb = load_embeddings(run_dir)
    assert emb["id"].tolist() == tr["id"].tolist()  # the train rows in their order, each once
    np.testing.assert_allclose(emb["emb"], load_clip(run_dir).encode_images(tr["x"]), atol=1e-5)

    # generate: exactly the plan, each row once ...
    plan = json.loads((run_dir / "stages" / "generate" / "clustered_dreambooth" / "plan.json").read_text())
    killed_rows = _gen_rows(run_dir)
    assert len(killed_rows) == plan["rows"] == 200
    # ... and the same images as an uninterrupted run of the stage (the same command, rows deleted)
    _reset_generate(run_dir)
    p = start(run_dir, *sets)
    _, log = epochs_of(p)
    assert p.returncode == 0, log[-3000:]
    assert "0 already generated, 200 to go" in log
    clean = _gen_rows(run_dir)
    assert clean.keys() == killed_rows.keys()
    assert all(clean[i] == killed_rows[i] for i in clean)  # pixel-identical

    # 2. SIGKILL the driver's tree with some generate batches written, then the same command
    _reset_generate(run_dir)
    p = start(run_dir, *sets)
    _drain(p)
    try:
        deadline = time.time() + 600
        while len(list(run_dir.glob(rows_glob))) < 3 and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
    finally:
        kill_tree(p)
    written = {r for f in run_dir.glob(rows_glob) for r in pq.read_table(f, columns=["id"]).column(0).to_pylist()}
    assert 0 < len(written) < 200, len(written)
    p = start(run_dir, *sets)
    _, log = epochs_of(p)
    assert p.returncode == 0, log[-3000:]
    m = re.search(r"(\d+) already generated, (\d+) to go", log)
    assert m and int(m.group(1)) == len(written) and int(m.group(2)) == 200 - len(written), log[-3000:]
    resumed = _gen_rows(run_dir)
    assert resumed.keys() == clean.keys()
    diff = max(int(np.abs(np.frombuffer(resumed[i], np.uint8).astype(int) - np.frombuffer(clean[i], np.uint8)).max())
               for i in clean)
    assert diff <= 1, diff  # other batch compositions than the clean run's: equal up to float rounding
