"""Run one config for several seeds (the seed of the run and of the built-in dataset draw) and print one table of
mean ± std per method — test AGA / WGA, the generation fidelity of the set each method trained on — and the wall
time of each run. Run-to-run spread on 2 CPU cores is several points, so claims are made on these means.

    python bench/seeds.py configs/demo.yaml --seeds 0 1 2 --out runs/seeds-demo
    python bench/seeds.py configs/demo.yaml --seeds 0 1 2 --out runs/seeds-999 --set data.builtin.aligned=0.999
    python bench/seeds.py configs/full.yaml --seeds 0 1 --out runs/seeds-full

A finished seed's run directory is reused (``raydebias run`` skips completed stages), so an interrupted bench
resumes. The fidelity probes are ensembles of ``--probes`` backbones (``evaluate.fidelity_probes``, default 3: one
probe's seed moves the fidelity numbers by several points; docs/metrics.md). ``--json`` also writes the table as
JSON next to the run directories.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FIDELITY = ("class_aligned", "class_conflicting", "bias_aligned", "bias_conflicting")


def _ms(values: list) -> str:
    v = [x for x in values if isinstance(x, (int, float))]
    if not v:
        return "–"
    return f"{np.mean(v):.3f} ± {np.std(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def summarise(run_dirs: list[Path]) -> dict:
    """Per method: the metric lists over seeds; per synthetic set: the fidelity lists."""
    methods: dict[str, dict[str, list]] = {}
    sets: dict[str, dict[str, list]] = {}
    for d in run_dirs:
        m = json.loads((d / "metrics.json").read_text())
        for r in m["rows"]:
            row = methods.setdefault(r["method"], {})
            for k in ("aga", "wga", "accuracy", "conflicting_acc"):
                row.setdefault(k, []).append(r.get(k))
        for name, fs in (m.get("generation", {}).get("fidelity") or {}).get("sets", {}).items():
            s = sets.setdefault(name, {})
            for k in (*FIDELITY, "class_fidelity"):
                s.setdefault(k, []).append(fs.get(k))
            s.setdefault("cas", []).append((fs.get("cas") or {}).get("aga"))
    return {"methods": methods, "sets": sets}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", required=True, help="parent directory of the per-seed run directories")
    ap.add_argument("--set", action="append", default=[], metavar="K=V")
    ap.add_argument("--probes", type=int, default=3, help="evaluate.fidelity_probes (backbones per fidelity probe)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    run_dirs, times = [], []
    for seed in args.seeds:
        d = out / f"seed{seed}"
        # the CLI of this interpreter's install: works from an unactivated venv (`.venv/bin/python bench/seeds.py`)
        cmd = [sys.executable, "-m", "raydebias.cli", "run", args.config, "--run-dir", str(d),
               "--set", f"seed={seed}", "--set", f"data.builtin.seed={seed}", "--set", f"evaluate.fidelity_probes={args.probes}"]
        for kv in args.set:
            cmd += ["--set", kv]
        t0 = time.perf_counter()
        print("$ " + " ".join(cmd), flush=True)
        rc = subprocess.run(cmd, check=False).returncode
        times.append(time.perf_counter() - t0)
        if rc:
            print(f"seed {seed}: exit code {rc}", file=sys.stderr)
            return rc
        run_dirs.append(d)
    s = summarise(run_dirs)
    print(f"\n{args.config} {' '.join(args.set)}: seeds {args.seeds}, wall time per run "
          + ", ".join(f"{t / 60:.1f} min" for t in times))
    print(f"{'method':<24}{'AGA':>18}{'WGA':>18}{'conflicting acc':>18}")
    for name, r in s["methods"].items():
        print(f"{name:<24}{_ms(r['aga']):>18}{_ms(r['wga']):>18}{_ms(r['conflicting_acc']):>18}")
    if s["sets"]:
        print(f"\n{'synthetic set':<30}" + "".join(f"{k:>20}" for k in (*FIDELITY, "cas")))
        for name, r in s["sets"].items():
            print(f"{name:<30}" + "".join(f"{_ms(r[k]):>20}" for k in (*FIDELITY, "cas")))
    if args.json:
        (out / "seeds.json").write_text(json.dumps({"config": args.config, "set": args.set, "seeds": args.seeds,
                                                    "wall_s": times, **s}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
