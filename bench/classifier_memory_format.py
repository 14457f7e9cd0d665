"""The classifier backbone with channels_last weights (what ``create_classifier`` builds) vs the default
contiguous layout: the demo's CNN trained with group-balanced batches on 99 % Colored MNIST (the demo's split
sizes), then its unbiased accuracy (AGA) on the group-balanced test split. One process per layout, so a
whole-process timer can pair them:

    python bench/classifier_memory_format.py --layout channels_last --seed 0
    python bench/classifier_memory_format.py --layout contiguous --seed 0

Prints the training time and the test AGA (the two layouts compute the same function; floats may round apart).
"""

from __future__ import annotations

import argparse
import time

import torch

import raydebias.evaluate.fidelity as fidelity
from raydebias.config import ClassifierModelConfig, ColoredMNISTConfig
from raydebias.data.builtin.colored_mnist import colored_mnist_arrays
from raydebias.evaluate.metrics import group_metrics
from raydebias.models.classifier import create_classifier


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", choices=["channels_last", "contiguous"], default="channels_last")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.layout == "contiguous":
        fidelity.create_classifier = lambda cfg, n: create_classifier(cfg, n).to(memory_format=torch.contiguous_format)
    data = colored_mnist_arrays(ColoredMNISTConfig(aligned=0.99, seed=args.seed, n_train=3500, n_val=200,
                                                   n_test=500), splits=("train", "test"))
    tr, te = data["train"], data["test"]
    cfg = ClassifierModelConfig(arch="cnn", width=32)  # configs/demo.yaml
    t0 = time.perf_counter()
    model = fidelity.fit_backbone(tr["x"], tr["y"], 10, cfg, groups=tr["y"] * 10 + tr["a"], epochs=args.epochs,
                                  seed=args.seed)
    secs = time.perf_counter() - t0
    pred = fidelity.predict_labels(model, te["x"])
    m = group_metrics(te["y"], pred, te["a"], 10, 10)
    layout = "channels_last" if model.encoder[0].weight.is_contiguous(memory_format=torch.channels_last) \
        else "contiguous"
    print(f"{layout}: {args.epochs} epochs in {secs:.1f} s, test AGA {m['aga']:.3f}")


if __name__ == "__main__":
    main()
