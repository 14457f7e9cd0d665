"""Training speed of the bootstrap text-to-image model: the session-1 architecture (baseline) vs the current
defaults, measured in the same process on the same Colored MNIST batch stream.

    python bench/diffusion_step.py --steps 60 --threads 2
"""

from __future__ import annotations

import argparse

import torch

from raydebias.config import ColoredMNISTConfig, DiffusionModelConfig
from raydebias.data.builtin.colored_mnist import colored_mnist_arrays
from raydebias.models.diffusion import bootstrap_diffusion
from raydebias.models.diffusion_training import train_bootstrap_diffusion

BASELINE = dict(unshuffle=2, block_out_channels=[32, 64], cross_attention="all", text_time_embedding=False,
                max_tokens=77)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tr = colored_mnist_arrays(ColoredMNISTConfig(n_train=512, n_val=10, n_test=10))["train"]
    pixels, caps = tr["x"], [f"a photo of a color {a} digit {y}" for y, a in zip(tr["y"], tr["a"])]
    rows = []
    for name, model_cfg, freeze in [("baseline (session 1)", BASELINE, False), ("current defaults", {}, True)]:
        torch.manual_seed(0)
        b = bootstrap_diffusion(DiffusionModelConfig(**model_cfg))
        train_bootstrap_diffusion(b, pixels, caps, steps=5, batch_size=args.batch_size, log=None,
                                  freeze_token_embedding=freeze)  # warm-up
        st = train_bootstrap_diffusion(b, pixels, caps, steps=args.steps, batch_size=args.batch_size, log=None,
                                       shift=2, freeze_token_embedding=freeze)
        rows.append((name, st["it_per_s"], sum(p.numel() for p in b.unet.parameters()) / 1e6))
    print("| model | UNet params (M) | it/s (batch %d) |" % args.batch_size)
    print("|---|---|---|")
    for name, ips, n in rows:
        print(f"| {name} | {n:.2f} | {ips:.2f} |")
    print(f"| ratio current / baseline | | {rows[1][1] / rows[0][1]:.2f}× |")


if __name__ == "__main__":
    main()
