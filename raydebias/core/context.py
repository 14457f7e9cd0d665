"""Stage result and run context (see :mod:`raydebias.core`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from raydebias.config import RunConfig


@dataclass
class StageResult:
    """What a stage produced: output paths (relative to the run dir) and a small JSON summary."""

    outputs: list[str]
    summary: dict[str, Any] = field(default_factory=dict)


class RunContext:
    """Everything a stage needs: the config, the run directory, logging and a lazily started Ray."""

    def __init__(self, cfg: RunConfig, log: Callable[[str], None] = print, methods: list[Any] | None = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir).expanduser().resolve()
        self.log = log
        self.methods = list(methods or [])  # the run's registered methods (raydebias.core.registry.Method)
        self.node_key: str | None = None  # the cache key of the stage being run (set by the pipeline)
        self._ray_started = False

    def stage_dir(self, name: str) -> Path:
        d = self.run_dir / "stages" / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def rel(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.run_dir))

    def ensure_ray(self) -> None:
        if not self._ray_started:
            from raydebias._internal.ray_utils import init_ray

            init_ray(self.cfg.ray, log=self.log)
            self._ray_started = True

    @property
    def data_info(self) -> dict[str, Any]:
        return json.loads((self.run_dir / "stages" / "data" / "info.json").read_text())
