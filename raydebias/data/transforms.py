"""Image decoding and model preprocessing shared by ingestion, training, evaluation and serving."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

MEAN = 0.5
STD = 0.5


class ImageError(ValueError):
    """The bytes are not a usable image; the message says why."""


def decode_image(data: bytes | None, size: int, max_pixels: int) -> np.ndarray:
    """Decode PNG/JPEG/... bytes to an RGB ``uint8`` array of shape (size, size, 3).

    The pixel count is checked from the header *before* decoding (decompression-bomb guard).
    """
    if data is None or len(data) == 0:
        raise ImageError("empty image bytes")
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises many types for garbage input
        raise ImageError(f"undecodable image: {type(e).__name__}: {e}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"zero-size image ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(f"image too large: {w}x{h} = {w * h} pixels > limit {max_pixels}")
    try:
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    except Exception as e:
        raise ImageError(f"undecodable image: {type(e).__name__}: {e}") from None
    return arr


def encode_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def to_model_input(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC → float32 NCHW in [-1, 1] (the only normalisation used anywhere), contiguous: a permuted
    (channels-last strided) input made oneDNN's convolution backward segfault with 2 threads (torch 2.14.1 CPU)."""
    x = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(np.array(pixels, dtype=np.uint8))
    if x.ndim == 3:
        x = x[None]
    return ((x.permute(0, 3, 1, 2).float() / 255.0 - MEAN) / STD).contiguous()


def pixels_from_column(col, size: int) -> np.ndarray:
    """Stack a column of raw HWC ``uint8`` buffers (as written by ingestion) into (N, size, size, 3)."""
    flat = np.frombuffer(b"".join(col), dtype=np.uint8)
    return flat.reshape(-1, size, size, 3)
