"""Diffusion bundle: bootstrap pixel-space model and the Stable Diffusion (pretrained) path through one loader."""

import copy
import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from raydebias.config import ColoredMNISTConfig, DiffusionModelConfig
from raydebias.data.transforms import to_model_input
from raydebias.models.diffusion import bootstrap_diffusion, diffusion_loss, load_diffusion
from raydebias.models.diffusion_training import train_bootstrap_diffusion
from raydebias.models.sampling import sample
from raydebias.models.testing import save_tiny_stable_diffusion

torch.set_num_threads(1)

@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory):
    d = save_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "tiny_diffusion-sd")
    # A tokenizer saved without a length limit (as a file-built one is) must still load with 77 (DESIGN trap).
    cfg_path = d / "tokenizer" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("model_max_length", None)
    cfg_path.write_text(json.dumps(cfg))
    return d


def test_bootstrap_shapes_and_loss(tiny_diffusion, tiny_diffusion_config):
    assert tiny_diffusion.vae is None and tiny_diffusion.resolution == 16
    assert tiny_diffusion.unet.config.in_channels == 12 and tiny_diffusion.unet.config.sample_size == 8
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    z = tiny_diffusion.encode(x)
    assert z.shape == (3, 12, 8, 8)
    assert torch.equal(tiny_diffusion.decode(z), x)  # the pixel-space latent is lossless
    emb = tiny_diffusion.embed_prompts(["a red digit 1", "", "a blue digit 7"])
    assert emb.shape == (3, tiny_diffusion_config.max_tokens, 32)
    with torch.no_grad():
        out = tiny_diffusion.unet(z, torch.tensor([0, 500, 999]), encoder_hidden_states=emb).sample
        assert out.shape == z.shape
        g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
        loss = diffusion_loss(tiny_diffusion, z, emb, generator=g())
        assert loss.ndim == 0 and torch.isfinite(loss)
        assert torch.equal(loss, diffusion_loss(tiny_diffusion, z, emb, generator=g()))  # reproducible from the generator
        # per-sample weights: mean_i(w_i · mse_i), with the same t and noise for the same generator seed
        per_row = [float(diffusion_loss(tiny_diffusion, z, emb, generator=g(), weights=3 * torch.eye(3)[i])) for i in range(3)]
        assert np.mean(per_row) == pytest.approx(float(loss), rel=1e-5)
        w = torch.tensor([0.5, 2.0, 0.0])
        weighted = diffusion_loss(tiny_diffusion, z, emb, generator=g(), weights=w)
        assert float(weighted) == pytest.approx(float((w * torch.tensor(per_row)).sum() / 3), rel=1e-5)


class _ZeroUNet(torch.nn.Module):
    """Predicts 0 everywhere, so the loss is the mean square of the regression target."""

    dtype = torch.float32

    def forward(self, x, t, encoder_hidden_states=None):
        return SimpleNamespace(sample=torch.zeros_like(x))


@pytest.mark.parametrize("kind", ["v_prediction", "epsilon"])
def test_loss_target_matches_the_closed_form(tiny_diffusion, tiny_diffusion_config, kind):
    """v-prediction regresses v = √ᾱ·ε − √(1−ᾱ)·x₀, ε-prediction the noise ε."""
    b = bootstrap_diffusion(tiny_diffusion_config.model_copy(update={"prediction_type": kind}),
                            tokenizer=tiny_diffusion.tokenizer)
    assert b.noise_scheduler.config.prediction_type == kind
    b = dataclasses.replace(b, unet=_ZeroUNet())
    z = torch.randn(4, 12, 8, 8)
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (4,), generator=g)
    noise = torch.randn(z.shape, generator=g)
    ab = b.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    target = ab.sqrt() * noise - (1 - ab).sqrt() * z if kind == "v_prediction" else noise
    loss = diffusion_loss(b, z, torch.zeros(4, 77, 32), generator=torch.Generator().manual_seed(5))
    assert float(loss) == pytest.approx(float(target.square().mean()), rel=1e-5)


def test_pixel_encode_decode_is_exact(tiny_diffusion):
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(tiny_diffusion.decode(tiny_diffusion.encode(x)), x)


