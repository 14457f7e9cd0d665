"""DreamBooth-LoRA: one named LoRA adapter on the UNet's attention projections, trained on a few images.

Adapters are peft layers injected with ``unet.add_adapter``; several named adapters coexist on one UNet and
:func:`set_active` switches between them without reloading anything. Saved adapters use the diffusers LoRA
format (``pytorch_lora_weights.safetensors``), so ``StableDiffusionPipeline.load_lora_weights`` reads them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from raydebias._internal.io import as_path, atomic_path, local_copy
from raydebias.data.transforms import resize_uint8, to_model_input
from raydebias.models.diffusion import DiffusionBundle, diffusion_loss

if TYPE_CHECKING:  # peft is imported where adapters are made or saved, not by every importer of the stages
    from peft import LoraConfig

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file save_lora_weights writes


def adapter_names(bundle: DiffusionBundle) -> list[str]:
    """Names of the adapters attached to the UNet."""
    return list(getattr(bundle.unet, "peft_config", None) or {})


def add_lora(
    unet: torch.nn.Module,
    name: str,
    rank: int = 4,
    alpha: float | None = None,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
) -> LoraConfig:
    """Attach a new LoRA adapter ``name`` (rank ``rank``, ``lora_alpha`` = ``alpha`` or ``rank``) and make it
    the only active one. ``lora_B`` starts at zero, so the adapted UNet equals the base until trained."""
    from peft import LoraConfig

    config = LoraConfig(
        r=rank,
        lora_alpha=float(rank if alpha is None else alpha),
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
    )
    unet.add_adapter(config, adapter_name=name)
    return config


def lora_parameters(unet: torch.nn.Module, name: str) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters of adapter ``name`` (peft names them ``...lora_A.<name>.weight``)."""
    keys = (f".lora_A.{name}.", f".lora_B.{name}.")
    return {k: p for k, p in unet.named_parameters() if any(s in k for s in keys)}


def set_active(bundle: DiffusionBundle, names: str | Sequence[str] | None) -> None:
    """Activate the named adapter(s) (their outputs add up), or run the base UNet with ``None``."""
    unet = bundle.unet
    if names is None:
        if adapter_names(bundle):
            unet.disable_adapters()
        return
    names = [names] if isinstance(names, str) else list(names)
    missing = set(names) - set(adapter_names(bundle))
    if missing:
        raise KeyError(f"unknown adapter(s) {sorted(missing)}; attached: {adapter_names(bundle)}")
    unet.enable_adapters()
    unet.set_adapters(names)


def _fingerprint(params: list[torch.Tensor]) -> torch.Tensor:
    """Cheap exact-change detector: per tensor, the float64 sum and sum of squares."""
    with torch.no_grad():
        return torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in params]).cpu()


@torch.no_grad()
def _encode_all(bundle: DiffusionBundle, pixels: np.ndarray, chunk: int = 32) -> torch.Tensor:
    dev, dt = bundle.device, bundle.dtype
    # at the model's resolution (a pretrained model's 512 px, not the dataset's image_size)
    parts = [bundle.encode(to_model_input(resize_uint8(pixels[i : i + chunk], bundle.resolution)).to(dev, dt))
             for i in range(0, len(pixels), chunk)]
    return torch.cat(parts)


