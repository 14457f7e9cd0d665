"""The pods run with ``readOnlyRootFilesystem: true`` and only /tmp and the run dir writable (k8s/, deploy/Dockerfile).
Emulated here for every Python process of a run — the driver and the Ray workers it starts — by an audit hook that
refuses writes elsewhere with EROFS (``read_only_root/sitecustomize.py``), with the image's ``ENV`` lines and a home
directory that cannot be written: the demo's whole pipeline runs and then serves a prediction over HTTP."""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end-to-end: `pytest -m "not slow"` is the fast loop

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
HOOK = Path(__file__).parent / "read_only_root"
HOME = "/nonexistent-raydebias-home/ray"  # the image's home, read-only: the hook refuses every write under it
# writes a process may attempt and recover from: the probe before Ray's token file (the token then stays in env)
RECOVERED = {("os.mkdir", f"{HOME}/.ray")}


def image_env() -> dict[str, str]:
    """The ``ENV K=V`` lines of deploy/Dockerfile."""
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    return dict(m.groups() for m in re.finditer(r"^ENV (\w+)=(\S+)$", text, re.M))


def container_env(log_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "MPLCONFIGDIR", "XDG_CACHE_HOME", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(image_env(), HOME=HOME, PYTHONPATH=str(HOOK), RD_WRITABLE=os.pathsep.join(["/tmp", "/dev"]),
               RD_VIOLATIONS=str(log_dir))
    return env


def violations(log_dir: Path) -> set[tuple[str, str]]:
    out = set()
    for f in log_dir.glob("violations-*.txt"):
        out |= {tuple(line.split("\t")[:2]) for line in f.read_text().splitlines()}
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(900)
def test_pipeline_and_serve_on_a_read_only_root(tmp_path, tiny_generative):
    assert str(tmp_path).startswith("/tmp/"), "the run dir stands for the writable PVC mount"
    assert "MPLCONFIGDIR" in image_env()
    log_dir, run_dir = tmp_path / "hook", tmp_path / "runs" / "demo"
    log_dir.mkdir()
    env = container_env(log_dir)
    args = [str(BIN / "raydebias"), "run", "configs/demo.yaml", "--run-dir", str(run_dir)]
    for kv in (*tiny_generative, "ray.include_dashboard=false", "ray.num_cpus=2"):
        args += ["--set", kv]
    run = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=800)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    hooked = [f.read_text() for f in log_dir.glob("active-*.txt")]
    assert any("raydebias run" in c for c in hooked), hooked  # the driver ran under the hook ...
    assert any("default_worker.py" in c for c in hooked), hooked  # ... and so did Ray's workers
    assert violations(log_dir) <= RECOVERED, violations(log_dir) - RECOVERED
    assert json.loads((run_dir / "metrics.json").read_text())["rows"]
    assert (run_dir / "report.html").is_file()

    # the RayService container: serve that run dir and answer one prediction
    port = free_port()
    from raydebias.data.splits import load_split
    from raydebias.data.transforms import encode_png

    png = encode_png(load_split(run_dir / "stages" / "data" / "test.parquet", 32)["x"][0])
    serve = subprocess.Popen([str(BIN / "raydebias"), "serve", str(run_dir), "--port", str(port)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, answer = time.time() + 240, None
        while time.time() < deadline and serve.poll() is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/predict", data=png,
                                             headers={"Content-Type": "image/png"})
                with urllib.request.urlopen(req, timeout=10) as r:
                    answer = (r.status, json.loads(r.read()))
                break
            except OSError:
                time.sleep(2)
    finally:
        import signal

        os.killpg(serve.pid, signal.SIGINT)
        try:
            out, _ = serve.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            out, _ = serve.communicate()
    assert answer is not None and answer[0] == 200, out[-3000:]
    assert answer[1]["class_id"] in range(10) and "model_version" in answer[1], answer
    assert any("raydebias serve" in f.read_text() for f in log_dir.glob("active-*.txt"))
    assert violations(log_dir) <= RECOVERED, violations(log_dir) - RECOVERED
