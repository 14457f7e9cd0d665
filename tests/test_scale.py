"""The driver's memory does not grow with the dataset: data → train → evaluate at 64×64 on 2,500 and 10,000 rows,
each in a fresh driver process, whose peak RSS (VmHWM) may differ by less than 100 MB (an in-memory data path adds
≈ 34 KB a row: ≈ 250 MB here). Throughput and the other processes' memory are measured by bench/scale.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

DRIVER = """
import json, sys
from pathlib import Path
from raydebias.config import load_config
from raydebias.pipeline import run_pipeline

uri, run_dir = sys.argv[1], sys.argv[2]
cfg = load_config(str(Path(sys.argv[3]) / "configs" / "parquet_dataset.yaml"), [
    f"data.uri={uri}", f"run_dir={run_dir}", "data.image_size=64", "stages=[data, train, evaluate]",
    "method=erm", "baselines=[]", "train.epochs=1", "train.batch_size=256", "models.classifier.width=4",
    "train.num_workers=0", "ray.num_cpus=2", "ray.address=local"])
ctx = run_pipeline(cfg, log=lambda m: None)
status = dict(l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines() if ":" in l)
counts = json.loads((Path(run_dir) / "stages" / "data" / "info.json").read_text())["counts"]
print(json.dumps({"hwm_kb": int(status["VmHWM"].split()[0]), "counts": counts}))
"""


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_driver_peak_rss_is_flat_from_2500_to_10k_rows(tmp_path):
    sys.path.insert(0, str(ROOT))
    from bench.scale import build_dataset

    peaks = {}
    for n in (2_500, 10_000):
        data = build_dataset(tmp_path / f"data-{n}", n)
        out = subprocess.run([sys.executable, "-c", DRIVER, str(data), str(tmp_path / f"run-{n}"), str(ROOT)],
                             cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        res = json.loads(out.stdout.strip().splitlines()[-1])
        assert sum(res["counts"].values()) == n  # every row went through
        peaks[n] = res["hwm_kb"] / 1024
    # a driver that held the rows would grow by ~34 KB a row: ~250 MB over these 7,500 rows
    assert peaks[10_000] - peaks[2_500] < 100, peaks
