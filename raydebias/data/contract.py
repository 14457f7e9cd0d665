"""The dataset contract: read Parquet from any fsspec URI through Ray Data, validate and decode every row,
route good rows to per-split Parquet files and bad rows to ``quarantine.parquet`` with a reason.

Contract columns: ``image`` (PNG/JPEG bytes) or ``path`` (URI, or relative to the dataset root), ``label``
(int), optional ``bias`` (int), optional ``split`` (train/val/test), optional ``id`` (string).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raydebias.config import DataConfig
from raydebias.data.transforms import ImageError, decode_image

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "dev": "val", "test": "test", "testing": "test"}

# Normalised rows written per split by ingestion.
NORMALIZED_SCHEMA = pa.schema(
    [("id", pa.string()), ("label", pa.int64()), ("bias", pa.int64()), ("pixels", pa.binary())]
)
QUARANTINE_SCHEMA = pa.schema(
    [("id", pa.string()), ("split", pa.string()), ("label", pa.string()),
     ("bias", pa.string()), ("image", pa.binary()), ("path", pa.string()), ("reason", pa.string())]
)


class ContractError(ValueError):
    """The dataset as a whole cannot be used (missing columns, empty train split, ...)."""


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _as_int(value: Any, name: str, upper: int | None) -> int:
    """Validate one label/bias cell; raise ValueError naming the field."""
    if _missing(value):
        raise ValueError(f"missing {name}")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, float, np.floating)):
        raise ValueError(f"wrong dtype for {name}: expected int, got {type(value).__name__} {value!r}")
    if isinstance(value, (float, np.floating)) and not float(value).is_integer():
        raise ValueError(f"wrong dtype for {name}: expected int, got non-integer {value!r}")
    v = int(value)
    if v < 0 or (upper is not None and v >= upper):
        rng = f"0..{upper - 1}" if upper is not None else ">= 0"
        raise ValueError(f"{name} {v} out of range ({rng})")
    return v


class DecodeBatch:
    """Ray Data UDF: decode + validate a pandas batch. Never raises for a bad row: it sets ``reason``."""

    def __init__(self, cfg: DataConfig, num_classes: int | None, num_bias: int | None, root: str | None):
        self.cfg, self.num_classes, self.num_bias, self.root = cfg, num_classes, num_bias, root

    def _read_path(self, p: str) -> bytes:
        import fsspec

        uri = p if ("://" in p or p.startswith("/") or self.root is None) else f"{self.root.rstrip('/')}/{p}"
        with fsspec.open(uri, "rb") as f:
            return f.read()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        cfg = self.cfg
        n = len(batch)
        out: dict[str, list] = {k: [] for k in ("id", "label", "bias", "split", "pixels", "reason")}
        get = lambda col: batch[col].tolist() if col in batch.columns else [None] * n  # noqa: E731
        images, paths = get(cfg.image_column), get(cfg.path_column)
        labels, biases, splits, ids = get("label"), get("bias"), get("split"), get("id")
        for i in range(n):
            reason, pixels, y, a = None, None, -1, -1
            split = splits[i]
            try:
                y = _as_int(labels[i], "label", self.num_classes)
                if "bias" in batch.columns:  # a missing bias is "unknown" (-1), not an error
                    a = -1 if _missing(biases[i]) else _as_int(biases[i], "bias", self.num_bias)
                if _missing(split):
                    split = None
                else:
                    s = _SPLIT_ALIASES.get(str(split).strip().lower())
                    if s is None:
                        raise ValueError(f"unknown split {split!r} (expected one of {list(SPLITS)})")
                    split = s
                data = images[i]
                if _missing(data) and not _missing(paths[i]):
                    try:
                        data = self._read_path(str(paths[i]))
                    except Exception as e:
                        raise ValueError(f"cannot read path {paths[i]!r}: {type(e).__name__}: {e}") from None
                if _missing(data):
                    raise ValueError(f"no image: both {cfg.image_column!r} and {cfg.path_column!r} are empty")
                pixels = decode_image(data, cfg.image_size, cfg.max_image_pixels).tobytes()
            except (ValueError, ImageError) as e:
                reason = str(e)
            raw = images[i] if isinstance(images[i], (bytes, bytearray)) else None
            rid = ids[i]
            if _missing(rid):
                src = raw if raw is not None else str(paths[i]).encode()
                rid = hashlib.sha1(src).hexdigest()[:16]
            out["id"].append(str(rid))
            out["label"].append(y if reason is None else None)
            out["bias"].append(a if reason is None else None)
            out["split"].append(split)
            out["pixels"].append(pixels)
            out["reason"].append(reason)
        df = pd.DataFrame(out)
        # Keep the raw inputs of rejected rows so that nothing is lost.
        df["raw_label"] = [None if r is None else repr(v) for r, v in zip(out["reason"], labels)]
        df["raw_bias"] = [None if r is None else repr(v) for r, v in zip(out["reason"], biases)]
        df["raw_image"] = [None if r is None else (v if isinstance(v, (bytes, bytearray)) else None)
                           for r, v in zip(out["reason"], images)]
        df["raw_path"] = [None if r is None or _missing(p) else str(p) for r, p in zip(out["reason"], paths)]
        return df


@dataclass
class IngestResult:
    counts: dict[str, int]
    quarantined: int
    num_classes: int
    num_bias: int | None
    group_counts: dict[str, list[list[int]]] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)


def _read_sources(cfg: DataConfig, source_uri: str | None):
    """Return (Ray Dataset of the raw contract rows, dataset root for relative paths)."""
    import ray

    from raydebias._internal.io import arrow_filesystem, is_in_process, url_to_fs

    def read(uri: str):
        fs, p = url_to_fs(uri)
        if is_in_process(fs):  # memory:// is invisible to Ray workers: read here, hand Arrow to Ray
            files = sorted(fs.find(p)) if fs.isdir(p) else [p]
            if not files:
                raise ContractError(f"{uri}: no Parquet files found")
            tables = [pq.read_table(fs.open(f, "rb")) for f in files]
            return ray.data.from_arrow(pa.concat_tables(tables, promote_options="default"))
        if not fs.exists(p):
            raise ContractError(f"dataset not found: {uri}")
        return ray.data.read_parquet(p, filesystem=arrow_filesystem(fs))

    if cfg.splits:
        parts = []
        for split, uri in cfg.splits.items():
            ds = read(uri)
            parts.append(ds.map_batches(lambda b, s=split: b.assign(split=s), batch_format="pandas"))
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        root = None
    else:
        assert source_uri is not None
        ds = read(source_uri)
        fs, p = url_to_fs(source_uri)
        root = source_uri if fs.isdir(p) else source_uri.rsplit("/", 1)[0]
    return ds, root


def check_schema(columns: list[str], cfg: DataConfig) -> None:
    missing = []
    if "label" not in columns:
        missing.append("label")
    if cfg.image_column not in columns and cfg.path_column not in columns:
        missing.append(f"{cfg.image_column} (or {cfg.path_column})")
    if missing:
        raise ContractError(
            f"dataset is missing required column(s): {', '.join(missing)}; found columns: {sorted(columns)}"
        )


def ingest(
    cfg: DataConfig,
    source_uri: str | None,
    out_dir,
    quarantine_path,
    log: Callable[[str], None] = print,
) -> IngestResult:
    """Read, validate and decode the dataset; write ``<out_dir>/{train,val,test}.parquet`` atomically."""
    from raydebias._internal.io import atomic_path

    ds, root = _read_sources(cfg, source_uri)
    columns = list(ds.schema().names)
    check_schema(columns, cfg)
    num_classes = len(cfg.class_names) if cfg.class_names else None
    num_bias = len(cfg.bias_names) if cfg.bias_names else None
    has_bias = "bias" in columns
    has_split = "split" in columns or bool(cfg.splits)
    total = ds.count()

    import ray

    decoded = ds.map_batches(
        DecodeBatch,
        fn_constructor_args=(cfg, num_classes, num_bias, root),
        batch_size=cfg.batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2),
        num_cpus=0.5,
    )

    rows: dict[str, dict[str, list]] = {s: {"id": [], "label": [], "bias": [], "pixels": []} for s in SPLITS}
    quarantine: dict[str, list] = {k: [] for k in QUARANTINE_SCHEMA.names}
    seen: dict[str, int] = {}
    reasons: dict[str, int] = {}
    done, t0, last = 0, time.time(), 0.0
    for batch in decoded.iter_batches(batch_format="pandas", batch_size=cfg.batch_size):
        for r in batch.itertuples(index=False):
            rid = r.id
            if rid in seen:  # duplicate ids get a stable suffix instead of clobbering each other
                seen[rid] += 1
                rid = f"{rid}#{seen[rid]}"
            else:
                seen[rid] = 0
            if isinstance(r.reason, str):  # pandas may hand back NA instead of None for "no reason"
                kind = r.reason.split(":")[0]
                reasons[kind] = reasons.get(kind, 0) + 1
                for k, v in (("id", rid), ("split", r.split if isinstance(r.split, str) else None),
                             ("label", r.raw_label), ("bias", r.raw_bias), ("image", r.raw_image),
                             ("path", r.raw_path), ("reason", r.reason)):
                    quarantine[k].append(v)
                continue
            split = r.split if has_split and isinstance(r.split, str) else "train"
            dst = rows[split]
            dst["id"].append(rid)
            dst["label"].append(int(r.label))
            dst["bias"].append(int(r.bias) if has_bias else -1)
            dst["pixels"].append(r.pixels)
        done += len(batch)
        now = time.time()
        if now - last > 5 or done == total:
            rate = done / max(now - t0, 1e-9)
            eta = (total - done) / max(rate, 1e-9)
            log(f"[data] {done}/{total} rows  {rate:,.0f} rows/s  ETA {eta:,.0f}s")
            last = now

    if quarantine["id"]:
        with atomic_path(quarantine_path) as tmp:
            pq.write_table(pa.table(quarantine, schema=QUARANTINE_SCHEMA), tmp)
        log(f"[data] {len(quarantine['id'])} row(s) quarantined → {quarantine_path}: {reasons}")
    elif quarantine_path.exists():
        quarantine_path.unlink()
    if not rows["train"]["id"]:
        raise ContractError(
            f"train split is empty after validation ({len(quarantine['id'])} of {total} rows quarantined"
            + (f"; see {quarantine_path}" if quarantine["id"] else "") + ")"
        )
    if num_classes is None:
        num_classes = 1 + max(max(r["label"], default=-1) for r in rows.values())
    if has_bias and num_bias is None:
        num_bias = 1 + max(max(r["bias"], default=-1) for r in rows.values())
    if not has_bias:
        num_bias = None

    _carve_missing_splits(rows, cfg.val_fraction, log)
    group_counts = {}
    for s in SPLITS:
        tbl = pa.table({k: rows[s][k] for k in NORMALIZED_SCHEMA.names}, schema=NORMALIZED_SCHEMA)
        with atomic_path(out_dir / f"{s}.parquet") as tmp:
            pq.write_table(tbl, tmp)
        if num_bias is not None:
            gc = np.zeros((num_classes, num_bias), dtype=np.int64)
            yy = np.asarray(rows[s]["label"], dtype=np.int64)
            aa = np.asarray(rows[s]["bias"], dtype=np.int64)
            known = aa >= 0  # rows with an unknown bias are not in any group
            np.add.at(gc, (yy[known], aa[known]), 1)
            group_counts[s] = gc.tolist()
    return IngestResult(
        counts={s: len(rows[s]["id"]) for s in SPLITS},
        quarantined=len(quarantine["id"]),
        num_classes=num_classes,
        num_bias=num_bias,
        group_counts=group_counts,
        reasons=reasons,
    )


def _carve_missing_splits(rows: dict[str, dict[str, list]], fraction: float, log) -> None:
    """Hold out val (and test, if absent) from train: a deterministic pseudo-random pick by row-id hash."""
    for split in ("val", "test"):
        if rows[split]["id"]:
            continue
        tr = rows["train"]
        keys = [(int(hashlib.sha1(i.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF) for i in tr["id"]]
        move = [k < fraction for k in keys]
        if split == "test":  # do not take the same rows twice
            move = [k > 1 - fraction for k in keys]
        if sum(move) == 0 or sum(move) == len(move):
            continue
        for k in tr:
            rows[split][k] = [v for v, m in zip(tr[k], move) if m]
            tr[k] = [v for v, m in zip(tr[k], move) if not m]
        log(f"[data] no {split} split in the dataset: held out {len(rows[split]['id'])} training rows")
