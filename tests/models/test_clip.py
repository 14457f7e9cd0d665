"""CLIP: open_clip-compatible tokenizer, tiny bootstrap arch, training, save/load, pretrained checkpoint files."""

import os

import numpy as np
import open_clip
import pytest
import torch
from transformers import CLIPTokenizer

from raydebias._internal.io import save_weights
from raydebias.config import ClipModelConfig, ColoredMNISTConfig
from raydebias.data.builtin.colored_mnist import CLASS_NAMES, COLOR_NAMES, build_colored_mnist
from raydebias.data.transforms import decode_image
from raydebias.models.clip import (
    ClipEncoder,
    captions_for,
    clip_loss,
    clip_tokenizer,
    create_clip,
    register_tiny_clip,
    train_bootstrap_clip,
    write_tokenizer_files,
)

torch.set_num_threads(1)

CFG = ClipModelConfig()  # width 64, 2 layers, patch 8, embed 64
SOT, EOT = 49406, 49407

CAPTIONS = [
    "a photo of a red digit 7",
    "Hello, World!!  It's 3.14 -- [V] (cat's) dog; x=y+z?",
    "a photo of a [V] dog!",
    "  Mixed CASE\twith\ttabs\nand newlines  ",
    "numbers 1234567890 and 10,000.5 % $ # @ ^ & * ~ ` | \\ / < > { }",
    "",
    "word " * 100,  # 100 words: truncated
    "x" * 500,  # one very long word: truncated
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return clip_tokenizer(tmp_path_factory.mktemp("tok"))


def _ids(tok, texts):
    return tok(list(texts), padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids


def test_tokenizer_ids_equal_open_clip(tokenizer):
    ids = _ids(tokenizer, CAPTIONS)
    ref = open_clip.tokenize(CAPTIONS)
    assert ids.shape == ref.shape == (len(CAPTIONS), 77)
    for text, a, b in zip(CAPTIONS, ids, ref):
        assert a.tolist() == b.tolist(), text
    # Truncation (both libraries): sot + 75 tokens + eot, no padding.
    for row in ids[-2:]:
        assert row[0] == SOT and row[-1] == EOT and (row != 0).all()
    assert tokenizer.model_max_length == 77 and tokenizer.pad_token_id == 0
    assert tokenizer("a")["input_ids"] == [SOT, 320, EOT]


def test_tokenizer_files_idempotent_and_save_pretrained_round_trip(tokenizer, tmp_path):
    d = write_tokenizer_files(tmp_path / "files")
    mtimes = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    assert set(mtimes) == {"vocab.json", "merges.txt"}
    assert write_tokenizer_files(d) == d
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == mtimes

    tokenizer.save_pretrained(tmp_path / "saved")
    loaded = CLIPTokenizer.from_pretrained(tmp_path / "saved")
    assert loaded.model_max_length == 77 and loaded.pad_token_id == 0
    assert _ids(loaded, CAPTIONS).tolist() == open_clip.tokenize(CAPTIONS).tolist()


def test_register_tiny_clip_is_deterministic():
    name = register_tiny_clip(CFG, 32)
    assert name.startswith("raydebias-tiny-") and name == register_tiny_clip(CFG, 32)
    assert name in open_clip.list_models()
    mc = open_clip.get_model_config(name)
    assert mc["embed_dim"] == 64 and mc["vision_cfg"]["image_size"] == 32
    assert mc["text_cfg"] == {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
    assert register_tiny_clip(CFG, 64) != name
    narrow = open_clip.get_model_config(register_tiny_clip(ClipModelConfig(width=16, embed_dim=8), 32))
    assert narrow["text_cfg"]["heads"] == 1 and narrow["vision_cfg"]["head_width"] == 16


def test_bootstrap_forward_shapes_normalisation_and_seed():
    enc = create_clip(CFG, "bootstrap", 32)
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    img = enc.encode_images(px, batch_size=2)
    txt = enc.encode_texts(["a red digit 1", "a blue digit 2", "x"])
    assert img.shape == (5, 64) and txt.shape == (3, 64)
    assert img.dtype == np.float32 and txt.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)
    # Batching does not change results; other sizes are resized to the model's 32 px.
    np.testing.assert_allclose(enc.encode_images(px, batch_size=256), img, atol=1e-5)
    assert enc.encode_images(rng.integers(0, 256, (2, 28, 28, 3), dtype=np.uint8)).shape == (2, 64)
    assert enc.encode_images(px[0]).shape == (1, 64)
    with pytest.raises(ValueError):
        enc.encode_images(px[..., 0])
    # The same seed gives the same weights, another seed different ones.
    np.testing.assert_array_equal(create_clip(CFG, "bootstrap", 32, seed=0).encode_images(px, batch_size=2), img)
    assert not np.allclose(create_clip(CFG, "bootstrap", 32, seed=1).encode_images(px), img, atol=1e-3)
    with pytest.raises(ValueError):
        create_clip(CFG, "nope", 32)
    with pytest.raises(ValueError):
        create_clip(CFG, "pretrained", 32)  # pretrained=None


@pytest.fixture(scope="module")
def cmnist():
    table = build_colored_mnist(ColoredMNISTConfig(n_train=256, n_val=10, n_test=10)).to_pylist()
    rows = [r for r in table if r["split"] == "train"]
    px = np.stack([decode_image(r["image"], 32, 10_000) for r in rows])
    caps = captions_for([r["label"] for r in rows], [r["bias"] for r in rows], CLASS_NAMES, COLOR_NAMES)
    return px, caps


@pytest.fixture(scope="module")
def trained(cmnist):
    px, caps = cmnist
    enc = create_clip(CFG, "bootstrap", 32)
    before = clip_loss(enc, px[:128], caps[:128])
    logs: list[str] = []
    res = train_bootstrap_clip(enc, px, caps, steps=120, batch_size=64, lr=1e-3, seed=0, log=logs.append)
    return enc, before, res, logs


def test_training_reduces_loss_and_retrieves_captions(cmnist, trained):
    px, caps = cmnist
    enc, before, res, logs = trained
    assert res["steps"] == 120 and logs
    assert res["loss_last"] < res["loss_first"] - 1.0, res
    after = clip_loss(enc, px[:128], caps[:128])
    assert after < before - 1.0, (before, after)
    # Image → text retrieval among the distinct captions beats chance by far.
    uniq = sorted(set(caps))
    sims = enc.encode_images(px) @ enc.encode_texts(uniq).T
    acc = float(np.mean([uniq[j] == c for j, c in zip(sims.argmax(1), caps)]))
    chance = 1.0 / len(uniq)
    assert len(uniq) >= 10 and acc > max(0.6, 5 * chance), (acc, chance)


def test_save_load_round_trip_gives_identical_embeddings(cmnist, trained, tmp_path, monkeypatch):
    px, caps = cmnist
    enc = trained[0]
    out = enc.save(tmp_path / "clip")
    assert sorted(os.listdir(out)) == ["clip.json", "model.safetensors"]
    # Simulate a fresh process: open_clip has never heard of the tiny arch and the config cache is empty.
    import open_clip.factory as factory

    monkeypatch.setenv("RAYDEBIAS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(factory, "_MODEL_CONFIG_PATHS", [p for p in factory._MODEL_CONFIG_PATHS
                                                         if "raydebias" not in str(p)])
    monkeypatch.setattr(factory, "_MODEL_CONFIGS", {k: v for k, v in factory._MODEL_CONFIGS.items()
                                                    if not k.startswith("raydebias-")})
    assert enc.name not in open_clip.list_models()
    loaded = ClipEncoder.load(out)
    assert loaded.name == enc.name and loaded.source == "bootstrap"
    np.testing.assert_array_equal(loaded.encode_images(px[:32]), enc.encode_images(px[:32]))
    np.testing.assert_array_equal(loaded.encode_texts(caps[:8]), enc.encode_texts(caps[:8]))


def test_pretrained_loads_a_local_checkpoint_file(tmp_path):
    src = create_clip(CFG, "bootstrap", 32, seed=3)
    ckpt = tmp_path / "weights.safetensors"
    save_weights(ckpt, src.model)
    cfg = ClipModelConfig(arch=src.name, pretrained=str(ckpt))
    enc = create_clip(cfg, "pretrained", 999)  # image_size is the checkpoint arch's, not this argument
    assert enc.source == "pretrained" and enc.image_size == (32, 32)
    px = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(enc.encode_images(px), src.encode_images(px))
    np.testing.assert_array_equal(enc.encode_texts(["a dog"]), src.encode_texts(["a dog"]))
    assert not np.allclose(create_clip(CFG, "bootstrap", 32, seed=4).encode_images(px), src.encode_images(px),
                           atol=1e-3)
    with pytest.raises(RuntimeError):
        create_clip(ClipModelConfig(arch=src.name, pretrained=str(tmp_path / "missing.pt")), "pretrained", 32)


def test_captions_for():
    assert captions_for([1, 0], [2, 1], ["cat", "dog"], ["red", "green", "blue"]) == [
        "a photo of a blue dog",
        "a photo of a green cat",
    ]
    assert captions_for([0], None, ["cat"], None) == ["a photo of a cat"]
    assert captions_for([0], None, ["cat"], None, template="{bias}{class} photo") == ["cat photo"]
    assert captions_for([0], [0], ["cat"], ["[V]"], template="{class}, {bias} style") == ["cat, [V] style"]
    with pytest.raises(ValueError):
        captions_for([0, 1], [0], ["a", "b"], ["x"])
    with pytest.raises(ValueError):
        captions_for([2], None, ["a", "b"], None)
    with pytest.raises(ValueError):
        captions_for([0], [0], ["a"], None)


def test_pretrained_loads_an_open_clip_folder_and_refuses_pickles(tmp_path):
    from raydebias.models.testing import save_tiny_open_clip

    folder = save_tiny_open_clip(tmp_path / "clip", image_size=32, seed=2)
    enc = create_clip(ClipModelConfig(pretrained=str(folder)), "pretrained", 999)  # arch comes from the folder
    assert enc.source == "pretrained" and enc.image_size == (32, 32) and enc.embed_dim == 32
    px = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    again = create_clip(ClipModelConfig(pretrained=str(folder)), "pretrained", 32).encode_images(px)
    np.testing.assert_array_equal(enc.encode_images(px), again)
    other = save_tiny_open_clip(tmp_path / "other", image_size=32, seed=3)
    assert not np.allclose(create_clip(ClipModelConfig(pretrained=str(other)), "pretrained", 32).encode_images(px),
                           again, atol=1e-3)  # the weights in the folder are the ones loaded
    (folder / "open_clip_model.safetensors").rename(folder / "open_clip_pytorch_model.bin")
    with pytest.raises(ValueError, match="no .safetensors"):
        create_clip(ClipModelConfig(pretrained=str(folder)), "pretrained", 32)
