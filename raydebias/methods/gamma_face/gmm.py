"""GAMMA-FACE (docs/methods/gamma_face.md): a Gaussian mixture over mid-trajectory diffusion latents, sampled equally per component.

* ``collect_latents`` runs the first ``split_index(num_steps, t_frac)`` DDIM (η = 0) steps from the same per-seed
  noise as :func:`raydebias.models.diffusion.sample`; ``continue_reverse`` runs the rest, so the two composed
  reproduce ``sample`` for the same prompt, guidance and seeds.
* ``forward_latents`` instead noises *real* images by the forward process to the same level (the paper's §4.3:
  "we initially utilize the diffusion model's forward process").
* ``fit_gmm_bic`` fits diagonal-covariance GMMs (k-means++ init) for K = 1..k_max and keeps the lowest BIC.
* ``sample_components`` / ``generate_balanced`` draw the same number of latents from every component
  (z ~ N(μ_k, diag σ_k²)) and finish the reverse process from them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from diffusers import DDIMScheduler

from raydebias.data.transforms import resize_uint8, to_model_input
from raydebias.models.diffusion import DiffusionBundle
from raydebias.models.sampling import cfg_context, ddim_denoise, initial_noise, latent_shape, to_uint8

if TYPE_CHECKING:  # sklearn is imported where a GMM is fitted: 1.2 s that every importer would pay
    from sklearn.mixture import GaussianMixture


def reverse_timesteps(bundle: DiffusionBundle, num_steps: int) -> tuple[DDIMScheduler, torch.Tensor]:
    """The DDIM scheduler ``sample`` uses (from the bundle's training-scheduler config) and its timesteps."""
    sched = DDIMScheduler.from_config(bundle.noise_scheduler.config)
    sched.set_timesteps(num_steps)
    return sched, sched.timesteps


def split_index(num_steps: int, t_frac: float) -> int:
    """Reverse steps already taken at the split: round(t_frac · num_steps), clamped to [1, num_steps − 1]."""
    if num_steps < 2:
        raise ValueError(f"num_steps must be at least 2 to split the reverse process, got {num_steps}")
    if not 0.0 <= t_frac <= 1.0:
        raise ValueError(f"t_frac must lie in [0, 1], got {t_frac}")
    return min(max(int(round(t_frac * num_steps)), 1), num_steps - 1)


def collect_latents(
    bundle: DiffusionBundle, seeds: list[int], num_steps: int = 20, t_frac: float = 0.5, prompt: str = "",
    guidance_scale: float = 1.0, batch_size: int = 128,
) -> torch.Tensor:
    """Latents (N, C, H, W) after the first ``split_index(num_steps, t_frac)`` reverse steps, row i started from
    ``torch.Generator().manual_seed(seeds[i])`` noise (the ``sample`` convention)."""
    split = split_index(num_steps, t_frac)
    sched, timesteps = reverse_timesteps(bundle, num_steps)
    seeds = [int(s) for s in seeds]
    out: list[torch.Tensor] = []
    for lo in range(0, len(seeds), batch_size):
        z = initial_noise(bundle, seeds[lo : lo + batch_size], sched.init_noise_sigma)
        ctx = cfg_context(bundle, [prompt] * len(z), guidance_scale)
        out.append(ddim_denoise(bundle, z, sched, timesteps[:split], ctx, guidance_scale))
    return torch.cat(out) if out else torch.zeros((0, *latent_shape(bundle)), dtype=bundle.dtype, device=bundle.device)


def forward_latents(bundle: DiffusionBundle, pixels: np.ndarray, num_steps: int, t_frac: float,
                    seed: int = 0) -> torch.Tensor:
    """Real uint8 NHWC images → latents noised by the forward process to the level at which
    :func:`continue_reverse` resumes (timestep ``timesteps[split_index]``): √ᾱ_t·z_0 + √(1−ᾱ_t)·ε."""
    sched, timesteps = reverse_timesteps(bundle, num_steps)
    t = timesteps[split_index(num_steps, t_frac)]
    with torch.no_grad():  # at the model's resolution, so the latents have the shape the reverse process uses
        z0 = bundle.encode(to_model_input(resize_uint8(pixels, bundle.resolution)).to(bundle.device, bundle.dtype))
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed)).to(z0)
    return sched.add_noise(z0, noise, t.expand(len(z0)))


