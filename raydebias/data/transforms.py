"""Image decoding and model preprocessing shared by ingestion, training, evaluation and serving.

torch is imported by the two functions that use it: the decode actors, the part readers and the filter's scoring
tasks import this module and never need torch, whose import costs a cold Ray worker about 2 s."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

MEAN = 0.5
STD = 0.5
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white, as a browser shows them


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB ``uint8`` by value, not by PIL's clipping ``convert``: 16-bit (``I;16*``) and 32-bit integer (``I``)
    images are scaled from their bit depth (``I``: 16-bit when every value fits, else its own max), float
    (``F``) images from [0, 1] (or [0, 255] when values exceed 1) — PIL's ``convert("RGB")`` turns a 16-bit
    PNG white and a [0, 1] float TIFF black. Alpha (and palette transparency) is composited on ``BACKGROUND``."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F":
            if not np.isfinite(arr).all():
                raise ImageError("float image with NaN or infinite values")
            scale = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        elif mode.startswith("I;16") or arr.max(initial=0) <= 65535:
            scale = 65535.0
        else:
            scale = float(arr.max())
        arr = np.clip(arr / scale, 0, 1) * 255.0
        img = Image.fromarray(np.rint(arr).astype(np.uint8), mode="L")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


class ImageError(ValueError):
    """The bytes are not a usable image; the message says why."""


def decode_image(data: bytes | None, size: int, max_pixels: int) -> np.ndarray:
    """Decode PNG/JPEG/... bytes to an RGB ``uint8`` array of shape (size, size, 3).

    The pixel count is checked from the header *before* decoding (decompression-bomb guard). High bit-depth and
    float images are scaled by value (:func:`_to_rgb`); transparency is composited on white (``BACKGROUND``).
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
        img = _to_rgb(img)
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
    import torch

    x = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(np.array(pixels, dtype=np.uint8))
    if x.ndim == 3:
        x = x[None]
    return ((x.permute(0, 3, 1, 2).float() / 255.0 - MEAN) / STD).contiguous()


def resize_uint8(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 NHWC images → ``size`` × ``size`` (bilinear, antialiased when shrinking); the same array when they
    already are. Between a pretrained model's resolution and the dataset's ``image_size``."""
    if pixels.ndim != 4 or pixels.shape[1:3] == (size, size):
        return pixels
    import torch

    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def pixels_from_column(col, size: int) -> np.ndarray:
    """Stack a column of raw HWC ``uint8`` buffers (as written by ingestion) into (N, size, size, 3). A buffer of
    another length is an error naming its row (it would otherwise be split across rows silently)."""
    want = size * size * 3
    bad = next((i for i, b in enumerate(col) if len(b) != want), None)
    if bad is not None:
        raise ValueError(f"pixels of row {bad}: {len(col[bad])} bytes, expected {want} ({size}x{size} RGB)")
    flat = np.frombuffer(b"".join(col), dtype=np.uint8)
    return flat.reshape(-1, size, size, 3)
