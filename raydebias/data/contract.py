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

from raydebias._internal.io import as_path, is_in_process, remove_path, replace_path, url_to_fs, write_table_uri
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


def row_id(rid: Any, image: Any, path: Any) -> str:
    """A row's id: its ``id`` cell, else a hash of its image bytes (else of its path)."""
    if not _missing(rid):
        return str(rid)
    src = image if isinstance(image, (bytes, bytearray)) else str(path).encode()
    return hashlib.sha1(src).hexdigest()[:16]


def normalize_split(split: Any, has_column: bool) -> str | None:
    """The contract's split name for a ``split`` cell (aliases resolved); ``train`` without a split column; None
    for a missing or unknown split in a dataset that has the column (the row is quarantined)."""
    if not has_column:
        return "train"
    if _missing(split):
        return None
    return _SPLIT_ALIASES.get(str(split).strip().lower())


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
            out["id"].append(row_id(ids[i], images[i], paths[i]))
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


CHUNK = "_chunk"  # the input position of the first row of the reader batch a row came in
ORDER = "_order"  # a row's position in the input (sources in order, then files by name, then rows): "first" means this


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


def _may_have_nulls(sources: list[_Source], column: str) -> bool:
    """Whether ``column`` may hold nulls in any input file, by the Parquet footers' statistics (True when a file
    has none, or lives in memory)."""
    import ray

    for src in sources:
        if src.uri is None:
            t = ray.get(src.ref)
            if column in t.column_names and t.column(column).null_count:
                return True
            continue
        fs, p = url_to_fs(src.uri)
        with fs.open(p, "rb") as fh:
            md = pq.ParquetFile(fh).metadata
        names = md.schema.to_arrow_schema().names
        if column not in names:
            return True
        j = names.index(column)
        for g in range(md.num_row_groups):
            st = md.row_group(g).column(j).statistics
            if st is None or not st.has_null_count or st.null_count:
                return True
    return False


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

    for uri, source, split, offset in zip(batch["uri"], batch["source"], batch["split"], batch["offset"]):
        fh = None
        if uri:
            fs, p = url_to_fs(str(uri))
            fh = fs.open(p, "rb")
            pf = pq.ParquetFile(fh)
            parts = pf.iter_batches(batch_size=batch_size, columns=[c for c in columns if c in pf.schema_arrow.names])
        else:
            table = ray.get(refs[int(source)])
            parts = table.select([c for c in columns if c in table.column_names]).to_batches(batch_size)
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
                df[CHUNK] = pos  # the reader's batch: one output part each, however Ray Data groups batches
                pos += len(df)
                yield df[[*columns, ORDER, CHUNK]]
        finally:
            if fh is not None:
                fh.close()


def _keys(batch: pd.DataFrame, image_column: str, path_column: str, has_split: bool,
          fraction: float) -> pd.DataFrame:
    """Ray Data UDF (tasks): a batch of input rows → each row's id, input position, split and carve key (the small
    columns from which duplicates and held-out splits are decided before any image is decoded)."""
    n = len(batch)
    get = lambda col: batch[col].tolist() if col in batch.columns else [None] * n  # noqa: E731
    ids = [row_id(r, im, p) for r, im, p in zip(get("id"), get(image_column), get(path_column))]
    return pd.DataFrame({"id": ids, ORDER: batch[ORDER].to_numpy(),
                         "split": [normalize_split(v, has_split) for v in get("split")],
                         "key": _carve_keys(ids)})


