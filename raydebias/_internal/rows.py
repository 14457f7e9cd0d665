"""Row accounting for Ray Data stages: a retried block (a killed actor) may write its rows again, and a stage
must end with exactly its planned rows (README, "Run directory")."""

from __future__ import annotations

import numpy as np


def exact_rows(ids: np.ndarray, planned: set[str]) -> tuple[np.ndarray, dict[str, int]]:
    """Indices of ``ids`` that make exactly the planned rows, each once (the first copy of a duplicated row id:
    rows are deterministic per id), and the counts repaired. Raises ``RuntimeError`` naming missing rows."""
    ids = np.asarray(ids, dtype=object)
    in_plan = np.isin(ids, list(planned))
    _, first = np.unique(ids, return_index=True)
    is_first = np.zeros(len(ids), bool)
    is_first[first] = True
    keep = np.flatnonzero(in_plan & is_first)
    missing = planned - set(ids[keep].tolist())
    if missing:
        raise RuntimeError(f"{len(missing)} planned rows are missing, e.g. {sorted(missing)[:5]}")
    return keep, {"duplicates": int((in_plan & ~is_first).sum()), "extra": int((~in_plan).sum())}
