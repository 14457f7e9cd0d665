"""The normalised splits the ``data`` stage writes (``stages/data/<split>.parquet``), read back as arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from raydebias._internal.io import as_path
from raydebias.data.transforms import pixels_from_column


def split_path(run_dir: str | Path, split: str) -> Path:
    """Where the ``data`` stage wrote ``split`` (train, val or test) in a run directory."""
    return as_path(run_dir) / "stages" / "data" / f"{split}.parquet"


def load_split(path: str | Path, image_size: int) -> dict[str, np.ndarray]:
    """A normalised split written by the ``data`` stage as numpy arrays."""
    t = pq.read_table(str(path))
    return {
        "id": np.asarray(t.column("id").to_pylist(), dtype=object),
        "x": pixels_from_column(t.column("pixels").to_pylist(), image_size) if t.num_rows else
        np.zeros((0, image_size, image_size, 3), np.uint8),
        "y": t.column("label").to_numpy().astype(np.int64),
        "a": t.column("bias").to_numpy().astype(np.int64),
    }
