"""Ray Serve application: ``serve run raydebias.serve.app:build run_dir=runs/demo``.

A FastAPI ingress decodes and validates requests (4xx JSON errors for bad input) and forwards decoded images to
the ``Classifier`` deployment, which batches them with ``@serve.batch``.
"""


import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.concurrency import run_in_threadpool

from raydebias._internal.io import as_path
from raydebias.models.classifier import load_classifier
from raydebias.serve.predictor import (
    Limits,
    RequestError,
    check_content_type,
    decode_images,
    model_card,
    model_version,
    parse_json_images,
    predict_images,
)


class ServeArgs(BaseModel):
    """Arguments of :func:`build` (``serve run ... key=value`` or ``applications[].args`` in a Serve config)."""

    model_config = ConfigDict(extra="forbid")
    run_dir: str = Field(default_factory=lambda: os.environ.get("RAYDEBIAS_RUN_DIR", "runs/demo"))
    method: Optional[str] = Field(None, description="which trained method to serve; default: the run's `method`")
    num_gpus: float = 0.0
    num_cpus: float = 0.5
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.005
    min_replicas: int = 1
    max_replicas: int = 2
    max_ongoing_requests: int = 64
    max_queued_requests: int = Field(256, description="requests waiting beyond max_ongoing_requests; more → 503")
    max_request_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 16_000_000
    max_batch_images: int = 64


def _resolve_method(run_dir: Path, method: str | None) -> str:
    if method:
        return method
    import yaml

    cfg = run_dir / "config.yaml"
    return yaml.safe_load(cfg.read_text())["method"] if cfg.exists() else "erm"


@serve.deployment
class Classifier:
    def __init__(self, run_dir: str, method: str | None, max_batch_size: int, batch_wait_timeout_s: float):
        import torch

        torch.set_num_threads(1)
        self.run_dir = as_path(run_dir)
        self.method = _resolve_method(self.run_dir, method)
        self.model, self.meta = load_classifier(self.run_dir / "stages" / "train" / self.method)
        self.version = model_version(self.run_dir, self.method)
        self.predict.set_max_batch_size(max_batch_size)
        self.predict.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def predict(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        return predict_images(self.model, np.stack(images), self.meta["class_names"])

    async def info(self) -> dict[str, Any]:
        return {"image_size": self.meta["image_size"], "method": self.method, "model_version": self.version}


api = FastAPI(
    title="raydebias classifier",
    description="Debiased image classifier trained by raydebias. POST an image to /v1/predict.",
    version="1",
)


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, classifier, run_dir: str, method: str | None, limits: dict[str, int]):
        self.classifier = classifier
        self.run_dir = as_path(run_dir)
        self.method = _resolve_method(self.run_dir, method)
        self.limits = Limits(**limits)
        self._info: dict[str, Any] | None = None  # image size and model version, fixed for the replica's life

    async def _model_info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = await self.classifier.info.remote()
        return self._info

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.limits.max_request_bytes:
            raise RequestError(413, f"request body too large: {declared} > {self.limits.max_request_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.limits.max_request_bytes:
                raise RequestError(413, f"request body too large: > {self.limits.max_request_bytes} bytes")
        if not body:
            raise RequestError(400, "empty request body")
        return bytes(body)

    async def _blobs(self, request: Request) -> tuple[list[bytes], bool]:
        ct = check_content_type(request.headers.get("content-type"))
        if ct == "multipart/form-data":
            from starlette.formparsers import MultiPartParser

            body = await self._read_body(request)  # enforces the byte limit before parsing

            async def stream():
                yield body
                yield b""

            try:
                form = await MultiPartParser(request.headers, stream(), max_files=self.limits.max_batch_images + 1,
                                             max_fields=16).parse()
            except Exception as e:
                raise RequestError(400, f"malformed multipart body: {e}") from None
            files = [v for k in ("image", "images") for v in form.getlist(k)]
            if not files:
                raise RequestError(422, "multipart body needs a file field named 'image'")
            blobs = []
            for f in files:
                blobs.append(await f.read() if hasattr(f, "read") else str(f).encode())
            return blobs, len(blobs) > 1
        body = await self._read_body(request)
        if ct == "application/json":
            return parse_json_images(body)
        return [body], False

    @api.post("/v1/predict", summary="Classify one image (raw bytes, multipart 'image', or JSON base64) or a list")
    async def predict(self, request: Request):
        try:
            blobs, batch = await self._blobs(request)
            info = await self._model_info()
            # decoding is CPU work: off the event loop, so one large upload does not stall every other request
            images = await run_in_threadpool(decode_images, blobs, info["image_size"], self.limits)
        except RequestError as e:
            return JSONResponse({"error": e.message}, status_code=e.status)
        results = [await r for r in [self.classifier.predict.remote(img) for img in images]]
        for r in results:
            r["model_version"] = info["model_version"]
        if batch:
            return {"predictions": results, "model_version": info["model_version"]}
        return results[0]

    @api.get("/v1/model", summary="Classes, training run and per-group test accuracy / WGA of the served model")
    async def model(self):
        # the version the predictions carry (hashed once at the Classifier's start), not a re-hash of the file
        return model_card(self.run_dir, self.method, version=(await self._model_info())["model_version"])

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}


def build(args: dict[str, Any] | None = None):
    """Application builder for ``serve run`` / ``serve build`` / RayService ``serveConfigV2``."""
    a = ServeArgs(**(args or {}))
    classifier = Classifier.options(
        ray_actor_options={"num_cpus": a.num_cpus, "num_gpus": a.num_gpus},
        max_ongoing_requests=a.max_ongoing_requests, max_queued_requests=a.max_queued_requests,
        autoscaling_config={"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                            "target_ongoing_requests": max(1, a.max_batch_size // 2)},
    ).bind(a.run_dir, a.method, a.max_batch_size, a.batch_wait_timeout_s)
    limits = {"max_request_bytes": a.max_request_bytes, "max_image_pixels": a.max_image_pixels,
              "max_batch_images": a.max_batch_images}
    return Ingress.options(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=a.max_ongoing_requests,
                           max_queued_requests=a.max_queued_requests).bind(
        classifier, a.run_dir, a.method, limits)
