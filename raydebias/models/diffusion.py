"""Text-to-image diffusion models: pretrained Stable Diffusion (diffusers layout) or a tiny bootstrap UNet.

Both sources give a :class:`DiffusionBundle` (UNet + CLIP text encoder + tokenizer + DDPM training scheduler +
optional VAE) and share one loader (:func:`load_diffusion`), one loss (:func:`diffusion_loss`) and one sampler
(:func:`sample`). The bootstrap model works in *pixel space*: ``F.pixel_unshuffle(x, f)`` turns a 32×32×3 image
into a lossless (32/f)×(32/f)×3f² "latent" (f = 2: 16×16×12, f = 4: 8×8×48), so no VAE has to be trained
(see docs/methods/bootstrap.md); f is read back from the saved UNet's ``in_channels``.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from raydebias._internal.io import atomic_path
from raydebias.config import DiffusionModelConfig
from raydebias.data.transforms import to_model_input

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
        from raydebias.models.clip import clip_tokenizer

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


def _to_uint8(x: torch.Tensor) -> np.ndarray:
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
    g_p scales what the class word adds *given* the bias word (g_p = g is plain CFG). README, "Generation fidelity".
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
        out.append(_to_uint8(bundle.decode(ddim_denoise(bundle, z, sched, sched.timesteps, ctx, guidance_scale,
                                                        partial_guidance_scale))))
    if not out:
        return np.zeros((0, bundle.resolution, bundle.resolution, 3), np.uint8)
    return np.concatenate(out)


@torch.no_grad()
def conditioning_gap(bundle: DiffusionBundle, latents: torch.Tensor, ids: torch.Tensor, empty_ids: torch.Tensor,
                     seed: int = 0, batch_size: int = 256) -> tuple[float, float]:
    """Mean denoising loss of ``latents`` with their captions' token ``ids`` and with the empty caption, at the
    same timesteps and noise (drawn from ``seed``): ``(loss_conditional, loss_unconditional)``. Their relative
    difference measures how much the model uses its captions; it falls to ~0 when it stops following them."""
    was_training = bundle.unet.training, bundle.text_encoder.training
    bundle.unet.eval()
    bundle.text_encoder.eval()
    lc = lu = 0.0
    for i in range(0, len(latents), batch_size):
        z = latents[i : i + batch_size]
        for key, rows in (("c", ids), ("u", empty_ids)):
            g = torch.Generator().manual_seed(seed + i)
            loss = float(diffusion_loss(bundle, z, bundle.embed_ids(rows[i : i + batch_size]), generator=g)) * len(z)
            if key == "c":
                lc += loss
            else:
                lu += loss
    bundle.unet.train(was_training[0])
    bundle.text_encoder.train(was_training[1])
    return lc / len(latents), lu / len(latents)


def train_bootstrap_diffusion(
    bundle: DiffusionBundle,
    pixels: np.ndarray,
    captions: list[str],
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    drop_probs: dict[str, float] | None = None,
    caption_dropout_fn: Callable[[str, np.random.Generator], str] | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
    shift: int = 0,
    log_every: int = 100,
    min_snr_gamma: float = 0.0,
    ema_decay: float = 0.0,
    freeze_token_embedding: bool = False,
    p2_gamma: float = 0.0,
    p2_k: float = 1.0,
    sample_weights: np.ndarray | None = None,
    checkpoint_every: int = 0,
    lr_schedule: str = "constant",
    on_checkpoint: Callable[[int, dict], None] | None = None,
    resume: dict | None = None,
    guard_pixels: np.ndarray | None = None,
    guard_captions: list[str] | None = None,
    guard_every: int = 0,
    guard_ratio: float = 0.5,
    guard_min_gap: float = 0.005,
) -> dict:
    """Train UNet + text encoder jointly (AdamW, grad-clip 1) on uint8 NHWC ``pixels`` with their captions.

    Conditioning guard (``guard_every`` > 0, on held-out ``guard_pixels``/``guard_captions``): every ``guard_every``
    steps :func:`conditioning_gap` measures how much the captions lower the denoising loss. The weights (and
    optimizer) with the largest gap so far are kept in memory; when the gap falls below ``guard_ratio`` × that best
    (the model stopped following its captions: the conditioning collapse of README "Generation fidelity") training
    rolls back to them and continues at half the learning rate, and a collapsed final model is replaced by them.
    Both act only once the best gap reached ``guard_min_gap`` (early in training the gap is ~0 and noisy).

    ``lr_schedule``: ``constant`` after the warm-up, or ``cosine`` decay to 0 at ``steps``.
    Every ``checkpoint_every`` steps ``on_checkpoint(steps_done, state)`` gets the full training state (weights,
    optimizer, schedule, EMA, both random generators, losses); ``resume=state`` continues from it, so a run
    resumed at step k ends with the same weights as an uninterrupted one.

    Caption dropout for classifier-free guidance: the whole caption becomes "" with probability
    ``drop_probs["all"]`` (default 0.1); otherwise ``caption_dropout_fn(caption, rng)`` (e.g. per-word
    dropout built by the caller) is applied. ``shift`` > 0 adds a random translation of up to ``shift`` pixels
    (zero padding). ``min_snr_gamma``, ``p2_gamma``, ``p2_k``: see :func:`diffusion_loss`. ``ema_decay`` > 0 keeps
    an exponential moving average of the weights (diffusers ``EMAModel`` with warm-up, decay capped at
    ``ema_decay``) and leaves the averaged weights in the model at the end (no measurable gain in 1,000-step CPU runs; meant for long runs).
    ``freeze_token_embedding`` leaves the text encoder's token table at its (random) initial values.
    ``sample_weights`` (one per image) draws each batch with those relative probabilities instead of uniformly.
    Returns loss statistics and the speed.
    """
    if len(pixels) != len(captions):
        raise ValueError(f"{len(pixels)} images but {len(captions)} captions")
    if len(pixels) == 0 or steps <= 0:
        raise ValueError("need at least one image and one step")
    if sample_weights is not None and len(sample_weights) != len(pixels):
        raise ValueError(f"{len(sample_weights)} sample weights for {len(pixels)} images")
    probs = None if sample_weights is None else np.asarray(sample_weights, np.float64) / np.sum(sample_weights)
    p_all = float((drop_probs or {"all": 0.1}).get("all", 0.0))
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    device = bundle.device
    unet, te = bundle.unet, bundle.text_encoder
    frozen = {id(te.get_input_embeddings().weight)} if freeze_token_embedding else set()
    params = [p for m in (unet, te) for p in m.parameters() if id(p) not in frozen]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    warmup = max(1, min(100, steps // 10))

    def lr_factor(i: int) -> float:  # linear warm-up, then constant or cosine decay to 0 at ``steps``
        if i + 1 < warmup:
            return (i + 1) / warmup
        if lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (i + 1 - warmup) / max(1, steps - warmup))))
        return 1.0

    sch = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    ema = None
    if ema_decay > 0:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3, foreach=True)
    token_cache: dict[str, torch.Tensor] = {}

    def ids_for(caps: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(caps) if c not in token_cache]
        if missing:
            for c, row in zip(missing, bundle.tokenize(missing)):
                token_cache[c] = row
        return torch.stack([token_cache[c] for c in caps])

    guard = None
    if guard_every > 0:
        if guard_pixels is None or guard_captions is None or len(guard_pixels) != len(guard_captions) \
                or len(guard_pixels) == 0:
            raise ValueError("guard_every > 0 needs guard_pixels and as many guard_captions")
        with torch.no_grad():
            guard_z = bundle.encode(to_model_input(guard_pixels).to(device, unet.dtype))
        guard_ids = (ids_for(list(guard_captions)), ids_for([""] * len(guard_captions)))
        guard = {"best_gap": -math.inf, "best_step": 0, "history": [], "rollbacks": [], "restored_best": False}
    best: dict | None = None

    def snapshot() -> dict:
        clone = lambda sd: {k: v.detach().clone() for k, v in sd.items()}  # noqa: E731
        return {"unet": clone(unet.state_dict()), "text_encoder": clone(te.state_dict()),
                "optimizer": copy.deepcopy(opt.state_dict()), "ema": copy.deepcopy(ema.state_dict()) if ema else None}

    def restore(snap: dict, optimizer: bool = True) -> None:
        unet.load_state_dict(snap["unet"])
        te.load_state_dict(snap["text_encoder"])
        if optimizer:
            opt.load_state_dict(snap["optimizer"])
            if ema is not None and snap["ema"] is not None:
                ema.load_state_dict(snap["ema"])

    def check_guard(step_done: int) -> float:
        nonlocal best
        lc, lu = conditioning_gap(bundle, guard_z, *guard_ids, seed=seed)
        gap = (lu - lc) / max(lu, 1e-12)
        guard["history"].append([step_done, round(lc, 5), round(gap, 5)])
        if log is not None:
            log(f"diffusion step {step_done}/{steps} conditioning gap {gap:.4f} (val loss {lc:.4f})")
        if gap >= guard["best_gap"]:
            guard["best_gap"], guard["best_step"], best = gap, step_done, snapshot()
        elif guard["best_gap"] >= guard_min_gap and gap < guard_ratio * guard["best_gap"] and step_done < steps:
            restore(best)
            sch.base_lrs = [b * 0.5 for b in sch.base_lrs]
            guard["rollbacks"].append([step_done, guard["best_step"]])
            if log is not None:
                log(f"diffusion step {step_done}: conditioning gap {gap:.4f} < {guard_ratio} x best "
                    f"{guard['best_gap']:.4f} (step {guard['best_step']}): rolled back, lr halved")
        return gap

    losses: list[float] = []
    start = 0
    if resume is not None:
        start = int(resume["step"])
        unet.load_state_dict(resume["unet"])
        te.load_state_dict(resume["text_encoder"])
        opt.load_state_dict(resume["optimizer"])
        sch.load_state_dict(resume["scheduler"])
        if ema is not None and resume.get("ema") is not None:
            ema.load_state_dict(resume["ema"])
        rng.bit_generator.state = resume["numpy_rng"]
        gen.set_state(resume["torch_rng"])
        losses = list(resume["losses"])
        if guard is not None and resume.get("guard") is not None:
            guard = resume["guard"]
            best = {k: resume[f"best_{k}"] for k in ("unet", "text_encoder", "optimizer", "ema")}
        if log is not None:
            log(f"diffusion: resumed at step {start}/{steps}")
    unet.train()
    te.train()
    t0 = time.perf_counter()
    try:
        for step in range(start, steps):
            size = min(batch_size, len(pixels))
            idx = rng.integers(0, len(pixels), size=size) if probs is None else rng.choice(len(pixels), size, p=probs)
            x = to_model_input(pixels[idx]).to(device)
            if shift > 0:
                h, w = x.shape[-2:]
                xp = F.pad(x, (shift, shift, shift, shift), value=-1.0)
                dy, dx = rng.integers(0, 2 * shift + 1, size=(2, len(idx)))
                x = torch.stack([xp[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(len(idx))])
            caps = []
            for i in idx:
                c = captions[i]
                if rng.random() < p_all:
                    c = ""
                elif caption_dropout_fn is not None:
                    c = caption_dropout_fn(c, rng)
                caps.append(c)
            with torch.no_grad():
                z = bundle.encode(x.to(unet.dtype))
            emb = bundle.embed_ids(ids_for(caps))
            loss = diffusion_loss(bundle, z, emb, generator=gen, min_snr_gamma=min_snr_gamma, p2_gamma=p2_gamma,
                                  p2_k=p2_k)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sch.step()
            if ema is not None:
                ema.step(params)
            losses.append(float(loss.detach()))
            if guard is not None and (step + 1) % guard_every == 0:
                check_guard(step + 1)
            if on_checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 \
                    and step + 1 < steps:
                on_checkpoint(step + 1, {
                    "step": step + 1, "unet": unet.state_dict(), "text_encoder": te.state_dict(),
                    "optimizer": opt.state_dict(), "scheduler": sch.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "numpy_rng": rng.bit_generator.state, "torch_rng": gen.get_state(), "losses": losses,
                    **({"guard": guard, **{f"best_{k}": v for k, v in best.items()}} if best is not None else {})})
            if log is not None and log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
                rate = (step + 1 - start) / (time.perf_counter() - t0)
                log(f"diffusion step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.4f} ({rate:.2f} it/s)")
        if ema is not None:
            ema.copy_to(params)
        if guard is not None:
            final = guard["history"][-1][2] if guard["history"] and guard["history"][-1][0] == steps \
                else check_guard(steps)
            if best is not None and guard["best_gap"] >= guard_min_gap and final < guard_ratio * guard["best_gap"]:
                restore(best, optimizer=False)
                if ema is not None and best["ema"] is not None:
                    ema.load_state_dict(best["ema"])
                    ema.copy_to(params)
                guard["restored_best"] = True
                if log is not None:
                    log(f"diffusion: final conditioning gap {final:.4f} < {guard_ratio} x best "
                        f"{guard['best_gap']:.4f}: kept the step-{guard['best_step']} weights")
    finally:
        unet.eval()
        te.eval()
        for p in params:
            p.requires_grad_(False)
    secs = time.perf_counter() - t0
    k = max(1, steps // 10)
    return {
        "steps": steps,
        "resumed_at": start,
        "batch_size": int(min(batch_size, len(pixels))),
        "loss_first": float(np.mean(losses[:k])),
        "loss_last": float(np.mean(losses[-k:])),
        "loss_mean": float(np.mean(losses)),
        "seconds": secs,
        "it_per_s": (steps - start) / secs if secs > 0 else float("inf"),
        **({"guard": {k: v for k, v in guard.items()}} if guard is not None else {}),
    }


def save_tiny_stable_diffusion(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny random-weight checkpoint in the real Stable Diffusion layout (``StableDiffusionPipeline``:
    VAE ×2 down-sampling, 16 px images, 32-wide UNet/text encoder, PNDM scheduler), for tests and offline smoke
    runs of the pretrained code path."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from raydebias.models.clip import clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=32, sample_size=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                       vocab_size=49408, max_position_embeddings=MAX_TOKENS, projection_dim=32, pad_token_id=0)
    )
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    out = Path(out_dir)
    with atomic_path(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out
