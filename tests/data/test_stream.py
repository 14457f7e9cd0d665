"""Streamed epochs over Parquet parts: the drawn multiset, the pixels that go with each index, the buffer bound."""

import numpy as np
import pytest

from raydebias.data.stream import PartSet, count_rows, epoch_counts, epoch_indices, iter_parts, stream_epoch, write_parts
from raydebias.debias.groupdro import group_balanced_weights


@pytest.fixture
def parts(tmp_path):
    n = 50
    x = np.zeros((n, 2, 2, 3), np.uint8)
    x[:, 0, 0, 0] = np.arange(n)  # each row's pixels name its index
    y = np.arange(n) % 3
    a = (np.arange(n) < 40).astype(np.int64)
    return PartSet.open(write_parts(tmp_path / "set", {"x": x, "y": y, "a": a}, rows_per_part=7))


def _epoch(data, counts, buffer_rows, seed=(0, 0), bs=8):
    batches = list(stream_epoch(data, counts, 2, bs, buffer_rows, list(seed)))
    idx = np.concatenate([b for b, _ in batches])
    for b, x in batches:  # the pixels that travel with an index are that row's
        assert (x[:, 0, 0, 0] == b).all()
    return batches, idx


@pytest.mark.parametrize("buffer_rows", [8, 16, 1000])
def test_an_epoch_streams_exactly_the_drawn_multiset(parts, buffer_rows):
    w = group_balanced_weights(parts.y * 2 + parts.a)
    counts = epoch_counts(len(parts), w, np.random.default_rng(3), 0, 1)
    batches, idx = _epoch(parts, counts, buffer_rows)
    assert np.array_equal(np.bincount(idx, minlength=len(parts)), counts)
    assert all(len(b) == 8 for b, _ in batches[:-1])


def test_counts_match_the_in_memory_draws_on_every_rank(parts):
    for world in (1, 3):
        for r in range(world):
            idx = epoch_indices(len(parts), None, np.random.default_rng([5, 1]), r, world)
            counts = epoch_counts(len(parts), None, np.random.default_rng([5, 1]), r, world)
            assert np.array_equal(np.bincount(idx, minlength=len(parts)), counts)


def test_the_same_seed_gives_the_same_batches_and_another_seed_another_order(parts):
    counts = np.ones(len(parts), np.int64)
    _, a = _epoch(parts, counts, 16, seed=(1, 2))
    _, b = _epoch(parts, counts, 16, seed=(1, 2))
    _, c = _epoch(parts, counts, 16, seed=(1, 3))
    assert np.array_equal(a, b) and not np.array_equal(a, c) and sorted(a) == sorted(c)


