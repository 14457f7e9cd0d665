"""Run-directory paths on an object store (a local S3 API): writes committed whole, folders moved and linked,
remote files read by local-only readers, and the cross-host lease that guards a run directory."""

import json
import threading
import time

import fsspec
import numpy as np
import pyarrow as pa
import pytest
import torch

from raydebias._internal.io import (
    as_path,
    atomic_path,
    atomic_write_json,
    atomic_write_table,
    file_stamp,
    is_remote,
    link_parts,
    load_safetensors,
    local_copy,
    remove_path,
    replace_path,
    save_weights,
    sha256_file,
)
from raydebias.data.stream import PartSet, parquet_parts, write_parts
from raydebias.pipeline import PipelineError, RunDirLease


def s3():
    return fsspec.filesystem("s3")


def keys(root: str) -> list[str]:
    base = root.removeprefix("s3://")
    return sorted(f[len(base) + 1:] for f in s3().find(base))


def test_paths_are_local_or_remote(tmp_path):
    assert not is_remote(tmp_path) and not is_remote(str(tmp_path)) and not is_remote(f"file://{tmp_path}")
    assert as_path(f"file://{tmp_path}") == tmp_path
    p = as_path("s3://bucket/run") / "stages" / "data"
    assert is_remote(p) and str(p) == "s3://bucket/run/stages/data" and p.name == "data"


def test_files_and_folders_are_written_whole(s3_root):
    root = as_path(s3_root)
    atomic_write_json(root / "a" / "info.json", {"x": 1})
    assert json.loads((root / "a" / "info.json").read_text()) == {"x": 1}
    with pytest.raises(RuntimeError):
        with atomic_path(root / "b" / "model") as tmp:  # a failed block uploads nothing
            tmp.mkdir()
            (tmp / "w.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert not (root / "b").exists()
    with atomic_path(root / "b" / "model") as tmp:
        tmp.mkdir()
        (tmp / "unet").mkdir()
        (tmp / "unet" / "w.bin").write_bytes(b"w")
        (tmp / "meta.json").write_text("{}")
    assert keys(s3_root) == ["a/info.json", "b/model/meta.json", "b/model/unet/w.bin"]
    # a folder on the store moved over an older one: only the new files remain, the source is gone
    atomic_write_json(root / "c" / "old.json", {})
    replace_path(root / "b" / "model", root / "c")
    assert keys(s3_root) == ["a/info.json", "c/meta.json", "c/unet/w.bin"]
    remove_path(root / "c")
    remove_path(root / "c")  # removing what is not there is not an error
    assert keys(s3_root) == ["a/info.json"]


def test_parts_written_read_and_linked_on_the_store(s3_root):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    y, a = np.arange(10) % 3, np.arange(10) % 2
    files = write_parts(f"{s3_root}/set", {"x": x, "y": y, "a": a}, rows_per_part=4)
    assert files == parquet_parts(f"{s3_root}/set") and len(files) == 3 and all(f.startswith("s3://") for f in files)
    ps = PartSet.open(files)
    assert len(ps) == 10 and ps.y.tolist() == y.tolist() and ps.a.tolist() == a.tolist()
    np.testing.assert_array_equal(np.concatenate([ps.read_pixels(i, 4) for i in range(3)]), x)
    link_parts(files[::-1], as_path(s3_root) / "linked")  # server-side copies, in the given order
    linked = PartSet.open(parquet_parts(f"{s3_root}/linked"))
    assert linked.y.tolist() == [*y[8:], *y[4:8], *y[:4]]
    atomic_write_table(as_path(s3_root) / "one.parquet", pa.table({"v": [1, 2]}))
    assert "one.parquet" in keys(s3_root)


def test_remote_weights_load_and_local_copies_follow_the_content(s3_root):
    path = as_path(s3_root) / "w" / "model.safetensors"
    save_weights(path, {"w": torch.arange(4.0)})
    assert torch.equal(load_safetensors(path)["w"], torch.arange(4.0))
    stamp, digest = file_stamp(path), sha256_file(path)
    first = local_copy(as_path(s3_root) / "w")
    assert not is_remote(first) and local_copy(as_path(s3_root) / "w") == first  # downloaded once
    save_weights(path, {"w": torch.ones(4)})
    assert file_stamp(path) != stamp and sha256_file(path) != digest
    second = local_copy(as_path(s3_root) / "w")
    assert second != first  # new content, new copy: a reader never gets the old weights
    from safetensors.torch import load_file

    assert torch.equal(load_file(f"{second}/model.safetensors")["w"], torch.ones(4))


def test_lease_excludes_a_live_holder_and_takes_over_a_dead_one(s3_root):
    with RunDirLease(s3_root, seconds=1.2) as first:
        assert first.held
        holder = json.loads(s3().cat_file(f"{s3_root.removeprefix('s3://')}/.lock"))
        assert holder["token"] == first._token
        t0 = time.time()
        with pytest.raises(PipelineError, match="in use by another run"):
            RunDirLease(s3_root, seconds=1.2).__enter__()  # the holder's heartbeat moves the object: alive
        assert time.time() - t0 < 3
    assert not s3().exists(f"{s3_root.removeprefix('s3://')}/.lock")  # released on exit
    # a holder that died without releasing (no heartbeat): taken over after one lease period
    s3().pipe_file(f"{s3_root.removeprefix('s3://')}/.lock", json.dumps({"pid": 1, "token": "dead"}).encode())
    t0 = time.time()
    with RunDirLease(s3_root, seconds=1.0) as lease:
        assert lease.held and 1.0 <= time.time() - t0 < 5


def test_a_lease_taken_by_another_run_is_noticed(s3_root):
    lease = RunDirLease(s3_root, seconds=0.6).__enter__()
    try:
        s3().pipe_file(f"{s3_root.removeprefix('s3://')}/.lock", json.dumps({"token": "other"}).encode())
        deadline = time.time() + 5
        while lease.held and time.time() < deadline:
            time.sleep(0.05)
        assert not lease.held  # the pipeline stops before its next stage
    finally:
        lease.__exit__(None, None, None)
    assert s3().exists(f"{s3_root.removeprefix('s3://')}/.lock")  # another holder's lease is not removed


def test_two_runs_racing_for_a_free_lease_get_one_holder(s3_root):
    won, lost = [], []

    def take():
        try:
            won.append(RunDirLease(s3_root, seconds=1.5).__enter__())
        except PipelineError:
            lost.append(1)

    threads = [threading.Thread(target=take) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(won) == 1 and len(lost) == 2  # the conditional create lets exactly one in
    finally:
        for w in won:
            w.__exit__(None, None, None)


def test_a_classifier_saved_on_the_store_loads_as_serve_loads_it(s3_root):
    from raydebias.config import ClassifierModelConfig
    from raydebias.models.classifier import create_classifier, load_classifier

    cfg = ClassifierModelConfig(width=8)
    model = create_classifier(cfg, 3)
    d = as_path(s3_root) / "stages" / "train" / "erm"
    save_weights(d / "model.safetensors", model)
    atomic_write_json(d / "meta.json", {"classifier": cfg.model_dump(), "num_classes": 3})
    loaded, meta = load_classifier(f"{s3_root}/stages/train/erm")
    assert meta["num_classes"] == 3
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
