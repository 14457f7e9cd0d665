"""Tiny random-weight models in real layouts, for tests and offline smoke runs of the pretrained path."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from raydebias._internal.io import atomic_path, save_weights
from raydebias.config import ClipModelConfig
from raydebias.models.clip import clip_tokenizer, tiny_model_config
from raydebias.models.diffusion import MAX_TOKENS


def save_tiny_stable_diffusion(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny random-weight checkpoint in the real Stable Diffusion layout (``StableDiffusionPipeline``:
    VAE ×2 down-sampling, 16 px images, 32-wide UNet/text encoder, PNDM scheduler), for tests and offline smoke
    runs of the pretrained code path."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

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


def save_tiny_open_clip(out_dir: str | os.PathLike, image_size: int = 32, seed: int = 0) -> Path:
    """A tiny random-weight open_clip model in the hub folder layout (``open_clip_config.json`` +
    ``open_clip_model.safetensors``, what ``open_clip.create_model("local-dir:<folder>")`` loads), for tests and
    offline smoke runs of ``models.clip.pretrained``."""
    import json

    import open_clip

    model_cfg = tiny_model_config(ClipModelConfig(width=32, layers=1, patch_size=8, embed_dim=32), image_size)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    out = Path(out_dir)
    with atomic_path(out) as tmp:
        Path(tmp).mkdir(parents=True, exist_ok=True)
        (Path(tmp) / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
        save_weights(Path(tmp) / "open_clip_model.safetensors", model)
    return out
