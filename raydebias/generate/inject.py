"""DiffInject / InjectFusion h-space content injection primitives (METHODS.md §3), pure tensor functions.

* ``slerp`` — batched spherical interpolation with a lerp fallback for near-colinear (and zero) vectors, where
  the public code divides by sin θ ≈ 0 and returns NaN.
* ``inject_h`` — h̃_t = Slerp(h_t, ‖h_t‖·h_c/‖h_c‖, γ): the content bottleneck h_c rescaled to the style
  bottleneck's norm, so every interpolant keeps ‖h_t‖.
* ``asymmetric_ddim_step`` — the asymmetric reverse step of Asyrp / InjectFusion (DiffInject eq. 7):
  x_{t−1} = √ᾱ_{t−1}·P_t(ε_injected) + D_t(ε_original) + σ_t z.
"""

from __future__ import annotations

import torch


def _per_sample(v, ref: torch.Tensor) -> torch.Tensor:
    """A scalar or a (B,) tensor as a (B, 1, …, 1) tensor broadcastable against ``ref``."""
    v = torch.as_tensor(v, dtype=ref.dtype, device=ref.device)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (ref.ndim - 1)))


def slerp(a: torch.Tensor, b: torch.Tensor, gamma, eps: float = 1e-6) -> torch.Tensor:
    """Spherical interpolation between ``a`` and ``b`` (B, …), each sample flattened to one vector.

    slerp = sin((1−γ)θ)/sin θ · a + sin(γθ)/sin θ · b with cos θ = ⟨a, b⟩/(‖a‖‖b‖). For unit vectors this
    walks the great circle (norm 1, angle γθ from ``a``); for vectors of equal norm r it keeps norm r. Where
    |cos θ| > 1 − eps (colinear or antiparallel), or either vector is zero, it returns the lerp
    (1−γ)a + γb instead (for antiparallel inputs the great circle is undefined; lerp passes through the origin).
    ``gamma``: a float or a (B,) tensor. Computed in float32 at least; returned in ``a``'s dtype. Gradient-safe
    (no NaN gradient from the unused branch).
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    out_dtype = a.dtype
    dtype = torch.promote_types(a.dtype, torch.float32)
    shape = a.shape
    a2, b2 = a.reshape(shape[0], -1).to(dtype), b.reshape(shape[0], -1).to(dtype)
    g = _per_sample(gamma, a2)
    na, nb = a2.norm(dim=1, keepdim=True), b2.norm(dim=1, keepdim=True)
    cos = (a2 * b2).sum(1, keepdim=True) / (na * nb).clamp_min(torch.finfo(dtype).tiny)
    degenerate = (cos.abs() > 1 - eps) | (na == 0) | (nb == 0)
    theta = torch.arccos(torch.where(degenerate, torch.zeros_like(cos), cos.clamp(-1.0, 1.0)))
    sin_t = torch.where(degenerate, torch.ones_like(theta), torch.sin(theta))
    spherical = (torch.sin((1 - g) * theta) / sin_t) * a2 + (torch.sin(g * theta) / sin_t) * b2
    linear = (1 - g) * a2 + g * b2
    return torch.where(degenerate, linear, spherical).reshape(shape).to(out_dtype)


def inject_h(h_t: torch.Tensor, h_c: torch.Tensor, gamma, eps: float = 1e-6) -> torch.Tensor:
    """h̃_t = Slerp(h_t, ‖h_t‖·h_c/‖h_c‖, γ) per sample (norms over all but the batch dim).

    γ = 0 keeps the style bottleneck h_t; γ = 1 gives h_c's direction at ‖h_t‖'s norm; every γ keeps ‖h_t‖
    (both endpoints have that norm). ``h_c`` with batch 1 is broadcast over ``h_t``'s batch.
    """
    h_c = h_c.expand_as(h_t)
    dims = tuple(range(1, h_t.ndim))
    n_t = torch.linalg.vector_norm(h_t, dim=dims, keepdim=True)
    n_c = torch.linalg.vector_norm(h_c, dim=dims, keepdim=True).clamp_min(torch.finfo(h_c.dtype).tiny)
    return slerp(h_t, h_c * (n_t / n_c), gamma, eps=eps)


def asymmetric_ddim_step(x_t: torch.Tensor, eps_injected: torch.Tensor, eps_original: torch.Tensor, alpha_t,
                         alpha_prev, eta: float = 0.0, noise: torch.Tensor | None = None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """One DDIM reverse step x_t → x_{t−1} with the predicted x̂_0 from ``eps_injected`` (ε with h̃_t) and the
    direction term from ``eps_original`` (ε with the untouched h_t):

        x̂_0 = (x_t − √(1−ᾱ_t)·ε_inj) / √ᾱ_t
        σ_t = η·√((1−ᾱ_{t−1})/(1−ᾱ_t))·√(1 − ᾱ_t/ᾱ_{t−1})
        x_{t−1} = √ᾱ_{t−1}·x̂_0 + √(1−ᾱ_{t−1}−σ_t²)·ε_orig + σ_t·z

    ``alpha_t`` / ``alpha_prev`` are *cumulative* products ᾱ (floats or (B,) tensors; ᾱ_{t−1} = 1 after the last
    step, as diffusers' ``set_alpha_to_one``). With ``eps_injected == eps_original`` this is the standard DDIM step
    (diffusers ``DDIMScheduler.step``, no clipping/thresholding). ``noise`` z defaults to N(0, I) from
    ``generator`` when η > 0; DiffInject uses η = 0 above t_boost and η > 0 below.
    """
    a_t, a_p = _per_sample(alpha_t, x_t), _per_sample(alpha_prev, x_t)
    x0 = (x_t - (1 - a_t).sqrt() * eps_injected) / a_t.sqrt()
    sigma = eta * ((1 - a_p) / (1 - a_t)).sqrt() * (1 - a_t / a_p).sqrt() if eta else torch.zeros_like(a_t)
    x_prev = a_p.sqrt() * x0 + (1 - a_p - sigma**2).clamp_min(0).sqrt() * eps_original
    if eta:
        if noise is None:
            noise = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype, device=x_t.device)
        x_prev = x_prev + sigma * noise
    return x_prev
