"""`ray job submit` of `raydebias run` against a real `ray start --head` with token auth (Ray 2.60)."""

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
    # --block: the head lives as long as this process, so the test stops its own cluster and nothing else
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0", "--port", "6391",
         "--dashboard-host", "127.0.0.1", "--dashboard-port", "8275", "--object-store-memory", "200000000",
         "--disable-usage-stats"], env={k: v for k, v in env.items() if k != "RAY_ADDRESS"}, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_jobs_api(env, head)

        # A local run beside a `ray start` cluster starts its own cluster instead of attaching to that one.
        local_env = {k: v for k, v in env.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
        local = sh([str(BIN / "raydebias"), "run", "configs/demo.yaml", "--run-dir", str(tmp_path / "local"),
                    "--set", "stages=[data,clip]", "--set", "clip.steps=2"], local_env, timeout=300, check=False)
        assert local.returncode == 0, local.stdout[-2000:] + local.stderr[-2000:]
        assert "started a local cluster" in local.stdout + local.stderr

        # Without the token the cluster refuses the job.
        no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
        no_token["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
        refused = sh(["bash", "deploy/submit.sh", "configs/demo.yaml"], no_token, timeout=120, check=False)
        assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower()

        # the demo's config, every stage of it, shrunk to seconds
        sets = [a for kv in tiny_generative for a in ("--set", kv)]
        p = sh(["bash", "deploy/submit.sh", "configs/demo.yaml", "--run-dir", str(run_dir), *sets], env, timeout=540)
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
    finally:
        head.terminate()  # `ray start --block` stops the processes it started on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)


def wait_for_jobs_api(env, head, timeout=120):
    import time

    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert head.poll() is None, f"`ray start --head` exited with {head.returncode}"
        try:
            if httpx.get("http://127.0.0.1:8275/api/version", timeout=5).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError("the head's dashboard did not come up")
