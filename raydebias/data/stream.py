"""Labelled image sets read as streams of Parquet parts: the training and evaluation loops hold a bounded window of
pixels, never a whole split.

A :class:`PartSet` is a list of Parquet files (``id``, ``label``, ``bias``, ``pixels``; optional ``group``) read
in file-name order; a row's index is its position in that order. Its small columns (labels, bias values, groups:
8 bytes a row each) are read whole, so that samplers and per-sample recipe state (LfF) work on indices as they
would in memory; pixels are read a part at a time.

An epoch is a multiset of row indices (a permutation, or weighted draws with replacement) given as per-row counts.
:func:`stream_epoch` reads the parts that hold drawn rows in a seeded random order, repeats each row by its count
into a shuffle buffer of ``buffer_rows`` rows and emits seeded random batches: with ``buffer_rows`` at least the
epoch's size this is a uniform shuffle of the multiset; beyond it, a local shuffle (as Ray Data's
``local_shuffle_buffer_size``) whose window is the buffer. The same seed gives the same batches. Ray Data has no
weighted sampler (ray-project/ray#31127), hence this reader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raydebias._internal.io import as_path, atomic_write_table
from raydebias.data.transforms import pixels_from_column, resize_uint8


def parquet_parts(path: str | Path) -> list[str]:
    """The Parquet files of a split written by the ``data`` stage (a folder of parts) or of a single file, in
    name order (input order for the ``data`` stage's parts)."""
    p = as_path(path)
    if p.is_dir():
        return sorted(str(f) for f in p.glob("*.parquet") if not f.name.startswith((".", "_")))
    return [str(p)]


@dataclass
class PartSet:
    """A labelled set as Parquet parts: ``files``, their row counts, and the small columns of all rows."""

    files: list[str]
    rows: np.ndarray  # rows per file
    y: np.ndarray
    a: np.ndarray  # -1 where the bias is unknown or the set has none
    g: np.ndarray | None = None  # explicit (pseudo-)groups, when the set carries a ``group`` column
    where: list[str | None] | None = None  # per file: the boolean column that selects its rows (None: all rows)

    @classmethod
    def open(cls, files: list[str], bias: bool = True, where: str | None = None,
             groups: list[int] | None = None) -> "PartSet":
        """The set in ``files``; ``bias=False`` ignores a ``bias`` column (rows without a bias label); ``where``
        names a boolean column: only its true rows belong to the set; ``groups``: each row's (pseudo-)group, in
        row order, in place of a ``group`` column."""
        ys, as_, gs, rows = [], [], [], []
        for f in files:
            names = pq.ParquetFile(str(f)).schema_arrow.names
            want = [c for c in ("label", "bias", "group", where) if c and c in names and (c != "bias" or bias)]
            t = pq.read_table(str(f), columns=want)
            if where:
                t = t.filter(t.column(where))
            rows.append(t.num_rows)
            ys.append(t.column("label").to_numpy().astype(np.int64))
            as_.append(t.column("bias").to_numpy().astype(np.int64) if "bias" in want
                       else np.full(t.num_rows, -1, np.int64))
            gs.append(t.column("group").to_numpy().astype(np.int64) if "group" in want else None)
        cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
        g = cat(gs) if gs and all(x is not None for x in gs) else None
        if groups is not None:
            g = np.asarray(groups, np.int64)
            if len(g) != sum(rows):
                raise ValueError(f"{len(g)} groups for a set of {sum(rows)} rows")
        return cls(list(files), np.asarray(rows, np.int64), cat(ys), cat(as_), g, [where] * len(files))

    @classmethod
    def union(cls, sets: list["PartSet"]) -> "PartSet":
        """The sets one after the other (rows of the second are indexed after the first's)."""
        g = np.concatenate([s.g for s in sets]) if all(s.g is not None for s in sets) else None
        return cls([f for s in sets for f in s.files], np.concatenate([s.rows for s in sets]),
                   np.concatenate([s.y for s in sets]), np.concatenate([s.a for s in sets]), g,
                   [w for s in sets for w in (s.where or [None] * len(s.files))])

    def __len__(self) -> int:
        return int(self.rows.sum())

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.rows)[:-1]]).astype(np.int64)

    def read_pixels(self, part: int, image_size: int) -> np.ndarray:
        where = self.where[part] if self.where else None
        t = pq.read_table(str(self.files[part]), columns=["pixels", *([where] if where else [])])
        if where:
            t = t.filter(t.column(where))
        if not t.num_rows:
            return np.zeros((0, image_size, image_size, 3), np.uint8)
        return pixels_from_column(t.column("pixels").to_pylist(), image_size)


