"""The dataset contract: good rows land per split, bad rows are quarantined with a reason, fatal problems fail fast."""

import io

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raydebias.config import DataConfig
from raydebias.data.contract import ContractError, ingest
from raydebias.data.splits import load_split


def png(color=(255, 0, 0), size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def good_rows(n=12, splits=("train", "val", "test")):
    return {
        "id": [f"r{i}" for i in range(n)],
        "image": [png((20 * i, 0, 0)) for i in range(n)],
        "label": [i % 2 for i in range(n)],
        "bias": [(i // 2) % 2 for i in range(n)],
        "split": [splits[i % len(splits)] for i in range(n)],
    }


def write(tmp_path, data, name="d.parquet", schema=None):
    p = tmp_path / name
    pq.write_table(pa.table(data, schema=schema), p)
    return str(p)


def run_ingest(tmp_path, uri, **cfg):
    cfg.setdefault("class_names", ["a", "b"])
    cfg.setdefault("bias_names", ["x", "y"])
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    q = tmp_path / "quarantine.parquet"
    res = ingest(DataConfig(uri=uri, image_size=8, **cfg), uri, out, q, log=lambda m: None)
    return res, out, q


def test_good_rows_are_decoded_and_split(ray_cluster, tmp_path):
    data = good_rows()
    res, out, q = run_ingest(tmp_path, write(tmp_path, data))
    assert res.counts == {"train": 4, "val": 4, "test": 4}
    assert res.quarantined == 0 and not q.exists()
    tr = load_split(out / "train.parquet", 8)
    assert tr["x"].shape == (4, 8, 8, 3) and tr["x"].dtype == np.uint8
    assert sorted(tr["id"]) == ["r0", "r3", "r6", "r9"]
    # pixels survive the round trip: row r3 was a solid (60, 0, 0) image
    k = list(tr["id"]).index("r3")
    assert (tr["x"][k] == np.array([60, 0, 0], np.uint8)).all()
    assert np.array(res.group_counts["train"]).sum() == 4


def test_bad_rows_go_to_quarantine_with_reasons(ray_cluster, tmp_path):
    d = good_rows(12)
    d["image"][0] = b"not an image at all"
    d["image"][1] = b""
    d["label"][2] = None
    d["label"][3] = 7  # out of range for 2 classes
    d["bias"][4] = -1
    d["image"][5] = png(size=(300, 300))  # over the pixel limit set below
    d["image"][6] = png()[:40]  # truncated PNG
    data = {**d, "label": pa.array(d["label"], pa.float64())}
    data["label"] = pa.array([None if v is None else float(v) for v in d["label"]][:7] + [2.5] + d["label"][8:],
                             pa.float64())
    res, out, q = run_ingest(tmp_path, write(tmp_path, data), max_image_pixels=10_000)
    assert q.exists()
    quarantine = pq.read_table(q).to_pylist()
    reasons = {r["id"]: r["reason"] for r in quarantine}
    assert set(reasons) == {"r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7"}
    assert "undecodable" in reasons["r0"]
    assert "empty image" in reasons["r1"]
    assert "missing label" in reasons["r2"]
    assert "label 7 out of range" in reasons["r3"]
    assert "bias -1 out of range" in reasons["r4"]
    assert "too large" in reasons["r5"]
    assert "undecodable" in reasons["r6"]
    assert "non-integer" in reasons["r7"]
    # nothing is lost: the raw bytes of rejected rows are kept
    assert next(r for r in quarantine if r["id"] == "r0")["image"] == b"not an image at all"
    assert res.quarantined == 8 and sum(res.counts.values()) == 4


def test_wrong_dtype_column_is_quarantined_per_row(ray_cluster, tmp_path):
    d = good_rows(6)
    d["label"] = ["0", "1", "0", "1", "0", "1"]
    with pytest.raises(ContractError, match="train split is empty"):
        run_ingest(tmp_path, write(tmp_path, d))
    reasons = pq.read_table(tmp_path / "quarantine.parquet").column("reason").to_pylist()
    assert len(reasons) == 6 and all("wrong dtype for label" in r for r in reasons)


def test_missing_columns_fail_fast(ray_cluster, tmp_path):
    d = good_rows(4)
    del d["label"]
    with pytest.raises(ContractError, match=r"missing required column\(s\): label"):
        run_ingest(tmp_path, write(tmp_path, d))
    d = good_rows(4)
    del d["image"]
    with pytest.raises(ContractError, match="image \\(or path\\)"):
        run_ingest(tmp_path, write(tmp_path, d, "e.parquet"))


def test_empty_train_split_fails_fast(ray_cluster, tmp_path):
    d = good_rows(6, splits=("val", "test"))
    with pytest.raises(ContractError, match="train split is empty"):
        run_ingest(tmp_path, write(tmp_path, d))


def test_paths_relative_to_dataset_root_and_missing_val(ray_cluster, tmp_path):
    root = tmp_path / "ds"
    (root / "imgs").mkdir(parents=True)
    n = 40
    for i in range(n):
        (root / "imgs" / f"{i}.png").write_bytes(png((i, i, i)))
    data = {"path": [f"imgs/{i}.png" for i in range(n - 1)] + ["imgs/missing.png"],
            "label": [i % 2 for i in range(n)]}
    pq.write_table(pa.table(data), root / "part-0.parquet")
    res, out, q = run_ingest(tmp_path, str(root), bias_names=None)
    assert res.num_bias is None
    assert res.quarantined == 1
    assert "cannot read path" in pq.read_table(q).column("reason")[0].as_py()
    # no split column: val and test are held out of train, disjoint, deterministic
    assert res.counts["val"] > 0 and res.counts["test"] > 0
    assert sum(res.counts.values()) == n - 1
    ids = [set(load_split(out / f"{s}.parquet", 8)["id"]) for s in ("train", "val", "test")]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])


def test_memory_filesystem_and_split_uris(ray_cluster, tmp_path):
    fs = fsspec.filesystem("memory")
    for split in ("train", "val", "test"):
        d = good_rows(6)
        del d["split"]
        d["id"] = [f"{split}{i}" for i in range(6)]
        with fs.open(f"/contract/{split}.parquet", "wb") as f:
            pq.write_table(pa.table(d), f)
    splits = {s: f"memory://contract/{s}.parquet" for s in ("train", "val", "test")}
    out = tmp_path / "out"
    out.mkdir()
    res = ingest(DataConfig(splits=splits, image_size=8), None, out, tmp_path / "q.parquet", log=lambda m: None)
    assert res.counts == {"train": 6, "val": 6, "test": 6}
    assert res.num_classes == 2 and res.num_bias == 2  # inferred without names
    assert set(load_split(out / "val.parquet", 8)["id"]) == {f"val{i}" for i in range(6)}


def test_missing_dataset_is_clear(ray_cluster, tmp_path):
    with pytest.raises(ContractError, match="dataset not found"):
        run_ingest(tmp_path, str(tmp_path / "nope.parquet"))


def test_missing_bias_means_unknown_not_quarantined(ray_cluster, tmp_path):
    d = good_rows(12)
    d["bias"] = [None if i % 3 == 0 else b for i, b in enumerate(d["bias"])]  # train rows r0, r3, r6, r9 → unknown
    res, out, q = run_ingest(tmp_path, write(tmp_path, d))
    assert res.quarantined == 0 and not q.exists()
    tr = load_split(out / "train.parquet", 8)
    unknown = {i for i, b in zip(tr["id"], tr["a"]) if b == -1}
    assert unknown == {"r0", "r3", "r6", "r9"}
    assert np.array(res.group_counts["train"]).sum() == 0  # unknown-bias rows belong to no group


def test_paths_are_confined_to_the_dataset_roots(ray_cluster, tmp_path):
    root, other, outside = tmp_path / "ds", tmp_path / "extra", tmp_path / "secret"
    for d in (root / "imgs", other, outside):
        d.mkdir(parents=True)
    (root / "imgs" / "ok.png").write_bytes(png((10, 10, 10)))
    (other / "ok2.png").write_bytes(png((30, 30, 30)))
    (outside / "s.png").write_bytes(png((50, 50, 50)))
    (root / "imgs" / "link.png").symlink_to(outside / "s.png")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    (root / "imgs" / "big.png").write_bytes(buf.getvalue())  # ~12 kB > the cap below
    paths = {"ok": "imgs/ok.png", "abs_ok": str(root / "imgs" / "ok.png"), "extra": str(other / "ok2.png"),
             "absolute": str(outside / "s.png"), "dotdot": "imgs/../../secret/s.png", "symlink": "imgs/link.png",
             "http": "http://127.0.0.1:9/x.png", "file_scheme": f"file://{outside}/s.png", "dev": "/dev/zero",
             "big": "imgs/big.png"}
    data = {"id": list(paths), "path": list(paths.values()), "label": [0] * len(paths), "bias": [0] * len(paths),
            "split": ["train"] * len(paths)}
    pq.write_table(pa.table(data), root / "part-0.parquet")
    res, out, q = run_ingest(tmp_path, str(root), max_image_bytes=5_000, path_roots=[str(other)])
    reasons = {r["id"]: r["reason"] for r in pq.read_table(q).to_pylist()}
    assert sorted(load_split(out / "train.parquet", 8)["id"]) == ["abs_ok", "extra", "ok"]
    for rid in ("absolute", "dotdot", "symlink", "http", "file_scheme", "dev"):
        assert "outside the dataset root" in reasons[rid], (rid, reasons[rid])
    assert "too large" in reasons["big"] and "data.max_image_bytes=5000" in reasons["big"]
    assert next(r for r in pq.read_table(q).to_pylist() if r["id"] == "dotdot")["path"] == paths["dotdot"]


def test_deep_and_transparent_images_keep_their_values(ray_cluster, tmp_path):
    def enc(img, fmt="PNG"):
        b = io.BytesIO()
        img.save(b, format=fmt)
        return b.getvalue()

    grey16 = Image.fromarray(np.full((8, 8), 32768, np.uint16))  # mid-grey at 16 bits (PIL's convert: white)
    grey_f = Image.fromarray(np.full((8, 8), 0.5, np.float32), mode="F")  # mid-grey in [0, 1] (convert: black)
    clear = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red → the white background
    d = good_rows(4, splits=("train",))
    d["image"] = [enc(grey16), enc(grey_f, "TIFF"), enc(clear), png((1, 2, 3))]
    res, out, q = run_ingest(tmp_path, write(tmp_path, d))
    assert res.quarantined == 0
    px = {i: x[0, 0].tolist() for s in ("train", "val", "test")
          for i, x in zip(load_split(out / f"{s}.parquet", 8)["id"], load_split(out / f"{s}.parquet", 8)["x"])}
    assert px["r0"] == [128, 128, 128] and px["r1"] == [128, 128, 128]
    assert px["r2"] == [255, 255, 255] and px["r3"] == [1, 2, 3]


def test_rows_without_a_place_are_quarantined_deterministically(ray_cluster, tmp_path):
    d = good_rows(12)
    d["split"][4] = None  # a hole in the split column: not silently train
    d["id"][7] = d["id"][8] = d["id"][9] = "dup"  # the first in input order is kept
    d["label"][10] = 10**9  # no class_names below: bounded by data.max_classes, not a 10⁹-row table
    results = []
    for run in range(2):
        sub = tmp_path / f"run{run}"
        sub.mkdir()
        res, out, q = run_ingest(sub, write(sub, d), class_names=None, bias_names=None)
        rows = {r["id"]: r for r in pq.read_table(q).to_pylist()}
        results.append({k: (v["reason"], v["image"]) for k, v in rows.items()})
        assert rows["r4"]["reason"] == "missing split"
        assert "label 1000000000 out of range (0..9999, data.max_classes" in rows["r10"]["reason"]
        dups = [r for r in pq.read_table(q).to_pylist() if r["id"] == "dup"]
        assert len(dups) == 2 and all("duplicate id 'dup' (row 7 of the input" in r["reason"] for r in dups)
        assert all(r["image"] for r in dups)  # the duplicates' pixels are kept
        kept = [i for s in ("train", "val", "test") for i in load_split(out / f"{s}.parquet", 8)["id"]]
        assert kept.count("dup") == 1 and len(kept) == 12 - 4
        assert res.num_classes == 2  # the out-of-range label did not size the class table
    assert results[0] == results[1]


def test_unknown_bias_in_val_is_not_a_crash(ray_cluster, tmp_path):
    from raydebias.evaluate.metrics import group_metrics

    d = good_rows(12)
    d["bias"][1] = None  # a val row
    res, out, q = run_ingest(tmp_path, write(tmp_path, d))
    va = load_split(out / "val.parquet", 8)
    assert (va["a"] == -1).sum() == 1
    m = group_metrics(va["y"], va["y"], va["a"], 2, 2)
    assert m["unknown_bias"] == 1 and m["wga"] == 1.0


def test_two_ingests_of_the_same_files_write_the_same_parts(ray_cluster, tmp_path):
    """Parts are named by input position and hold one input batch each: identical runs give identical bytes (the
    pipeline's content hashes, and so its caching, depend on it), however the read and decode tasks interleave."""
    from raydebias._internal.io import sha256_file

    src = tmp_path / "src"
    src.mkdir()
    for f in range(3):
        d = good_rows(30)
        d["id"] = [f"f{f}-{i}" for i in range(30)]
        d["id"][0] = "dup"  # the same id in every file: the first file's row is kept
        write(src, d, f"part-{f}.parquet")
    hashes = []
    for run in ("a", "b"):
        out = tmp_path / run
        out.mkdir()
        res = ingest(DataConfig(uri=str(src), image_size=8, batch_size=7, class_names=["a", "b"],
                                bias_names=["x", "y"]), str(src), out, tmp_path / f"q-{run}", log=lambda m: None)
        assert res.quarantined == 2 and sum(res.counts.values()) == 88
        hashes.append({str(p.relative_to(out)): sha256_file(p) for p in sorted(out.rglob("*.parquet")) if p.is_file()})
    assert hashes[0] == hashes[1] and len(hashes[0]) > 3
    kept = {i for s in ("train", "val", "test") for i in load_split(tmp_path / "a" / f"{s}.parquet", 8)["id"]}
    assert "dup" in kept and pq.read_table(tmp_path / "q-a").column("id").to_pylist() == ["dup", "dup"]
