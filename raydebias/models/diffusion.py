"""Text-to-image diffusion models: pretrained Stable Diffusion (diffusers layout) or a tiny bootstrap UNet.

Both sources give a :class:`DiffusionBundle` (UNet + CLIP text encoder + tokenizer + DDPM training scheduler +
optional VAE) and share one loader (:func:`load_diffusion`), one loss (:func:`diffusion_loss`), one sampler
(:mod:`raydebias.models.sampling`) and, for the bootstrap source, one trainer
(:mod:`raydebias.models.diffusion_training`). The bootstrap model works in *pixel space*: ``F.pixel_unshuffle(x, f)`` turns a 32×32×3 image
into a lossless (32/f)×(32/f)×3f² "latent" (f = 2: 16×16×12, f = 4: 8×8×48), so no VAE has to be trained
(see docs/methods/bootstrap.md); f is read back from the saved UNet's ``in_channels``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from raydebias._internal.io import atomic_path
from raydebias.config import DiffusionModelConfig
from raydebias.models.clip import clip_tokenizer

MAX_TOKENS = 77
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class DiffusionBundle:
    """The components of a text-to-image latent (or pixel-space) diffusion model."""

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    vae: AutoencoderKL | None
    resolution: int

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def unshuffle(self) -> int:
        """The pixel-unshuffle factor of a pixel-space (VAE-less) model."""
        return _unshuffle_factor(self.unet)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "DiffusionBundle":
        """Move every module (in place) and return ``self``."""
        for m in (self.unet, self.text_encoder, self.vae):
            if m is not None:
                m.to(device=device, dtype=dtype)
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], NCHW → latents (VAE mean × scaling factor; pixel mode: f× pixel-unshuffle)."""
        if self.vae is None:
            return F.pixel_unshuffle(x, self.unshuffle)
        x = x.to(device=self.vae.device, dtype=self.vae.dtype)
        z = self.vae.encode(x).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (z - shift) * self.vae.config.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`encode`: latents → images in (about) [-1, 1], NCHW."""
        if self.vae is None:
            return F.pixel_shuffle(z, self.unshuffle)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = z.to(device=self.vae.device, dtype=self.vae.dtype) / self.vae.config.scaling_factor + shift
        return self.vae.decode(z).sample

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids (N, tokenizer.model_max_length), padded to that length as Stable Diffusion does."""
        return self.tokenizer(
            list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    def predict(self, x: torch.Tensor, t, context: torch.Tensor) -> torch.Tensor:
        """The UNet's output for latents ``x`` at timestep(s) ``t`` given the text context (N, tokens, width)."""
        return self.unet(x, t, encoder_hidden_states=context.to(self.unet.dtype)).sample

    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts → text-encoder ``last_hidden_state`` (N, 77, width), the UNet's cross-attention context."""
        return self.embed_ids(self.tokenize(prompts))

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write the diffusers folder layout (unet/, text_encoder/, tokenizer/, scheduler/, vae/ if any) atomically.

        With a VAE the folder is a full ``StableDiffusionPipeline`` (``model_index.json`` included). The UNet must
        carry no LoRA adapters (save those with ``finetune.dreambooth_lora.save_lora``).
        """
        if getattr(self.unet, "_hf_peft_config_loaded", False) and getattr(self.unet, "peft_config", None):
            raise ValueError("the UNet has LoRA adapters attached; save them with save_lora, not with the base model")
        out = Path(out_dir)
        with atomic_path(out) as tmp:
            if self.vae is not None:
                from diffusers import StableDiffusionPipeline

                StableDiffusionPipeline(
                    vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
                    scheduler=self.noise_scheduler, safety_checker=None, feature_extractor=None,
                    requires_safety_checker=False,
                ).save_pretrained(tmp, safe_serialization=True)
            else:
                tmp.mkdir(parents=True)
                self.unet.save_pretrained(tmp / "unet", safe_serialization=True)
                self.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
                self.tokenizer.save_pretrained(tmp / "tokenizer")
                self.noise_scheduler.save_pretrained(tmp / "scheduler")
        return out


def _unshuffle_factor(unet: UNet2DConditionModel) -> int:
    """f of a pixel-space UNet from its input channels: in_channels = 3·f²."""
    return int(round(math.sqrt(unet.config.in_channels / 3)))


def _norm_groups(channels: list[int]) -> int:
    return math.gcd(32, *channels)


def bootstrap_diffusion(cfg: DiffusionModelConfig, tokenizer: CLIPTokenizer | None = None) -> DiffusionBundle:
    """A tiny text-conditioned pixel-space model built from ``cfg`` (random weights, trained in-run)."""
    if tokenizer is None:
        tokenizer = clip_tokenizer()
    tokenizer.model_max_length = cfg.max_tokens
    f = cfg.unshuffle
    if cfg.resolution % f:
        raise ValueError(f"resolution {cfg.resolution} is not a multiple of the pixel-unshuffle factor {f}")
    channels = list(cfg.block_out_channels)
    n = len(channels)
    # Cross-attention at the lowest resolution (+ the middle block) or only in the middle block; attention is
    # most of a CPU step at these sizes (docs/methods/bootstrap.md), the ResNet blocks still see the caption
    # through the time embedding when text_time_embedding is on.
    attn_last = cfg.cross_attention == "all"
    down = ["DownBlock2D"] * (n - 1) + ["CrossAttnDownBlock2D" if attn_last else "DownBlock2D"]
    unet = UNet2DConditionModel(
        sample_size=cfg.resolution // f,
        in_channels=3 * f * f,
        out_channels=3 * f * f,
        block_out_channels=tuple(channels),
        down_block_types=tuple(down),
        up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cfg.text_width,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=_norm_groups(channels),
        addition_embed_type="text" if cfg.text_time_embedding else None,
        addition_embed_type_num_heads=max(1, cfg.text_width // 16),
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=cfg.text_width,
            intermediate_size=2 * cfg.text_width,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=max(1, cfg.text_width // 16),
            vocab_size=49408,
            max_position_embeddings=cfg.max_tokens,
            projection_dim=cfg.text_width,
            pad_token_id=0,
            bos_token_id=49406,
            eos_token_id=49407,
        )
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=cfg.prediction_type,
        clip_sample=False,
        timestep_spacing="trailing",  # few-step DDIM then starts at t = 999 (pure noise), not 900
    )
    unet.eval()
    text_encoder.eval()
    return DiffusionBundle(unet, text_encoder, tokenizer, scheduler, None, cfg.resolution)


def load_diffusion(path_or_id: str, dtype: str = "float32", revision: str | None = None) -> DiffusionBundle:
    """Load a diffusers-layout model: real Stable Diffusion weights (local dir or hub id) or a saved bundle.

    Weights load from safetensors only (``use_safetensors=True``: a folder with only pickled ``.bin`` weights is
    an error, never unpickled). ``revision`` pins a hub id to a commit. ``vae/`` is loaded when the local folder
    has one (hub ids are assumed to); without it the model is a pixel-space bootstrap bundle.
    """
    torch_dtype = _DTYPES[dtype]
    p = str(path_or_id)
    kw = {"use_safetensors": True, "revision": revision}
    unet = UNet2DConditionModel.from_pretrained(p, subfolder="unet", torch_dtype=torch_dtype, **kw)
    text_encoder = CLIPTextModel.from_pretrained(p, subfolder="text_encoder", torch_dtype=torch_dtype, **kw)
    tokenizer = CLIPTokenizer.from_pretrained(p, subfolder="tokenizer", revision=revision)
    limit = min(MAX_TOKENS, text_encoder.config.max_position_embeddings)
    if tokenizer.model_max_length is None or tokenizer.model_max_length > limit:
        tokenizer.model_max_length = limit  # a file-built tokenizer has none: the pipeline then overflows
    scheduler = DDPMScheduler.from_pretrained(p, subfolder="scheduler", revision=revision)
    has_vae = (Path(p) / "vae").is_dir() if os.path.isdir(p) else True
    vae = AutoencoderKL.from_pretrained(p, subfolder="vae", torch_dtype=torch_dtype, **kw) if has_vae else None
    sample_size = unet.config.sample_size
    sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else _unshuffle_factor(unet)
    for m in (unet, text_encoder, vae):
        if m is not None:
            m.eval()
    return DiffusionBundle(unet, text_encoder, tokenizer, scheduler, vae, int(sample_size) * factor)


def diffusion_loss(
    bundle: DiffusionBundle,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    generator: torch.Generator | None = None,
    timesteps: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    min_snr_gamma: float = 0.0,
    p2_gamma: float = 0.0,
    p2_k: float = 1.0,
    noise: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Denoising loss: MSE between the UNet output and the noise (ε-prediction) or velocity (v-prediction).

    ``generator`` (a CPU generator) draws t and the noise reproducibly, unless ``timesteps`` / ``noise`` are
    given; ``weights`` (B,) gives ``mean_i(w_i · mse_i)``; ``reduction="none"`` returns the (weighted) per-sample
    losses instead of their mean. ``min_snr_gamma`` > 0 applies Min-SNR-γ weighting (Hang et al. 2023), expressed
    for the model's target: min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v. ``p2_gamma`` > 0 applies P2
    weighting (Choi et al. 2022; DiffInject) λ = 1/(k + SNR)^γ on the ε-loss, i.e. λ·SNR/(SNR + 1) on the v-loss
    (‖ε̂ − ε‖² = SNR/(SNR + 1)·‖v̂ − v‖²).
    """
    sched = bundle.noise_scheduler
    b = latents.shape[0]
    device = latents.device
    if timesteps is None:
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=generator)
    timesteps = timesteps.to(device=device, dtype=torch.long)
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    noise = noise.to(device, latents.dtype)
    noisy = sched.add_noise(latents, noise, timesteps)
    kind = sched.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = sched.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")
    pred = bundle.predict(noisy, timesteps, prompt_embeds)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    if min_snr_gamma > 0 or p2_gamma > 0:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(sched, timesteps).float()
        to_target = torch.ones_like(snr) if kind == "epsilon" else snr / (snr + 1)  # ε-space weight → target's
        if min_snr_gamma > 0:
            per_sample = per_sample * snr.clamp(max=min_snr_gamma) / snr * to_target
        if p2_gamma > 0:
            per_sample = per_sample * (p2_k + snr).pow(-p2_gamma) * to_target
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample)
    return per_sample if reduction == "none" else per_sample.mean()


