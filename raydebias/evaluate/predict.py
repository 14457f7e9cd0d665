"""Trained classifiers' predictions on a Parquet set, computed by Ray Data actors a part at a time: the driver
receives small per-row columns (label, bias, predictions, probabilities), never pixels."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raydebias._internal.io import atomic_write_table
from raydebias.data.stream import parquet_parts
from raydebias.data.transforms import pixels_from_column
from raydebias.models.classifier import load_classifier, predict


class _Predict:
    """Ray Data UDF (actors): one Parquet part per row → every model's predictions on it. Writes ``id``, ``label``,
    ``bias``, ``pred``, ``probs`` per model beside the part's name when ``out`` is set, and returns per row the
    label, the bias and per model ``pred:<m>``, ``p_true:<m>`` (the probability of the true class) and, with
    ``with_probs``, ``probs:<m>``; with ``with_ids`` the ``id`` too."""

    def __init__(self, model_dirs: dict[str, str], image_size: int, batch_size: int, threads: int,
                 out: dict[str, str] | None, with_probs: bool, with_ids: bool):
        torch.set_num_threads(threads)
        self.models = {m: load_classifier(d)[0] for m, d in model_dirs.items()}
        self.size, self.batch_size, self.out = image_size, batch_size, out
        self.with_probs, self.with_ids = with_probs, with_ids

    def __call__(self, batch: dict[str, np.ndarray]) -> pd.DataFrame:
        frames = []
        for part in batch["part"]:
            t = pq.read_table(part)
            y = t.column("label").to_numpy().astype(np.int64)
            x = pixels_from_column(t.column("pixels").to_pylist(), self.size) if t.num_rows else \
                np.zeros((0, self.size, self.size, 3), np.uint8)
            cols: dict[str, Any] = {"label": y, "bias": t.column("bias").to_numpy().astype(np.int64)}
            if self.with_ids:
                cols["id"] = t.column("id").to_pylist()
            for m, model in self.models.items():
                probs = predict(model, x, batch_size=self.batch_size).astype(np.float32) if len(x) else \
                    np.zeros((0, 1), np.float32)
                pred = probs.argmax(1) if len(x) else np.zeros(0, np.int64)
                cols[f"pred:{m}"], cols[f"p_true:{m}"] = pred, probs[np.arange(len(y)), y] if len(y) else probs[:, 0]
                if self.with_probs:
                    cols[f"probs:{m}"] = list(probs)
                if self.out is not None:
                    atomic_write_table(Path(self.out[m]) / Path(part).name, pa.table(
                        {"id": t.column("id"), "label": y, "bias": cols["bias"], "pred": pred,
                         "probs": pa.array(list(probs), pa.list_(pa.float32()))}))
            frames.append(pd.DataFrame(cols))
        return pd.concat(frames, ignore_index=True)


@contextlib.contextmanager
def _in_order():
    from ray.data import DataContext

    data_ctx = DataContext.get_current()
    before = data_ctx.execution_options.preserve_order
    data_ctx.execution_options.preserve_order = True
    try:
        yield
    finally:
        data_ctx.execution_options.preserve_order = before


def predict_parts(ctx, parts: list[str], model_dirs: dict[str, str | Path], out: dict[str, Path] | None = None,
                  with_probs: bool = False, with_ids: bool = False) -> dict[str, np.ndarray]:
    """Every model's predictions on the Parquet ``parts`` (``id``, ``label``, ``bias``, ``pixels``), by Ray Data
    actors; returns the columns of :class:`_Predict` in the parts' row order."""
    import ray

    cfg, info = ctx.cfg, ctx.data_info
    ctx.ensure_ray()
    threads = max(1, int(cfg.ray.num_cpus or 2) // 2)
    ds = ray.data.from_items([{"part": p} for p in parts]).map_batches(
        _Predict, fn_constructor_args=({m: str(d) for m, d in model_dirs.items()}, info["image_size"],
                                       cfg.evaluate.batch_size, threads,
                                       {m: str(p) for m, p in out.items()} if out else None, with_probs, with_ids),
        batch_size=1, concurrency=(1, 2), num_cpus=0.5)
    cols: dict[str, list] = {}
    with _in_order():
        for b in ds.iter_batches(batch_format="pandas", batch_size=None):
            for k in b.columns:
                cols.setdefault(k, []).extend(b[k].tolist())
    result = {k: np.asarray(v) for k, v in cols.items() if not k.startswith("probs:")}
    for k, v in cols.items():
        if k.startswith("probs:"):
            result[k] = np.stack(v) if v else np.zeros((0, info["num_classes"]), np.float32)
    return result


def predict_split(ctx, split: str, methods: list[str], out: dict[str, Path] | None = None,
                  with_probs: bool = False, with_ids: bool = False) -> dict[str, np.ndarray]:
    """:func:`predict_parts` of the trained classifiers ``stages/train/<method>`` on a split of the data stage."""
    parts = parquet_parts(ctx.run_dir / "stages" / "data" / f"{split}.parquet")
    return predict_parts(ctx, parts, {m: ctx.run_dir / "stages" / "train" / m for m in methods}, out,
                         with_probs, with_ids)
