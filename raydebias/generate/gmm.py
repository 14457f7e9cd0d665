"""GAMMA-FACE (METHODS.md §4): a Gaussian mixture over mid-trajectory diffusion latents, sampled equally per component.

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

import numpy as np
import torch
from diffusers import DDIMScheduler
from sklearn.mixture import GaussianMixture

from raydebias.models.diffusion import (DiffusionBundle, _to_uint8, cfg_context, ddim_denoise, initial_noise,
                                       latent_shape)


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
    from raydebias.data.transforms import to_model_input

    sched, timesteps = reverse_timesteps(bundle, num_steps)
    t = timesteps[split_index(num_steps, t_frac)]
    with torch.no_grad():
        z0 = bundle.encode(to_model_input(pixels).to(bundle.device, bundle.dtype))
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
            out.append(_to_uint8(bundle.decode(zb)))
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


def gmm_task(run_dir: str, cfg_json: str, n_generate: int, threads: int) -> dict:
    """Ray task: latents (forward-noised real images or the ``ddpm`` model's reverse trajectories, unconditional)
    → BIC-selected GMM → equal sampling
    per component. Writes ``stages/gmm/{latent_gmm.npz, bic.json}`` and returns the images and components."""
    import json
    from pathlib import Path

    from raydebias._internal.io import atomic_path, atomic_write_json
    from raydebias.config import RunConfig
    from raydebias.diffusion.ddpm import load_ddpm

    torch.set_num_threads(threads)
    cfg = RunConfig.model_validate_json(cfg_json)
    g, out = cfg.gamma_face, Path(run_dir) / "stages" / "gmm"
    bundle = load_ddpm(Path(run_dir))
    if g.latents == "forward":  # real training images noised to the split level (paper §4.3)
        from raydebias.data.splits import load_split

        info = json.loads((Path(run_dir) / "stages" / "data" / "info.json").read_text())
        x = load_split(Path(run_dir) / "stages" / "data" / "train.parquet", info["image_size"])["x"]
        x = x[np.random.default_rng(cfg.seed).permutation(len(x))[: g.num_latents]]
        z = forward_latents(bundle, x, g.num_steps, g.t_frac, cfg.seed)
    else:  # the model's own reverse trajectories from noise, stopped at the split
        seeds = [cfg.seed * 1_000_003 + 500_000 + i for i in range(g.num_latents)]
        z = collect_latents(bundle, seeds, g.num_steps, g.t_frac)
    z = z.flatten(1).float().cpu().numpy()
    gmm, bics = fit_gmm_bic(z, k_max=g.k_max, seed=cfg.seed)
    k = int(gmm.n_components)
    per_component = -(-n_generate // k)
    images, comp = generate_balanced(bundle, gmm, per_component, cfg.seed, g.num_steps, g.t_frac)
    with atomic_path(out / "latent_gmm.npz") as tmp, open(tmp, "wb") as f:  # our own format: plain arrays
        np.savez(f, weights=gmm.weights_, means=gmm.means_, covariances=gmm.covariances_)
    atomic_write_json(out / "bic.json", {"k": list(range(1, len(bics) + 1)), "bic": bics, "chosen": k,
                                         "latents": g.latents,
                                         "latent_dim": int(z.shape[1]), "num_latents": int(z.shape[0])})
    return {"images": images[:n_generate], "component": comp[:n_generate], "k": k}


def run_gmm(ctx):
    """GAMMA-FACE generation (a Ray task) + pseudo-labels from the ``labeler`` classifier → ``generated.parquet``."""
    import pyarrow as pa
    import ray

    from raydebias._internal.io import atomic_write_json, atomic_write_table
    from raydebias.models.classifier import load_classifier, predict
    from raydebias.core import StageResult

    cfg, info, g = ctx.cfg, ctx.data_info, ctx.cfg.gamma_face
    out = ctx.stage_dir("gmm")
    n_generate = max(1, int(round(g.mix_ratio * info["counts"]["train"])))
    ctx.log(f"[gmm] {g.num_latents} {g.latents} latents at {g.t_frac:.2f} of {g.num_steps} DDIM steps → GMM "
            f"(K ≤ {g.k_max} by BIC) → {n_generate} images, equal per component")
    ctx.ensure_ray()
    task = ray.remote(num_cpus=g.num_cpus, num_gpus=cfg.ray.num_gpus_per_worker or 0, max_retries=1,
                      retry_exceptions=True)(gmm_task)
    res = ray.get(task.remote(str(ctx.run_dir), cfg.model_dump_json(), n_generate, max(1, int(g.num_cpus))))
    model, _ = load_classifier(ctx.run_dir / "stages" / "train" / g.labeler)
    torch.set_num_threads(max(1, int(cfg.ray.num_cpus or 2)))
    probs = predict(model, res["images"])
    label, conf = probs.argmax(1), probs.max(1)
    keep = conf >= g.min_confidence
    atomic_write_table(out / "generated.parquet", pa.table({
        "row": np.arange(len(label), dtype=np.int64), "component": res["component"], "label": label.astype(np.int64),
        "confidence": conf.astype(np.float32), "kept": keep,
        "pixels": [np.ascontiguousarray(p).tobytes() for p in res["images"]]}))
    C = info["num_classes"]
    stats = {"k": res["k"], "generated": int(len(label)), "kept": int(keep.sum()), "labeler": g.labeler,
             "label_histogram_per_component": [np.bincount(label[res["component"] == c], minlength=C).tolist()
                                               for c in range(res["k"])]}
    atomic_write_json(out / "stats.json", stats)
    ctx.log(f"[gmm] K = {res['k']}; kept {stats['kept']}/{stats['generated']} pseudo-labelled images")
    return StageResult([ctx.rel(out / p) for p in ("generated.parquet", "bic.json", "latent_gmm.npz", "stats.json")],
                       {k: v for k, v in stats.items() if k != "label_histogram_per_component"})


def run_train_gamma_face(ctx):
    """Retrain on real ∪ generated (the kept pseudo-labelled images); val selects the epoch."""
    import pyarrow.parquet as pq

    from raydebias.debias.train import fit_augmented

    gen = pq.read_table(ctx.run_dir / "stages" / "gmm" / "generated.parquet")
    return fit_augmented(ctx, "gamma_face", gen.filter(gen.column("kept")))
