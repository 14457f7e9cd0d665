"""Connecting to (or starting) a Ray cluster from ``RayConfig``."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from raydebias._internal.io import as_path, atomic_write_json, is_remote, local_copy, remove_path, upload

if TYPE_CHECKING:  # annotations only: config imports the core, whose context imports this module
    from raydebias.config import RayConfig


# glibc malloc for the workers of a local cluster: with its defaults, torch's per-batch buffers (1–32 MB) are mmapped
# and unmapped, or trimmed, at every step: a classifier epoch of the demo faulted in ~1.3 GB of fresh pages (340 k
# minor faults) and ran 1.4× as long as with these settings (BENCHMARKS.md, "Worker malloc"). 32 MiB is glibc's own
# upper bound for its adaptive mmap threshold; up to 64 MiB of freed heap stays with a process. Values already in the
# environment win; on a cluster this package does not start, set them in the nodes' environment (deploy/Dockerfile).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(64 * 2**20)}


def apply_malloc_env() -> None:
    """Put :data:`MALLOC_ENV` in this process's environment where unset, so that the processes it starts from now on
    (a local cluster's raylet and workers) run with it; this process's own malloc is already set up."""
    for k, v in MALLOC_ENV.items():
        os.environ.setdefault(k, v)


def init_ray(cfg: RayConfig, log: Callable[[str], None] = print) -> None:
    """``address`` null → ``$RAY_ADDRESS`` (set by ``ray job submit``) or a new local cluster; ``local`` → a new
    local cluster, whatever else runs on the machine; ``auto`` or an address → attach (``ray.init(address=...)``).
    Reuses an already initialised Ray."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.address
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        _keep_token_in_env_if_home_is_read_only(log)
        # Ray Train 2.60 patches print() in its workers to tee each line to the worker's stdout *and* its logger,
        # so every line reached run.log twice; the cluster started here (and its workers) inherits this.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        apply_malloc_env()
        ray.init(
            address="local",  # a new cluster even when `ray start` left one (and its address file) on this host
            num_cpus=cfg.num_cpus or os.cpu_count(),
            num_gpus=cfg.num_gpus,
            object_store_memory=cfg.object_store_memory,
            include_dashboard=cfg.include_dashboard,
            dashboard_host="127.0.0.1",
            log_to_driver=True,
            configure_logging=True,
            logging_level="warning",
        )
        log(f"[ray] started a local cluster: {ray.cluster_resources()}")
    else:
        ray.init(address=address, logging_level="warning")
        log(f"[ray] connected to {address}: {ray.cluster_resources()}")
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = True


def _keep_token_in_env_if_home_is_read_only(log: Callable[[str], None]) -> None:
    """A new local cluster with token auth (Ray's default) saves a generated token to ``~/.ray/auth_token``; on a
    read-only home (a container's ``readOnlyRootFilesystem``, ``docker run --read-only``) that write fails and
    ``ray.init`` with it. Then the token lives in this process's environment (``RAY_AUTH_TOKEN``, inherited by the
    cluster it starts) instead. A token already given (env, ``RAY_AUTH_TOKEN_PATH``, the file) is left alone."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or os.environ.get("RAY_AUTH_TOKEN") \
            or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    try:
        d = Path.home() / ".ray"
        if (d / "auth_token").is_file():
            return
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".writable-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except (OSError, RuntimeError):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        log("[ray] ~/.ray is not writable: the local cluster's auth token is kept in this process's environment")


def keyed_train_run(storage: Path, base: str, key: str | None) -> str:
    """The Ray Train run name for one stage run: ``<base>-<key[:12]>``. Ray Train resumes a run from the
    checkpoints under ``storage/<name>``, so keying the name by the stage key means a rerun after a killed driver
    resumes only the same inputs and config; runs of ``base`` under other keys (stale: another lr, epochs,
    width or dataset) are deleted here, so they are neither resumed nor left behind."""
    name = f"{base}-{key[:12]}" if key else base
    storage = as_path(storage)
    if storage.is_dir():
        for d in storage.iterdir():
            if d.is_dir() and d.name != name and (d.name == base or d.name.startswith(f"{base}-")):
                remove_path(d)
    return name


# --- Ray Train: a worker group, or local mode in one Ray task -----------------------------------------------------

_LOCAL_RUN: Path | None = None  # set inside ``_fit_local``'s task: where ``report`` keeps the local-mode checkpoint


def fit_torch(loop: Callable[[dict], object], config: dict, *, num_workers: int, resources: dict[str, float],
              storage: Path, name: str, max_failures: int = 1):
    """Run a Ray Train loop and return its last reported checkpoint (``ray.train.Checkpoint``, or None).

    ``num_workers >= 1``: ``TorchTrainer`` with that many workers of ``resources`` each (DDP over them; a failed
    worker group restarts from the last checkpoint, ``max_failures`` times). ``num_workers == 0``: Ray Train's local
    mode (``ScalingConfig(num_workers=0)``, the loop and the same ``ray.train`` API in one process) inside one Ray task
    of ``resources``, retried ``max_failures`` times from the last checkpoint. Local mode skips the worker group's
    controller and helper actors: ~13 s less per fit and ~10 % more torch throughput on 2 cores (BENCHMARKS.md,
    "Round 8"). Loops report through :func:`report` and resume through :func:`get_checkpoint`, which keep the
    checkpoint under ``storage/name`` in both modes (local mode persists none itself)."""
    import ray
    from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if num_workers == 0:
        opts = {"num_cpus": resources.get("CPU", 1), "num_gpus": resources.get("GPU", 0),
                "max_retries": max_failures, "retry_exceptions": True}
        ray.get(ray.remote(_fit_local).options(**opts).remote(loop, config, str(storage), name))
        d = _local_checkpoint_dir(as_path(storage) / name)
        return Checkpoint.from_directory(str(d)) if d is not None else None
    trainer = TorchTrainer(
        loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=bool(resources.get("GPU")),
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=str(storage), failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)))
    result = trainer.fit()
    if result.error:
        raise result.error
    return result.checkpoint


def _fit_local(loop: Callable[[dict], object], config: dict, storage: str, name: str) -> None:
    global _LOCAL_RUN
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    _LOCAL_RUN = as_path(storage) / name
    try:
        result = TorchTrainer(loop, train_loop_config=config, scaling_config=ScalingConfig(num_workers=0)).fit()
        if result.error:
            raise result.error
    finally:
        _LOCAL_RUN = None


def report(metrics: dict, checkpoint_dir: str | Path | None = None) -> None:
    """``ray.train.report`` for loops run by :func:`fit_torch`; ``checkpoint_dir`` (a temporary directory) is
    consumed: persisted by Ray Train (worker group) or moved to the run's storage (local mode), then removed."""
    import shutil

    import ray.train

    if _LOCAL_RUN is None:
        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        ray.train.report(metrics, checkpoint=ckpt)
    else:
        if checkpoint_dir is not None:
            _keep_local_checkpoint(_LOCAL_RUN, Path(checkpoint_dir))
        ray.train.report(metrics)
    if checkpoint_dir is not None:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)


