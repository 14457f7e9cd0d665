"""`ray job submit` of `raydebias run` against a real `ray start --head` with token auth (Ray 2.60)."""

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow  # end-to-end: `pytest -m "not slow"` is the fast loop

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent


def sh(args, env, timeout=300, check=True):
    p = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{args[:3]} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.mark.timeout(600)
def test_job_submit_against_local_head(tmp_path, tiny_generative):
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_ADDRESS": "http://127.0.0.1:8275"}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    run_dir = tmp_path / "jobrun"
    # Record what runs before `ray start`, so that the end of the test stops only the processes this head started
    # (not `ray stop`, which stops every Ray cluster on the machine).
    import ray

    if ray.is_initialized():  # the tests' shared cluster: one cluster fewer on the 2 cores (restarted on demand)
        ray.shutdown()
    before = {p.pid for p in psutil.process_iter()}
    # ports of its own (agents, client server, metrics): Ray's defaults would collide with any other local cluster
    # (its job agent then never registers: "No available agent to submit job")
    sh([str(BIN / "ray"), "start", "--head", "--num-cpus", "2", "--num-gpus", "0", "--port", "6391",
        "--dashboard-host", "127.0.0.1", "--dashboard-port", "8275", "--object-store-memory", "200000000",
        "--dashboard-agent-listen-port", "52465", "--dashboard-agent-grpc-port", "52466",
        "--runtime-env-agent-port", "52467", "--metrics-export-port", "52468", "--ray-client-server-port", "9991",
        "--disable-usage-stats"], {k: v for k, v in env.items() if k != "RAY_ADDRESS"}, timeout=120)
    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    head = [p for p in psutil.process_iter() if p.pid not in before and p.pid not in mine]
    try:
        # Without the token the cluster refuses the job.
        no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
        no_token["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
        refused = sh(["bash", "deploy/submit.sh", "configs/demo.yaml"], no_token, timeout=120, check=False)
        assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower()

        # the demo's config, every stage of it, shrunk to seconds
        sets = [a for kv in tiny_generative for a in ("--set", kv)]
        submit = ["bash", "deploy/submit.sh", "configs/demo.yaml", "--run-dir", str(run_dir), *sets]
        for _ in range(12):  # a `--block` head answers HTTP before its job agent is up: "No available agent"
            p = sh(submit, env, timeout=540, check=False)
            if p.returncode == 0 or "No available agent" not in p.stdout + p.stderr:
                break
            time.sleep(5)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert "succeeded" in p.stdout + p.stderr
        job_id = next(w.strip("'") for line in (p.stdout + p.stderr).splitlines() if "Job '" in line
                      for w in line.split() if w.startswith("'raysubmit_"))
        status = sh([sys.executable, "-c", "from ray.job_submission import JobSubmissionClient as C; "
                     f"print(C('http://127.0.0.1:8275').get_job_status('{job_id}').value)"], env, timeout=60)
        assert status.stdout.strip().splitlines()[-1] == "SUCCEEDED"
        report = json.loads((run_dir / "metrics.json").read_text())
        assert {r["method"] for r in report["rows"]} == {"clustered_dreambooth", "groupdro", "erm"}
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert all(e["status"] == "completed" for e in manifest["stages"].values())

        # A local run beside a `ray start` cluster starts its own cluster instead of attaching to that one.
        local_env = {k: v for k, v in env.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
        local = sh([str(BIN / "raydebias"), "run", "configs/demo.yaml", "--run-dir", str(tmp_path / "local"),
                    "--set", "stages=[data,clip]", "--set", "clip.steps=2"], local_env, timeout=300, check=False)
        assert local.returncode == 0, local.stdout[-2000:] + local.stderr[-2000:]
        # the quiet console: one line per stage; Ray's and the stages' output is in the run's log
        assert "[2/2] clip" in local.stdout and "started a local cluster" not in local.stdout
        assert "started a local cluster" in (tmp_path / "local" / "logs" / "run.log").read_text()
    finally:
        for p in head:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(head, timeout=30)
        for p in alive:
            p.kill()
        # `ray start` recorded this head as the machine's current cluster (what `ray stop` would clear): a later
        # `ray.init()` without an address would try to attach to it
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.exists() and current.read_text().strip().endswith(":6391"):
            current.unlink()