def continue_reverse(
    bundle: DiffusionBundle, z: torch.Tensor | np.ndarray, num_steps: int, t_frac: float, prompt: str = "",
    guidance_scale: float = 1.0, batch_size: int = 128,
) -> np.ndarray:
    """Run reverse steps ``split_index(num_steps, t_frac)`` .. end on latents ``z`` → uint8 NHWC images."""
    split = split_index(num_steps, t_frac)
    sched, timesteps = reverse_timesteps(bundle, num_steps)
    z = torch.as_tensor(z)
    if z.ndim != 4 or tuple(z.shape[1:]) != latent_shape(bundle):
        raise ValueError(f"latents of shape {tuple(z.shape)}, expected (N, *{latent_shape(bundle)})")
    out: list[np.ndarray] = []
    for lo in range(0, z.shape[0], batch_size):
        zb = z[lo : lo + batch_size].to(bundle.device, bundle.dtype)
        zb = ddim_denoise(bundle, zb, sched, timesteps[split:], cfg_context(bundle, [prompt] * len(zb), guidance_scale),
                          guidance_scale)
        with torch.no_grad():
            out.append(to_uint8(bundle.decode(zb)))
    if not out:
        return np.zeros((0, bundle.resolution, bundle.resolution, 3), np.uint8)
    return np.concatenate(out)


def fit_gmm_bic(
    z: np.ndarray, k_max: int = 11, covariance_type: str = "diag", seed: int = 0, reg_covar: float = 1e-6,
) -> tuple[GaussianMixture, list[float]]:
    """Fit GMMs (k-means++ init) for K = 1..min(k_max, n) → (lowest-BIC model, BICs with index 0 ↔ K = 1)."""
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"z must be 2-D (n_samples, n_features), got shape {z.shape}")
    if z.shape[0] < 1 or z.shape[1] < 1:
        raise ValueError(f"z must be non-empty, got shape {z.shape}")
    if not np.isfinite(z).all():
        raise ValueError(f"z contains {int((~np.isfinite(z)).sum())} non-finite values (NaN or inf)")
    if k_max < 1:
        raise ValueError(f"k_max must be at least 1, got {k_max}")
    from sklearn.mixture import GaussianMixture

    best: GaussianMixture | None = None
    bics: list[float] = []
    for k in range(1, min(k_max, z.shape[0]) + 1):
        gmm = GaussianMixture(n_components=k, covariance_type=covariance_type, init_params="k-means++",
                              random_state=seed, reg_covar=reg_covar).fit(z)
        bics.append(float(gmm.bic(z)))
        if best is None or bics[-1] < min(bics[:-1]):
            best = gmm
    assert best is not None
    return best, bics


def sample_components(gmm: GaussianMixture, per_component: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_component`` draws μ_k + σ_k·ε from every component (diag or spherical covariance) → (z (K·n, d)
    float32, component ids int64), component-major; deterministic given ``seed``."""
    means = np.asarray(gmm.means_, dtype=np.float64)
    k, d = means.shape
    if gmm.covariance_type == "diag":
        std = np.sqrt(np.asarray(gmm.covariances_, dtype=np.float64))
    elif gmm.covariance_type == "spherical":
        std = np.sqrt(np.asarray(gmm.covariances_, dtype=np.float64))[:, None] * np.ones((1, d))
    else:
        raise ValueError(f"covariance_type {gmm.covariance_type!r} unsupported (diag or spherical)")
    if per_component < 0:
        raise ValueError(f"per_component must be non-negative, got {per_component}")
    eps = np.random.default_rng(seed).standard_normal((k, per_component, d))
    z = means[:, None, :] + std[:, None, :] * eps
    return z.reshape(k * per_component, d).astype(np.float32), np.repeat(np.arange(k, dtype=np.int64), per_component)


def generate_balanced(
    bundle: DiffusionBundle, gmm: GaussianMixture, per_component: int, seed: int, num_steps: int, t_frac: float,
    prompt: str = "", guidance_scale: float = 1.0, batch_size: int = 128,
) -> tuple[np.ndarray, np.ndarray]:
    """``per_component`` images from every GMM component: mid-trajectory latents from ``sample_components``,
    finished by ``continue_reverse`` → (uint8 NHWC images, component ids)."""
    z, ids = sample_components(gmm, per_component, seed)
    shape = latent_shape(bundle)
    if z.shape[1] != int(np.prod(shape)):
        raise ValueError(f"GMM dimension {z.shape[1]} does not match the latent shape {shape}")
    images = continue_reverse(bundle, torch.from_numpy(z).reshape(-1, *shape), num_steps, t_frac, prompt,
                              guidance_scale, batch_size)
    return images, ids


def bic_plot(ks: list[int], bics: list[float], chosen: int):
    """BIC against K (one line) with the chosen K marked → a matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 3))
    ax = fig.add_subplot()
    ax.plot(list(ks), list(bics), marker="o", color="tab:blue")
    if chosen in list(ks):
        ax.scatter([chosen], [bics[list(ks).index(chosen)]], s=120, facecolors="none", edgecolors="tab:red",
                   zorder=3, label=f"chosen K = {chosen}")
        ax.legend()
    ax.set_xlabel("number of components K")
    ax.set_ylabel("BIC")
    ax.set_xticks(list(ks))
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------------------
# Stage ``gmm`` and ``train/gamma_face``
# --------------------------------------------------------------------------------------------------------------
