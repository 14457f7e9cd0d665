"""Batched multi-LoRA training vs one adapter at a time, at equal steps per adapter, and mixed-adapter generation
batches vs switching adapters within a batch, on the demo's bootstrap
text-to-image architecture (``configs/demo.yaml`` ``models.diffusion``, untrained weights: the same FLOPs), on
Colored MNIST digits, in one process with the same thread count. Both sides give every adapter the same update
(tests/finetune/test_multi_lora.py); pairs alternate so drift hits both.

    python bench/multi_lora.py --adapters 20 --steps 20 --threads 1 --pairs 2

Generation: ``--rows-per-adapter`` rows per adapter sorted by adapter as the generate stage sorts them, in batches of
``--gen-batch`` (generate.batch_size), 10 DDIM steps with CFG; switching = one ``sample`` call per adapter in a batch
(the stage before), mixed = one call per batch (``generate.mixed_adapters``).

Ray Data vs bare loop (``--ray-actors``, 0 = skip): the same rows through the generate stage's UDF
(``GenerateBatch``: a Ray Data actor pool of ``--ray-actors`` one-thread actors, row files written as the stage
writes them, each image also CLIP-encoded as the stage does, actor start-up included, Ray start-up not) vs
``sample_mixed`` + the same CLIP encoding in a loop in this process with as many threads, both on the base model,
adapters and an untrained bootstrap CLIP saved to a temp run directory and loaded back.

Bound (``--bound``): the same UNet's forward + backward with no adapter at all, ``--adapters`` × ``--steps`` steps of
``--batch-size`` rows vs ``--steps`` steps of ``--adapters`` × ``--batch-size`` rows — the most any batched trainer
can gain on this machine from larger batches alone (``train_speedup_bound``).

Prints one JSON line: {"train_speedup": ..., "generate_speedup": ..., "ray_data_vs_bare_loop": ..., ...}.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch

from raydebias.config import ColoredMNISTConfig, load_config
from raydebias.data.builtin.colored_mnist import colored_mnist_arrays
from raydebias.finetune.dreambooth_lora import set_active, train_lora
from raydebias.finetune.multi_lora import sample_mixed, train_loras_batched
from raydebias.models.clip import clip_tokenizer
from raydebias.models.diffusion import bootstrap_diffusion
from raydebias.models.sampling import sample


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=20)
    ap.add_argument("--images", type=int, default=40, help="images per adapter")
    ap.add_argument("--steps", type=int, default=20, help="steps per adapter (the demo's finetune.steps)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--rows-per-adapter", type=int, default=10)
    ap.add_argument("--gen-batch", type=int, default=100)
    ap.add_argument("--ray-actors", type=int, default=2, help="actors of the Ray Data side (0: skip that measure)")
    ap.add_argument("--ray-batch", type=int, default=25, help="rows per batch on both sides of the Ray Data measure")
    ap.add_argument("--bound", action="store_true", help="also time the adapter-free batching bound")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(None, []).models.diffusion.model_copy(
        update=dict(unshuffle=4, block_out_channels=[64, 128], text_width=64, text_layers=0))  # demo.yaml
    torch.manual_seed(0)
    base = bootstrap_diffusion(cfg, tokenizer=clip_tokenizer())
    n = args.adapters * args.images
    px = colored_mnist_arrays(ColoredMNISTConfig(n_train=n, n_val=10, n_test=10))["train"]["x"][:n]
    jobs = [{"name": f"a{k}", "pixels": px[k * args.images:(k + 1) * args.images],
             "prompts": [f"a photo of a sks digit {k}"] * args.images, "seed": k} for k in range(args.adapters)]
    kw = dict(steps=args.steps, batch_size=args.batch_size, lr=2e-3, rank=4)
    seq, bat = [], []
    for _ in range(args.pairs):
        b = copy.deepcopy(base)
        t0 = time.perf_counter()
        for j in jobs:
            train_lora(b, j["name"], j["pixels"], j["prompts"], seed=j["seed"], **kw)
        seq.append(time.perf_counter() - t0)
        b = copy.deepcopy(base)
        t0 = time.perf_counter()
        train_loras_batched(b, jobs, **kw)
        bat.append(time.perf_counter() - t0)
    trained = copy.deepcopy(base)
    train_loras_batched(trained, jobs, **kw)
    rows = [(j["name"], j["prompts"][0], 1000 * k + i) for k, j in enumerate(jobs) for i in range(args.rows_per_adapter)]
    batches = [rows[i:i + args.gen_batch] for i in range(0, len(rows), args.gen_batch)]
    switch, mixed = [], []
    for _ in range(args.pairs):
        t0 = time.perf_counter()
        for batch in batches:
            for name in dict.fromkeys(r[0] for r in batch):
                mine = [r for r in batch if r[0] == name]
                set_active(trained, [name])
                sample(trained, [r[1] for r in mine], num_steps=10, guidance_scale=3.0, seeds=[r[2] for r in mine])
        switch.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for batch in batches:
            sample_mixed(trained, [r[0] for r in batch], [r[1] for r in batch], [r[2] for r in batch], num_steps=10,
                         guidance_scale=3.0)
        mixed.append(time.perf_counter() - t0)
    bound = batching_bound(base, px, args.adapters, args.steps, args.batch_size, args.pairs) if args.bound else None
    ray_ratio = None
    if args.ray_actors:
        ray_s, bare_s = ray_data_vs_bare_loop(base, trained, jobs, rows, args.ray_batch, args.ray_actors, args.pairs)
        ray_ratio = {"ratio": round(float(np.median(bare_s) / np.median(ray_s)), 2),
                     "ray_data_s": [round(x, 1) for x in ray_s], "bare_loop_s": [round(x, 1) for x in bare_s],
                     "actors": args.ray_actors, "batch": args.ray_batch}
    print(json.dumps({"train_speedup": round(float(np.median(seq) / np.median(bat)), 2),
                      "generate_speedup": round(float(np.median(switch) / np.median(mixed)), 2),
                      "sequential_s": [round(x, 1) for x in seq], "batched_s": [round(x, 1) for x in bat],
                      "switching_s": [round(x, 1) for x in switch], "mixed_s": [round(x, 1) for x in mixed],
                      "adapters": args.adapters, "steps": args.steps, "batch_size": args.batch_size,
                      "images": len(rows), "gen_batch": args.gen_batch, "threads": args.threads,
                      "ray_data_vs_bare_loop": ray_ratio, "train_speedup_bound": bound}))


def batching_bound(base, px: np.ndarray, adapters: int, steps: int, batch: int, pairs: int) -> dict:
    """Forward + backward of the base UNet with no adapter (frozen weights, the gradient flowing through every
    activation to the input, as a LoRA step's does; same loss and prompts) for ``adapters × steps`` steps of
    ``batch`` rows vs ``steps`` steps of ``adapters × batch`` rows."""
    from raydebias.models.diffusion import diffusion_loss

    b = copy.deepcopy(base)
    b.unet.train().requires_grad_(False)
    with torch.no_grad():
        z = b.encode(torch.from_numpy(px[: adapters * batch]).permute(0, 3, 1, 2).float() / 127.5 - 1)
        emb = b.embed_prompts(["a photo of a sks digit"]).expand(len(z), -1, -1).contiguous()
    gen = torch.Generator().manual_seed(0)

    def run(n_steps: int, rows: int) -> float:
        t0 = time.perf_counter()
        for i in range(n_steps):
            lo = (i * rows) % max(1, len(z) - rows + 1)
            zi = z[lo:lo + rows].clone().requires_grad_(True)
            diffusion_loss(b, zi, emb[lo:lo + rows], generator=gen).backward()
        return time.perf_counter() - t0

    small, large = [], []
    for _ in range(pairs):
        small.append(run(adapters * steps, batch))
        large.append(run(steps, adapters * batch))
    return {"ratio": round(float(np.median(small) / np.median(large)), 2),
            "small_batches_s": [round(x, 1) for x in small], "large_batches_s": [round(x, 1) for x in large]}


def ray_data_vs_bare_loop(base, trained, jobs, rows, batch: int, actors: int, pairs: int) -> tuple[list, list]:
    """Seconds per pass for the generate stage's Ray Data path and for a bare ``sample_mixed`` loop (images/s
    ratio = bare / Ray Data time)."""
    import tempfile
    from pathlib import Path

    import ray

    from raydebias._internal.io import atomic_write_json
    from raydebias.diffusion.base import load_base
    from raydebias.finetune.dreambooth_lora import load_lora, save_lora
    from raydebias.generate.text2img import GenerateBatch

    run = Path(tempfile.mkdtemp(prefix="bench-run-"))
    base.save(run / "stages" / "diffusion" / "model")
    atomic_write_json(run / "stages" / "diffusion" / "model.json", {"path": "stages/diffusion/model",
                                                                     "run_relative": True})
    atomic_write_json(run / "stages" / "data" / "info.json", {"image_size": base.resolution})
    from raydebias.config import ClipModelConfig
    from raydebias.embed.stage import load_clip
    from raydebias.models.clip import create_clip

    clip_cfg = ClipModelConfig()  # the generate actors also encode their images (for the filter): both sides do
    create_clip(clip_cfg, "bootstrap", base.resolution).save(run / "stages" / "clip" / "model")
    atomic_write_json(run / "stages" / "clip" / "clip.json", {"source": "bootstrap", "config": clip_cfg.model_dump(),
                                                              "image_size": base.resolution})
    clip = load_clip(run)
    for j in jobs:
        save_lora(trained, j["name"], run / "stages" / "finetune" / "bench" / j["name"])
    items = [{"row_id": f"r{k:05d}", "y": 0, "a": 0, "cluster": 0, "adapter": name, "prompt": prompt, "seed": seed,
              "transferred": False} for k, (name, prompt, seed) in enumerate(rows)]
    ray.init(address="local", num_cpus=actors, num_gpus=0, include_dashboard=False, object_store_memory=200_000_000,
             logging_level="warning")
    bundle = load_base(run)
    for j in jobs:
        load_lora(bundle, run / "stages" / "finetune" / "bench" / j["name"], j["name"])
    ray_s, bare_s = [], []
    for p in range(pairs):
        out = Path(tempfile.mkdtemp(prefix="bench-rows-", dir=run))
        t0 = time.perf_counter()
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items) // batch)).map_batches(
            GenerateBatch, fn_constructor_args=(str(run), "bench", 10, 3.0, str(out), None, True),
            batch_size=batch, batch_format="numpy", num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=actors))  # as the stage: a fixed pool
        n = sum(len(b["row_id"]) for b in ds.iter_batches(batch_format="numpy"))
        ray_s.append(time.perf_counter() - t0)
        assert n == len(items), n
        torch.set_num_threads(actors)
        t0 = time.perf_counter()
        for lo in range(0, len(rows), batch):
            chunk = rows[lo:lo + batch]
            clip.encode_images(sample_mixed(bundle, [r[0] for r in chunk], [r[1] for r in chunk],
                                            [r[2] for r in chunk], num_steps=10, guidance_scale=3.0))
        bare_s.append(time.perf_counter() - t0)
    ray.shutdown()
    return ray_s, bare_s


if __name__ == "__main__":
    main()
