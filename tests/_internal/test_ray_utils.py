"""Ray Train run names keyed by the stage key: a stale run is never resumed and never left behind."""

import os

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