def get_checkpoint():
    """The checkpoint to resume from (``ray.train.Checkpoint`` or None), in either mode of :func:`fit_torch`."""
    import ray.train

    if _LOCAL_RUN is None:
        return ray.train.get_checkpoint()
    d = _local_checkpoint_dir(_LOCAL_RUN)
    return ray.train.Checkpoint.from_directory(str(d)) if d is not None else None


def _keep_local_checkpoint(run, src: Path) -> None:
    """Replace ``run/checkpoint`` by a copy of ``src``; a crash at any point leaves a whole checkpoint to resume
    from (``checkpoint``, else ``checkpoint.old``; ``checkpoint.tmp`` is never read). On an object store (no
    rename) the copy is uploaded to a new folder and committed by rewriting the pointer ``checkpoint.json``
    (one PUT), then older folders are removed."""
    import shutil
    import uuid

    if is_remote(run):
        name = f"checkpoint-{uuid.uuid4().hex[:12]}"
        upload(src, run / name)
        atomic_write_json(run / "checkpoint.json", {"dir": name})
        for d in run.iterdir():
            if d.name.startswith("checkpoint-") and d.name != name:
                remove_path(d)
        return
    run.mkdir(parents=True, exist_ok=True)
    dst, old, tmp = run / "checkpoint", run / "checkpoint.old", run / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def _local_checkpoint_dir(run) -> Path | None:
    """The folder of ``run``'s last kept checkpoint (see :func:`_keep_local_checkpoint`) on local disk, or None; a
    remote one through :func:`~raydebias._internal.io.local_copy` (downloaded once per checkpoint)."""
    import json

    if is_remote(run):
        pointer = run / "checkpoint.json"
        if not pointer.exists():
            return None
        return Path(local_copy(run / json.loads(pointer.read_text())["dir"]))
    for d in (run / "checkpoint", run / "checkpoint.old"):
        if d.is_dir():
            return d
    return None


def map_items(fn: Callable[..., Any], items: dict[str, list], fn_kwargs: dict[str, Any] | None = None,
              num_cpus: float = 1) -> list[Any]:
    """``fn(chunk, **fn_kwargs)`` over consecutive chunks of ``items`` (columns of equal length: a batch in Ray
    Data's ``numpy``-dict format) as Ray tasks, about two per CPU (:func:`items_per_call`); returns the results in
    chunk order. For passes over a list of Parquet parts whose results are small columns: a Ray Data pass over the
    same items costs about 1.4 s more to plan and start (BENCHMARKS.md, "Scale"), which dominates a stage of a few
    seconds. The keyword arguments are stored once in the object store and shared by every task."""
    import ray

    n = len(next(iter(items.values()), []))
    if not n:
        return []
    task = ray.remote(num_cpus=num_cpus)(_call_with).options(name=getattr(fn, "__name__", "map_items"))
    kwargs = ray.put(fn_kwargs or {})
    k = items_per_call(n)
    return ray.get([task.remote(fn, {c: list(v[i:i + k]) for c, v in items.items()}, kwargs) for i in range(0, n, k)])


def _call_with(fn: Callable[..., Any], chunk: dict[str, list], kwargs: dict[str, Any]) -> Any:
    return fn(chunk, **kwargs)


def items_per_call(n: int) -> int:
    """Batch size for a Ray Data UDF over ``n`` small work items (Parquet parts): about two calls per CPU of the
    cluster, so that a few calls share the per-call cost and every CPU still gets work."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    return max(1, -(-n // max(1, 2 * cpus)))
