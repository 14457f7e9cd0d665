"""``datasets import-folder`` (ImageFolder + bias CSV → contract table) and the ``datasets`` CLI."""

import csv
import hashlib
import io
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raydebias.cli import main
from raydebias.data.import_folder import import_folder


def png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 5), color).save(buf, format="PNG")
    return buf.getvalue()


def make_tree(root, files: dict[str, bytes]):
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def write_csv(path, rows, fieldnames=("path", "bias")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fieldnames)
        w.writerows(rows)
    return str(path)


FLAT = {  # root/<class>/<image>
    "dog/d1.png": png((200, 0, 0)),
    "dog/d2.jpg": png((0, 200, 0)),  # extension is what counts, not the content
    "cat/c1.png": png((0, 0, 200)),
    "cat/sub/c2.PNG": png((9, 9, 9)),  # nested and upper-case extension
    "cat/notes.txt": b"not an image",
}
SPLIT = {  # root/<split>/<class>/<image>
    "train/a/t1.png": png((1, 2, 3)),
    "train/a/t2.png": png((4, 5, 6)),
    "train/b/t3.png": png((7, 8, 9)),
    "val/a/v1.png": png((10, 11, 12)),
    "val/b/v2.png": png((13, 14, 15)),
    "test/b/x1.png": png((16, 17, 18)),
}


def test_flat_layout_without_bias(tmp_path):
    root = make_tree(tmp_path / "flat", FLAT)
    t = import_folder(root)
    assert t.schema.names == ["id", "label", "path"]  # no split, no bias, paths not bytes
    rows = t.to_pylist()
    assert [r["path"] for r in rows] == ["cat/c1.png", "cat/sub/c2.PNG", "dog/d1.png", "dog/d2.jpg"]
    assert [r["label"] for r in rows] == [0, 0, 1, 1]  # classes numbered in sorted order
    assert t.schema.metadata[b"class_names"] == b"cat,dog"
    assert rows[0]["id"] == hashlib.sha1(b"cat/c1.png").hexdigest()[:16]
    assert len({r["id"] for r in rows}) == len(rows)


def test_split_layout_without_bias(tmp_path):
    root = make_tree(tmp_path / "sp", SPLIT)
    t = import_folder(root)
    assert t.schema.names == ["id", "label", "split", "path"]
    rows = t.to_pylist()
    assert Counter(r["split"] for r in rows) == {"train": 3, "val": 2, "test": 1}
    by_path = {r["path"]: r for r in rows}
    assert by_path["train/a/t1.png"]["label"] == 0 and by_path["test/b/x1.png"]["label"] == 1
    assert by_path["val/a/v1.png"]["split"] == "val"
    assert t.schema.metadata[b"class_names"] == b"a,b"


def test_embed_stores_the_file_bytes_instead_of_paths(tmp_path):
    root = make_tree(tmp_path / "sp", SPLIT)
    t = import_folder(root, embed=True)
    assert "path" not in t.schema.names
    assert t.schema.field("image").type == pa.binary()
    paths = import_folder(root).column("path").to_pylist()
    assert t.column("id").to_pylist() == import_folder(root).column("id").to_pylist()
    for rel, data in zip(paths, t.column("image").to_pylist()):
        assert data == SPLIT[rel]


def test_int_bias_csv(tmp_path):
    root = make_tree(tmp_path / "flat", FLAT)
    csv_path = write_csv(tmp_path / "bias.csv", [
        ["dog/d1.png", "3"], ["dog/d2.jpg", "0"], ["cat/c1.png", "3"], ["./cat/sub/c2.PNG", "1"],
        ["not/in/tree.png", "7"],  # extra rows are harmless
    ])
    t = import_folder(root, bias_csv=csv_path)
    assert t.schema.field("bias").type == pa.int64()
    got = dict(zip(t.column("path").to_pylist(), t.column("bias").to_pylist()))
    assert got == {"dog/d1.png": 3, "dog/d2.jpg": 0, "cat/c1.png": 3, "cat/sub/c2.PNG": 1}  # kept as given
    assert t.schema.metadata[b"bias_names"] == b"0,1,3,7"


def test_string_bias_csv_is_numbered_in_sorted_order(tmp_path):
    root = make_tree(tmp_path / "sp", SPLIT)
    rows = [["train/a/t1.png", "water"], ["train/a/t2.png", "land"], ["train/b/t3.png", "water"],
            ["val/a/v1.png", "land"], ["val/b/v2.png", "sky"], ["test/b/x1.png", "land"]]
    t = import_folder(root, bias_csv=write_csv(tmp_path / "b.csv", rows), embed=True)
    assert t.schema.names == ["id", "label", "split", "image", "bias"]
    assert t.schema.metadata[b"bias_names"] == b"land,sky,water"
    name_of = {"land": 0, "sky": 1, "water": 2}
    ids = {hashlib.sha1(p.encode()).hexdigest()[:16]: name_of[b] for p, b in rows}
    assert dict(zip(t.column("id").to_pylist(), t.column("bias").to_pylist())) == ids