def train_lora(
    bundle: DiffusionBundle,
    name: str,
    pixels: np.ndarray,
    prompts: list[str],
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    prior: tuple[np.ndarray, list[str]] | None = None,
    prior_weight: float = 1.0,
    seed: int = 0,
    rank: int = 4,
) -> dict:
    """Train adapter ``name`` (created with ``rank`` if absent) on uint8 NHWC ``pixels`` with their prompts.

    Only that adapter's LoRA weights train; the base UNet, the text encoder and other adapters stay frozen (checked
    after training). ``prior`` = (pixels, prompts) adds DreamBooth's prior-preservation term:
    loss = instance MSE + ``prior_weight`` · prior MSE. Leaves ``name`` as the only active adapter; with a
    half-precision UNet the adapter's weights are trained (and saved) in float32.
    """
    if len(pixels) != len(prompts):
        raise ValueError(f"{len(pixels)} images but {len(prompts)} prompts")
    if len(pixels) == 0 or steps <= 0:
        raise ValueError("need at least one image and one step")
    unet = bundle.unet
    if name not in adapter_names(bundle):
        torch.manual_seed(seed)  # lora_A's initial values: reproducible per adapter
        add_lora(unet, name, rank=rank)
    set_active(bundle, [name])
    trainable = lora_parameters(unet, name)
    if not trainable:
        raise RuntimeError(f"adapter {name!r} has no LoRA parameters (no target module matched?)")
    for m in (unet, bundle.text_encoder, bundle.vae):
        if m is not None:
            m.requires_grad_(False)
    for p in trainable.values():
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()  # half-precision base model: keep the trained LoRA weights in fp32 (as diffusers)
        p.requires_grad_(True)
    frozen = [p for k, p in unet.named_parameters() if k not in trainable]
    before = _fingerprint(frozen)

    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    latents = _encode_all(bundle, pixels)
    all_prompts = list(prompts) + (list(prior[1]) if prior is not None else [])
    uniq = list(dict.fromkeys(all_prompts))
    with torch.no_grad():
        table = bundle.embed_prompts(uniq).to(bundle.dtype)
    row = {p: i for i, p in enumerate(uniq)}
    inst_ids = torch.tensor([row[p] for p in prompts])
    if prior is not None:
        if len(prior[0]) != len(prior[1]) or len(prior[0]) == 0:
            raise ValueError("prior needs as many prompts as images, and at least one image")
        prior_latents = _encode_all(bundle, prior[0])
        prior_ids = torch.tensor([row[p] for p in prior[1]])
    opt = torch.optim.AdamW(list(trainable.values()), lr=lr, weight_decay=1e-2)
    bs = min(batch_size, len(pixels))
    losses: list[float] = []
    unet.train()
    t0 = time.perf_counter()
    try:
        for _ in range(steps):
            idx = torch.from_numpy(rng.integers(0, len(pixels), size=bs))
            z, emb = latents[idx], table[inst_ids[idx]]
            weights = None
            if prior is not None:
                pidx = torch.from_numpy(rng.integers(0, len(prior_latents), size=bs))
                z = torch.cat([z, prior_latents[pidx]])
                emb = torch.cat([emb, table[prior_ids[pidx]]])
                # mean_i(w_i · mse_i) over 2·bs rows with w = 2·[1…, prior_weight…]
                # = instance mean + prior_weight · prior mean
                weights = 2.0 * torch.cat([torch.ones(bs), torch.full((bs,), float(prior_weight))])
            loss = diffusion_loss(bundle, z, emb, generator=gen, weights=weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(trainable.values()), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        unet.eval()
        for p in trainable.values():
            p.requires_grad_(False)
    secs = time.perf_counter() - t0
    if not torch.equal(before, _fingerprint(frozen)):
        raise RuntimeError("frozen weights changed during LoRA training")
    k = max(1, steps // 10)
    return {
        "adapter": name,
        "steps": steps,
        "batch_size": bs,
        "trainable_params": int(sum(p.numel() for p in trainable.values())),
        "loss_first": float(np.mean(losses[:k])),
        "loss_last": float(np.mean(losses[-k:])),
        "seconds": secs,
        "it_per_s": steps / secs if secs > 0 else float("inf"),
    }


def save_lora(bundle: DiffusionBundle, name: str, out_dir: str | os.PathLike) -> Path:
    """Write adapter ``name`` in the diffusers LoRA format (atomically: temp folder, then rename)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    if name not in adapter_names(bundle):
        raise KeyError(f"unknown adapter {name!r}; attached: {adapter_names(bundle)}")
    unet = bundle.unet
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=name))
    state = {k: v.detach().contiguous() for k, v in state.items()}
    metadata = unet.peft_config[name].to_dict()  # keeps lora_alpha/targets, so alpha ≠ rank loads right
    out = as_path(out_dir)
    with atomic_path(out) as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=state, safe_serialization=True, unet_lora_adapter_metadata=metadata
        )
    return out


def load_lora(bundle: DiffusionBundle, lora_dir: str | os.PathLike, name: str) -> None:
    """Attach the diffusers-format adapter in ``lora_dir`` as ``name`` and make it the only active one."""
    bundle.unet.load_lora_adapter(
        local_copy(lora_dir), adapter_name=name, prefix="unet", weight_name=LORA_WEIGHTS, use_safetensors=True
    )
    set_active(bundle, [name])
    for p in lora_parameters(bundle.unet, name).values():
        p.requires_grad_(False)
