"""Generation and LoRA training throughput on a GPU, on the Stable Diffusion 1.5 architecture with random weights
(the same FLOPs as the real model; no weights can be downloaded here): plain ``StableDiffusionPipeline`` at its
best batch vs raydebias' generate path (``models.sampling.sample`` on ``load_diffusion``, the code the generate
actors run), and DreamBooth-LoRA training samples/s one adapter at a time (``train_lora``) vs one batched pass over
all adapters (``train_loras_batched``). Runs only where CUDA is present (BENCHMARKS.md, "GPU").

    python bench/gpu_generate.py                       # SD-1.5 layout, 512², 50 DDIM steps, CFG 7.5, fp16
    python bench/gpu_generate.py --size tiny --device cpu --batches 2 --steps 2 --lora-steps 1   # smoke test

Prints one JSON line: {"pipeline_img_s": {batch: img/s}, "raydebias_img_s": {batch: img/s}, "best": {...},
"lora_samples_s": {"sequential": ..., "batched": ...}, ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SD15 = {  # the Stable Diffusion v1.5 configs (diffusers' model configs of that checkpoint)
    "unet": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, sample_size=512),
    "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 projection_dim=768),
}
TINY = {
    "unet": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 cross_attention_dim=32, attention_head_dim=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                layers_per_block=1, sample_size=16),
    "text": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
}


def save_random_sd(out: Path, spec: dict, seed: int = 0) -> Path:
    """A random-weight checkpoint of ``spec`` in the Stable Diffusion folder layout (safetensors)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from raydebias.models.clip import clip_tokenizer
    from raydebias.models.diffusion import MAX_TOKENS

    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**spec["vae"]), unet=UNet2DConditionModel(**spec["unet"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=MAX_TOKENS,
                                                  pad_token_id=0, **spec["text"])),
        tokenizer=clip_tokenizer(),
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                num_train_timesteps=1000, steps_offset=1, clip_sample=False, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_pipeline(path: Path, device: str, dtype: torch.dtype, batch: int, steps: int, cfg: float,
                  repeats: int) -> float:
    """img/s of ``StableDiffusionPipeline`` (DDIM, ``steps`` steps, CFG ``cfg``) at ``batch`` prompts a call."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=dtype, use_safetensors=True).to(device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a photo of a bird on water"] * batch
    pipe(prompts, num_inference_steps=2, guidance_scale=cfg)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        pipe(prompts, num_inference_steps=steps, guidance_scale=cfg, output_type="np")
    _sync(device)
    return batch * repeats / (time.perf_counter() - t0)


def time_raydebias(path: Path, device: str, dtype: str, batch: int, steps: int, cfg: float, repeats: int,
                   channels_last: bool, compile_unet: bool) -> float:
    """img/s of the generate actors' path: ``load_diffusion`` + ``sample`` (per-row seeded noise, CFG in one
    batch of 2·``batch``), with channels-last memory and optionally ``torch.compile`` of the UNet."""
    from raydebias.models.diffusion import load_diffusion
    from raydebias.models.sampling import sample

    bundle = load_diffusion(str(path), dtype=dtype).to(device)
    if channels_last:
        bundle.unet.to(memory_format=torch.channels_last)
    if compile_unet:
        bundle.unet = torch.compile(bundle.unet)
    prompts = ["a photo of a bird on water"] * batch
    with torch.inference_mode():
        sample(bundle, prompts, num_steps=2, guidance_scale=cfg, batch_size=batch)  # warm-up (and compile)
        _sync(device)
        t0 = time.perf_counter()
        for r in range(repeats):
            sample(bundle, prompts, num_steps=steps, guidance_scale=cfg, seeds=list(range(r * batch, (r + 1) * batch)),
                   batch_size=batch)
        _sync(device)
    return batch * repeats / (time.perf_counter() - t0)


def time_lora(path: Path, device: str, adapters: int, steps: int, batch: int, resolution: int) -> dict:
    """Training samples/s of ``adapters`` DreamBooth-LoRAs, ``steps`` steps of ``batch`` rows each: one adapter
    at a time vs one batched pass (fp32 master weights of the adapters, the base model in fp16 on CUDA)."""
    import copy

    from raydebias.finetune.dreambooth_lora import train_lora
    from raydebias.finetune.multi_lora import train_loras_batched
    from raydebias.models.diffusion import load_diffusion

    base = load_diffusion(str(path), dtype="float16" if device.startswith("cuda") else "float32").to(device)
    rng = np.random.default_rng(0)
    jobs = [{"name": f"a{k}", "pixels": rng.integers(0, 256, (2 * batch, resolution, resolution, 3), dtype=np.uint8),
             "prompts": [f"a photo of a sks bird {k}"] * (2 * batch), "seed": k} for k in range(adapters)]
    out = {}
    b = copy.deepcopy(base)
    _sync(device)
    t0 = time.perf_counter()
    for j in jobs:
        train_lora(b, j["name"], j["pixels"], j["prompts"], steps=steps, batch_size=batch, seed=j["seed"])
    _sync(device)
    out["sequential"] = adapters * steps * batch / (time.perf_counter() - t0)
    b = copy.deepcopy(base)
    _sync(device)
    t0 = time.perf_counter()
    train_loras_batched(b, jobs, steps=steps, batch_size=batch)
    _sync(device)
    out["batched"] = adapters * steps * batch / (time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=["sd15", "tiny"], default="sd15")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time the raydebias path with torch.compile")
    ap.add_argument("--lora-adapters", type=int, default=8)
    ap.add_argument("--lora-steps", type=int, default=10)
    ap.add_argument("--lora-batch", type=int, default=4)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/gpu_generate.py needs CUDA (use --size tiny --device cpu for a smoke run)", file=sys.stderr)
        sys.exit(2)
    spec = SD15 if args.size == "sd15" else TINY
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        path = save_random_sd(Path(tmp) / "sd", spec)
        pipe = {b: round(time_pipeline(path, args.device, dtype, b, args.steps, args.cfg, args.repeats), 3)
                for b in args.batches}
        ours = {b: round(time_raydebias(path, args.device, args.dtype, b, args.steps, args.cfg, args.repeats,
                                        channels_last=True, compile_unet=False), 3) for b in args.batches}
        compiled = ({b: round(time_raydebias(path, args.device, args.dtype, b, args.steps, args.cfg, args.repeats,
                                             channels_last=True, compile_unet=True), 3) for b in args.batches}
                    if args.compile else None)
        resolution = spec["vae"]["sample_size"]
        lora = {k: round(v, 2) for k, v in time_lora(path, args.device, args.lora_adapters, args.lora_steps,
                                                     args.lora_batch, resolution).items()}
    best = {"pipeline": max(pipe.values()), "raydebias": max([*ours.values(), *(compiled or {}).values()])}
    print(json.dumps({
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "size": args.size, "dtype": args.dtype, "steps": args.steps, "cfg": args.cfg, "resolution": resolution,
        "pipeline_img_s": pipe, "raydebias_img_s": ours, "raydebias_compiled_img_s": compiled, "best": best,
        "raydebias_vs_pipeline": round(best["raydebias"] / best["pipeline"], 2),
        "lora_samples_s": lora, "lora_speedup": round(lora["batched"] / lora["sequential"], 2),
        "lora": {"adapters": args.lora_adapters, "steps": args.lora_steps, "batch": args.lora_batch}}))


if __name__ == "__main__":
    main()
