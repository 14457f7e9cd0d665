"""Ray Train run names keyed by the stage key: a stale run is never resumed and never left behind."""

import os

import pytest

from raydebias._internal.ray_utils import keyed_train_run


def test_keyed_train_run_deletes_other_keys_only(tmp_path):
    for d in ("erm-aaaaaaaaaaaa", "erm-bbbbbbbbbbbb", "erm", "groupdro-aaaaaaaaaaaa", "ermx-cccccccccccc"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "checkpoint").write_text("x")
    name = keyed_train_run(tmp_path, "erm", "bbbbbbbbbbbbffff")
    assert name == "erm-bbbbbbbbbbbb"
    # the same key's run stays (a rerun resumes it); erm's other runs go; other methods' runs are untouched
    assert sorted(d.name for d in tmp_path.iterdir()) == ["erm-bbbbbbbbbbbb", "ermx-cccccccccccc",
                                                          "groupdro-aaaaaaaaaaaa"]
    assert keyed_train_run(tmp_path, "erm", "c" * 64) == "erm-cccccccccccc"
    assert not (tmp_path / "erm-bbbbbbbbbbbb").exists()
    assert keyed_train_run(tmp_path / "missing", "tiw", None) == "tiw"


def test_local_cluster_token_stays_in_env_only_when_home_is_read_only(tmp_path, monkeypatch):
    from raydebias._internal.ray_utils import _keep_token_in_env_if_home_is_read_only

    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    logs: list[str] = []
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # writable: Ray saves its token there as usual
    _keep_token_in_env_if_home_is_read_only(logs.append)
    assert "RAY_AUTH_TOKEN" not in os.environ and not logs
    assert not list((tmp_path / "home" / ".ray").iterdir())  # the probe is removed
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("HOME", str(tmp_path / "file"))  # ~/.ray cannot be created
    _keep_token_in_env_if_home_is_read_only(logs.append)
    assert len(os.environ["RAY_AUTH_TOKEN"]) == 64 and "not writable" in logs[0]
    token = os.environ["RAY_AUTH_TOKEN"]
    _keep_token_in_env_if_home_is_read_only(logs.append)  # a token already given is left alone
    assert os.environ["RAY_AUTH_TOKEN"] == token and len(logs) == 1
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    _keep_token_in_env_if_home_is_read_only(logs.append)
    assert "RAY_AUTH_TOKEN" not in os.environ


