"""Stage graph, run directory, manifest and resume.

A run is a list of nodes (``data``, ``train/<method>``, ``evaluate``, ``report``). Each node's *key* hashes the
config block it reads, the content hashes of its upstream nodes' outputs and the package version. A node whose
manifest entry is ``completed`` with the same key and intact outputs is skipped, so re-running a finished run
does no work, and changing one block reruns only what depends on it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

from raydebias import __version__
from raydebias._internal.io import (
    as_path,
    atomic_write_json,
    atomic_write_text,
    is_remote,
    sha256_file,
    sha256_json,
    url_to_fs,
)
from raydebias.config import RunConfig, dump_config
from raydebias.core import RunContext, Stage, toposort
from raydebias.core.context import run_path
from raydebias.core.registry import method_blocks, stage_kinds
from raydebias.methods import get_method
from raydebias.methods.shared import DATA, REPORT, SHARED, evaluate


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "raydebias": __version__}
    for pkg in ("ray", "torch", "torchvision", "diffusers", "peft", "open_clip_torch", "faiss-cpu", "pyarrow",
                "pydantic", "scikit-learn"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def unused_method_keys(cfg: RunConfig) -> list[str]:
    """``block.key=value`` for every non-default key of a method's config block (``Method.config``) that no method
    of this run declares and no stage of its graph reads: a setting that would do nothing. The CLI rejects such a
    key given with ``--set`` and warns about one that comes from the config file (a shipped multi-method config
    run with fewer methods)."""
    methods = [get_method(m) for m in cfg.methods]
    stages = _graph(cfg, methods)
    used = {m.config[0] for m in methods if m.config} | {r.lstrip("-").split(".")[0] for s in stages for r in s.reads}
    out = []
    for name, model in method_blocks().items():
        if name not in used:
            value, default = getattr(cfg, name).model_dump(), model().model_dump()
            out += [f"{name}.{k}={value[k]!r}" for k in value if value[k] != default[k]]
    return out


def build_graph(cfg: RunConfig) -> list[Stage]:
    """The stages this config asks for, in dependency order: data, the shared building blocks the run's methods
    need, each method's own stages (:mod:`raydebias.methods`), evaluate and report; only the kinds listed in
    ``cfg.stages`` are kept."""
    want, known = set(cfg.stages), set(stage_kinds())
    stages = _graph(cfg, [get_method(m) for m in cfg.methods])
    undeclared = sorted({f"{s.name} (kind {s.kind!r})" for s in stages if s.kind not in known})
    if undeclared:  # a stage no ``stages:`` entry could switch on would be dropped silently
        raise ValueError(f"stages of undeclared kinds: {undeclared}; a method declares its kinds in Method.kinds")
    return toposort([s for s in stages if s.kind in want])


def _graph(cfg: RunConfig, methods: list) -> list[Stage]:
    """Every stage the run's methods need, before the ``stages:`` filter."""
    stages: dict[str, Stage] = {DATA.name: DATA}
    for name, stage in SHARED.items():
        if any(name in m.shared for m in methods):
            stages[name] = stage
    for m in methods:
        for stage in m.stages(cfg):
            stages.setdefault(stage.name, stage)  # a stage two methods share (the amplifier) runs once
    # a building block a stage depends on joins the graph even when no method names it in ``shared`` (which one
    # DiffInject and GAMMA-FACE edit depends on the model source)
    todo = list(stages.values())
    while todo:
        for dep in todo.pop().deps:
            if dep in SHARED and dep not in stages:
                stages[dep] = SHARED[dep]
                todo.append(SHARED[dep])
    stages["evaluate"] = evaluate([m.result_node for m in methods])
    stages["report"] = REPORT
    return list(stages.values())


