"""DreamBooth-LoRA: only adapter weights train, diffusers-format round trip, named adapters switch in place."""

import numpy as np
import pytest
import torch
from peft.utils import get_peft_model_state_dict

from raydebias.finetune.dreambooth_lora import (
    LORA_WEIGHTS,
    adapter_names,
    add_lora,
    load_lora,
    lora_parameters,
    save_lora,
    set_active,
    train_lora,
)
from raydebias.models.diffusion import load_diffusion
from raydebias.models.testing import save_tiny_stable_diffusion

torch.set_num_threads(1)

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture
def bundle(sd_dir):
    return load_diffusion(str(sd_dir))


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)


def unet_out(unet, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return unet(z, torch.tensor([50, 700]), encoder_hidden_states=ctx).sample


def perturb(unet, name: str, seed: int) -> None:
    """Make an adapter nonzero (lora_B starts at 0) without training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in lora_parameters(unet, name).items():
            if ".lora_B." in k:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_only_lora_params_change(bundle):
    unet_before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    te_before = {k: v.clone() for k, v in bundle.text_encoder.state_dict().items()}
    add_lora(bundle.unet, "other")
    perturb(bundle.unet, "other", 1)
    other_before = {k: v.clone() for k, v in lora_parameters(bundle.unet, "other").items()}
    prior = (images(4, 9), ["a photo of a digit"] * 4)
    stats = train_lora(bundle, "x", images(6, 0), ["a photo of sks digit"] * 6, steps=4, batch_size=3, lr=1e-2,
                       prior=prior, prior_weight=0.5)
    assert stats["steps"] == 4 and np.isfinite(stats["loss_last"])
    assert adapter_names(bundle) == ["other", "x"] and bundle.unet.active_adapters() == ["x"]
    trained = lora_parameters(bundle.unet, "x")
    assert stats["trainable_params"] == sum(p.numel() for p in trained.values())
    assert any(".lora_B.x." in k and p.abs().sum() > 0 for k, p in trained.items())  # it did train
    # base weights: peft moves each targeted Linear's weight to `<module>.base_layer.weight`
    after = bundle.unet.state_dict()
    for k, v in unet_before.items():
        name = k
        if k not in after:
            stem, leaf = k.rsplit(".", 1)
            name = f"{stem}.base_layer.{leaf}"
        assert torch.equal(after[name], v), k
    for k, v in other_before.items():
        assert torch.equal(lora_parameters(bundle.unet, "other")[k], v)
    for k, v in bundle.text_encoder.state_dict().items():
        assert torch.equal(v, te_before[k])
    assert not any(p.requires_grad for p in bundle.unet.parameters())


def test_roundtrip_through_stable_diffusion_pipeline(bundle, sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    base = unet_out(bundle.unet)
    add_lora(bundle.unet, "x", rank=4, alpha=8)  # alpha ≠ rank: the scale must survive the file
    train_lora(bundle, "x", images(4, 0), ["a photo of sks digit"] * 4, steps=3, batch_size=2, lr=1e-2)
    perturb(bundle.unet, "x", 2)  # training 3 steps moves lora_B only a little; make the difference obvious
    ours = unet_out(bundle.unet)
    assert (ours - base).abs().max() > 1e-3
    out = save_lora(bundle, "x", tmp_path / "lora-x")
    assert sorted(p.name for p in out.iterdir()) == [LORA_WEIGHTS]
    assert not list(tmp_path.glob(".lora-x*"))  # no temp folder left behind

    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir))
    pipe.load_lora_weights(str(out), adapter_name="x")
    theirs = unet_out(pipe.unet)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)

    # and our own loader into a fresh copy of the base model
    fresh = load_diffusion(str(sd_dir))
    load_lora(fresh, out, "x")
    torch.testing.assert_close(unet_out(fresh.unet), ours, rtol=1e-5, atol=1e-6)

    # overwriting a saved adapter replaces it
    perturb(bundle.unet, "x", 3)
    save_lora(bundle, "x", out)
    fresh2 = load_diffusion(str(sd_dir))
    load_lora(fresh2, out, "x")
    torch.testing.assert_close(unet_out(fresh2.unet), unet_out(bundle.unet), rtol=1e-5, atol=1e-6)


def test_two_adapters_coexist_and_switch_without_reloading(bundle):
    unet = bundle.unet
    base = unet_out(unet)
    add_lora(unet, "x")
    add_lora(unet, "y", rank=2)
    perturb(unet, "x", 1)
    perturb(unet, "y", 2)
    set_active(bundle, "x")
    out_x = unet_out(unet)
    set_active(bundle, ["y"])
    out_y = unet_out(unet)
    set_active(bundle, None)
    assert torch.equal(unet_out(unet), base)
    set_active(bundle, ["x", "y"])
    out_xy = unet_out(unet)
    assert unet.active_adapters() == ["x", "y"]
    set_active(bundle, ["x"])
    assert unet is bundle.unet and torch.equal(unet_out(unet), out_x)
    for a, b in [(out_x, base), (out_y, base), (out_x, out_y), (out_xy, out_x), (out_xy, out_y)]:
        assert (a - b).abs().max() > 1e-4
    with pytest.raises(KeyError):
        set_active(bundle, ["z"])
    with pytest.raises(ValueError):
        add_lora(unet, "x")


def test_lora_parameter_count_matches_peft(bundle):
    rank = 4
    add_lora(bundle.unet, "x", rank=rank)
    ours = lora_parameters(bundle.unet, "x")
    peft_sd = get_peft_model_state_dict(bundle.unet, adapter_name="x")
    assert sum(p.numel() for p in ours.values()) == sum(v.numel() for v in peft_sd.values())
    assert len(ours) == len(peft_sd)
    # closed form: every targeted attention Linear gets A (r × in) and B (out × r)
    expected = 0
    for name, m in bundle.unet.named_modules():
        if any(name.endswith("." + t) for t in TARGETS) and hasattr(m, "base_layer"):
            expected += rank * (m.base_layer.in_features + m.base_layer.out_features)
    assert expected > 0 and sum(p.numel() for p in ours.values()) == expected