def test_save_and_load_gives_identical_outputs(tiny_diffusion, tmp_path):
    out = tiny_diffusion.save(tmp_path / "bundle")
    assert sorted(p.name for p in out.iterdir()) == ["scheduler", "text_encoder", "tokenizer", "unet"]
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").exists()
    loaded = load_diffusion(str(out))
    assert loaded.vae is None and loaded.resolution == 16
    assert loaded.noise_scheduler.config.prediction_type == "v_prediction"
    prompts = ["a red digit 1", "a green digit 2"]
    assert torch.equal(loaded.tokenize(prompts), tiny_diffusion.tokenize(prompts))
    z = torch.randn(2, 12, 8, 8)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        e1, e2 = tiny_diffusion.embed_prompts(prompts), loaded.embed_prompts(prompts)
        assert torch.equal(e1, e2)
        assert torch.equal(tiny_diffusion.unet(z, t, e1).sample, loaded.unet(z, t, e2).sample)
    # the sampler sees the same model too
    assert np.array_equal(sample(tiny_diffusion, prompts, num_steps=2), sample(loaded, prompts, num_steps=2))


def test_stable_diffusion_layout_loads_and_samples(tiny_sd_dir):
    b = load_diffusion(str(tiny_sd_dir))
    assert b.vae is not None
    assert b.tokenizer.model_max_length == 77
    assert b.resolution == 16  # UNet sample_size 8 × VAE factor 2
    assert type(b.noise_scheduler).__name__ == "DDPMScheduler"
    imgs = sample(b, ["a photo of a cat", "a photo of a dog", "x"], num_steps=2, guidance_scale=3.0)
    assert imgs.dtype == np.uint8 and imgs.shape == (3, 16, 16, 3)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = b.encode(x)
        assert z.shape == (2, 4, 8, 8)
        assert b.decode(z).shape == (2, 3, 16, 16)
        loss = diffusion_loss(b, z, b.embed_prompts(["a", "b"]), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_sample_is_deterministic_per_seed(tiny_diffusion):
    prompts = ["a red digit 1", "a blue digit 2", "a red digit 1", "a pink digit 9"]
    seeds = [11, 12, 13, 14]
    ref = sample(tiny_diffusion, prompts, num_steps=3, seeds=seeds, batch_size=4)
    assert ref.shape == (4, 16, 16, 3) and ref.dtype == np.uint8
    # other batch sizes / orders / companions: every (prompt, seed) row gives the same image, up to CPU kernels'
    # batch-size-dependent float rounding (exact equality failed once in a full-suite run): at most one uint8 level
    same = lambda u, v: int(np.abs(u.astype(np.int16) - v.astype(np.int16)).max()) <= 1  # noqa: E731
    order = [2, 0, 3, 1]
    shuffled = sample(tiny_diffusion, [prompts[i] for i in order], num_steps=3, seeds=[seeds[i] for i in order], batch_size=3)
    assert same(shuffled, ref[order])
    alone = sample(tiny_diffusion, [prompts[3]], num_steps=3, seeds=[14], batch_size=1)
    assert same(alone[0], ref[3])
    # same prompt, different seed → different image
    assert not same(ref[0], ref[2])
    with pytest.raises(ValueError):
        sample(tiny_diffusion, prompts, seeds=[1])


def _colored_mnist(n: int):
    from raydebias.data.builtin.colored_mnist import COLOR_NAMES, colored_mnist_arrays

    tr = colored_mnist_arrays(ColoredMNISTConfig(n_train=n, n_val=10, n_test=10))["train"]
    return tr["x"], [f"a {COLOR_NAMES[a]} digit {y}" for y, a in zip(tr["y"], tr["a"])]


def test_default_text_encoder_keeps_each_word_at_its_own_position():
    """text_layers = 0 (the default): the class word changes the context at its own position only, by a margin,
    so a dominant bias word earlier in the caption cannot drown it (BENCHMARKS.md, "Generation fidelity: findings")."""
    from raydebias.config import DiffusionModelConfig

    b = bootstrap_diffusion(DiffusionModelConfig(block_out_channels=[16, 32], text_width=32))
    with torch.no_grad():
        e = b.embed_prompts(["a photo of a red digit 0", "a photo of a red digit 5"])
    change = (e[0] - e[1]).norm(dim=-1)
    pos = int(change.argmax())
    assert change[pos] > 1.0 and float(change.sum() - change[pos]) < 1e-5


def test_compositional_guidance_reduces_to_cfg_and_uses_the_partial_prompt(tiny_diffusion):
    """ε_u + g(ε_p − ε_u) + g_c(ε_c − ε_p): with g_c = g it is plain CFG whatever the partial prompt; with
    g_c ≠ g the partial prompt matters."""
    import torch

    from diffusers import DDIMScheduler
    from raydebias.models.sampling import cfg_context, ddim_denoise, initial_noise

    prompts, partial = ["a red digit 1", "a blue digit 2"], ["a red", "a blue"]
    sched = DDIMScheduler.from_config(tiny_diffusion.noise_scheduler.config)
    sched.set_timesteps(3)
    z = initial_noise(tiny_diffusion, [1, 2])
    plain = ddim_denoise(tiny_diffusion, z, sched, sched.timesteps, cfg_context(tiny_diffusion, prompts, 2.0), 2.0)
    same = ddim_denoise(tiny_diffusion, z, sched, sched.timesteps,
                        cfg_context(tiny_diffusion, prompts, 2.0, partial_prompts=partial), 2.0, 2.0)
    torch.testing.assert_close(same, plain, atol=1e-4, rtol=1e-4)
    a = sample(tiny_diffusion, prompts, num_steps=3, seeds=[1, 2], partial_prompts=partial, partial_guidance_scale=4.0)
    b = sample(tiny_diffusion, prompts, num_steps=3, seeds=[1, 2], partial_prompts=["a green", "a pink"],
               partial_guidance_scale=4.0)
    assert a.shape == (2, 16, 16, 3) and not np.array_equal(a, b)
    with pytest.raises(ValueError, match="both"):
        sample(tiny_diffusion, prompts, partial_prompts=partial)


@pytest.mark.parametrize("f", [1, 4])
def test_unshuffle_factor_round_trips_through_save(tiny_diffusion_config, tmp_path, f):
    b = bootstrap_diffusion(tiny_diffusion_config.model_copy(update={"unshuffle": f, "cross_attention": "all"}))
    assert b.unet.config.in_channels == 3 * f * f and b.unet.config.sample_size == 16 // f
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert b.encode(x).shape == (2, 3 * f * f, 16 // f, 16 // f)
    loaded = load_diffusion(str(b.save(tmp_path / "m")))
    assert loaded.unshuffle == f and loaded.resolution == 16
    assert torch.equal(loaded.decode(loaded.encode(x)), x)
    assert loaded.tokenizer.model_max_length == tiny_diffusion_config.max_tokens
    assert loaded.unet.config.addition_embed_type == "text"  # pooled caption → time embedding


def test_min_snr_weighting_matches_the_formula(tiny_diffusion):
    """Min-SNR-γ for v-prediction: per-sample weight min(SNR, γ)/(SNR + 1), SNR = ᾱ/(1 − ᾱ)."""
    z = torch.randn(4, 12, 8, 8)
    emb = tiny_diffusion.embed_prompts(["a"] * 4)
    t = torch.tensor([10, 300, 700, 990])
    ab = tiny_diffusion.noise_scheduler.alphas_cumprod[t]
    snr = ab / (1 - ab)
    with torch.no_grad():
        per = torch.stack([diffusion_loss(tiny_diffusion, z[i : i + 1], emb[i : i + 1], torch.Generator().manual_seed(0),
                                          timesteps=t[i : i + 1]) for i in range(4)])
        weighted = torch.stack([diffusion_loss(tiny_diffusion, z[i : i + 1], emb[i : i + 1], torch.Generator().manual_seed(0),
                                               timesteps=t[i : i + 1], min_snr_gamma=5.0) for i in range(4)])
    torch.testing.assert_close(weighted, per * snr.clamp(max=5.0) / (snr + 1), rtol=1e-4, atol=1e-7)


def test_training_reduces_loss_on_colored_mnist():
    pixels, captions = _colored_mnist(256)
    assert pixels.shape == (256, 32, 32, 3)
    torch.manual_seed(0)
    cfg = DiffusionModelConfig(block_out_channels=[32, 32], attention_head_dim=8, text_width=32, text_layers=1)
    b = bootstrap_diffusion(cfg)
    table = b.text_encoder.get_input_embeddings().weight.detach().clone()

    def held_out_loss() -> float:
        from raydebias.data.transforms import to_model_input

        with torch.no_grad():
            z = b.encode(to_model_input(pixels[:64]))
            emb = b.embed_prompts(captions[:64])
            return float(diffusion_loss(b, z, emb, generator=torch.Generator().manual_seed(1)))

    before = held_out_loss()
    seen = []
    stats = train_bootstrap_diffusion(
        b, pixels, captions, steps=30, batch_size=32, lr=2e-3, seed=0, log=seen.append, log_every=10, shift=2,
        caption_dropout_fn=lambda c, rng: " ".join(w for w in c.split() if rng.random() > 0.1),
        freeze_token_embedding=True, ema_decay=0.99,
    )
    assert torch.equal(b.text_encoder.get_input_embeddings().weight, table)  # frozen
    after = held_out_loss()
    assert stats["steps"] == 30 and stats["it_per_s"] > 0 and len(seen) == 3
    assert after < 0.8 * before, (before, after, stats)
    assert not any(p.requires_grad for p in b.unet.parameters())
    assert not b.unet.training


def test_p2_weighting_matches_the_formula(tiny_diffusion):
    """P2 (DiffInject: γ = 1, k = 1) on the ε-loss is 1/(k + SNR)^γ; for v-prediction that is
    (k + SNR)^−γ · SNR/(SNR + 1) on the v-loss, since ‖ε̂ − ε‖² = SNR/(SNR + 1)·‖v̂ − v‖²."""
    z = torch.randn(4, 12, 8, 8)
    emb = tiny_diffusion.embed_prompts(["a"] * 4)
    t = torch.tensor([10, 300, 700, 990])
    ab = tiny_diffusion.noise_scheduler.alphas_cumprod[t]
    snr = ab / (1 - ab)

    def per(**kw):
        return torch.stack([diffusion_loss(tiny_diffusion, z[i : i + 1], emb[i : i + 1], torch.Generator().manual_seed(0),
                                           timesteps=t[i : i + 1], **kw) for i in range(4)])

    with torch.no_grad():
        plain, p2 = per(), per(p2_gamma=0.5, p2_k=2.0)
    torch.testing.assert_close(p2, plain * (2.0 + snr) ** -0.5 * snr / (snr + 1), rtol=1e-4, atol=1e-7)


def test_training_draws_images_by_sample_weights(tiny_diffusion):
    """Only images with non-zero weight are drawn (seen through the per-caption dropout hook)."""
    pixels, captions = _colored_mnist(64)
    weights = np.zeros(64)
    weights[[3, 10, 40]] = [1.0, 2.0, 1.0]
    seen: list[str] = []

    def record(c, rng):
        seen.append(c)
        return c

    bundle = copy.deepcopy(tiny_diffusion)  # the fixture is shared: train a copy
    train_bootstrap_diffusion(bundle, pixels, [f"{c} #{i}" for i, c in enumerate(captions)], steps=3,
                              batch_size=16, drop_probs={"all": 0.0}, caption_dropout_fn=record, log=None,
                              sample_weights=weights)
    assert len(seen) == 48 and {c.split("#")[1] for c in seen} <= {"3", "10", "40"}
    with pytest.raises(ValueError, match="sample weights"):
        train_bootstrap_diffusion(bundle, pixels, captions, steps=1, sample_weights=np.ones(3), log=None)


def test_load_refuses_pickled_weights(tiny_sd_dir, tmp_path):
    """Only safetensors load: a folder whose UNet ships a pickled ``.bin`` instead is an error, never unpickled."""
    import shutil

    from safetensors.torch import load_file

    d = tmp_path / "pickled"
    shutil.copytree(tiny_sd_dir, d)
    st = d / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(st), d / "unet" / "diffusion_pytorch_model.bin")
    st.unlink()
    with pytest.raises(OSError, match="safetensors"):
        load_diffusion(str(d))
    assert load_diffusion(str(tiny_sd_dir)).vae is not None  # the safetensors original loads


def test_resumed_training_matches_an_uninterrupted_run(tiny_diffusion, tmp_path):
    """Checkpoint at step 3 of 6, restore it (through the files a Ray Train checkpoint holds) into a fresh copy,
    finish: the same weights as 6 steps straight (shift, caption dropout, EMA and both generators included; blocks
    of 2 steps' rows, so that the resume lands inside a block)."""
    from raydebias.diffusion.base import load_train_state, save_train_state

    pixels, captions = _colored_mnist(64)
    kw = dict(steps=6, batch_size=8, lr=1e-3, log=None, shift=2, ema_decay=0.9, seed=3, block_rows=16,
              caption_dropout_fn=lambda c, rng: c if rng.random() < 0.8 else "")
    straight = copy.deepcopy(tiny_diffusion)
    train_bootstrap_diffusion(straight, pixels, captions, **kw)

    saved = []
    first = copy.deepcopy(tiny_diffusion)
    train_bootstrap_diffusion(first, pixels, captions, checkpoint_every=3,
                              on_checkpoint=lambda step, st: (save_train_state(tmp_path, st), saved.append(step)), **kw)
    assert saved == [3]  # no checkpoint at the last step: the final model is the output
    resumed = copy.deepcopy(tiny_diffusion)  # a restarted worker: untrained weights + the checkpoint
    stats = train_bootstrap_diffusion(resumed, pixels, captions, resume=load_train_state(tmp_path), **kw)
    assert stats["resumed_at"] == 3
    for a, b in ((straight.unet, resumed.unet), (straight.text_encoder, resumed.text_encoder)):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    changed = any(not torch.equal(p, q) for p, q in zip(straight.unet.state_dict().values(),
                                                         tiny_diffusion.unet.state_dict().values()))
    assert changed


def test_conditioning_gap_is_zero_exactly_when_captions_cannot_matter(tiny_diffusion):
    """Same timesteps and noise for both losses: identical captions, or a UNet whose caption paths (the
    cross-attention output and the pooled text-time embedding) are zeroed, give a gap of 0; a random model given
    real captions does not."""
    from raydebias.models.diffusion_training import conditioning_gap

    pixels, captions = _colored_mnist(16)
    bundle = copy.deepcopy(tiny_diffusion)
    with torch.no_grad():
        z = bundle.encode(to_model_input(pixels))
    ids, empty = bundle.tokenize(captions), bundle.tokenize([""] * len(captions))
    lc, lu = conditioning_gap(bundle, z, ids, empty)
    assert lc != lu
    assert conditioning_gap(bundle, z, empty, empty) == (lu, lu)
    with torch.no_grad():
        for name, p in bundle.unet.named_parameters():
            if "attn2.to_out" in name or name.startswith("add_embedding."):
                p.zero_()
    lc0, lu0 = conditioning_gap(bundle, z, ids, empty)
    assert lc0 == pytest.approx(lu0, rel=1e-6)


def _scripted_guard(monkeypatch, gaps: list[float]) -> list[dict]:
    """Replace the guard's measurement by a script of gaps; record the UNet weights at each check."""
    import raydebias.models.diffusion_training as mod

    seen = []

    def fake(bundle, *args, **kwargs):
        seen.append({k: v.clone() for k, v in bundle.unet.state_dict().items()})
        return 1.0 - gaps[len(seen) - 1], 1.0

    monkeypatch.setattr(mod, "conditioning_gap", fake)
    return seen


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_guard_keeps_the_best_weights_when_the_final_model_collapsed(tiny_diffusion, monkeypatch):
    pixels, captions = _colored_mnist(32)
    seen = _scripted_guard(monkeypatch, [0.02, 0.03, 0.02, 0.001])  # checks at steps 2, 4, 6, 8
    bundle = copy.deepcopy(tiny_diffusion)
    stats = train_bootstrap_diffusion(bundle, pixels, captions, steps=8, batch_size=8, lr=1e-3, log=None,
                                      guard_every=2, guard_pixels=pixels[:4], guard_captions=captions[:4])
    g = stats["guard"]
    assert (g["best_step"], g["restored_best"], g["rollbacks"]) == (4, True, []) and g["best_gap"] == pytest.approx(0.03)
    assert [h[0] for h in g["history"]] == [2, 4, 6, 8]
    assert _same(bundle.unet.state_dict(), seen[1]) and not _same(seen[1], seen[3])


def test_guard_rolls_back_a_collapse_mid_run_and_keeps_a_recovered_model(tiny_diffusion, monkeypatch):
    pixels, captions = _colored_mnist(32)
    seen = _scripted_guard(monkeypatch, [0.02, 0.03, 0.001, 0.025])
    bundle = copy.deepcopy(tiny_diffusion)
    stats = train_bootstrap_diffusion(bundle, pixels, captions, steps=8, batch_size=8, lr=1e-3, log=None,
                                      guard_every=2, guard_pixels=pixels[:4], guard_captions=captions[:4])
    g = stats["guard"]
    assert g["rollbacks"] == [[6, 4]] and not g["restored_best"]
    final = bundle.unet.state_dict()
    assert not _same(final, seen[1]) and not _same(final, seen[2])  # two more steps from the step-4 weights


def test_guard_state_resumes_exactly(tiny_diffusion, monkeypatch, tmp_path):
    """A checkpoint taken after a rollback carries the guard (best weights, halved lr): resumed = straight."""
    from raydebias.diffusion.base import load_train_state, save_train_state

    pixels, captions = _colored_mnist(32)
    gaps = [0.02, 0.03, 0.001, 0.025, 0.03, 0.001]
    kw = dict(steps=12, batch_size=8, lr=1e-3, log=None, guard_every=2, guard_pixels=pixels[:4],
              guard_captions=captions[:4], seed=1)
    _scripted_guard(monkeypatch, gaps)
    straight = copy.deepcopy(tiny_diffusion)
    s1 = train_bootstrap_diffusion(straight, pixels, captions, **kw)
    _scripted_guard(monkeypatch, gaps)
    train_bootstrap_diffusion(copy.deepcopy(tiny_diffusion), pixels, captions, checkpoint_every=8,
                              on_checkpoint=lambda step, st: save_train_state(tmp_path, st), **kw)
    _scripted_guard(monkeypatch, gaps[4:])
    resumed = copy.deepcopy(tiny_diffusion)
    s2 = train_bootstrap_diffusion(resumed, pixels, captions, resume=load_train_state(tmp_path), **kw)
    assert s2["resumed_at"] == 8 and s2["guard"]["rollbacks"] == s1["guard"]["rollbacks"] == [[6, 4]]
    assert s1["guard"]["restored_best"] and s2["guard"]["restored_best"]
    for (name, p), q in zip(straight.unet.state_dict().items(), resumed.unet.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_guard_ignores_gaps_below_its_floor(tiny_diffusion, monkeypatch):
    """Early in training the gap is ~0 and noisy: falling from 0.004 to 0.0001 is no collapse."""
    pixels, captions = _colored_mnist(32)
    _scripted_guard(monkeypatch, [0.004, 0.001, 0.0005, 0.0001])
    stats = train_bootstrap_diffusion(copy.deepcopy(tiny_diffusion), pixels, captions, steps=8, batch_size=8,
                                      lr=1e-3, log=None, guard_every=2, guard_pixels=pixels[:4],
                                      guard_captions=captions[:4])
    assert stats["guard"]["rollbacks"] == [] and not stats["guard"]["restored_best"]


class _ContextMeanUNet(torch.nn.Module):
    """Outputs, for every latent entry, the mean of the sample's text context: ε depends on the caption only."""

    dtype = torch.float32

    def forward(self, x, t, encoder_hidden_states=None):
        return SimpleNamespace(sample=torch.zeros_like(x) + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1))


def test_coind_loss_matches_the_formula(tiny_diffusion):
    """CoInD's L_CI = mean ‖ε(c_y) + ε(c_a) − ε(∅) − ε(c_y, c_a)‖²: against the closed form on a UNet whose output is
    a per-caption constant, 0 for one that ignores its captions, and the same t / noise for all four captions."""
    from raydebias.models.diffusion import coind_loss

    bundle = copy.copy(tiny_diffusion)
    z = torch.randn(3, 12, 8, 8)
    ctx = tuple(torch.randn(3, 5, 4) for _ in range(4))  # full, class only, bias only, empty
    m = [c.mean(dim=(1, 2)) for c in ctx]
    bundle.unet = _ContextMeanUNet()
    got = coind_loss(bundle, z, ctx, generator=torch.Generator().manual_seed(0))
    assert float(got) == pytest.approx(float(((m[1] + m[2] - m[3] - m[0]) ** 2).mean()), rel=1e-5)
    bundle.unet = _ZeroUNet()
    assert float(coind_loss(bundle, z, ctx)) == 0.0
    with pytest.raises(ValueError, match="4 contexts"):
        coind_loss(bundle, z, ctx[:3])
    # the real UNet: the four predictions come from the same noisy latents and timesteps
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        t = torch.randint(0, tiny_diffusion.noise_scheduler.config.num_train_timesteps, (3,), generator=g)
        noisy = tiny_diffusion.noise_scheduler.add_noise(z, torch.randn(z.shape, generator=g), t)
        emb = [tiny_diffusion.embed_prompts(p) for p in (["a red digit 1"] * 3, ["a digit 1"] * 3, ["a red"] * 3, [""] * 3)]
        e = [tiny_diffusion.predict(noisy, t, c) for c in emb]
        want = float(((e[1] + e[2] - e[3] - e[0]) ** 2).mean())
        got = float(coind_loss(tiny_diffusion, z, tuple(emb), generator=torch.Generator().manual_seed(5)))
    assert got == pytest.approx(want, rel=1e-4)


def test_coind_training_makes_the_joint_the_composition_of_the_marginals(tiny_diffusion):
    """From the same initial weights and batches, training with the CoInD term leaves a smaller independence
    violation on held-out images than training without it; the term needs its marginal captions."""
    from raydebias.data.builtin.colored_mnist import COLOR_NAMES
    from raydebias.data.transforms import resize_uint8
    from raydebias.models.diffusion import coind_loss

    pixels, captions = _colored_mnist(128)
    pixels = resize_uint8(pixels, 16)
    pairs = [(" ".join(w for w in c.split() if w not in COLOR_NAMES), " ".join(c.split()[:2])) for c in captions]
    assert pairs[0][0].startswith("a digit") and pairs[0][1] in {f"a {k}" for k in COLOR_NAMES}

    def violation(b) -> float:
        with torch.no_grad():
            z = b.encode(to_model_input(pixels[-32:]))
            caps = (captions[-32:], [p[0] for p in pairs[-32:]], [p[1] for p in pairs[-32:]], [""] * 32)
            return float(coind_loss(b, z, tuple(b.embed_prompts(list(c)) for c in caps),
                                    generator=torch.Generator().manual_seed(1)))

    out = {}
    for lam in (0.0, 5.0):
        b = copy.deepcopy(tiny_diffusion)
        stats = train_bootstrap_diffusion(b, pixels[:-32], captions[:-32], steps=40, batch_size=16, lr=2e-3, log=None,
                                          caption_dropout_fn=lambda c, rng: c if rng.random() > 0.3 else "",
                                          coind_weight=lam, coind_captions=pairs[:-32], coind_fraction=1.0)
        out[lam] = violation(b)
        assert ("coind_loss_last" in stats) == (lam > 0)
    assert out[5.0] < 0.5 * out[0.0], out
    with pytest.raises(ValueError, match="caption pair per image"):
        train_bootstrap_diffusion(copy.deepcopy(tiny_diffusion), pixels, captions, steps=1, log=None, coind_weight=1.0)



def test_training_from_parquet_parts_gives_the_weights_of_training_from_the_array(tiny_diffusion, tmp_path):
    """The stage streams the train split: the trainer reads the rows of a block of steps from Parquet parts
    (PartRows, blocks smaller than the run so that several are read, group weights included) and ends with the
    same weights as the same training on the in-memory array."""
    from raydebias.data.stream import PartRows, PartSet, write_parts

    pixels, captions = _colored_mnist(64)
    files = write_parts(tmp_path / "train.parquet", {"x": pixels, "y": np.zeros(len(pixels), np.int64)},
                        rows_per_part=10)
    weights = np.linspace(1, 3, len(pixels))
    kw = dict(steps=6, batch_size=8, lr=1e-3, log=None, shift=2, seed=3, sample_weights=weights, block_rows=16)
    ref = copy.deepcopy(tiny_diffusion)
    train_bootstrap_diffusion(ref, pixels, captions, **kw)
    streamed = copy.deepcopy(tiny_diffusion)
    rows = PartRows(PartSet.open(files), pixels.shape[1])
    train_bootstrap_diffusion(streamed, rows, captions, **kw)
    for (name, p), q in zip(ref.unet.state_dict().items(), streamed.unet.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    np.testing.assert_array_equal(rows.take(np.array([63, 0, 5, 5])), pixels[[63, 0, 5, 5]])
