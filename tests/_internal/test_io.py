"""Atomic writes, content fingerprints and Parquet writes to any fsspec URI."""

import json
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydebias._internal.io import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_table,
    atomic_write_text,
    fingerprint_uri,
    save_weights,
    write_table_uri,
)


def listing(d):
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*"))


@pytest.fixture
def mem_root():
    """A fresh ``memory://`` folder (the in-memory filesystem is process-global), removed afterwards."""
    root = f"memory://raydebias-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    path = root.removeprefix("memory://")
    if fs.exists(path):
        fs.rm(path, recursive=True)


# ---------------------------------------------------------------- atomic writes


def test_atomic_write_bytes_text_json_replace_content_and_leave_no_temp_files(tmp_path):
    target = tmp_path / "deep" / "dir" / "f.bin"  # parents are created
    atomic_write_bytes(target, b"first")
    assert target.read_bytes() == b"first"
    atomic_write_bytes(target, b"2nd")
    assert target.read_bytes() == b"2nd"

    atomic_write_text(tmp_path / "t.txt", "héllo")
    atomic_write_text(tmp_path / "t.txt", "bye")
    assert (tmp_path / "t.txt").read_text() == "bye"

    atomic_write_json(tmp_path / "m.json", {"a": 1, "p": tmp_path})  # non-JSON values go through str()
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1, "p": str(tmp_path)}
    assert (tmp_path / "m.json").read_text().endswith("\n")

    assert listing(tmp_path) == ["deep", "deep/dir", "deep/dir/f.bin", "m.json", "t.txt"]