def _carve_keys(ids) -> np.ndarray:
    """A row's deterministic place in [0, 1] by its id's hash: who is held out when a split is missing."""
    return np.array([int(hashlib.sha1(i.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF for i in ids], np.float64)


def _write_part(folder: str, first: int, table: pa.Table) -> None:
    """``<folder>/part-<first>.parquet``, named by the input position of the batch's first row: deterministic, and
    a folder's files read in name order are in input order. Written whole or not at all."""
    write_table_uri(table, f"{folder.rstrip('/')}/part-{first:012d}.parquet")


class _DecodeAndWrite(DecodeBatch):
    """Ray Data UDF (actors): decode and validate a batch (:class:`DecodeBatch`), quarantine the later rows of a
    duplicated id (the first in input order is kept), hold out val/test rows where a split is missing, and write
    the batch's rows to the split folders and the quarantine folder as ``part-<first input position>.parquet``.
    Returns the batch's counts (``key``, ``n``): per split, per (split, class, bias) group, per quarantine reason."""

    def __init__(self, cfg, num_classes, num_bias, roots, folders: dict[str, str], duplicates, carve: dict[str, bool],
                 has_split: bool, has_bias: bool):
        super().__init__(cfg, num_classes, num_bias, roots)
        self.folders, self.duplicates, self.carve = folders, duplicates, carve
        self.has_split, self.has_bias = has_split, has_bias

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import ray

        if isinstance(self.duplicates, ray.ObjectRef):
            self.duplicates = ray.get(self.duplicates)
        t = super().__call__(batch)
        order = batch[ORDER].to_numpy()
        reason = [r if isinstance(r, str) else None for r in t["reason"]]
        for i, rid in enumerate(t["id"]):
            keep = self.duplicates.get(rid)
            if keep is not None and keep != order[i] and reason[i] is None:
                reason[i] = f"duplicate id {rid!r} (row {keep} of the input has it)"
        t["reason"] = reason
        split = np.array([s if self.has_split and isinstance(s, str) else "train" for s in t["split"]], object)
        key = _carve_keys(t["id"])
        fraction = self.cfg.val_fraction
        if self.carve["val"]:
            split[(split == "train") & (key < fraction)] = "val"
        if self.carve["test"]:
            split[(split == "train") & (key > 1 - fraction)] = "test"
        t["split_out"] = split
        counts: dict[str, int] = {}
        chunks = batch[CHUNK].to_numpy()
        for first in np.unique(chunks):
            self._write(t[chunks == first], int(first), counts)
        counts["rows"] = len(t)
        return pd.DataFrame({"key": list(counts), "n": list(counts.values())})

    def _write(self, t: pd.DataFrame, first: int, counts: dict[str, int]) -> None:
        """One reader batch's rows → ``part-<first>.parquet`` in each split folder it has rows for, and in the
        quarantine folder; adds its counts to ``counts``."""
        bad = t["reason"].notna().to_numpy()
        split = t["split_out"].to_numpy()
        for s in SPLITS:
            sel = ~bad & (split == s)
            if not sel.any():
                continue
            rows = t[sel]
            labels = rows["label"].to_numpy(np.int64)
            bias = rows["bias"].to_numpy(np.int64) if self.has_bias else np.full(len(rows), -1, np.int64)
            _write_part(self.folders[s], first, pa.table(
                {"id": rows["id"].tolist(), "label": labels, "bias": bias, "pixels": rows["pixels"].tolist()},
                schema=NORMALIZED_SCHEMA))
            for (y, a), n in pd.Series(list(zip(labels, bias))).value_counts().items():
                k = f"group:{s}:{y}:{a}"
                counts[k] = counts.get(k, 0) + int(n)
            counts[f"count:{s}"] = counts.get(f"count:{s}", 0) + int(sel.sum())
        if bad.any():
            q = t[bad]
            images = []
            for raw, pixels in zip(q["raw_image"], q["pixels"]):
                image = raw if isinstance(raw, (bytes, bytearray)) else None
                if image is None and isinstance(pixels, (bytes, bytearray)):  # a decodable duplicate: its pixels
                    size = self.cfg.image_size
                    image = encode_png(np.frombuffer(pixels, np.uint8).reshape(size, size, 3))
                images.append(image)
            reasons = q["reason"].tolist()
            _write_part(self.folders["quarantine"], first, pa.table({
                "id": q["id"].tolist(), "split": [v if isinstance(v, str) else None for v in q["split"]],
                "label": q["raw_label"].tolist(), "bias": q["raw_bias"].tolist(), "image": images,
                "path": [v if isinstance(v, str) else None for v in q["raw_path"]], "reason": reasons,
            }, schema=QUARANTINE_SCHEMA))
            for r in reasons:
                k = "reason:" + ("duplicate id" if r.startswith("duplicate id") else r.split(":")[0])
                counts[k] = counts.get(k, 0) + 1


def _plan(keys, fraction: float, rows: int) -> tuple[dict[str, int], dict[str, bool]]:
    """From the rows' keys (a Ray Dataset of ``id``, position, ``split``, ``key``): every duplicated id → the input
    position of its first row, by a Ray Data ``groupby`` (only these ids reach the driver); and whether val / test
    are held out of train (a split the dataset does not have, and a hold-out that leaves train neither empty nor
    whole; counted over the rows whose split is train, before decoding), from per-block counts."""
    from ray.data import DataContext
    from ray.data.aggregate import Count, Min
    from ray.data.context import ShuffleStrategy
    from ray.data.expressions import col

    data_ctx = DataContext.get_current()
    before = data_ctx.shuffle_strategy
    # the sort-based pull shuffle over a few partitions: ~0.2 s where the default hash shuffle's aggregator actors
    # take ~5 s to start on 2 cores (BENCHMARKS.md, "Scale"); a partition per 200 k ids
    data_ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        agg = keys.groupby("id", num_partitions=max(2, -(-rows // 200_000))).aggregate(
            Count(alias_name="n"), Min(ORDER, alias_name="first"))
        duplicates = {r["id"]: int(r["first"]) for r in agg.filter(expr=col("n") > 1).iter_rows()}
    finally:
        data_ctx.shuffle_strategy = before

    def block_counts(b: pd.DataFrame) -> pd.DataFrame:
        train = (b["split"] == "train").to_numpy()
        k = b["key"].to_numpy()
        c = {f"split:{s}": int((b["split"] == s).sum()) for s in SPLITS}
        c.update(val=int((train & (k < fraction)).sum()), test=int((train & (k > 1 - fraction)).sum()),
                 test_not_val=int((train & (k > 1 - fraction) & ~(k < fraction)).sum()))
        return pd.DataFrame([c])

    n: dict[str, int] = {}
    for b in keys.map_batches(block_counts, batch_format="pandas", batch_size=None).iter_batches(
            batch_format="pandas", batch_size=None):
        for k, v in b.sum().items():
            n[k] = n.get(k, 0) + int(v)
    n_train = n.get("split:train", 0)
    carve = {"val": not n.get("split:val") and 0 < n.get("val", 0) < n_train}
    left = n_train - (n.get("val", 0) if carve["val"] else 0)
    carve["test"] = not n.get("split:test") and 0 < n.get("test_not_val" if carve["val"] else "test", 0) < left
    return duplicates, {k: bool(v) for k, v in carve.items()}


def ingest(
    cfg: DataConfig,
    source_uri: str | None,
    out_dir,
    quarantine_path,
    log: Callable[[str], None] = print,
) -> IngestResult:
    """Read, validate and decode the dataset; write ``<out_dir>/{train,val,test}.parquet`` (folders of Parquet
    parts) and the quarantined rows to ``quarantine_path`` (a folder of parts), each replaced as a whole.

    Two streaming passes through Ray Data, the rows never on the driver: (1) the small columns (id, split) of every
    row, tagged with its input position → Ray Data aggregations decide the duplicated ids and the held-out splits;
    (2) each input file read in batches → decoded, validated and written to the split folders or the quarantine by
    the actor that decoded it, which returns counts. The driver holds counts and the duplicated ids."""
    import ray

    sources, columns, roots = _list_sources(cfg, source_uri)
    check_schema(columns, cfg)
    num_classes = len(cfg.class_names) if cfg.class_names else None
    num_bias = len(cfg.bias_names) if cfg.bias_names else None
    has_bias = "bias" in columns
    has_split = "split" in columns
    total = sum(s.rows for s in sources)
    wanted = [c for c in (cfg.image_column, cfg.path_column, "label", "bias", "split", "id") if c in columns]
    out_dir = as_path(out_dir)
    work = out_dir / "_ingest"  # the new outputs, moved into place when complete
    remove_path(work)
    folders = {s: str(work / f"{s}.parquet") for s in SPLITS} | {"quarantine": str(work / "quarantine.parquet")}
    for f in folders.values():
        as_path(f).mkdir(parents=True)
    from ray.data import DataContext

    data_ctx = DataContext.get_current()
    block_size = data_ctx.target_max_block_size
    # small blocks: a reader emits each batch of data.batch_size rows as it goes (not a whole file's rows), so a
    # decode actor holds a few batches, however large the input files
    data_ctx.target_max_block_size = 8 * 2**20
    try:
        refs = [src.ref for src in sources]
        files = ray.data.from_items([{"uri": src.uri or "", "source": i, "split": src.split or "", "offset": src.offset}
                                     for i, src in enumerate(sources)])

        def read(cols: list[str]):
            return files.map_batches(_read_sources, fn_kwargs={"columns": cols, "batch_size": cfg.batch_size,
                                                               "refs": refs}, batch_size=1, num_cpus=0.25)

        # pass 1: the small columns that decide duplicates and held-out splits (image bytes only for rows that
        # need a content-hash id)
        key_cols = [c for c in ("id", "split") if c in columns]
        if "id" not in columns or _may_have_nulls(sources, "id"):
            key_cols += [c for c in (cfg.image_column, cfg.path_column) if c in columns]
        keys = read(key_cols).map_batches(
            _keys, fn_kwargs={"image_column": cfg.image_column, "path_column": cfg.path_column,
                              "has_split": has_split, "fraction": cfg.val_fraction},
            batch_format="pandas", batch_size=None, num_cpus=0.25).materialize()
        duplicates, carve = _plan(keys, cfg.val_fraction, total)
        del keys
        # pass 2: decode, validate and write every row where it belongs; batch_size=None: one batch per block the
        # reader yielded (one input file's rows), so every part's rows are the same on every run
        written = read(wanted).map_batches(
            _DecodeAndWrite, fn_constructor_args=(cfg, num_classes, num_bias, roots, folders, ray.put(duplicates),
                                                  carve, has_split, has_bias),
            batch_size=None, batch_format="pandas", concurrency=(1, 2), num_cpus=0.5)
        counts: dict[str, int] = {}
        t0, last = time.time(), 0.0
        for b in written.iter_batches(batch_format="pandas", batch_size=None):
            for k, n in zip(b["key"], b["n"]):
                counts[k] = counts.get(k, 0) + int(n)
            now = time.time()
            if now - last > 5 or counts["rows"] == total:
                rate = counts["rows"] / max(now - t0, 1e-9)
                log(f"[data] {counts['rows']}/{total} rows  {rate:,.0f} rows/s  "
                    f"ETA {(total - counts['rows']) / max(rate, 1e-9):,.0f}s")
                last = now
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
        data_ctx.target_max_block_size = block_size
        remove_path(work)
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
