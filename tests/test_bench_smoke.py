"""The GPU benchmark's code path on a tiny random Stable-Diffusion layout on CPU: it runs end to end and prints
its JSON line (no timing is asserted here: numbers come from the bench itself, BENCHMARKS.md)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_generate_bench_runs_on_a_tiny_model():
    out = subprocess.run([sys.executable, "bench/gpu_generate.py", "--size", "tiny", "--device", "cpu", "--dtype",
                          "float32", "--batches", "1", "2", "--steps", "2", "--repeats", "1", "--lora-adapters", "2",
                          "--lora-steps", "1", "--lora-batch", "2"], cwd=ROOT, capture_output=True, text=True,
                         timeout=500)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(res["pipeline_img_s"]) == set(res["raydebias_img_s"]) == {"1", "2"}
    assert all(v > 0 for v in [*res["pipeline_img_s"].values(), *res["raydebias_img_s"].values()])
    assert res["lora_samples_s"]["sequential"] > 0 and res["lora_samples_s"]["batched"] > 0
    no_cuda = subprocess.run([sys.executable, "bench/gpu_generate.py", "--device", "cuda"], cwd=ROOT,
                             capture_output=True, text=True, env={"CUDA_VISIBLE_DEVICES": "", "PATH": ""})
    assert no_cuda.returncode == 2 and "needs CUDA" in no_cuda.stderr
