"""Connecting to (or starting) a Ray cluster from ``RayConfig``."""

from __future__ import annotations

import os
from typing import Callable

from raydebias.config import RayConfig


def init_ray(cfg: RayConfig, log: Callable[[str], None] = print) -> None:
    """``address`` null → ``$RAY_ADDRESS`` (set by ``ray job submit``) or a new local cluster; ``local`` → a new
    local cluster; anything else is passed to ``ray.init(address=...)``. Reuses an already initialised Ray."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.address
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        ray.init(
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
