"""A real Serve deployment on loopback: predictions match offline evaluation, bad input gets 4xx, bounded load."""

import base64
import json
import random
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from serve_helpers import png_bytes

pytestmark = pytest.mark.slow  # end-to-end: `pytest -m "not slow"` is the fast loop

sys.path.insert(0, str(Path(__file__).parents[2]))
from bench.serve_load import run_load  # noqa: E402

PORT = 8123
URL = f"http://127.0.0.1:{PORT}"


@pytest.fixture(scope="module")
def server(ray_module, served_run):
    from ray import serve

    from raydebias.serve.app import build

    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build({"run_dir": str(served_run), "max_request_bytes": 1_000_000, "max_image_pixels": 4_000_000}),
              name="raydebias", route_prefix="/")
    yield URL
    serve.shutdown()


def test_predict_matches_offline(server, served_run, sample_pngs):
    from raydebias.data.transforms import decode_image
    from raydebias.models.classifier import load_classifier, predict

    model, meta = load_classifier(served_run / "stages" / "train" / "groupdro")
    offline = predict(model, np.stack([decode_image(b, 32, 10**7) for b in sample_pngs])).argmax(1)
    with httpx.Client(base_url=server, timeout=30) as c:
        for b, want in zip(sample_pngs[:5], offline):
            r = c.post("/v1/predict", content=b, headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
            assert r.json()["class_id"] == want and r.json()["class_name"] == meta["class_names"][want]
        # curl -F image=@x.png
        r = c.post("/v1/predict", files={"image": ("x.png", sample_pngs[0], "image/png")})
        assert r.status_code == 200 and r.json()["class_id"] == offline[0]
        # JSON, single and batch
        enc = [base64.b64encode(b).decode() for b in sample_pngs[:3]]
        r = c.post("/v1/predict", json={"image": enc[0]})
        assert r.json()["class_id"] == offline[0] and r.json()["model_version"].startswith("demo/groupdro@")
        r = c.post("/v1/predict", json={"images": enc})
        assert [p["class_id"] for p in r.json()["predictions"]] == offline[:3].tolist()
        r = c.post("/v1/predict", files=[("image", ("a.png", sample_pngs[0], "image/png")),
                                         ("image", ("b.png", sample_pngs[1], "image/png"))])
        assert [p["class_id"] for p in r.json()["predictions"]] == offline[:2].tolist()


def test_model_health_openapi(server):
    with httpx.Client(base_url=server, timeout=30) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        card = c.get("/v1/model").json()
        assert card["classes"][0] == "digit 0" and card["test_metrics"]["wga"] == 0.1
        spec = c.get("/openapi.json").json()
        assert {"/v1/predict", "/v1/model", "/healthz"} <= set(spec["paths"])


BAD = [
    ("empty body", b"", "image/png", 400),
    ("not an image", b"hello world", "image/png", 400),
    ("truncated png", png_bytes()[:40], "image/png", 400),
    ("decompression bomb", png_bytes((3000, 3000)), "image/png", 413),
    ("oversized upload", b"\0" * 1_200_000, "application/octet-stream", 413),
    ("wrong content type", png_bytes(), "text/plain", 415),
    ("no content type", png_bytes(), None, 415),
    ("bad json", b"{oops", "application/json", 400),
    ("json without image", b'{"x": 1}', "application/json", 422),
    ("data url without comma", b'{"image": "data:x"}', "application/json", 400),
    ("json nested 100k deep", b"[" * 100_000, "application/json", 400),
    ("multipart without image", b"--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n--b--\r\n",
     "multipart/form-data; boundary=b", 422),
    ("broken multipart", b"garbage", "multipart/form-data; boundary=b", None),
]


@pytest.mark.parametrize("name,body,ctype,status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_4xx(server, name, body, ctype, status):
    headers = {"content-type": ctype} if ctype else {}
    with httpx.Client(base_url=server, timeout=30) as c:
        r = c.post("/v1/predict", content=body, headers=headers)
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
        if status:
            assert r.status_code == status, r.text
        assert "error" in r.json()


def test_fuzz_predict_never_5xx(server, sample_pngs):
    rng = random.Random(0)
    good = sample_pngs[0]
    types = ["image/png", "image/jpeg", "application/octet-stream", "application/json",
             "multipart/form-data; boundary=zz", "text/html", ""]
    with httpx.Client(base_url=server, timeout=30) as c:
        for i in range(150):
            kind = i % 4
            if kind == 0:
                body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
            elif kind == 1:  # flip bytes of a valid PNG
                b = bytearray(good)
                for _ in range(rng.randint(1, 20)):
                    b[rng.randrange(len(b))] = rng.getrandbits(8)
                body = bytes(b)
            elif kind == 2:  # truncate a valid PNG
                body = good[: rng.randint(0, len(good) - 1)]
            else:  # JSON with junk
                body = json.dumps({rng.choice(["image", "images", "x"]): rng.choice(
                    ["", "AAAA", base64.b64encode(good[:50]).decode(), [1, 2], None])}).encode()
            r = c.post("/v1/predict", content=body, headers={"content-type": rng.choice(types)})
            assert r.status_code < 500, (i, r.status_code, r.text)
        assert c.get("/healthz").status_code == 200  # the replica survived


def test_bounded_load_has_no_errors(server, sample_pngs):
    stats = run_load(f"{server}/v1/predict", sample_pngs, requests=2000, concurrency=16, deadline_s=240)
    print(json.dumps(stats))
    assert stats["errors"] == 0, stats["first_errors"]
    assert stats["requests"] == 2000