def coind_loss(bundle: DiffusionBundle, latents: torch.Tensor, contexts: tuple[torch.Tensor, ...],
               generator: torch.Generator | None = None) -> torch.Tensor:
    """CoInD's conditional-independence term (Gaudi et al. 2025, "CoInD: Enabling Logical Compositions in
    Diffusion Models", Eq. L_CI for two attributes): ``mean ‖ε(c_y) + ε(c_a) − ε(∅) − ε(c_y, c_a)‖²`` at the same
    noisy latents and timesteps, so that the joint score equals the sum of the two conditional marginals' minus the
    unconditional one (p(x | y, a) ∝ p(x | y) p(x | a) / p(x)). ``contexts`` = the text contexts of the full
    caption, the class-only caption, the bias-only caption and the empty caption, each (N, tokens, width). The
    relation is affine-invariant, so it holds for v-prediction outputs too."""
    if len(contexts) != 4:
        raise ValueError("coind_loss needs 4 contexts: full, class only, bias only, empty")
    sched = bundle.noise_scheduler
    b = latents.shape[0]
    t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=generator).to(latents.device)
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
    noisy = sched.add_noise(latents, noise, t)
    pred = bundle.predict(noisy.repeat(4, *([1] * (noisy.dim() - 1))), t.repeat(4), torch.cat(contexts))
    full, cls, bias, empty = pred.float().chunk(4)
    return F.mse_loss(cls + bias, empty + full)