def test_extra_csv_columns_are_fine(tmp_path):
    root = make_tree(tmp_path / "flat", {"x/1.png": png((1, 1, 1)), "y/2.png": png((2, 2, 2))})
    p = write_csv(tmp_path / "b.csv", [["note", "x/1.png", "1"], ["n", "y/2.png", "0"]], ("comment", "path", "bias"))
    assert import_folder(root, bias_csv=p).column("bias").to_pylist() == [1, 0]


def test_missing_bias_for_an_image_is_an_error(tmp_path):
    root = make_tree(tmp_path / "flat", FLAT)
    p = write_csv(tmp_path / "b.csv", [["dog/d1.png", "0"], ["dog/d2.jpg", "1"], ["cat/c1.png", "0"]])
    with pytest.raises(ValueError, match=r"no bias for 1 image\(s\).*cat/sub/c2.PNG"):
        import_folder(root, bias_csv=p)


def test_csv_without_the_required_columns_is_an_error(tmp_path):
    root = make_tree(tmp_path / "flat", FLAT)
    p = write_csv(tmp_path / "b.csv", [["dog/d1.png", "0"]], ("file", "bias"))
    with pytest.raises(ValueError, match="needs columns 'path' and 'bias'"):
        import_folder(root, bias_csv=p)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="needs columns"):
        import_folder(root, bias_csv=str(empty))


def test_empty_or_missing_directory_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        import_folder(tmp_path / "empty")
    make_tree(tmp_path / "noimg", {"cls/readme.txt": b"x"})
    with pytest.raises(ValueError, match="no images"):
        import_folder(tmp_path / "noimg")
    with pytest.raises(FileNotFoundError):
        import_folder(tmp_path / "does-not-exist")


# ---------------------------------------------------------------- CLI


def test_cli_import_folder_writes_a_readable_parquet(tmp_path, capsys):
    root = make_tree(tmp_path / "sp", SPLIT)
    out = tmp_path / "out" / "d.parquet"
    rows = [[p, str(i % 2)] for i, p in enumerate(SPLIT)]
    bias_csv = write_csv(tmp_path / "b.csv", rows)
    assert main(["datasets", "import-folder", str(root), "--out", str(out), "--bias-csv", bias_csv, "--embed"]) == 0
    assert "wrote 6 rows" in capsys.readouterr().out
    t = pq.read_table(out)
    assert t.num_rows == 6
    assert set(t.schema.names) == {"id", "label", "split", "image", "bias"}
    assert sorted(t.column("image").to_pylist()) == sorted(SPLIT.values())
    assert sorted(t.column("bias").to_pylist()) == [0, 0, 0, 1, 1, 1]
    assert [p.name for p in out.parent.iterdir()] == ["d.parquet"]  # atomic write left no temp files


def test_cli_import_folder_paths_layout(tmp_path):
    root = make_tree(tmp_path / "flat", FLAT)
    out = tmp_path / "flat.parquet"
    assert main(["datasets", "import-folder", str(root), "--out", str(out)]) == 0
    t = pq.read_table(out)
    assert t.column("path").to_pylist() == ["cat/c1.png", "cat/sub/c2.PNG", "dog/d1.png", "dog/d2.jpg"]
    assert pq.read_schema(out).metadata[b"class_names"] == b"cat,dog"


def test_cli_import_folder_missing_root_exits_2(tmp_path, capsys):
    assert main(["datasets", "import-folder", str(tmp_path / "nope"), "--out", str(tmp_path / "o.parquet")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists()


def test_cli_colored_mnist(tmp_path, capsys):
    out = tmp_path / "c.parquet"
    assert main(["datasets", "colored-mnist", "--out", str(out), "--aligned", "0.9"]) == 0
    assert "wrote 10500 rows" in capsys.readouterr().out
    t = pq.read_table(out)
    assert t.schema.names == ["id", "image", "label", "bias", "split"]
    # defaults: 3500 train images, 200 val and 500 test digits each drawn in all 10 colours
    assert Counter(t.column("split").to_pylist()) == {"train": 3500, "val": 2000, "test": 5000}
    train = t.filter(pc.equal(t.column("split"), "train"))
    aligned = pc.sum(pc.equal(train.column("label"), train.column("bias"))).as_py()
    assert aligned == 3500 - round(0.1 * 3500)
