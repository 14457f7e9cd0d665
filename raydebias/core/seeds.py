"""Seeds derived from the run's ``seed`` for per-sample and per-worker random generators."""

from __future__ import annotations

SEED_STRIDE = 1_000_003
"""A prime larger than any per-run count of samples: run seed s owns the integers [s·stride, (s+1)·stride), so two
runs with different seeds never give any sample or worker the same generator seed."""


def derived_seed(seed: int, index: int) -> int:
    """The generator seed of item ``index`` (a sample, or a stream such as ``phase * 1009 + rank``) of a run seeded
    ``seed``; ``0 <= index < SEED_STRIDE`` keeps it inside the run's own range."""
    if not 0 <= index < SEED_STRIDE:
        raise ValueError(f"index {index} outside [0, {SEED_STRIDE})")
    return seed * SEED_STRIDE + index


def sample_seeds(seed: int, n: int, offset: int = 0) -> list[int]:
    """Per-sample seeds ``derived_seed(seed, offset + i)`` for ``i < n``; stages that sample from the same run use
    distinct ``offset`` ranges so that their samples draw different noise."""
    return [derived_seed(seed, offset + i) for i in range(n)]