def test_a_train_worker_line_reaches_the_driver_once(tmp_path):
    """Ray Train 2.60 patches ``print`` in its workers to write each line to stdout *and* its logger; a local
    cluster started by ``init_ray`` turns that off, so every worker line is in ``run.log`` once, not twice."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import time
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
        from raydebias._internal.ray_utils import init_ray
        from raydebias.config import RayConfig

        init_ray(RayConfig(address="local", num_cpus=1, object_store_memory=100_000_000))

        def loop(config):
            print("worker-line-7f3a", flush=True)

        TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={{"CPU": 1}}),
                     run_config=RunConfig(storage_path={str(tmp_path)!r}, name="once")).fit()
        time.sleep(2)  # the driver's log monitor forwards worker output asynchronously
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TRAIN_ENABLE_PRINT_PATCH")}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (p.stdout + p.stderr).count("worker-line-7f3a") == 1, p.stdout[-3000:]


def _counting_loop(config):
    """Reports steps 0..4 with a checkpoint each; fails once at step 2 (a marker file says whether it did)."""
    import json
    import tempfile
    from pathlib import Path

    from raydebias._internal.ray_utils import get_checkpoint, report

    start, starts = 0, []
    ckpt = get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            st = json.loads((Path(d) / "state.json").read_text())
            start, starts = st["step"] + 1, st["starts"]
    starts = [*starts, start]
    marker = Path(config["marker"])
    for step in range(start, 5):
        if step == 2 and not marker.exists():
            marker.write_text("failed once")
            raise RuntimeError("injected failure at step 2")
        tmp = Path(tempfile.mkdtemp())
        (tmp / "state.json").write_text(json.dumps({"step": step, "starts": starts}))
        report({"step": step}, tmp)
        assert not tmp.exists()  # consumed


@pytest.mark.parametrize("num_workers", [0, 1])
def test_fit_torch_resumes_from_the_last_checkpoint_after_a_failure(ray_cluster, tmp_path, num_workers):
    """Both modes of ``fit_torch`` (local mode in a Ray task, a one-worker group) restart a failed loop once and
    resume it at the step after its last checkpoint; the returned checkpoint is the last one reported."""
    import json
    import sys
    from pathlib import Path

    from ray import cloudpickle

    from raydebias._internal.ray_utils import fit_torch

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test module is not importable in workers
    try:
        ckpt = fit_torch(_counting_loop, {"marker": str(tmp_path / "marker")}, num_workers=num_workers,
                         resources={"CPU": 1}, storage=tmp_path / "ray", name="count", max_failures=1)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert (tmp_path / "marker").exists()  # it did fail once
    with ckpt.as_directory() as d:
        st = json.loads((Path(d) / "state.json").read_text())
    assert st == {"step": 4, "starts": [0, 2]}


def test_fit_torch_local_mode_gives_up_after_max_failures(ray_cluster, tmp_path):
    import sys

    import ray
    from ray import cloudpickle

    from raydebias._internal.ray_utils import fit_torch

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        with pytest.raises(ray.exceptions.RayTaskError, match="injected failure at step 2"):
            fit_torch(_counting_loop, {"marker": str(tmp_path / "marker")}, num_workers=0, resources={"CPU": 1},
                      storage=tmp_path / "ray", name="count", max_failures=0)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_local_checkpoint_replacement_always_leaves_a_whole_checkpoint(tmp_path, monkeypatch):
    """``checkpoint`` is replaced by two renames; a crash between them leaves ``checkpoint.old``, which is read."""
    from pathlib import Path

    from raydebias._internal import ray_utils

    run = tmp_path / "run"
    assert ray_utils._local_checkpoint_dir(run) is None
    for step in (1, 2):
        src = tmp_path / f"src{step}"
        src.mkdir()
        (src / "step").write_text(str(step))
        ray_utils._keep_local_checkpoint(run, src)
        assert (ray_utils._local_checkpoint_dir(run) / "step").read_text() == str(step)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint"]
    src = tmp_path / "src3"
    src.mkdir()
    (src / "step").write_text("3")
    real_rename = Path.rename

    def crash_on_second_rename(self, target):
        if Path(target).name == "checkpoint":
            raise OSError("killed between the renames")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_second_rename)
    with pytest.raises(OSError):
        ray_utils._keep_local_checkpoint(run, src)
    monkeypatch.undo()
    assert (ray_utils._local_checkpoint_dir(run) / "step").read_text() == "2"  # the old one, whole
    ray_utils._keep_local_checkpoint(run, src)  # the next report recovers
    assert (ray_utils._local_checkpoint_dir(run) / "step").read_text() == "3"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint"]


def test_malloc_env_fills_only_what_is_unset(monkeypatch):
    from raydebias._internal.ray_utils import MALLOC_ENV, apply_malloc_env

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")  # the user's value wins
    apply_malloc_env()
    assert os.environ["MALLOC_MMAP_THRESHOLD_"] == MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "12345"


def test_local_cluster_workers_run_with_the_malloc_env(ray_cluster):
    from raydebias._internal.ray_utils import MALLOC_ENV

    @ray_cluster.remote(num_cpus=0.1)
    def env():
        return {k: os.environ.get(k) for k in MALLOC_ENV}

    assert ray_cluster.get(env.remote()) == MALLOC_ENV


def test_the_image_sets_the_malloc_env():
    import re
    from pathlib import Path

    from raydebias._internal.ray_utils import MALLOC_ENV

    text = (Path(__file__).resolve().parents[2] / "deploy" / "Dockerfile").read_text()
    assert {k: v for k, v in re.findall(r"^ENV (\w+)=(\S+)$", text, re.M) if k.startswith("MALLOC_")} == MALLOC_ENV
