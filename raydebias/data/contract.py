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
from pathlib import Path
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


ORDER = "_order"  # a row's position in the input (sources in order, then files by name, then rows): "first" means this
_STAGED = ("id", ORDER, "split", "label", "bias", "pixels", "reason", "raw_label", "raw_bias", "raw_image", "raw_path")


@dataclass
class _Source:
    """One Parquet file of the input: where it is (or, for ``memory://``, the table itself in the object store),
    the split it stands for (``data.splits``), its rows and the input position of its first row."""

    uri: str | None
    ref: Any
    split: str | None
    rows: int
    offset: int


def _parquet_files(fs, p: str) -> list[str]:
    if not fs.isdir(p):
        return [p]
    return sorted(f for f in fs.find(p) if f.endswith((".parquet", ".parq"))
                  and not any(part.startswith((".", "_")) for part in f[len(p):].split("/") if part))


def _list_sources(cfg: DataConfig, source_uri: str | None) -> tuple[list[_Source], list[str], list[str]]:
    """(the input files in input order, the union of their columns, the roots ``path`` may point into: the
    dataset's folder first — relative paths resolve there — then ``data.path_roots``). Reads Parquet footers only;
    ``memory://`` tables (visible to this process alone) are read here and handed to Ray by reference."""
    import ray

    from raydebias._internal.io import is_in_process, url_to_fs

    pairs = [(s, cfg.splits[s]) for s in cfg.splits] if cfg.splits else [(None, source_uri)]
    sources, columns, roots, offset = [], {}, [], 0
    for split, uri in pairs:
        assert uri is not None
        fs, p = url_to_fs(uri)
        if not fs.exists(p):
            raise ContractError(f"dataset not found: {uri}")
        files = _parquet_files(fs, p)
        if not files:
            raise ContractError(f"{uri}: no Parquet files found")
        for f in files:
            if is_in_process(fs):
                table = pq.read_table(fs.open(f, "rb"))
                names, rows, ref, furi = table.column_names, table.num_rows, ray.put(table), None
            else:
                with fs.open(f, "rb") as fh:
                    md = pq.ParquetFile(fh).metadata
                    names, rows = md.schema.to_arrow_schema().names, md.num_rows
                ref, furi = None, fs.unstrip_protocol(f)
            columns.update(dict.fromkeys(names))
            sources.append(_Source(furi, ref, split, rows, offset))
            offset += rows
        roots.append(uri if fs.isdir(p) else uri.rsplit("/", 1)[0])
    if cfg.splits:
        columns["split"] = None
    return sources, list(columns), list(dict.fromkeys([*roots, *cfg.path_roots]))


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


def _read_sources(batch: dict[str, np.ndarray], columns: list[str], batch_size: int, refs: list):
    """Ray Data UDF (tasks): input files (one per row: ``uri``, or ``source``, an index into ``refs`` for
    ``memory://`` tables) → their rows in batches, each row tagged with its input position (:data:`ORDER`) and every
    contract column present (a file without one gets nulls: the union of the files' schemas)."""
    import ray

    from raydebias._internal.io import url_to_fs

    for uri, source, split, offset in zip(batch["uri"], batch["source"], batch["split"], batch["offset"]):
        fh = None
        if uri:
            fs, p = url_to_fs(str(uri))
            fh = fs.open(p, "rb")
            pf = pq.ParquetFile(fh)
            parts = pf.iter_batches(batch_size=batch_size, columns=[c for c in columns if c in pf.schema_arrow.names])
        else:
            parts = ray.get(refs[int(source)]).select(
                [c for c in columns if c in ray.get(refs[int(source)]).column_names]).to_batches(batch_size)
        pos = int(offset)
        try:
            for rb in parts:
                df = rb.to_pandas()
                for c in columns:
                    if c not in df.columns:
                        df[c] = None
                if split:
                    df["split"] = str(split)
                df[ORDER] = np.arange(pos, pos + len(df), dtype=np.int64)
                pos += len(df)
                yield df[[*columns, ORDER]]
        finally:
            if fh is not None:
                fh.close()