def test_failed_atomic_write_keeps_the_old_file_and_cleans_up(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # fails while writing the temp file
    assert target.read_text() == "old"
    assert listing(tmp_path) == ["f.txt"]


def test_atomic_path_replaces_a_file_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp != target and tmp.parent.parent == tmp_path
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing visible until the block ends
    assert target.read_text() == "new"
    assert listing(tmp_path) == ["out.txt"]


def test_atomic_path_keeps_the_old_file_when_the_block_raises(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert listing(tmp_path) == ["out.txt"]
    # and nothing appears when there was no old file
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "new.txt") as tmp:
            tmp.write_text("x")
            raise RuntimeError
    assert listing(tmp_path) == ["out.txt"]


def test_atomic_path_replaces_a_whole_directory(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.bin").write_bytes(b"old")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "weights.bin").write_bytes(b"new")
    assert listing(tmp_path) == ["model", "model/weights.bin"]
    assert (target / "weights.bin").read_bytes() == b"new"


def test_atomic_write_table(tmp_path):
    t = pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    atomic_write_table(tmp_path / "t.parquet", t)
    atomic_write_table(tmp_path / "t.parquet", t.slice(1))
    assert pq.read_table(tmp_path / "t.parquet").equals(t.slice(1))
    assert listing(tmp_path) == ["t.parquet"]


def test_save_weights_writes_channels_last_weights_and_keeps_the_old_file_on_failure(tmp_path):
    import torch
    from safetensors.torch import load_file

    conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()  # what a bare safetensors save_file refuses
    path = save_weights(tmp_path / "w.safetensors", conv, metadata={"format": "pt"})
    loaded = load_file(path)
    assert loaded.keys() == conv.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in conv.state_dict().items())

    shared = torch.zeros(4)
    with pytest.raises(RuntimeError):  # safetensors refuses tensors that share storage
        save_weights(path, {"a": shared, "b": shared})
    assert torch.equal(load_file(path)["weight"], conv.weight)
    assert listing(tmp_path) == ["w.safetensors"]


# ---------------------------------------------------------------- fingerprints


def _make_local_tree(root):
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(bytes(range(256)) * 4)
    (root / "sub" / "b.txt").write_text("hello world")
    (root / "c.txt").write_text("c")


def test_fingerprint_local_dir_is_stable_and_sees_a_one_byte_change(tmp_path):
    root = tmp_path / "data"
    _make_local_tree(root)
    fp = fingerprint_uri(str(root))
    assert len(fp) == 64
    assert fingerprint_uri(str(root)) == fp
    assert fingerprint_uri(str(root) + "/") == fp

    # an identical copy elsewhere has the same fingerprint (content-, not location-based)
    copy = tmp_path / "copy"
    _make_local_tree(copy)
    assert fingerprint_uri(str(copy)) == fp

    data = bytearray((root / "a.bin").read_bytes())
    data[500] ^= 1  # one bit of one byte, same size
    (root / "a.bin").write_bytes(bytes(data))
    changed = fingerprint_uri(str(root))
    assert changed != fp
    data[500] ^= 1
    (root / "a.bin").write_bytes(bytes(data))
    assert fingerprint_uri(str(root)) == fp  # back to the original content → back to the same hash

    (root / "sub" / "b.txt").rename(root / "sub" / "b2.txt")  # same bytes, different name
    assert fingerprint_uri(str(root)) != fp
    (root / "sub" / "b2.txt").rename(root / "sub" / "b.txt")
    (root / "extra").write_bytes(b"")  # an added empty file
    assert fingerprint_uri(str(root)) != fp


def test_fingerprint_of_a_single_file(tmp_path):
    f = tmp_path / "x.parquet"
    f.write_bytes(b"abc")
    fp = fingerprint_uri(str(f))
    assert fingerprint_uri(str(f)) == fp
    f.write_bytes(b"abd")
    assert fingerprint_uri(str(f)) != fp


def test_fingerprint_over_the_content_limit_falls_back_to_listing_metadata(tmp_path):
    root = tmp_path / "big"
    _make_local_tree(root)
    fp = fingerprint_uri(str(root), content_limit=10)
    assert fp == fingerprint_uri(str(root), content_limit=10)
    assert fp != fingerprint_uri(str(root))  # a different scheme than the content hash
    (root / "c.txt").write_text("cc")  # size changes
    assert fingerprint_uri(str(root), content_limit=10) != fp


def test_fingerprint_memory_uri(mem_root):
    fs = fsspec.filesystem("memory")
    base = mem_root.removeprefix("memory://")
    fs.pipe(f"{base}/d/x.bin", b"\x00" * 100)
    fs.pipe(f"{base}/d/sub/y.bin", b"yyy")
    uri = f"{mem_root}/d"
    fp = fingerprint_uri(uri)
    assert fingerprint_uri(uri) == fp

    fs.pipe(f"{base}/d/x.bin", b"\x00" * 50 + b"\x01" + b"\x00" * 49)  # one byte differs
    assert fingerprint_uri(uri) != fp
    fs.pipe(f"{base}/d/x.bin", b"\x00" * 100)
    assert fingerprint_uri(uri) == fp

    # the same tree in a local dir hashes the same: only relative names and bytes count
    fs.pipe(f"{base}/e/x.bin", b"\x00" * 100)
    fs.pipe(f"{base}/e/sub/y.bin", b"yyy")
    assert fingerprint_uri(f"{mem_root}/e") == fp


def test_fingerprint_separates_file_names_from_contents(tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    (tmp_path / "1" / "a").write_bytes(b"b")
    (tmp_path / "2" / "ab").write_bytes(b"")
    assert fingerprint_uri(str(tmp_path / "1")) != fingerprint_uri(str(tmp_path / "2"))


# ---------------------------------------------------------------- write_table_uri


def test_write_table_uri_memory_round_trip(mem_root):
    t = pa.table({"id": ["a", "b"], "x": pa.array([b"\x00\x01", b""], pa.binary()), "y": [1, 2]})
    t = t.replace_schema_metadata({b"class_names": b"p,q"})
    uri = f"{mem_root}/out/t.parquet"
    assert write_table_uri(t, uri) == uri
    fs, path = fsspec.core.url_to_fs(uri)
    with fs.open(path, "rb") as f:
        back = pq.read_table(f)
    assert back.equals(t)
    assert back.schema.metadata[b"class_names"] == b"p,q"
    assert fs.ls(path.rsplit("/", 1)[0], detail=False) == [path]  # the .tmp file was moved, not left behind
    # overwriting replaces the content
    write_table_uri(t.slice(1), uri)
    with fs.open(path, "rb") as f:
        assert pq.read_table(f).to_pydict()["id"] == ["b"]


def test_write_table_uri_local_path_and_file_uri(tmp_path):
    t = pa.table({"v": [1.5, 2.5]})
    write_table_uri(t, str(tmp_path / "a" / "t.parquet"))
    assert pq.read_table(tmp_path / "a" / "t.parquet").equals(t)
    write_table_uri(t, f"file://{tmp_path}/b.parquet")
    assert pq.read_table(tmp_path / "b.parquet").equals(t)
    assert listing(tmp_path) == ["a", "a/t.parquet", "b.parquet"]


def test_stage_keys_fingerprint_local_pretrained_weights(tmp_path):
    from raydebias.config import load_config
    from raydebias.embed.stage import clip_key
    from raydebias.methods.shared import SHARED

    def diffusion_key(cfg):
        return SHARED["diffusion"].config_key(cfg)

    sd, ck = tmp_path / "sd", tmp_path / "clip.safetensors"
    (sd / "unet").mkdir(parents=True)
    (sd / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights v1")
    ck.write_bytes(b"clip v1")
    cfg = load_config(None, ["models.source=pretrained", f"models.diffusion.pretrained={sd}",
                             f"models.clip.pretrained={ck}"])
    before = diffusion_key(cfg), clip_key(cfg)
    (sd / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights v2")  # same path, new weights
    ck.write_bytes(b"clip v2")
    after = diffusion_key(cfg), clip_key(cfg)
    assert before[0] != after[0] and before[1] != after[1]
    assert diffusion_key(cfg) == after[0]  # deterministic
    hub = load_config(None, ["models.source=pretrained", "models.diffusion.pretrained=org/sd-id",
                             "models.clip.pretrained=laion2b_s34b_b79k", "method=erm"])
    assert diffusion_key(hub)["_key"] is None and clip_key(hub)["weights"] is None
