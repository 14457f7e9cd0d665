"""Trained classifiers' predictions on a Parquet set, computed by Ray tasks a part at a time: the driver receives
small per-row columns (label, bias, predictions, probabilities), never pixels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raydebias._internal.io import as_path, atomic_write_table, file_stamp
from raydebias._internal.ray_utils import map_items
from raydebias.data.stream import parquet_parts
from raydebias.data.transforms import pixels_from_column
from raydebias.models.classifier import load_classifier, predict

_MODELS: dict[tuple[str, str], torch.nn.Module] = {}  # per worker process: a reused worker loads a model once


def _model(model_dir: str) -> torch.nn.Module:
    key = (model_dir, file_stamp(f"{model_dir}/model.safetensors"))
    if key not in _MODELS:
        _MODELS[key] = load_classifier(model_dir)[0]
    return _MODELS[key]


def _predict_parts(batch: dict[str, np.ndarray], model_dirs: dict[str, str], image_size: int, batch_size: int,
                   out: dict[str, str] | None, with_probs: bool, with_ids: bool) -> pd.DataFrame:
    """Ray task (:func:`~raydebias._internal.ray_utils.map_items`): Parquet parts (``part``, ``tag``; ``write``: whether to save its predictions) → every
    model's predictions on them. Saves ``id``, ``label``, ``bias``, ``pred``, ``probs`` per model under ``out[m]``
    beside the part's name, and returns per row the tag, label, bias and per model ``pred:<m>``, ``p_true:<m>``
    (the probability of the true class) and, with ``with_probs``, ``probs:<m>``; with ``with_ids`` the ``id``."""
    torch.set_num_threads(1)
    frames = []
    for part, tag, write in zip(batch["part"], batch["tag"], batch["write"]):
        t = pq.read_table(str(part))
        y = t.column("label").to_numpy().astype(np.int64)
        x = pixels_from_column(t.column("pixels").to_pylist(), image_size) if t.num_rows else \
            np.zeros((0, image_size, image_size, 3), np.uint8)
        cols: dict[str, Any] = {"tag": [str(tag)] * len(y), "label": y,
                                "bias": t.column("bias").to_numpy().astype(np.int64)}
        if with_ids:
            cols["id"] = t.column("id").to_pylist()
        for m, d in model_dirs.items():
            probs = predict(_model(d), x, batch_size=batch_size).astype(np.float32) if len(x) else \
                np.zeros((0, 1), np.float32)
            pred = probs.argmax(1) if len(x) else np.zeros(0, np.int64)
            cols[f"pred:{m}"], cols[f"p_true:{m}"] = pred, probs[np.arange(len(y)), y] if len(y) else probs[:, 0]
            if with_probs:
                cols[f"probs:{m}"] = list(probs)
            if write and out is not None:
                atomic_write_table(as_path(out[m]) / as_path(part).name, pa.table(
                    {"id": t.column("id"), "label": y, "bias": cols["bias"], "pred": pred,
                     "probs": pa.array(list(probs), pa.list_(pa.float32()))}))
        frames.append(pd.DataFrame(cols))
    return pd.concat(frames, ignore_index=True)


def predict_parts(ctx, parts: list[tuple[str, str, bool]], model_dirs: dict[str, str | Path],
                  out: dict[str, Path] | None = None, with_probs: bool = False,
                  with_ids: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """Every model's predictions on Parquet parts (``id``, ``label``, ``bias``, ``pixels``) given as ``(path, tag,
    write)``, by Ray tasks (pooled workers: no actor to start); returns, per tag, the columns of
    :func:`_predict_parts` in the parts' row order. Parts marked ``write`` save their predictions under ``out``."""
    cfg, info = ctx.cfg, ctx.data_info
    ctx.ensure_ray()
    frames = map_items(_predict_parts, {"part": [p for p, _, _ in parts], "tag": [t for _, t, _ in parts],
                                        "write": [w for _, _, w in parts]},
                       {"model_dirs": {m: str(d) for m, d in model_dirs.items()}, "image_size": info["image_size"],
                        "batch_size": cfg.evaluate.batch_size,
                        "out": {m: str(p) for m, p in out.items()} if out else None,
                        "with_probs": with_probs, "with_ids": with_ids})
    cols: dict[str, list] = {}
    for b in frames:
        for k in b.columns:
            cols.setdefault(k, []).extend(b[k].tolist())
    tags = np.asarray(cols.pop("tag", []), dtype=object)
    result = {}
    for tag in dict.fromkeys(t for _, t, _ in parts):
        sel = tags == tag
        r = {k: np.asarray(v, dtype=object if k == "id" else None)[sel] for k, v in cols.items()
             if not k.startswith("probs:")}
        for k, v in cols.items():
            if k.startswith("probs:"):
                r[k] = np.stack([v[i] for i in np.flatnonzero(sel)]) if sel.any() else \
                    np.zeros((0, info["num_classes"]), np.float32)
        result[tag] = r
    return result


def predict_splits(ctx, splits: dict[str, bool], methods: list[str], out: dict[str, Path] | None = None,
                   with_probs: bool = False, with_ids: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """:func:`predict_parts` of the trained classifiers ``stages/train/<method>`` on splits of the data stage, in
    one Ray Data pass; ``splits``: split → whether to save its predictions under ``out``."""
    parts = [(p, s, w) for s, w in splits.items()
             for p in parquet_parts(ctx.run_dir / "stages" / "data" / f"{s}.parquet")]
    return predict_parts(ctx, parts, {m: ctx.run_dir / "stages" / "train" / m for m in methods}, out,
                         with_probs, with_ids)
