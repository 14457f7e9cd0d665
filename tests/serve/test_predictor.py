"""Serving logic without Serve: decoding/validation of requests and the batch function."""

import base64
import json

import numpy as np
import pytest

from raydebias.models.classifier import load_classifier, predict
from raydebias.data.transforms import decode_image
from raydebias.serve.predictor import (Limits, RequestError, check_content_type, decode_images, model_card,
                                       parse_json_images, predict_images)

from serve_helpers import png_bytes


def test_batch_function_matches_offline_evaluation(served_run, sample_pngs):
    model, meta = load_classifier(served_run / "stages" / "train" / "groupdro")
    images = decode_images(sample_pngs, 32, Limits())
    served = predict_images(model, images, meta["class_names"])
    offline = predict(model, np.stack([decode_image(b, 32, 10**7) for b in sample_pngs]))
    assert [r["class_id"] for r in served] == offline.argmax(1).tolist()
    for r, p in zip(served, offline):
        assert r["class_name"] == meta["class_names"][r["class_id"]]
        np.testing.assert_allclose(list(r["probabilities"].values()), p, atol=1e-5)
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-4


def test_json_forms():
    b = png_bytes()
    one = base64.b64encode(b).decode()
    assert parse_json_images(json.dumps({"image": one}).encode()) == ([b], False)
    assert parse_json_images(json.dumps({"images": [one, one]}).encode()) == ([b, b], True)
    assert parse_json_images(json.dumps({"image": "data:image/png;base64," + one}).encode()) == ([b], False)


@pytest.mark.parametrize("body,status", [
    (b"{not json", 400),
    (b'"just a string"', 422),
    (b'{"img": "x"}', 422),
    (b'{"images": "abc"}', 422),
    (b'{"image": 5}', 400),
    (b'{"image": "@@@not base64@@@"}', 400),
    (b'{"image": "data:x"}', 400),  # a data URL without a comma (was IndexError → 500)
    (b'{"image": "data:image/png,AAAA"}', 400),  # not base64-encoded
    (b"[" * 100_000, 400),  # nested past the parser's recursion limit (was RecursionError → 500)
])
def test_json_errors(body, status):
    with pytest.raises(RequestError) as e:
        parse_json_images(body)
    assert e.value.status == status


def test_decode_errors():
    lim = Limits(max_image_pixels=100 * 100, max_batch_images=3)
    with pytest.raises(RequestError, match="no image") as e:
        decode_images([], 32, lim)
    assert e.value.status == 400
    with pytest.raises(RequestError, match="undecodable") as e:
        decode_images([b"hello"], 32, lim)
    assert e.value.status == 400
    with pytest.raises(RequestError, match="too large") as e:
        decode_images([png_bytes((200, 200))], 32, lim)
    assert e.value.status == 413
    with pytest.raises(RequestError, match="too many") as e:
        decode_images([png_bytes()] * 4, 32, lim)
    assert e.value.status == 413
    with pytest.raises(RequestError, match=r"image\[1\]: undecodable"):
        decode_images([png_bytes(), png_bytes()[:30]], 32, lim)
    assert decode_images([png_bytes((64, 48), fmt="JPEG")], 32, lim).shape == (1, 32, 32, 3)


def test_content_types():
    for ok in ("image/png", "image/jpeg; q=1", "application/octet-stream", "application/json",
               "multipart/form-data; boundary=x"):
        assert check_content_type(ok)
    for bad in (None, "", "text/plain", "application/xml"):
        with pytest.raises(RequestError) as e:
            check_content_type(bad)
        assert e.value.status == 415


def test_model_card(served_run):
    card = model_card(served_run, "groupdro")
    assert card["classes"][3] == "digit 3" and card["training_run_id"] == "demo"
    assert card["test_metrics"]["wga"] == 0.1 and card["model_version"].startswith("demo/groupdro@")
    # the served version is the one the predictions carry, whatever the file on disk hashes to now
    assert model_card(served_run, "groupdro", version="demo/groupdro@abc")["model_version"] == "demo/groupdro@abc"