class _DecodeAndStage(DecodeBatch):
    """Ray Data UDF (actors): decode and validate a batch (:class:`DecodeBatch`), write it to the staging folder
    as ``part-<first input position>.parquet`` and return one row of counts: the decoded pixels stay on disk,
    out of the driver and the object store."""

    def __init__(self, cfg, num_classes, num_bias, roots, staging: str, val_fraction: float):
        super().__init__(cfg, num_classes, num_bias, roots)
        self.staging, self.fraction = staging, val_fraction

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        df = super().__call__(batch)
        df[ORDER] = batch[ORDER].to_numpy()
        _write_part(self.staging, int(df[ORDER].min()), _staged_table(df))
        ok = df["reason"].isna()
        split = df["split"].where(df["split"].notna(), "train")
        key = _carve_keys(df["id"])
        train_ok = ok & (split == "train")
        return pd.DataFrame([{
            "rows": len(df),
            **{f"ok_{s}": int((ok & (split == s)).sum()) for s in SPLITS},
            "move_val": int((train_ok & (key < self.fraction)).sum()),
            "move_test": int((train_ok & (key > 1 - self.fraction)).sum()),
            "move_test_not_val": int((train_ok & (key > 1 - self.fraction) & ~(key < self.fraction)).sum()),
        }])