class Manifest:
    """``manifest.json``: per node status, key, input hashes, output hashes, timings; written atomically."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = {"stages": {}}
        if path.exists():
            self.data = json.loads(path.read_text())
            self.data.setdefault("stages", {})

    def entry(self, name: str) -> dict[str, Any] | None:
        return self.data["stages"].get(name)

    def set(self, name: str, **fields: Any) -> None:
        self.data["stages"].setdefault(name, {}).update(fields)
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.data)


def _hash_outputs(run_dir: Path, outputs: list[str]) -> dict[str, str]:
    hashes = {}
    for rel in outputs:
        p = run_dir / rel
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for f in files:
            hashes[str(f.relative_to(run_dir))] = sha256_file(f)
    return hashes


def _intact(run_dir: Path, hashes: dict[str, str]) -> bool:
    for rel, h in hashes.items():
        p = run_dir / rel
        if not p.is_file() or sha256_file(p) != h:
            return False
    return True


class PipelineError(RuntimeError):
    pass


def check_graph(cfg: RunConfig) -> list[Stage]:
    """The config's graph, checked before anything runs: every dependency of a node is a node of this run or a
    stage the run directory's manifest records as completed. Raises :class:`PipelineError` naming the stage."""
    nodes = build_graph(cfg)
    names = {n.name for n in nodes}
    mpath = run_path(cfg.run_dir) / "manifest.json"
    done = set()
    if mpath.exists():
        done = {k for k, e in json.loads(mpath.read_text()).get("stages", {}).items() if e.get("status") == "completed"}
    for n in nodes:
        missing = [d for d in n.deps if d not in names and d not in done]
        if missing:
            stage = missing[0].split("/")[0]
            raise PipelineError(f"stage {n.name!r} needs {missing[0]!r}, which this config does not run and "
                                f"{cfg.run_dir} has not completed: add {stage!r} to `stages` (have {cfg.stages})")
    return nodes


class RunDirLock:
    """``<run_dir>/.lock``: one run per run directory, held as a kernel lock (``flock``) on the open file.

    The kernel releases the lock when the holding process dies, however it dies and whether or not its parent has
    reaped it (a SIGKILLed driver that is still a zombie holds nothing), so a stale lock cannot block a rerun. The
    file also names the holder (pid, host, since) for the message a second run gets. ``flock`` holds between
    processes of one host and on shared filesystems that implement it (NFSv4, CephFS, Lustre with ``flock``)."""

    def __init__(self, run_dir: Path):
        self.path = as_path(run_dir) / ".lock"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunDirLock":
        import fcntl
        import socket

        for _ in range(8):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise PipelineError(
                    f"{self.path.parent} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, "
                    f"since {holder.get('since')}); wait for it to finish") from None
            try:  # the file may have been unlinked by a holder releasing it after we opened it: lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            me = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            self._fd = fd
            return self
        raise PipelineError(f"could not take {self.path}")

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked: a waiter that opened it retries on the new file
            os.close(self._fd)  # releases the flock
            self._fd = None


class RunDirLease:
    """``<run_dir>/.lock`` on an object store (``s3://``, ``gs://``): a lease that holds across hosts.

    The holder creates the object with a conditional write (create only if absent: S3's ``If-None-Match``) and
    rewrites it every ``seconds / 6`` from a heartbeat thread. A second run that finds the object watches it for
    ``seconds``: if the holder's heartbeat moves the object's modification time it is alive and the second run
    stops with the holder's name; if not, the holder is dead (a killed driver, a lost node) and the lease is taken
    over. So a rerun after a killed driver waits at most ``seconds`` (``RAYDEBIAS_LEASE_SECONDS``, default 30). A
    heartbeat that finds another holder's token in the object marks the lease lost, and the pipeline stops before
    its next stage."""

    def __init__(self, run_dir, seconds: float | None = None):
        self.path = str(run_dir).rstrip("/") + "/.lock"
        self.fs, self._key = url_to_fs(self.path)
        self.seconds = float(seconds or os.environ.get("RAYDEBIAS_LEASE_SECONDS", 30))
        self.lost = False
        self._beats = 0
        self._token: str | None = None
        self._stop = None

    @property
    def held(self) -> bool:
        return self._token is not None and not self.lost

    def _body(self) -> bytes:
        import socket

        self._beats += 1  # every rewrite differs, so its ETag does (the watcher's sign of life)
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": self._since,
                           "token": self._token, "renewed": _now(), "beat": self._beats}).encode()

    def _stamp(self) -> str | None:
        self.fs.invalidate_cache(self._key)
        try:
            info = self.fs.info(self._key)
        except FileNotFoundError:
            return None
        return str(info.get("ETag") or info.get("LastModified") or info.get("mtime")) + str(info.get("size"))

    def _holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.fs.cat_file(self._key))
        except (FileNotFoundError, ValueError):
            return {}

    def __enter__(self) -> "RunDirLease":
        import threading
        import uuid

        self._token, self._since = uuid.uuid4().hex, _now()
        deadline = None
        while True:
            try:
                self.fs.pipe_file(self._key, self._body(), mode="create")
                break
            except FileExistsError:
                pass
            stamp, holder = self._stamp(), self._holder()
            if deadline is None:
                deadline, seen = time.time() + self.seconds, stamp
            elif stamp != seen:
                self._token = None
                raise PipelineError(
                    f"{self.path.rsplit('/', 1)[0]} is in use by another run (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, since {holder.get('since')}); wait for it to finish")
            if time.time() >= deadline and stamp is not None:  # no heartbeat for a whole lease: the holder is dead
                self.fs.rm_file(self._key)
                continue
            time.sleep(min(1.0, self.seconds / 6))
        self._stop = threading.Event()
        threading.Thread(target=self._heartbeat, daemon=True, name="raydebias-lease").start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.seconds / 6):
            try:
                if self._holder().get("token") != self._token:
                    self.lost = True
                    return
                self.fs.pipe_file(self._key, self._body())
            except Exception:  # noqa: BLE001 - a failed renewal is retried at the next beat
                continue

    def __exit__(self, *exc) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._token is not None and self._holder().get("token") == self._token:
            self.fs.rm_file(self._key)
        self._token = None


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}


