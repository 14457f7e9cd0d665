"""Serving logic without Serve: request decoding and validation, and the batched prediction function.

Everything a bad request can trigger raises :class:`RequestError` with an HTTP 4xx status, so the ingress turns
it into a JSON error and the replica never crashes on input.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raydebias._internal.io import sha256_file
from raydebias.data.transforms import ImageError, decode_image, to_model_input

RAW_TYPES = ("image/", "application/octet-stream")


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 16_000_000
    max_batch_images: int = 64


def _decode(data: bytes, size: int, limits: Limits, what: str) -> np.ndarray:
    try:
        return decode_image(data, size, limits.max_image_pixels)
    except ImageError as e:
        status = 413 if "too large" in str(e) else 400
        raise RequestError(status, f"{what}: {e}") from None


def _b64(s: Any, what: str) -> bytes:
    if not isinstance(s, str):
        raise RequestError(400, f"{what}: expected a base64 string, got {type(s).__name__}")
    if s.startswith("data:"):  # a data URL: data:[<mediatype>][;base64],<data>
        head, comma, s = s.partition(",")
        if not comma or not head.endswith(";base64"):
            raise RequestError(400, f"{what}: a data URL must be 'data:<type>;base64,<data>'")
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{what}: invalid base64") from None


def parse_json_images(body: bytes) -> tuple[list[bytes], bool]:
    """``{"image": b64}`` or ``{"images": [b64, ...]}`` → (image bytes, is_batch)."""
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError(400, "body is not valid JSON") from None
    except RecursionError:  # e.g. 100 k nested '[': the parser's recursion limit, not a server fault
        raise RequestError(400, "JSON nested too deeply") from None
    if not isinstance(doc, dict) or not ({"image", "images"} & set(doc)):
        raise RequestError(422, 'JSON body must be {"image": <base64>} or {"images": [<base64>, ...]}')
    if "images" in doc:
        if not isinstance(doc["images"], list):
            raise RequestError(422, '"images" must be a list of base64 strings')
        return [_b64(s, f"images[{i}]") for i, s in enumerate(doc["images"])], True
    return [_b64(doc["image"], "image")], False


def decode_images(blobs: list[bytes], size: int, limits: Limits) -> np.ndarray:
    if not blobs:
        raise RequestError(400, "no image in the request")
    if len(blobs) > limits.max_batch_images:
        raise RequestError(413, f"too many images: {len(blobs)} > {limits.max_batch_images}")
    return np.stack([_decode(b, size, limits, f"image[{i}]") for i, b in enumerate(blobs)])


def check_content_type(content_type: str | None) -> str:
    ct = (content_type or "").split(";")[0].strip().lower()
    if ct == "application/json" or ct == "multipart/form-data" or ct.startswith(RAW_TYPES):
        return ct
    raise RequestError(415, f"unsupported content type {ct or '(none)'!r}; send image/*, application/octet-stream, "
                            "multipart/form-data (field 'image') or application/json")


def predict_images(model: torch.nn.Module, images: np.ndarray, class_names: list[str]) -> list[dict[str, Any]]:
    """The batch function behind ``@serve.batch``: uint8 NHWC → one result per image (same preprocessing as
    training and evaluation: :func:`raydebias.data.transforms.to_model_input`)."""
    with torch.no_grad():
        probs = torch.softmax(model(to_model_input(images)), dim=1).numpy()
    return [
        {"class_id": int(p.argmax()), "class_name": class_names[int(p.argmax())],
         "probabilities": {name: round(float(v), 6) for name, v in zip(class_names, p)}}
        for p in probs
    ]


def model_card(run_dir: Path, method: str, version: str | None = None) -> dict[str, Any]:
    """``GET /v1/model``: classes, run id, method and its test metrics from ``metrics.json``. ``version``: the
    served model's version (default: hash the weights on disk)."""
    meta = json.loads((run_dir / "stages" / "train" / method / "meta.json").read_text())
    card: dict[str, Any] = {"method": method, "classes": meta["class_names"], "image_size": meta["image_size"],
                            "model_version": version or model_version(run_dir, method)}
    mpath = run_dir / "metrics.json"
    if mpath.exists():
        report = json.loads(mpath.read_text())
        card["training_run_id"] = report.get("run_id")
        row = next((r for r in report["rows"] if r["method"] == method), {})
        card["test_metrics"] = {k: row.get(k) for k in ("accuracy", "wga", "aga", "per_group")}
        card["headline"] = report.get("headline")
    return card


def model_version(run_dir: Path, method: str) -> str:
    """Content hash of the served weights (changes whenever the model does)."""
    return f"{run_dir.name}/{method}@" + sha256_file(run_dir / "stages" / "train" / method / "model.safetensors")[:12]
