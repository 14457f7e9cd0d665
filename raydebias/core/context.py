"""Stage result and run context (see :mod:`raydebias.core`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from raydebias._internal.io import as_path, is_remote
from raydebias._internal.ray_utils import init_ray

if TYPE_CHECKING:
    from raydebias.config import RunConfig


@dataclass
class StageResult:
    """What a stage produced: output paths (relative to the run dir) and a small JSON summary."""

    outputs: list[str]
    summary: dict[str, Any] = field(default_factory=dict)


def run_path(run_dir: str | Path):
    """The run directory as a path: an absolute :class:`~pathlib.Path` on local disk, a :class:`upath.UPath` for a
    URI (``s3://bucket/runs/x``)."""
    path = as_path(run_dir)
    return path if is_remote(path) else path.expanduser().resolve()


class RunContext:
    """Everything a stage needs: the config, the run directory, logging and a lazily started Ray."""

    def __init__(self, cfg: RunConfig, log: Callable[[str], None] = print, methods: list[Any] | None = None):
        self.cfg = cfg
        self.run_dir = run_path(cfg.run_dir)
        self.log = log
        self.methods = list(methods or [])  # the run's registered methods (raydebias.core.registry.Method)
        self.node_key: str | None = None  # the cache key of the stage being run (set by the pipeline)
        self._ray_started = False

    def stage_dir(self, name: str) -> "Path":
        d = self.run_dir / "stages" / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def rel(self, path: Path) -> str:
        path = as_path(path)
        return str((path if is_remote(path) else path.resolve()).relative_to(self.run_dir))

    def ensure_ray(self) -> None:
        if not self._ray_started:
            init_ray(self.cfg.ray, log=self.log)
            self._ray_started = True

    @property
    def data_info(self) -> dict[str, Any]:
        return json.loads((self.run_dir / "stages" / "data" / "info.json").read_text())