def run_pipeline(cfg: RunConfig, log: Callable[[str], None] = print,
                 progress: Callable[[dict], None] | None = None) -> RunContext:
    """Run (or resume) every node of ``cfg``; returns the context (run dir, config). One run per run directory
    (:class:`RunDirLock`); the graph is checked before any stage starts (:func:`check_graph`). ``progress`` gets
    one event per stage start and end: ``{"event": "start" | "done" | "skip" | "failed", "i", "n", "stage",
    "seconds", "error"}`` (the console of ``raydebias run``)."""
    ctx = RunContext(cfg, log=log, methods=[get_method(m) for m in cfg.methods])
    nodes = check_graph(cfg)
    unused = unused_method_keys(cfg)
    if unused:
        log(f"[config] warning: no method of this run reads {', '.join(unused)}")
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    with (RunDirLease(ctx.run_dir) if is_remote(ctx.run_dir) else RunDirLock(ctx.run_dir)) as lock:
        _run_nodes(ctx, nodes, log, progress or (lambda event: None), lock)
    return ctx


def _run_nodes(ctx: RunContext, nodes: list[Stage], log: Callable[[str], None],
               progress: Callable[[dict], None], lock: Any = None) -> None:
    cfg = ctx.cfg
    atomic_write_text(ctx.run_dir / "config.yaml", dump_config(cfg))
    manifest = Manifest(ctx.run_dir / "manifest.json")
    manifest.data.update(
        run_id=manifest.data.get("run_id") or f"{ctx.run_dir.name}-{_dt.datetime.now():%Y%m%d-%H%M%S}",
        versions=library_versions(),
        command=" ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)),
    )
    manifest.save()
    t_run = time.time()
    for i, node in enumerate(nodes, 1):
        if lock is not None and not lock.held:
            raise PipelineError(f"{ctx.run_dir}: another run took this run directory's lease; stopping before "
                                f"{node.name!r}")
        event = {"i": i, "n": len(nodes), "stage": node.name}
        inputs = {}
        for dep in node.deps:
            e = manifest.entry(dep)
            if e is None or e.get("status") != "completed":
                raise PipelineError(f"stage {node.name!r} needs {dep!r}, which has not completed; "
                                    f"add it to `stages` (have {cfg.stages})")
            inputs[dep] = sha256_json(e["outputs"])
        key = sha256_json({"config": node.config_key(cfg), "inputs": inputs, "version": __version__})
        prev = manifest.entry(node.name)
        if prev and prev.get("status") == "completed" and prev.get("key") == key and _intact(ctx.run_dir, prev["outputs"]):
            log(f"[pipeline] skip {node.name}: completed {prev.get('finished')}, inputs unchanged")
            manifest.set(node.name, last_action="skipped", skipped_at=_now())
            progress({**event, "event": "skip"})
            continue
        log(f"[pipeline] run  {node.name}")
        ctx.node_key = key
        t0 = time.time()
        manifest.set(node.name, status="running", key=key, inputs=inputs, started=_now(), last_action="ran")
        progress({**event, "event": "start"})
        try:
            result = node.run(ctx)
        except BaseException as e:
            manifest.set(node.name, status="failed", error=f"{type(e).__name__}: {e}", finished=_now(),
                         seconds=round(time.time() - t0, 2))
            progress({**event, "event": "failed", "seconds": time.time() - t0,
                      "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]})
            raise
        manifest.set(node.name, status="completed", outputs=_hash_outputs(ctx.run_dir, result.outputs),
                     summary=result.summary, finished=_now(), seconds=round(time.time() - t0, 2), error=None)
        log(f"[pipeline] done {node.name} in {time.time() - t0:.1f}s")
        progress({**event, "event": "done", "seconds": time.time() - t0})
    manifest.data["last_run_seconds"] = round(time.time() - t_run, 2)
    manifest.save()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
