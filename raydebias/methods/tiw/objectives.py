"""TIW — Time-dependent Importance reWeighting (Kim et al., ICLR 2024; docs/methods/tiw.md), pure torch.

A time-dependent discriminator d_φ(x_t, t) (reference = 1, biased = 0) gives the density ratio
w_t(x_t) = p_ref,t(x_t) / p_bias,t(x_t) = d / (1 − d).  Since ∇log p_ref,t = ∇log p_bias,t + ∇log w_t, the score-matching
loss on the unbiased density equals, up to a θ-constant (Theorem 1),

    E_t E_{x0 ~ p_bias} E_{x_t | x0} [ w_t(x_t) · ‖ s_θ(x_t, t) − ∇log p(x_t | x0) − ∇log w_t(x_t) ‖² ].

Conventions used throughout:

* Schedule: continuous **linear-β VP** (Song et al. 2021), β(t) = β_min + t (β_max − β_min), t ∈ [t_eps, 1],
  α_t = exp(−¼ t² (β_max − β_min) − ½ t β_min), σ_t = sqrt(1 − α_t²), x_t = α_t x0 + σ_t ε.
  (Not diffusers' DDPMScheduler — continuous t is needed for a time-dependent discriminator.)
* Models are **ε-predictors** called as ``model(x_t, t)`` with ``t`` of shape (N,); score s = −ε̂ / σ_t.
* The DSM loss is the ε-MSE, i.e. score-space MSE with λ(t) = σ_t².  Substituting s = −ε̂/σ into Theorem 1:

      score target  −ε/σ + ∇log w      ⇔   ε target  ε − σ ∇log w      ⇔   x0 target (VP)  x0 + (σ²/α) ∇log w

  so the paper's "+σ²∇log w" correction (stated for the EDM denoiser D = x + σ² s) is **−σ ∇log w in ε units**.
* ``form="code"`` reproduces the public code's variant: weight 2·d and correction −σ²∇d in the denoiser slot,
  i.e. score target −ε/σ − ∇d (ε target ε + σ ∇d).  It is *not* equivalent to Theorem 1 (see the toy test).

All functions accept any tensor shape (N, ...); per-sample quantities are broadcast over the trailing dims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample (N,) tensor to (N, 1, ..., 1) so it broadcasts against ``like``."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


@dataclass(frozen=True)
class VPSchedule:
    """Continuous linear-β variance-preserving schedule, t ∈ [t_eps, 1]."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_eps: float = 1e-3

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Signal scale α_t (= sqrt(ᾱ) in DDPM notation)."""
        return self.log_alpha(t).exp()

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise scale σ_t = sqrt(1 − α_t²)."""
        return (-torch.expm1(2.0 * self.log_alpha(t))).clamp_min(0.0).sqrt()

    def sample_t(self, n: int, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """t ~ U[t_eps, 1], shape (n,)."""
        u = torch.rand(n, device=device, generator=generator)
        return self.t_eps + (1.0 - self.t_eps) * u


def _perturb(x: torch.Tensor, schedule: VPSchedule, generator: torch.Generator | None,
             t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw (t, ε) in a fixed order and return (x_t, t, ε)."""
    if t is None:
        t = schedule.sample_t(x.shape[0], x.device, generator)
    eps = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    x_t = _bcast(schedule.alpha(t), x) * x + _bcast(schedule.sigma(t), x) * eps
    return x_t, t, eps


class FourierTime(nn.Module):
    """Time features [t, sin(2^k·π·t), cos(2^k·π·t)] for k < ``n_freq``, shape (N, ``dim`` = 2·n_freq + 1)."""

    def __init__(self, n_freq: int) -> None:
        super().__init__()
        self.dim = 2 * n_freq + 1
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freq, dtype=torch.float32), persistent=False)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        t = t.reshape(-1, 1).to(dtype)
        tf = t * self.freqs.to(dtype)
        return torch.cat([t, tf.sin(), tf.cos()], dim=1)


class TimeMLP(nn.Module):
    """MLP f(x, t) for fixed-shape inputs (N, *shape): flattens x, appends Fourier features of t, reshapes back.

    ``out_features=None`` → output has the input's shape (an ε-model); an int → output (N, out_features).
    """

    def __init__(self, shape: tuple[int, ...] | int, out_features: int | None = None, hidden: int = 128,
                 depth: int = 3, n_freq: int = 8) -> None:
        super().__init__()
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        d_in = math.prod(self.shape)
        self.out_features = out_features
        self.time = FourierTime(n_freq)
        layers: list[nn.Module] = []
        width = d_in + self.time.dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, d_in if out_features is None else out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x.reshape(x.shape[0], -1), self.time(t, x.dtype)], dim=1)
        out = self.net(h)
        return out.reshape(x.shape) if self.out_features is None else out


class TimeDiscriminator(nn.Module):
    """d_φ(x_t, t) ∈ (0, 1): probability that x_t comes from the (perturbed) reference set.

    Either a :class:`TimeMLP` on ``shape`` or a user ``backbone(x_t, t)`` returning logits of shape (N,) or (N, 1)
    (e.g. a UNet encoder for images).  ``forward`` returns probabilities (N,), ``logits`` the pre-sigmoid values.
    """

    def __init__(self, shape: tuple[int, ...] | int | None = None, backbone: nn.Module | None = None,
                 hidden: int = 128, depth: int = 3) -> None:
        super().__init__()
        if (shape is None) == (backbone is None):
            raise ValueError("give exactly one of `shape` (MLP) or `backbone`")
        self.backbone = backbone if backbone is not None else TimeMLP(shape, 1, hidden, depth)  # type: ignore[arg-type]

    def logits(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.backbone(x, t).reshape(x.shape[0])

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x, t))


def discriminator_loss(disc: TimeDiscriminator, x_bias: torch.Tensor, x_ref: torch.Tensor, schedule: VPSchedule,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Balanced BCE (reference = 1, biased = 0) on x_t = α_t x + σ_t ε; both halves share the same t draws."""
    if x_bias.shape[0] != x_ref.shape[0]:
        raise ValueError("balanced batches required: x_bias and x_ref must have the same batch size")
    t = schedule.sample_t(x_bias.shape[0], x_bias.device, generator)
    xb, _, _ = _perturb(x_bias, schedule, generator, t)
    xr, _, _ = _perturb(x_ref, schedule, generator, t)
    lb, lr = disc.logits(xb, t), disc.logits(xr, t)
    return 0.5 * (F.binary_cross_entropy_with_logits(lb, torch.zeros_like(lb))
                  + F.binary_cross_entropy_with_logits(lr, torch.ones_like(lr)))


def _clamped_prob(disc: Model, x_t: torch.Tensor, t: torch.Tensor, eps: float) -> torch.Tensor:
    return disc(x_t, t).reshape(x_t.shape[0]).clamp(eps, 1.0 - eps)


def density_ratio(disc: Model, x_t: torch.Tensor, t: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """w_t(x_t) = d / (1 − d) with d clamped to [eps, 1 − eps]; shape (N,)."""
    d = _clamped_prob(disc, x_t, t, eps)
    return d / (1.0 - d)


def _grad_wrt_x(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(out.sum(), x, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def log_ratio_grad(disc: Model, x_t: torch.Tensor, t: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """∇_x log w_t(x_t) by autograd (detached, shape of x_t).  Zero where d is clamped."""
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        d = _clamped_prob(disc, x, t, eps)
        return _grad_wrt_x(torch.log(d) - torch.log1p(-d), x).detach()


def _eps_mse(model: Model, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over non-batch dims of (ε̂ − target)², shape (N,)."""
    return (model(x_t, t) - target).pow(2).reshape(x_t.shape[0], -1).mean(dim=1)


def dsm_loss(score_model: Model, x: torch.Tensor, schedule: VPSchedule,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Plain denoising score matching in ε units: E ‖ε̂(x_t, t) − ε‖² (score MSE with λ(t) = σ_t²)."""
    x_t, t, eps = _perturb(x, schedule, generator)
    return _eps_mse(score_model, x_t, t, eps).mean()


def tiw_dsm_loss(score_model: Model, disc: Model, x: torch.Tensor, schedule: VPSchedule,
                 form: Literal["paper", "code"] = "paper", generator: torch.Generator | None = None,
                 is_ref: torch.Tensor | None = None, eps: float = 1e-4) -> torch.Tensor:
    """TIW-DSM in ε units; the discriminator is evaluated without gradients to its parameters (frozen).

    ``form="paper"`` (Theorem 1): weight w = d/(1−d), ε target ε − σ ∇log w (score target −ε/σ + ∇log w).
    ``form="code"`` (public code):  weight 2d,         ε target ε + σ ∇d     (denoiser correction −σ²∇d).

    ``is_ref`` (bool, (N,)) marks samples drawn from the reference set: they already follow the unbiased density,
    so they get plain DSM (weight 1, no correction) — this keeps training on D_bias ∪ D_ref exact when the
    discriminator was trained on D_bias vs D_ref.  ``None`` treats every sample as a D_bias draw.
    """
    if form not in ("paper", "code"):
        raise ValueError(f"form must be 'paper' or 'code', got {form!r}")
    x_t, t, noise = _perturb(x, schedule, generator)
    with torch.enable_grad():
        xg = x_t.detach().requires_grad_(True)
        d = _clamped_prob(disc, xg, t, eps)
        if form == "paper":
            weight = d / (1.0 - d)
            corr = _grad_wrt_x(torch.log(d) - torch.log1p(-d), xg)  # score-space correction +∇log w
        else:
            weight = 2.0 * d
            corr = -_grad_wrt_x(d, xg)  # score-space correction −∇d
    weight, corr = weight.detach(), corr.detach()
    if is_ref is not None:
        ref = is_ref.to(torch.bool).reshape(-1)
        weight = torch.where(ref, torch.ones_like(weight), weight)
        corr = torch.where(_bcast(ref, corr), torch.zeros_like(corr), corr)
    target = noise - _bcast(schedule.sigma(t), x) * corr
    return (weight * _eps_mse(score_model, x_t, t, target)).mean()


@torch.no_grad()
def sample(score_model: Model, shape: tuple[int, ...], schedule: VPSchedule, steps: int = 100, eta: float = 0.0,
           generator: torch.Generator | None = None, device: torch.device | str = "cpu",
           clip_x0: float | None = None) -> torch.Tensor:
    """DDIM sampler on the continuous VP schedule from t = 1 to t_eps (eta = 0: probability-flow ODE,
    eta = 1: ancestral DDPM).  Returns the final x̂0 prediction, shape ``shape``. ``clip_x0`` clamps x̂0 to
    [−c, c] at every step and re-derives ε from it (diffusers' ``clip_sample`` for pixel-space images: at t = 1,
    α ≈ 0.007, so a small ε error is a huge x̂0 error that DDIM would carry to the end)."""
    ts = torch.linspace(1.0, schedule.t_eps, steps + 1, device=device)
    x = torch.randn(shape, device=device, generator=generator)
    x0 = x
    for i in range(steps):
        t, s = ts[i].expand(shape[0]), ts[i + 1]
        a_t, s_t = schedule.alpha(ts[i]), schedule.sigma(ts[i])
        a_s, s_s = schedule.alpha(s), schedule.sigma(s)
        e = score_model(x, t)
        x0 = (x - s_t * e) / a_t
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            e = (x - a_t * x0) / s_t
        if i == steps - 1:
            break
        noise_sd = eta * (s_s / s_t) * (1.0 - (a_t / a_s) ** 2).clamp_min(0.0).sqrt()
        x = a_s * x0 + (s_s**2 - noise_sd**2).clamp_min(0.0).sqrt() * e
        if eta > 0:
            x = x + noise_sd * torch.randn(shape, device=device, generator=generator)
    return x0
