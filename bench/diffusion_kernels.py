"""Kernel-level variants of one bootstrap diffusion training run (the demo's model and recipe): torch's fused
AdamW vs its default per-tensor implementation (what the trainer uses), and channels_last vs contiguous UNet
weights and latents. One process per variant, so a whole-process timer can pair them:

    python bench/diffusion_kernels.py --steps 150                          # what the trainer does
    python bench/diffusion_kernels.py --steps 150 --optimizer fused
    python bench/diffusion_kernels.py --steps 150 --layout channels_last

Prints it/s and the last losses (every variant computes the same update up to float rounding).
"""

from __future__ import annotations

import argparse
import functools

import torch

import raydebias.models.diffusion_training as training
from raydebias.config import ColoredMNISTConfig, DiffusionModelConfig
from raydebias.data.builtin.colored_mnist import colored_mnist_arrays
from raydebias.models.diffusion import bootstrap_diffusion


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--optimizer", choices=["fused", "default"], default="default")
    ap.add_argument("--layout", choices=["channels_last", "contiguous"], default="contiguous")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-token-table", action="store_true", help="also train the 49,408-row token table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.optimizer == "fused":
        torch.optim.AdamW = functools.partial(torch.optim.AdamW, fused=True)  # this process only
    tr = colored_mnist_arrays(ColoredMNISTConfig(n_train=512, n_val=10, n_test=10))["train"]
    pixels, caps = tr["x"], [f"a photo of a color {a} digit {y}" for y, a in zip(tr["y"], tr["a"])]
    torch.manual_seed(0)
    b = bootstrap_diffusion(DiffusionModelConfig(text_layers=0))  # the demo's model (configs/demo.yaml)
    if args.layout == "channels_last":
        b.unet.to(memory_format=torch.channels_last)
        encode = b.encode
        b.encode = lambda x: encode(x).contiguous(memory_format=torch.channels_last)  # the latents the UNet sees
    st = training.train_bootstrap_diffusion(b, pixels, caps, steps=args.steps, batch_size=64, lr=2e-3, log=None,
                                            freeze_token_embedding=not args.train_token_table)
    print(f"{args.optimizer} AdamW, {args.layout}: {st['it_per_s']:.2f} it/s, loss_last {st['loss_last']:.4f}")


if __name__ == "__main__":
    main()
