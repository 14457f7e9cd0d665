"""The batched multi-LoRA trainer gives every adapter the update it would get alone (train_lora), to float
tolerance, and leaves ordinary peft adapters that save in the diffusers format."""

import copy

import numpy as np
import pytest
import torch

from raydebias.finetune.dreambooth_lora import load_lora, lora_parameters, save_lora, train_lora
from raydebias.finetune.multi_lora import RoutedLoRA, train_loras_batched

torch.set_num_threads(1)


def _jobs(n: int = 3):
    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        m = 3 + 2 * k  # different sizes: batches of 3, 4, 4 rows with batch_size 4
        out.append({"name": f"c{k}", "pixels": rng.integers(0, 256, (m, 16, 16, 3), dtype=np.uint8),
                    "prompts": [f"a photo of a sks {['red', 'green', 'blue'][k % 3]} digit"] * m, "seed": 10 + k})
    return out


@pytest.mark.parametrize("steps", [1, 3])
def test_batched_equals_one_adapter_at_a_time(tiny_diffusion, steps):
    jobs = _jobs()
    kw = dict(steps=steps, batch_size=4, lr=5e-3, rank=2)
    alone = {}
    for j in jobs:
        b = copy.deepcopy(tiny_diffusion)
        train_lora(b, j["name"], j["pixels"], j["prompts"], seed=j["seed"], **kw)
        alone[j["name"]] = {k: v.detach().clone() for k, v in lora_parameters(b.unet, j["name"]).items()}
    batched = copy.deepcopy(tiny_diffusion)
    base = {k: v.clone() for k, v in batched.unet.state_dict().items()}
    stats = train_loras_batched(batched, jobs, **kw)
    assert [s["adapter"] for s in stats] == ["c0", "c1", "c2"] and stats[0]["batch_size"] == 3
    for j in jobs:
        got = lora_parameters(batched.unet, j["name"])
        assert got.keys() == alone[j["name"]].keys()
        for key, want in alone[j["name"]].items():
            torch.testing.assert_close(got[key], want, rtol=1e-4, atol=1e-6, msg=key)
        assert any(v.abs().sum() > 0 for k, v in got.items() if "lora_B" in k)  # it did train
    for k, v in batched.unet.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, base[k.replace(".base_layer", "")]), k  # the base UNet is untouched


def test_routing_sends_each_row_to_its_adapter(tiny_diffusion):
    """Two rows, two adapters: the routed forward of row i equals peft's forward with adapter i active."""
    jobs = _jobs(2)
    b = copy.deepcopy(tiny_diffusion)
    train_loras_batched(b, jobs, steps=2, batch_size=4, lr=5e-2, rank=2)
    x = torch.randn(2, b.unet.config.in_channels, 8, 8)
    t = torch.tensor([500, 500])
    ctx = b.embed_prompts(["a photo of a sks red digit"] * 2)
    from raydebias.finetune.dreambooth_lora import set_active

    with torch.no_grad():
        want = []
        for k in range(2):
            set_active(b, [f"c{k}"])
            want.append(b.predict(x[k : k + 1], t[:1], ctx[:1]))
        routed = RoutedLoRA(b.unet, ["c0", "c1"])
        with routed.routing(b.unet):
            routed.route = torch.tensor([0, 1])
            got = b.predict(x, t, ctx)
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(want[0], want[1])


def test_batched_adapters_save_and_load_in_the_diffusers_format(tiny_diffusion, tmp_path):
    jobs = _jobs(2)
    b = copy.deepcopy(tiny_diffusion)
    train_loras_batched(b, jobs, steps=2, batch_size=4, lr=5e-2, rank=2)
    save_lora(b, "c1", tmp_path / "c1")
    fresh = copy.deepcopy(tiny_diffusion)
    load_lora(fresh, tmp_path / "c1", "c1")
    for k, v in lora_parameters(b.unet, "c1").items():
        torch.testing.assert_close(lora_parameters(fresh.unet, "c1")[k], v)


def test_rejects_duplicate_names_and_empty_jobs(tiny_diffusion):
    jobs = _jobs(2)
    with pytest.raises(ValueError, match="unique"):
        train_loras_batched(copy.deepcopy(tiny_diffusion), [jobs[0], jobs[0]], steps=1)
    with pytest.raises(ValueError, match="at least one"):
        train_loras_batched(copy.deepcopy(tiny_diffusion), [], steps=1)


def test_mixed_adapter_sampling_equals_switching_adapters(tiny_diffusion):
    """One batch mixing two adapters and the base model (CFG on): the same images as sampling each row with its
    adapter activated alone."""
    from raydebias.finetune.dreambooth_lora import set_active
    from raydebias.finetune.multi_lora import sample_mixed
    from raydebias.models.sampling import sample

    b = copy.deepcopy(tiny_diffusion)
    train_loras_batched(b, _jobs(2), steps=3, batch_size=4, lr=5e-2, rank=2)
    adapters = ["c1", None, "c0", "c1", "c0"]
    prompts = [f"a photo of a sks {c} digit" for c in ("red", "green", "blue", "red", "green")]
    seeds = [3, 1, 4, 1, 5]
    mixed = sample_mixed(b, adapters, prompts, seeds, num_steps=3, guidance_scale=2.0)
    for i, a in enumerate(adapters):
        set_active(b, [a] if a else None)
        alone = sample(b, [prompts[i]], num_steps=3, guidance_scale=2.0, seeds=[seeds[i]])[0]
        diff = np.abs(mixed[i].astype(int) - alone.astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.05, (i, a, diff.max())  # float rounding at the uint8 edge
    set_active(b, None)
    base = sample(b, [prompts[0]], num_steps=3, guidance_scale=2.0, seeds=[seeds[0]])[0]
    assert np.abs(mixed[0].astype(int) - base.astype(int)).max() > 1  # the adapter did change row 0
