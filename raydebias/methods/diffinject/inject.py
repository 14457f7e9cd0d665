"""DiffInject / InjectFusion h-space content injection primitives (docs/methods/diffinject.md), pure tensor functions.

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


# --------------------------------------------------------------------------------------------------------------
# h-space injection with a diffusers UNet (DDIM inversion, cached bottlenecks, asymmetric reverse process)
# --------------------------------------------------------------------------------------------------------------


class HSpace:
    """Forward hook on ``unet.mid_block`` (the bottleneck, Asyrp's h-space).

    ``mode="record"`` stores the block's output in ``self.h``; ``mode="inject"`` expects a doubled batch
    [x, x] and replaces the second half of the output by ``inject_h(h, self.content, self.gamma)``, so one UNet call
    gives both ε_original and ε_injected. ``mode=None`` leaves the UNet untouched. Use as a context manager.
    """

    def __init__(self, unet) -> None:
        self.unet, self.mode, self.h, self.content, self.gamma = unet, None, None, None, 0.0
        self._handle = None

    def __enter__(self) -> "HSpace":
        self._handle = self.unet.mid_block.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self.mode = None

    def _hook(self, module, inputs, output):
        if self.mode == "record":
            self.h = output.detach()
        elif self.mode == "inject":
            b = output.shape[0] // 2
            return torch.cat([output[:b], inject_h(output[b:], self.content.to(output), self.gamma)])
        return None


def _eps(bundle, x: torch.Tensor, t, context: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """The UNet's output at (x, t) as ε (v-prediction converted with ᾱ of ``x``'s level)."""
    out = bundle.predict(x, t, context.expand(x.shape[0], -1, -1))
    if bundle.noise_scheduler.config.prediction_type == "v_prediction":
        out = abar.sqrt() * out + (1 - abar).sqrt() * x
    return out


def _schedules(bundle, num_steps: int):
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    fwd = DDIMScheduler.from_config(bundle.noise_scheduler.config)
    fwd.set_timesteps(num_steps)
    inv = DDIMInverseScheduler.from_config(bundle.noise_scheduler.config)
    inv.set_timesteps(num_steps)
    return fwd, inv


def _abar(sched, t: int) -> torch.Tensor:
    return sched.alphas_cumprod[t] if t >= 0 else sched.final_alpha_cumprod


@torch.no_grad()
def ddim_invert(bundle, z0: torch.Tensor, num_steps: int, context: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM inversion x_0 → x_T (diffusers ``DDIMInverseScheduler``; the model is evaluated at the
    current, less noisy latent with the next timestep, as diffusers' inversion pipelines do)."""
    _, inv = _schedules(bundle, num_steps)
    x = z0.to(bundle.device, bundle.dtype)
    for t in inv.timesteps:
        out = bundle.predict(x, t, context.expand(x.shape[0], -1, -1))
        x = inv.step(out, t, x).prev_sample
    return x


@torch.no_grad()
def record_h(bundle, z_T: torch.Tensor, num_steps: int, context: torch.Tensor, t_edit: int) -> torch.Tensor:
    """Plain DDIM (η = 0) reconstruction from ``z_T`` recording the bottleneck h_t at every step with t ≥ t_edit:
    the content features InjectFusion injects. Returns (S_edit, B, C, H, W)."""
    fwd, _ = _schedules(bundle, num_steps)
    step = bundle.noise_scheduler.config.num_train_timesteps // num_steps
    x, hs = z_T.to(bundle.device, bundle.dtype), []
    with HSpace(bundle.unet) as hook:
        for t in fwd.timesteps:
            if int(t) < t_edit:
                break
            hook.mode = "record"
            a_t, a_p = _abar(fwd, int(t)), _abar(fwd, int(t) - step)
            eps = _eps(bundle, x, t, context, a_t)
            hs.append(hook.h)
            x = asymmetric_ddim_step(x, eps, eps, a_t, a_p)
    return torch.stack(hs) if hs else torch.zeros(0)


@torch.no_grad()
def inject_generate(bundle, z_T: torch.Tensor, h_content: torch.Tensor, num_steps: int, context: torch.Tensor,
                    t_edit: int, t_boost: int, gamma: float, eta: float = 1.0,
                    seeds: list[int] | None = None) -> torch.Tensor:
    """DiffInject generation from the style images' inverted latents ``z_T`` (B, …): for t ≥ t_edit the
    bottleneck is replaced by Slerp(h_t, ‖h_t‖·h_c/‖h_c‖, γ) (``h_content`` from :func:`record_h`, one
    (B, …) slice per edited step) with the asymmetric step; below t_edit plain DDIM, η = 0 above ``t_boost`` and
    ``eta`` (stochastic, per-row seeded noise) below. Returns x_0 latents."""
    fwd, _ = _schedules(bundle, num_steps)
    step = bundle.noise_scheduler.config.num_train_timesteps // num_steps
    x = z_T.to(bundle.device, bundle.dtype)
    gens = [torch.Generator().manual_seed(int(s)) for s in (seeds or range(x.shape[0]))]
    with HSpace(bundle.unet) as hook:
        for i, t in enumerate(fwd.timesteps):
            a_t, a_p = _abar(fwd, int(t)), _abar(fwd, int(t) - step)
            if int(t) >= t_edit and i < len(h_content):
                hook.mode, hook.content, hook.gamma = "inject", h_content[i], gamma
                eps_orig, eps_inj = _eps(bundle, torch.cat([x, x]), t, context, a_t).chunk(2)
                x = asymmetric_ddim_step(x, eps_inj, eps_orig, a_t, a_p)
            else:
                hook.mode = None
                eps = _eps(bundle, x, t, context, a_t)
                e = eta if int(t) < t_boost else 0.0
                noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x) if e else None
                x = asymmetric_ddim_step(x, eps, eps, a_t, a_p, eta=e, noise=noise)
    return x


# --------------------------------------------------------------------------------------------------------------
# Stages: ``mine`` (GCE-biased classifier → top-K loss samples), ``inject`` (one Ray task per batch of pairs)
# --------------------------------------------------------------------------------------------------------------
