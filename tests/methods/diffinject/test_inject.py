"""Slerp (endpoints, unit norm, angle γθ, colinear/antiparallel/zero fallbacks, batching), h-space injection, and
the asymmetric DDIM step against diffusers' DDIMScheduler as an oracle."""

import math

import numpy as np

import pytest
import torch
from diffusers import DDIMScheduler

from raydebias.methods.diffinject.inject import asymmetric_ddim_step, inject_h, slerp
from raydebias.models.sampling import initial_noise

torch.set_num_threads(1)


def unit(shape, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x / x.flatten(1).norm(dim=1).reshape(-1, *([1] * (x.ndim - 1)))


def flat_norm(x):
    return x.flatten(1).norm(dim=1)


def angle(a, b):
    cos = (a.flatten(1) * b.flatten(1)).sum(1) / (flat_norm(a) * flat_norm(b))
    return torch.arccos(cos.clamp(-1, 1))


SHAPE = (5, 3, 4, 4)


def test_slerp_endpoints_norm_and_angle():
    a, b = unit(SHAPE, 0), unit(SHAPE, 1)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    theta = angle(a, b)
    assert (theta > 0.5).all()  # random 48-d vectors are far from colinear
    for gamma in (0.1, 0.3, 0.5, 0.9):
        s = slerp(a, b, gamma)
        assert s.shape == SHAPE
        torch.testing.assert_close(flat_norm(s), torch.ones(5, dtype=torch.float64))
        torch.testing.assert_close(angle(a, s), gamma * theta)
        torch.testing.assert_close(angle(s, b), (1 - gamma) * theta)


def test_slerp_per_sample_gamma_and_batch_shapes():
    a, b = unit(SHAPE, 2), unit(SHAPE, 3)
    gammas = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    out = slerp(a, b, gammas)
    for i, g in enumerate(gammas.tolist()):
        torch.testing.assert_close(out[i : i + 1], slerp(a[i : i + 1], b[i : i + 1], g))
    for shape in [(7, 16), (2, 512, 8, 8), (1, 3)]:
        x, y = unit(shape, 4), unit(shape, 5)
        assert slerp(x, y, 0.3).shape == shape
    with pytest.raises(ValueError):
        slerp(unit((2, 3), 0), unit((3, 3), 0), 0.5)


def test_slerp_colinear_antiparallel_and_zero_fall_back_to_lerp():
    a = unit((4, 6), 6)
    noise = unit((4, 6), 7) * 1e-5
    cases = {
        "identical": a.clone(),
        "colinear, other norm": 2.5 * a,
        "antiparallel": -a,
        "near-colinear": a + noise,  # 1 − cos ≈ 5e-11 < eps; sin θ ≈ 1e-5 is where the public code loses it
        "zero": torch.zeros_like(a),
    }
    for name, b in cases.items():
        for gamma in (0.0, 0.3, 0.5, 1.0):
            s = slerp(a, b, gamma)
            assert torch.isfinite(s).all(), name
            torch.testing.assert_close(s, (1 - gamma) * a + gamma * b, msg=name)
    # identical vectors: the lerp is also the exact slerp (a itself); antiparallel at γ = ½ is the origin
    torch.testing.assert_close(slerp(a, a, 0.7), a)
    torch.testing.assert_close(slerp(a, -a, 0.5), torch.zeros_like(a))
    # mixed batch: only the degenerate rows fall back
    b = unit((4, 6), 8)
    b[1] = a[1] * 3
    s = slerp(a, b, 0.4)
    torch.testing.assert_close(s[1], 0.6 * a[1] + 0.4 * b[1])
    torch.testing.assert_close(s[[0, 2, 3]], slerp(a[[0, 2, 3]], b[[0, 2, 3]], 0.4))


def test_slerp_gradient_is_finite_at_colinear_inputs_and_dtype_is_kept():
    a = unit((3, 8), 9).requires_grad_(True)
    b = torch.cat([a.detach()[:1], -a.detach()[1:2], unit((1, 8), 10)]).requires_grad_(True)
    slerp(a, b, 0.3).sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    h = unit((2, 16), 11).to(torch.bfloat16)
    out = slerp(h, unit((2, 16), 12).to(torch.bfloat16), 0.5)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_inject_h_keeps_norm_and_takes_content_direction():
    gen = torch.Generator().manual_seed(13)
    h_t = torch.randn(SHAPE, generator=gen, dtype=torch.float64) * 3
    h_c = torch.randn(SHAPE, generator=gen, dtype=torch.float64) * 0.2
    torch.testing.assert_close(inject_h(h_t, h_c, 0.0), h_t)
    full = inject_h(h_t, h_c, 1.0)
    torch.testing.assert_close(flat_norm(full), flat_norm(h_t))
    torch.testing.assert_close(full / flat_norm(full).reshape(-1, 1, 1, 1), h_c / flat_norm(h_c).reshape(-1, 1, 1, 1))
    theta = angle(h_t, h_c)
    for gamma in (0.1, 0.3, 0.7):
        mid = inject_h(h_t, h_c, gamma)
        torch.testing.assert_close(flat_norm(mid), flat_norm(h_t))
        torch.testing.assert_close(angle(h_t, mid), gamma * theta)
    # one content bottleneck broadcast over a batch of style bottlenecks
    out = inject_h(h_t, h_c[:1], 1.0)
    for i in range(SHAPE[0]):
        torch.testing.assert_close(out[i], h_c[0] * flat_norm(h_t)[i] / flat_norm(h_c[:1])[0])


def scheduler(steps=50):
    s = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True)
    s.set_timesteps(steps)
    return s