def _carve_keys(ids: pd.Series) -> np.ndarray:
    """A row's deterministic place in [0, 1] by its id's hash: who is held out when a split is missing."""
    return np.array([int(hashlib.sha1(i.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF for i in ids], np.float64)


def _staged_table(df: pd.DataFrame) -> pa.Table:
    out = {c: df[c].tolist() for c in _STAGED}
    out["raw_image"] = [v if isinstance(v, (bytes, bytearray)) else None for v in out["raw_image"]]
    for c in ("label", "bias"):
        out[c] = [None if _missing(v) else int(v) for v in out[c]]
    for c in ("split", "reason", "raw_path"):
        out[c] = [v if isinstance(v, str) else None for v in out[c]]
    return pa.table(out, schema=_STAGED_SCHEMA)


_STAGED_SCHEMA = pa.schema([("id", pa.string()), (ORDER, pa.int64()), ("split", pa.string()), ("label", pa.int64()),
                            ("bias", pa.int64()), ("pixels", pa.binary()), ("reason", pa.string()),
                            ("raw_label", pa.string()), ("raw_bias", pa.string()), ("raw_image", pa.binary()),
                            ("raw_path", pa.string())])


def _write_part(folder: str, first: int, table: pa.Table) -> None:
    """``<folder>/part-<first>.parquet``, named by the input position of the batch's first row: deterministic, and
    a folder's files read in name order are in input order. Written whole or not at all."""
    from raydebias._internal.io import write_table_uri

    write_table_uri(table, f"{folder.rstrip('/')}/part-{first:012d}.parquet")


class _Route:
    """Ray Data UDF: one staged part per row → its rows written to the split folders and the quarantine folder, with
    later rows of a duplicated id quarantined (the first in input order is kept); returns the part's counts."""

    def __init__(self, folders: dict[str, str], duplicates, carve: dict[str, bool], fraction: float, has_split: bool,
                 has_bias: bool, image_size: int):
        self.folders, self.duplicates, self.carve = folders, duplicates, carve
        self.fraction, self.has_split, self.has_bias, self.size = fraction, has_split, has_bias, image_size

    def __call__(self, batch: dict[str, np.ndarray]) -> pd.DataFrame:
        import ray

        from raydebias._internal.io import url_to_fs

        dups = ray.get(self.duplicates) if isinstance(self.duplicates, ray.ObjectRef) else self.duplicates
        counts: dict[str, int] = {}
        for part in batch["part"]:
            fs, p = url_to_fs(part)
            with fs.open(p, "rb") as f:
                t = pq.read_table(f).to_pandas()
            first = int(t[ORDER].iloc[0])
            reason = [r if isinstance(r, str) else None for r in t["reason"]]
            for i, (rid, order) in enumerate(zip(t["id"], t[ORDER])):
                keep = dups.get(rid)
                if keep is not None and keep != order and reason[i] is None:
                    reason[i] = f"duplicate id {rid!r} (row {keep} of the input has it)"
            bad = np.array([r is not None for r in reason], bool)
            split = np.array([s if self.has_split and isinstance(s, str) else "train" for s in t["split"]], object)
            key = _carve_keys(t["id"])
            train = split == "train"
            if self.carve["val"]:
                split[train & (key < self.fraction)] = "val"
            if self.carve["test"]:
                split[(split == "train") & (key > 1 - self.fraction)] = "test"
            for s in SPLITS:
                sel = ~bad & (split == s)
                if not sel.any():
                    continue
                rows = t[sel]
                bias = rows["bias"].to_numpy(np.int64) if self.has_bias else np.full(len(rows), -1, np.int64)
                _write_part(self.folders[s], first, pa.table(
                    {"id": rows["id"].tolist(), "label": rows["label"].to_numpy(np.int64), "bias": bias,
                     "pixels": rows["pixels"].tolist()}, schema=NORMALIZED_SCHEMA))
                labels = rows["label"].to_numpy(np.int64)
                for y, a in zip(labels, bias):
                    k = f"group:{s}:{y}:{a}"
                    counts[k] = counts.get(k, 0) + 1
                counts[f"count:{s}"] = counts.get(f"count:{s}", 0) + int(sel.sum())
            if bad.any():
                q = t[bad].assign(reason=[r for r in reason if r is not None])
                images = []
                for raw, pixels in zip(q["raw_image"], q["pixels"]):
                    image = raw if isinstance(raw, (bytes, bytearray)) else None
                    if image is None and isinstance(pixels, (bytes, bytearray)):  # a decodable duplicate: its pixels
                        image = encode_png(np.frombuffer(pixels, np.uint8).reshape(self.size, self.size, 3))
                    images.append(image)
                _write_part(self.folders["quarantine"], first, pa.table({
                    "id": q["id"].tolist(), "split": [s if isinstance(s, str) else None for s in q["split"]],
                    "label": q["raw_label"].tolist(), "bias": q["raw_bias"].tolist(), "image": images,
                    "path": [v if isinstance(v, str) else None for v in q["raw_path"]], "reason": q["reason"].tolist(),
                }, schema=QUARANTINE_SCHEMA))
                for r in q["reason"]:
                    k = "reason:" + ("duplicate id" if r.startswith("duplicate id") else r.split(":")[0])
                    counts[k] = counts.get(k, 0) + 1
        return pd.DataFrame({"key": list(counts), "n": list(counts.values())})


def _duplicated_ids(staging: str) -> dict[str, int]:
    """Every id that more than one input row has → the input position of its first row: an aggregation in Ray Data
    over the staged ``(id, position)`` columns; only the duplicated ids reach the driver."""
    import ray
    from ray.data.aggregate import Count, Min

    from raydebias._internal.io import arrow_filesystem, url_to_fs

    fs, p = url_to_fs(staging)
    from ray.data.expressions import col

    ds = ray.data.read_parquet(p, filesystem=arrow_filesystem(fs)).select_columns(["id", ORDER])
    agg = ds.groupby("id").aggregate(Count(alias_name="n"), Min(ORDER, alias_name="first"))
    return {r["id"]: int(r["first"]) for r in agg.filter(expr=col("n") > 1).iter_rows()}


def ingest(
    cfg: DataConfig,
    source_uri: str | None,
    out_dir,
    quarantine_path,
    log: Callable[[str], None] = print,
) -> IngestResult:
    """Read, validate and decode the dataset; write ``<out_dir>/{train,val,test}.parquet`` (folders of Parquet
    parts) and the quarantined rows to ``quarantine_path`` (a folder of parts), each replaced as a whole.

    Two streaming passes through Ray Data, the rows never on the driver: (1) read each input file in batches →
    decode and validate in actors → stage the decoded batch on disk, returning counts; the duplicated ids are found
    by an aggregation over the staged ``(id, position)`` columns; (2) each staged part → its rows written to the
    split folders or the quarantine by the worker that reads it. The driver holds counts and duplicated ids."""
    import shutil

    import ray

    from raydebias._internal.io import remove_path, replace_path

    sources, columns, roots = _list_sources(cfg, source_uri)
    check_schema(columns, cfg)
    num_classes = len(cfg.class_names) if cfg.class_names else None
    num_bias = len(cfg.bias_names) if cfg.bias_names else None
    has_bias = "bias" in columns
    has_split = "split" in columns
    total = sum(s.rows for s in sources)
    wanted = [c for c in (cfg.image_column, cfg.path_column, "label", "bias", "split", "id") if c in columns]
    out_dir = Path(out_dir)
    work = out_dir / "_ingest"  # staged parts and the new outputs, moved into place when complete
    shutil.rmtree(work, ignore_errors=True)
    staging = work / "staging"
    staging.mkdir(parents=True)
    folders = {s: str(work / f"{s}.parquet") for s in SPLITS} | {"quarantine": str(work / "quarantine.parquet")}
    for f in folders.values():
        Path(f).mkdir()
    try:
        refs = [src.ref for src in sources]
        files = ray.data.from_items([{"uri": src.uri or "", "source": i, "split": src.split or "", "offset": src.offset}
                                     for i, src in enumerate(sources)])
        staged = files.map_batches(_read_sources, fn_kwargs={"columns": wanted, "batch_size": cfg.batch_size,
                                                             "refs": refs}, batch_size=1, num_cpus=0.25).map_batches(
            _DecodeAndStage, fn_constructor_args=(cfg, num_classes, num_bias, roots, str(staging), cfg.val_fraction),
            batch_size=cfg.batch_size, batch_format="pandas", concurrency=(1, 2), num_cpus=0.5)
        seen = pd.Series(0, index=["rows", *(f"ok_{s}" for s in SPLITS), "move_val", "move_test", "move_test_not_val"])
        t0, last = time.time(), 0.0
        for batch in staged.iter_batches(batch_format="pandas", batch_size=None):
            seen = seen.add(batch.sum(), fill_value=0)
            now = time.time()
            if now - last > 5 or seen["rows"] == total:
                rate = seen["rows"] / max(now - t0, 1e-9)
                log(f"[data] {int(seen['rows'])}/{total} rows  {rate:,.0f} rows/s  "
                    f"ETA {(total - seen['rows']) / max(rate, 1e-9):,.0f}s")
                last = now
        duplicates = _duplicated_ids(str(staging))
        n_train = int(seen["ok_train"])
        carve = {"val": bool(not seen["ok_val"] and 0 < seen["move_val"] < n_train)}
        left = n_train - (int(seen["move_val"]) if carve["val"] else 0)
        carve["test"] = bool(not seen["ok_test"] and 0 < (seen["move_test_not_val"] if carve["val"]
                                                           else seen["move_test"]) < left)
        parts = sorted(str(p) for p in staging.glob("part-*.parquet"))
        routed = ray.data.from_items([{"part": p} for p in parts]).map_batches(
            _Route, fn_constructor_args=(folders, ray.put(duplicates), carve, cfg.val_fraction, has_split,
                                         has_bias, cfg.image_size),
            batch_size=1, concurrency=(1, 2), num_cpus=0.5)
        counts: dict[str, int] = {}
        for r in routed.iter_rows():
            counts[r["key"]] = counts.get(r["key"], 0) + int(r["n"])
        quarantined = sum(n for k, n in counts.items() if k.startswith("reason:"))
        reasons = {k.split(":", 1)[1]: n for k, n in counts.items() if k.startswith("reason:")}
        split_counts = {s: counts.get(f"count:{s}", 0) for s in SPLITS}
        if quarantined:
            replace_path(folders["quarantine"], quarantine_path)
        else:
            remove_path(quarantine_path)
        if not split_counts["train"]:  # the splits of an earlier ingest stay as they were
            raise ContractError(f"train split is empty after validation ({quarantined} of {total} rows quarantined"
                                + (f"; see {quarantine_path}" if quarantined else "") + ")")
        for s in SPLITS:
            if not split_counts[s]:  # an empty split is one empty part, so that readers still find its schema
                _write_part(folders[s], 0, NORMALIZED_SCHEMA.empty_table())
            replace_path(folders[s], out_dir / f"{s}.parquet")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if quarantined:
        log(f"[data] {quarantined} row(s) quarantined → {quarantine_path}: {reasons}")
    for s in ("val", "test"):
        if carve[s]:
            log(f"[data] no {s} split in the dataset: held out {split_counts[s]} training rows")
    groups = [tuple(k.split(":")[1:]) for k in counts if k.startswith("group:")]
    if num_classes is None:
        num_classes = 1 + max(int(y) for _, y, _ in groups)
    if has_bias and num_bias is None:
        num_bias = 1 + max(int(a) for _, _, a in groups)
    if not has_bias:
        num_bias = None
    group_counts = {}
    if num_bias is not None:
        for s in SPLITS:
            gc = np.zeros((num_classes, num_bias), dtype=np.int64)
            for (split, y, a) in groups:
                if split == s and int(a) >= 0:  # rows with an unknown bias are not in any group
                    gc[int(y), int(a)] = counts[f"group:{split}:{y}:{a}"]
            group_counts[s] = gc.tolist()
    return IngestResult(counts=split_counts, quarantined=quarantined, num_classes=num_classes, num_bias=num_bias,
                        group_counts=group_counts, reasons=reasons)
