"""Connecting to (or starting) a Ray cluster from ``RayConfig``."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable

from raydebias.config import RayConfig


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
    import shutil

    name = f"{base}-{key[:12]}" if key else base
    storage = Path(storage)
    if storage.is_dir():
        for d in storage.iterdir():
            if d.is_dir() and d.name != name and (d.name == base or d.name.startswith(f"{base}-")):
                shutil.rmtree(d, ignore_errors=True)
    return name