def alphas_for(s, t):
    prev = int(t) - s.config.num_train_timesteps // s.num_inference_steps
    return s.alphas_cumprod[int(t)], (s.alphas_cumprod[prev] if prev >= 0 else s.final_alpha_cumprod)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_symmetric_step_equals_diffusers_ddim(eta):
    s = scheduler()
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    for k in (0, 10, 25, 49):  # 49: the last step, ᾱ_prev = 1
        t = s.timesteps[k]
        eps = torch.randn(x.shape, generator=gen)
        z = torch.randn(x.shape, generator=gen)
        a_t, a_prev = alphas_for(s, t)
        ref = s.step(eps, t, x, eta=eta, variance_noise=z if eta else None).prev_sample
        ours = asymmetric_ddim_step(x, eps, eps, a_t, a_prev, eta=eta, noise=z)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_asymmetric_step_uses_injected_eps_for_x0_and_original_for_direction():
    s = scheduler()
    t = s.timesteps[20]
    a_t, a_prev = (float(v) for v in alphas_for(s, t))
    gen = torch.Generator().manual_seed(15)
    x, e_inj, e_org = (torch.randn(3, 4, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    out = asymmetric_ddim_step(x, e_inj, e_org, a_t, a_prev)
    x0 = (x - math.sqrt(1 - a_t) * e_inj) / math.sqrt(a_t)
    torch.testing.assert_close(out, math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * e_org)
    # relative to the plain step on ε_original, only the x̂_0 term moves
    plain = asymmetric_ddim_step(x, e_org, e_org, a_t, a_prev)
    coef = -math.sqrt(a_prev) * math.sqrt(1 - a_t) / math.sqrt(a_t)
    torch.testing.assert_close(out - plain, coef * (e_inj - e_org))


def test_asymmetric_step_per_sample_alphas_and_generator_noise():
    gen = torch.Generator().manual_seed(16)
    x, e1, e2 = (torch.randn(3, 2, 4, generator=gen) for _ in range(3))
    a_t, a_p = torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0.3, 0.6, 0.95])
    out = asymmetric_ddim_step(x, e1, e2, a_t, a_p, eta=0.5, noise=torch.zeros_like(x) + 0.1)
    for i in range(3):
        torch.testing.assert_close(out[i : i + 1], asymmetric_ddim_step(
            x[i : i + 1], e1[i : i + 1], e2[i : i + 1], float(a_t[i]), float(a_p[i]), eta=0.5,
            noise=torch.full_like(x[i : i + 1], 0.1)))
    r1 = asymmetric_ddim_step(x, e1, e2, a_t, a_p, eta=1.0, generator=torch.Generator().manual_seed(0))
    r2 = asymmetric_ddim_step(x, e1, e2, a_t, a_p, eta=1.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(r1, r2)
    assert not torch.allclose(r1, asymmetric_ddim_step(x, e1, e2, a_t, a_p, eta=0.0))


# ---- h-space injection on a (tiny, untrained) diffusers UNet --------------------------------------------------

def test_injection_with_gamma_zero_is_plain_ddim_sampling(tiny_diffusion):
    """γ = 0 and no stochastic tail → exactly diffusers' DDIM sampling (``models.diffusion.sample``) from the
    same noise: the hook, the asymmetric step and the v→ε conversion add nothing."""
    from raydebias.methods.diffinject.inject import inject_generate, record_h
    from raydebias.models.sampling import to_uint8, sample

    b, seeds, steps = tiny_diffusion, [3, 4, 5], 6
    ctx = b.embed_prompts([""])
    z = initial_noise(b, seeds)
    h_c = record_h(b, initial_noise(b, [9]).expand(3, -1, -1, -1), steps, ctx, t_edit=500)
    assert h_c.shape[0] == 3  # t = 999, 832, 666 ≥ 500 with 6 trailing steps
    ours = to_uint8(b.decode(inject_generate(b, z, h_c, steps, ctx, t_edit=500, t_boost=0, gamma=0.0)))
    ref = sample(b, [""] * 3, num_steps=steps, guidance_scale=1.0, seeds=seeds)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
    # γ > 0 with a different content image changes the result; injecting an image's own h changes nothing
    other = to_uint8(b.decode(inject_generate(b, z, h_c, steps, ctx, t_edit=500, t_boost=0, gamma=0.9)))
    assert np.abs(other.astype(int) - ref.astype(int)).max() > 5
    own = record_h(b, z, steps, ctx, t_edit=500)
    same = to_uint8(b.decode(inject_generate(b, z, own, steps, ctx, t_edit=500, t_boost=0, gamma=0.7)))
    assert np.abs(same.astype(int) - ref.astype(int)).max() <= 1
    assert not b.unet.mid_block._forward_hooks  # the hook is removed


def test_stochastic_tail_is_seeded_per_row(tiny_diffusion):
    from raydebias.methods.diffinject.inject import inject_generate

    b, steps = tiny_diffusion, 4
    ctx = b.embed_prompts([""])
    z = initial_noise(b, [1, 2])
    empty = torch.zeros(0)
    a = inject_generate(b, z, empty, steps, ctx, t_edit=1000, t_boost=600, gamma=0.3, eta=1.0, seeds=[7, 8])
    a2 = inject_generate(b, z[:1], empty, steps, ctx, t_edit=1000, t_boost=600, gamma=0.3, eta=1.0, seeds=[7])
    c = inject_generate(b, z, empty, steps, ctx, t_edit=1000, t_boost=600, gamma=0.3, eta=1.0, seeds=[9, 8])
    torch.testing.assert_close(a[:1], a2)  # a row's noise does not depend on its batch
    assert not torch.allclose(a[0], c[0]) and torch.allclose(a[1], c[1])


def test_ddim_inversion_round_trips(tiny_diffusion):
    """Inversion (diffusers DDIMInverseScheduler) then DDIM sampling returns close to the start latent."""
    from raydebias.methods.diffinject.inject import ddim_invert, inject_generate

    b, steps = tiny_diffusion, 50
    ctx = b.embed_prompts([""])
    z0 = torch.randn(2, 12, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    z_T = ddim_invert(b, z0, steps, ctx)
    assert z_T.shape == z0.shape and not torch.allclose(z_T, z0)
    back = inject_generate(b, z_T, torch.zeros(0), steps, ctx, t_edit=1000, t_boost=0, gamma=0.0)
    err = (back - z0).abs().mean() / (z0 - z0.flip(0)).abs().mean()
    assert err < 0.1, err
