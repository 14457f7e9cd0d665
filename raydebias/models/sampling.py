"""Sampling a :class:`~raydebias.models.diffusion.DiffusionBundle`: per-row seeded noise, DDIM with
classifier-free or compositional guidance, uint8 images out."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDIMScheduler

from raydebias.models.diffusion import DiffusionBundle


def to_uint8(x: torch.Tensor) -> np.ndarray:
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def latent_shape(bundle: DiffusionBundle) -> tuple[int, int, int]:
    """(C, H, W) of one latent, from the UNet config."""
    cfg = bundle.unet.config
    size = cfg.sample_size[0] if isinstance(cfg.sample_size, (list, tuple)) else cfg.sample_size
    return (int(cfg.in_channels), int(size), int(size))


def initial_noise(bundle: DiffusionBundle, seeds: list[int], init_noise_sigma: float = 1.0) -> torch.Tensor:
    """x_T for each row: ``torch.randn`` from ``torch.Generator().manual_seed(seed)`` (independent of batching)."""
    shape = latent_shape(bundle)
    z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    return z.to(bundle.device, bundle.dtype) * init_noise_sigma


def cfg_context(bundle: DiffusionBundle, prompts: list[str], guidance_scale: float,
                negative_prompt: str = "", partial_prompts: list[str] | None = None) -> torch.Tensor:
    """Cross-attention context for :func:`ddim_denoise`: [uncond; cond] when guiding, else cond;
    [uncond; partial; cond] with ``partial_prompts`` (compositional guidance)."""
    cond = bundle.embed_prompts(list(prompts)).to(bundle.dtype)
    if guidance_scale == 1.0 and partial_prompts is None:
        return cond
    uncond = bundle.embed_prompts([negative_prompt]).to(bundle.dtype).expand(len(prompts), -1, -1)
    if partial_prompts is None:
        return torch.cat([uncond, cond])
    return torch.cat([uncond, bundle.embed_prompts(list(partial_prompts)).to(bundle.dtype), cond])


@torch.no_grad()
def ddim_denoise(bundle: DiffusionBundle, z: torch.Tensor, sched: DDIMScheduler, timesteps, context: torch.Tensor,
                 guidance_scale: float, partial_guidance_scale: float | None = None) -> torch.Tensor:
    """DDIM (η = 0) over ``timesteps`` (all or a slice of ``sched.timesteps``) with classifier-free guidance.

    With ``partial_guidance_scale`` (context [uncond; partial; cond]) the guidance is compositional:
    ε = ε_u + g·(ε_partial − ε_u) + g_p·(ε_cond − ε_partial) — with partial = the prompt without the class word,
    g_p scales what the class word adds *given* the bias word (g_p = g is plain CFG). BENCHMARKS.md, "Generation
    fidelity: findings".
    """
    ways = 1 if guidance_scale == 1.0 and partial_guidance_scale is None else \
        (2 if partial_guidance_scale is None else 3)
    for t in timesteps:
        inp = sched.scale_model_input(torch.cat([z] * ways) if ways > 1 else z, t)
        pred = bundle.predict(inp, t.to(bundle.device), context)
        if ways == 2:
            pu, pc = pred.chunk(2)
            pred = pu + guidance_scale * (pc - pu)
        elif ways == 3:
            pu, pp, pc = pred.chunk(3)
            pred = pu + guidance_scale * (pp - pu) + partial_guidance_scale * (pc - pp)
        z = sched.step(pred, t, z, eta=0.0).prev_sample
    return z


@torch.no_grad()
def sample(
    bundle: DiffusionBundle,
    prompts: list[str],
    num_steps: int = 10,
    guidance_scale: float = 2.0,
    seeds: list[int] | None = None,
    negative_prompt: str = "",
    batch_size: int = 64,
    partial_prompts: list[str] | None = None,
    partial_guidance_scale: float | None = None,
) -> np.ndarray:
    """DDIM (η = 0) sampling with classifier-free guidance → uint8 NHWC images.

    Row i starts from noise drawn by ``torch.Generator().manual_seed(seeds[i])``, so its image depends only on
    (model, prompt, seed), not on the batch it shares (default seeds: 0..N−1). ``partial_prompts`` (one per row)
    with ``partial_guidance_scale``: compositional guidance (:func:`ddim_denoise`).
    """
    prompts = list(prompts)
    seeds = list(range(len(prompts))) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    if (partial_prompts is None) != (partial_guidance_scale is None):
        raise ValueError("compositional guidance needs both partial_prompts and partial_guidance_scale")
    if partial_prompts is not None and len(partial_prompts) != len(prompts):
        raise ValueError(f"{len(partial_prompts)} partial prompts for {len(prompts)} prompts")
    sched = DDIMScheduler.from_config(bundle.noise_scheduler.config)
    sched.set_timesteps(num_steps)
    out: list[np.ndarray] = []
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo : lo + batch_size]
        z = initial_noise(bundle, seeds[lo : lo + len(chunk)], sched.init_noise_sigma)
        part = None if partial_prompts is None else list(partial_prompts[lo : lo + len(chunk)])
        ctx = cfg_context(bundle, chunk, guidance_scale, negative_prompt, part)
        out.append(to_uint8(bundle.decode(ddim_denoise(bundle, z, sched, sched.timesteps, ctx, guidance_scale,
                                                        partial_guidance_scale))))
    if not out:
        return np.zeros((0, bundle.resolution, bundle.resolution, 3), np.uint8)
    return np.concatenate(out)
