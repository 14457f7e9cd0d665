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
from raydebias.data.transforms import ImageError, decode_image, encode_png

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


def _as_int(value: Any, name: str, upper: int | None, bound: str | None = None) -> int:
    """Validate one label/bias cell; raise ValueError naming the field (``bound``: the setting behind ``upper``)."""
    if _missing(value):
        raise ValueError(f"missing {name}")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, float, np.floating)):
        raise ValueError(f"wrong dtype for {name}: expected int, got {type(value).__name__} {value!r}")
    if isinstance(value, (float, np.floating)) and not float(value).is_integer():
        raise ValueError(f"wrong dtype for {name}: expected int, got non-integer {value!r}")
    v = int(value)
    if v < 0 or (upper is not None and v >= upper):
        rng = f"0..{upper - 1}" if upper is not None else ">= 0"
        raise ValueError(f"{name} {v} out of range ({rng}" + (f", {bound})" if bound and v >= 0 else ")"))
    return v


def _split_uri(uri: str) -> tuple[str, str]:
    """(scheme, path) with ``file://`` and bare paths both local (scheme "")."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return "", uri
    return ("", rest) if scheme == "file" else (scheme, rest)


def inside_root(uri: str, root: str) -> bool:
    """``uri`` lies under ``root`` after normalisation: same scheme; ``..`` collapsed; for local paths symlinks
    resolved (a link inside the root that points out of it is outside)."""
    import os
    import posixpath

    (s1, p1), (s2, p2) = _split_uri(uri), _split_uri(root)
    if s1 != s2:
        return False
    if s1 == "":
        p1, p2 = os.path.realpath(p1), os.path.realpath(p2)
        return os.path.commonpath([p1, p2]) == p2
    p1, p2 = posixpath.normpath("/" + p1), posixpath.normpath("/" + p2)
    return p1 == p2 or p1.startswith(p2.rstrip("/") + "/")


class DecodeBatch:
    """Ray Data UDF: decode + validate a pandas batch. Never raises for a bad row: it sets ``reason``.

    ``path`` cells resolve against ``roots[0]`` (the dataset's folder) and must stay inside one of ``roots``
    (the dataset's folder and ``data.path_roots``): absolute paths elsewhere, other schemes, ``..`` escapes and
    symlinks out are quarantined. No file larger than ``data.max_image_bytes`` is read."""

    def __init__(self, cfg: DataConfig, num_classes: int | None, num_bias: int | None, roots: list[str]):
        self.cfg, self.num_classes, self.num_bias, self.roots = cfg, num_classes, num_bias, list(roots)

    def resolve(self, p: str) -> str:
        if "://" in p or p.startswith("/"):
            uri = p
        elif self.roots:
            uri = f"{self.roots[0].rstrip('/')}/{p}"
        else:
            raise ValueError(f"relative path {p!r} but the dataset has no folder to resolve it in")
        if not any(inside_root(uri, r) for r in self.roots):
            raise ValueError(f"path {p!r} is outside the dataset root ({', '.join(self.roots) or 'none'}); "
                             "list other roots in data.path_roots")
        return uri

    def _read_path(self, p: str) -> bytes:
        from raydebias._internal.io import url_to_fs

        cap = self.cfg.max_image_bytes
        fs, path = url_to_fs(self.resolve(p))
        size = fs.size(path)
        if size is not None and size > cap:
            raise ValueError(f"image file too large: {size} bytes > data.max_image_bytes={cap}")
        with fs.open(path, "rb") as f:
            data = f.read(cap + 1)  # bounded even where the size is unknown or wrong (a device, a growing file)
        if len(data) > cap:
            raise ValueError(f"image file too large: > data.max_image_bytes={cap} bytes")
        return data

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
                y = _as_int(labels[i], "label", self.num_classes or cfg.max_classes,
                            None if self.num_classes else "data.max_classes (or set data.class_names)")
                if "bias" in batch.columns:  # a missing bias is "unknown" (-1), not an error
                    a = -1 if _missing(biases[i]) else _as_int(
                        biases[i], "bias", self.num_bias or cfg.max_bias,
                        None if self.num_bias else "data.max_bias (or set data.bias_names)")
                if _missing(split):
                    if "split" in batch.columns:  # a split column with a hole: no guess at where the row belongs
                        raise ValueError("missing split")
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
                if isinstance(data, (bytes, bytearray)) and len(data) > cfg.max_image_bytes:
                    raise ValueError(f"image too large: {len(data)} bytes > data.max_image_bytes={cfg.max_image_bytes}")
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
        df["raw_label"] = [repr(v) for v in labels]  # small: kept for every row (a later duplicate needs them)
        df["raw_bias"] = [repr(v) for v in biases]
        df["raw_image"] = [None if r is None else (v if isinstance(v, (bytes, bytearray)) else None)
                           for r, v in zip(out["reason"], images)]
        df["raw_path"] = [None if _missing(p) else str(p) for p in paths]
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
    """Return (Ray Dataset of the raw contract rows, the roots ``path`` may point into: the dataset's folder
    first — relative paths resolve there — then ``data.path_roots``)."""
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
        uris = [cfg.splits[s] for s in SPLITS if s in cfg.splits]
    else:
        assert source_uri is not None
        ds = read(source_uri)
        uris = [source_uri]
    roots = []
    for uri in uris:
        fs, p = url_to_fs(uri)
        roots.append(uri if fs.isdir(p) else uri.rsplit("/", 1)[0])
    return ds, list(dict.fromkeys([*roots, *cfg.path_roots]))


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

    ds, roots = _read_sources(cfg, source_uri)
    columns = list(ds.schema().names)
    check_schema(columns, cfg)
    num_classes = len(cfg.class_names) if cfg.class_names else None
    num_bias = len(cfg.bias_names) if cfg.bias_names else None
    has_bias = "bias" in columns
    has_split = "split" in columns or bool(cfg.splits)
    total = ds.count()

    import ray
    from ray.data import DataContext

    # rows come back in source order, so "the first of duplicated ids is kept" is deterministic
    data_ctx = DataContext.get_current()
    preserve_order = data_ctx.execution_options.preserve_order
    data_ctx.execution_options.preserve_order = True
    decoded = ds.map_batches(
        DecodeBatch,
        fn_constructor_args=(cfg, num_classes, num_bias, roots),
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
    try:
        for batch in decoded.iter_batches(batch_format="pandas", batch_size=cfg.batch_size):
            for r in batch.itertuples(index=False):
                rid, reason = r.id, r.reason if isinstance(r.reason, str) else None  # pandas may give NA for None
                if rid in seen and reason is None:  # the first row with an id is kept, later ones are quarantined
                    reason = f"duplicate id {rid!r} (row {seen[rid]} of the input has it)"
                seen.setdefault(rid, done)
                done += 1
                if reason is not None:
                    kind = "duplicate id" if reason.startswith("duplicate id") else reason.split(":")[0]
                    reasons[kind] = reasons.get(kind, 0) + 1
                    image = r.raw_image if isinstance(r.raw_image, (bytes, bytearray)) else None  # NA → None
                    if image is None and isinstance(r.pixels, (bytes, bytearray)):  # a decodable duplicate: keep its pixels
                        image = encode_png(np.frombuffer(r.pixels, np.uint8).reshape(cfg.image_size, cfg.image_size, 3))
                    for k, v in (("id", rid), ("split", r.split if isinstance(r.split, str) else None),
                                 ("label", r.raw_label), ("bias", r.raw_bias), ("image", image),
                                 ("path", r.raw_path if isinstance(r.raw_path, str) else None), ("reason", reason)):
                        quarantine[k].append(v)
                    continue
                split = r.split if has_split and isinstance(r.split, str) else "train"
                dst = rows[split]
                dst["id"].append(rid)
                dst["label"].append(int(r.label))
                dst["bias"].append(int(r.bias) if has_bias else -1)
                dst["pixels"].append(r.pixels)
            now = time.time()
            if now - last > 5 or done == total:
                rate = done / max(now - t0, 1e-9)
                eta = (total - done) / max(rate, 1e-9)
                log(f"[data] {done}/{total} rows  {rate:,.0f} rows/s  ETA {eta:,.0f}s")
                last = now
    finally:
        data_ctx.execution_options.preserve_order = preserve_order

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