def buffer_rows(megabytes: float, side: int) -> int:
    """How many decoded ``side`` × ``side`` RGB images fit in ``megabytes`` (at least one): the shuffle buffer,
    a sampler's block, a cache of decoded parts."""
    return max(1, int(megabytes * 2**20 // (side * side * 3)))


def count_rows(files: list[str], where: str | None = None, **_) -> int:
    """Rows of the set :meth:`PartSet.open` would read from ``files`` (extra keys of a set spec are ignored): the
    Parquet footers' row counts, or the true cells of the boolean column ``where``."""
    if where is None:
        return sum(pq.ParquetFile(str(f)).metadata.num_rows for f in files)
    return sum(int(pc.sum(pq.read_table(str(f), columns=[where]).column(where)).as_py() or 0) for f in files)


def write_parts(folder: str | Path, arrays: dict[str, np.ndarray], rows_per_part: int = 4096) -> list[str]:
    """Write in-memory labelled arrays (``x`` uint8 NHWC, ``y``, optional ``a``, ``g``) as Parquet parts that a
    :class:`PartSet` reads; returns the files."""
    folder = as_path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(arrays["y"])
    files = []
    for i, start in enumerate(range(0, max(n, 1), rows_per_part)):
        sl = slice(start, min(n, start + rows_per_part))
        x = arrays["x"][sl]
        cols = {"label": pa.array(arrays["y"][sl], pa.int64()),
                "bias": pa.array(arrays["a"][sl] if "a" in arrays else np.full(len(x), -1), pa.int64()),
                "pixels": pa.array([r.tobytes() for r in x], pa.binary())}
        if "g" in arrays:
            cols["group"] = pa.array(arrays["g"][sl], pa.int64())
        f = folder / f"part-{i:06d}.parquet"
        atomic_write_table(f, pa.table(cols))
        files.append(str(f))
    return files


def epoch_indices(n: int, weights: np.ndarray | None, rng: np.random.Generator, rank: int, world: int) -> np.ndarray:
    """This rank's draws for one epoch: a permutation, or ``n`` weighted draws with replacement.

    ``rng`` must be seeded identically on every rank: all ranks draw the same sequence and take disjoint strided
    shards of it. It is padded cyclically to a multiple of ``world`` so that every rank gets the same number of
    samples (DDP needs the same number of steps on every rank, or its all-reduces hang).
    """
    if weights is None:
        idx = rng.permutation(n)
    else:
        idx = rng.choice(n, size=n, replace=True, p=weights / weights.sum())
    if n and n % world:
        idx = np.resize(idx, -(-n // world) * world)
    return idx[rank::world]


def epoch_counts(n: int, weights: np.ndarray | None, rng: np.random.Generator, rank: int, world: int) -> np.ndarray:
    """How often each of ``n`` rows is among this rank's draws (:func:`epoch_indices`) in one epoch."""
    return np.bincount(epoch_indices(n, weights, rng, rank, world), minlength=n)


def stream_epoch(data: PartSet, counts: np.ndarray, image_size: int, batch_size: int, buffer_rows: int,
                 seed: list[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """This epoch's batches ``(row indices, uint8 NHWC pixels)``: every row repeated ``counts[row]`` times, shuffled
    within a buffer of ``buffer_rows`` rows (see the module docstring); the last batch may be smaller."""
    rng = np.random.default_rng(seed)
    offsets = data.offsets
    parts = [p for p in rng.permutation(len(data.files)) if counts[offsets[p]:offsets[p] + data.rows[p]].any()]
    buf_i: list[np.ndarray] = []
    buf_x: list[np.ndarray] = []
    held = 0
    capacity = max(buffer_rows, batch_size)

    def emit(keep: int):
        nonlocal buf_i, buf_x, held
        idx, x = np.concatenate(buf_i), np.concatenate(buf_x)
        perm = rng.permutation(len(idx))
        out = len(idx) - keep
        out -= out % batch_size if keep else 0
        for s in range(0, out, batch_size):
            sel = perm[s:min(out, s + batch_size)]
            yield idx[sel], x[sel]
        rest = perm[out:]
        buf_i, buf_x, held = [idx[rest]], [x[rest]], len(rest)

    for p in parts:
        c = counts[offsets[p]:offsets[p] + data.rows[p]]
        take = np.repeat(np.arange(len(c)), c)
        x = data.read_pixels(p, image_size)
        buf_i.append(offsets[p] + take)
        buf_x.append(x[take])
        held += len(take)
        if held >= capacity:
            yield from emit(capacity // 2)
    if held:
        yield from emit(0)


def iter_parts(data: PartSet, image_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every row once, in order: ``(row indices, uint8 NHWC pixels)`` a part at a time (evaluation)."""
    for p, off in enumerate(data.offsets):
        yield off + np.arange(data.rows[p]), data.read_pixels(p, image_size)


def take_rows(path: str | Path, rows: np.ndarray, image_size: int) -> tuple[pa.Table, np.ndarray]:
    """The rows at positions ``rows`` (in the set's part order) of a Parquet set, in the order given: the table
    without its pixel column, and the decoded pixels. Only the parts holding them are read, one at a time."""
    files = parquet_parts(path)
    offsets = np.cumsum([0, *(pq.ParquetFile(str(f)).metadata.num_rows for f in files)])
    rows = np.asarray(rows, np.int64)
    uniq, back = np.unique(rows, return_inverse=True)
    tables = []
    for i, f in enumerate(files):
        sel = uniq[(uniq >= offsets[i]) & (uniq < offsets[i + 1])]
        if len(sel):
            tables.append(pq.read_table(str(f)).take(pa.array(sel - offsets[i])))
    if len(uniq) and sum(t.num_rows for t in tables) != len(uniq):
        raise IndexError(f"rows out of range for {path} ({offsets[-1]} rows)")
    if not tables:
        t = pq.read_schema(str(files[0])).empty_table() if files else pa.table({"pixels": pa.array([], pa.binary())})
        return t.drop_columns(["pixels"]), np.zeros((0, image_size, image_size, 3), np.uint8)
    t = pa.concat_tables(tables).take(pa.array(back))
    return t.drop_columns(["pixels"]), pixels_from_column(t.column("pixels").to_pylist(), image_size)


def read_columns(path: str | Path, columns: list[str]) -> pa.Table:
    """Small columns of every row of a Parquet set, in part order (never the pixels)."""
    return pa.concat_tables([pq.read_table(str(f), columns=columns) for f in parquet_parts(path)])


def first_per_group(y: np.ndarray, a: np.ndarray, k: int) -> np.ndarray:
    """Positions of the first ``k`` rows of every (y, a) pair, in row order."""
    keys = np.asarray(y, np.int64) * (int(np.max(a, initial=0)) + 1) + np.asarray(a, np.int64)
    picked = [np.flatnonzero(keys == g)[:k] for g in np.unique(keys)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def take_ids(path: str | Path, ids: list[str], image_size: int) -> tuple[pa.Table, np.ndarray]:
    """The rows whose ``id`` is in ``ids``, in the set's order: the table without pixels, and the decoded pixels.
    Each part's id column is read; pixels only from the parts that hold a wanted row."""
    wanted = pa.array(list(ids), pa.string())
    tables = []
    for f in parquet_parts(path):
        mask = pc.is_in(pq.read_table(str(f), columns=["id"]).column("id"), value_set=wanted)
        if pc.any(mask).as_py():
            tables.append(pq.read_table(str(f)).filter(mask))
    if not tables:
        return pa.table({"id": pa.array([], pa.string())}), np.zeros((0, image_size, image_size, 3), np.uint8)
    t = pa.concat_tables(tables)
    return t.drop_columns(["pixels"]), pixels_from_column(t.column("pixels").to_pylist(), image_size)


class PartRows:
    """Random access to a :class:`PartSet`'s images by row index, for samplers that draw rows with replacement (the
    bootstrap diffusion and TIW trainers): ``rows[idx]``, ``rows[a:b]`` and :meth:`take` read each part that holds
    a wanted row once and decode only the wanted rows, or, with ``cache_rows`` > 0, decode whole parts and keep the
    most recently used ones up to that many rows (a set that fits is decoded once). ``resolution`` resizes the
    images (the model's, when it differs from the dataset's); ``index`` maps this view's rows to the set's
    (:meth:`select`, :meth:`concat`)."""

    def __init__(self, data: PartSet, image_size: int, resolution: int | None = None,
                 index: np.ndarray | None = None, cache_rows: int = 0):
        self.data, self.image_size, self.resolution = data, image_size, resolution
        self.index = None if index is None else np.asarray(index, np.int64)
        self.cache_rows = cache_rows
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.data.rows.sum()) if self.index is None else len(self.index)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        side = self.resolution or self.image_size
        return (len(self), side, side, 3)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            return self.take(np.arange(*key.indices(len(self))))
        return self.take(np.asarray(key))

    def __getstate__(self) -> dict:  # the cache stays with its process
        return {**self.__dict__, "_cache": {}}

    def select(self, index: np.ndarray) -> "PartRows":
        """The view of rows ``index`` of this one."""
        base = np.arange(len(self)) if self.index is None else self.index
        return PartRows(self.data, self.image_size, self.resolution, base[np.asarray(index, np.int64)],
                        self.cache_rows)

    @staticmethod
    def concat(first: "PartRows", second: "PartRows") -> "PartRows":
        """``first``'s rows, then ``second``'s (same image size)."""
        n1 = int(first.data.rows.sum())
        i1 = np.arange(n1) if first.index is None else first.index
        i2 = np.arange(int(second.data.rows.sum())) if second.index is None else second.index
        return PartRows(PartSet.union([first.data, second.data]), first.image_size, first.resolution,
                        np.concatenate([i1, i2 + n1]), max(first.cache_rows, second.cache_rows))

    def _part(self, p: int, rows: np.ndarray) -> np.ndarray:
        d = self.data
        if p in self._cache:
            self._cache[p] = self._cache.pop(p)  # most recently used last
            return self._cache[p][rows]
        where = d.where[p] if d.where else None
        t = pq.read_table(str(d.files[p]), columns=["pixels", *([where] if where else [])])
        if where:
            t = t.filter(t.column(where))
        if self.cache_rows <= 0 or d.rows[p] > self.cache_rows:
            return pixels_from_column(t.column("pixels").take(pa.array(rows)).to_pylist(), self.image_size)
        x = pixels_from_column(t.column("pixels").to_pylist(), self.image_size)
        self._cache[p] = x
        while sum(len(v) for v in self._cache.values()) > self.cache_rows:
            self._cache.pop(next(iter(self._cache)))
        return x[rows]

    def take(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, np.int64)
        if self.index is not None:
            idx = self.index[idx]
        uniq, back = np.unique(idx, return_inverse=True)
        d, out = self.data, []
        for p, lo in enumerate(d.offsets):
            sel = uniq[(uniq >= lo) & (uniq < lo + d.rows[p])]
            if len(sel):
                out.append(self._part(p, sel - lo))
        x = np.concatenate(out)[back.reshape(-1)] if out else \
            np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
        return resize_uint8(x, self.resolution) if self.resolution and len(x) else x