def test_a_buffer_as_large_as_the_epoch_mixes_every_part(parts):
    """With the whole epoch in the buffer the first batch draws from across the set, not from one or two parts."""
    counts = np.ones(len(parts), np.int64)
    batches, _ = _epoch(parts, counts, 1000)
    first = batches[0][0]
    assert len({int(i) // 7 for i in first}) >= 3


def test_parts_with_no_drawn_row_are_not_read(parts, monkeypatch):
    read = []
    orig = PartSet.read_pixels
    monkeypatch.setattr(PartSet, "read_pixels", lambda self, p, size: read.append(p) or orig(self, p, size))
    counts = np.zeros(len(parts), np.int64)
    counts[[0, 8]] = 2  # rows of parts 0 and 1
    _, idx = _epoch(parts, counts, 16)
    assert sorted(read) == [0, 1] and sorted(idx.tolist()) == [0, 0, 8, 8]


def test_iter_parts_yields_every_row_once_in_order(parts):
    idx = np.concatenate([i for i, _ in iter_parts(parts, 2)])
    x = np.concatenate([x for _, x in iter_parts(parts, 2)])
    assert idx.tolist() == list(range(50)) and (x[:, 0, 0, 0] == idx).all()


def test_a_set_can_ignore_its_bias_column_and_keep_only_the_rows_a_column_selects(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = np.arange(6, dtype=np.uint8)[:, None, None, None].repeat(2, 1).repeat(2, 2).repeat(3, 3)
    f = tmp_path / "gen.parquet"
    pq.write_table(pa.table({"label": np.arange(6) % 2, "bias": np.arange(6), "kept": [True, False] * 3,
                             "pixels": [r.tobytes() for r in x]}), f)
    s = PartSet.open([str(f)], bias=False, where="kept")
    assert count_rows([str(f)], where="kept") == len(s) == 3 and count_rows([str(f)]) == 6 and s.y.tolist() == [0, 0, 0] and s.a.tolist() == [-1, -1, -1]
    _, px = next(iter_parts(s, 2))
    assert px[:, 0, 0, 0].tolist() == [0, 2, 4]  # the kept rows' pixels, in order
    counts = np.array([0, 2, 1])
    batches = list(stream_epoch(s, counts, 2, 4, 16, [0]))
    idx = np.concatenate([b for b, _ in batches])
    assert sorted(idx.tolist()) == [1, 1, 2]
    assert all((xb[:, 0, 0, 0] == 2 * b).all() for b, xb in batches)


def test_take_rows_reads_the_asked_rows_in_the_asked_order(tmp_path):
    from raydebias.data.stream import first_per_group, read_columns, take_rows

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (30, 4, 4, 3), dtype=np.uint8)
    y, a = np.arange(30) % 3, (np.arange(30) // 3) % 2
    write_parts(tmp_path / "s.parquet", {"x": x, "y": y, "a": a}, rows_per_part=7)
    t, px = take_rows(tmp_path / "s.parquet", np.array([29, 0, 8, 8]), 4)
    assert np.array_equal(px, x[[29, 0, 8, 8]]) and t.column("label").to_pylist() == y[[29, 0, 8, 8]].tolist()
    assert "pixels" not in t.column_names
    with pytest.raises(IndexError):
        take_rows(tmp_path / "s.parquet", np.array([30]), 4)
    small = read_columns(tmp_path / "s.parquet", ["label", "bias"])
    first = first_per_group(small.column("label").to_numpy(), small.column("bias").to_numpy(), 2)
    want = sorted(i for g in {(yy, aa) for yy, aa in zip(y, a)}
                  for i in [j for j in range(30) if (y[j], a[j]) == g][:2])
    assert first.tolist() == want


def test_take_ids_reads_the_rows_with_the_asked_ids_in_set_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raydebias.data.stream import take_ids

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 4, 4, 3), dtype=np.uint8)
    files = write_parts(tmp_path / "s.parquet", {"x": x, "y": np.arange(20) % 2}, rows_per_part=6)
    for i, f in enumerate(files):  # ids r0..r19 in set order
        t = pq.read_table(f)
        pq.write_table(t.append_column("id", pa.array([f"r{6 * i + k}" for k in range(t.num_rows)])), f)
    t, px = take_ids(tmp_path / "s.parquet", ["r17", "r2", "r3", "nope"], 4)
    assert t.column("id").to_pylist() == ["r2", "r3", "r17"] and np.array_equal(px, x[[2, 3, 17]])
    t, px = take_ids(tmp_path / "s.parquet", ["nope"], 4)
    assert t.num_rows == 0 and px.shape == (0, 4, 4, 3)


@pytest.mark.parametrize("cache_rows", [0, 12, 1000])
def test_part_rows_index_like_the_array_with_or_without_a_cache(tmp_path, cache_rows):
    """PartRows stands in for a uint8 array in the samplers: fancy indexing, slices, views of selected rows and the
    concatenation of two sets give the array's images, whether parts are decoded per row or cached whole (a cache
    of 12 rows holds one 7-row part: it evicts)."""
    from raydebias.data.stream import PartRows

    rng = np.random.default_rng(0)
    x1, x2 = (rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8) for n in (30, 11))
    r1 = PartRows(PartSet.open(write_parts(tmp_path / "a", {"x": x1, "y": np.zeros(30)}, rows_per_part=7)), 4,
                  cache_rows=cache_rows)
    r2 = PartRows(PartSet.open(write_parts(tmp_path / "b", {"x": x2, "y": np.ones(11)}, rows_per_part=4)), 4,
                  cache_rows=cache_rows)
    idx = rng.integers(0, 30, 50)
    assert np.array_equal(r1[idx], x1[idx]) and np.array_equal(r1[3:17], x1[3:17]) and r1.shape == x1.shape
    pick = np.array([10, 2, 7])
    both = PartRows.concat(r1, r2.select(pick))
    want = np.concatenate([x1, x2[pick]])
    assert len(both) == 33 and np.array_equal(both[np.arange(33)[::-1]], want[::-1])
    if cache_rows:
        assert sum(len(v) for v in r1._cache.values()) <= cache_rows
