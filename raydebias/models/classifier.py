"""Classifier backbones: a registry of small ResNets built from config (``create_classifier(cfg, C)``), and a
trained one loaded (safetensors + ``meta.json``) and applied: what evaluation and Serve need, without training code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from raydebias._internal.io import as_path, load_safetensors
from raydebias.config import ClassifierModelConfig
from raydebias.data.transforms import to_model_input

_REGISTRY: dict[str, Callable[[ClassifierModelConfig, int], nn.Module]] = {}


def register(name: str):
    def deco(fn):
        _REGISTRY[name] = fn
        return fn

    return deco


def available() -> list[str]:
    return sorted(_REGISTRY)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class Classifier(nn.Module):
    """``encoder`` (image → feature vector) + linear ``head``; the split is what last-layer retraining needs."""

    def __init__(self, encoder: nn.Module, feat_dim: int, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(feat_dim, num_classes)
        self.feat_dim = feat_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        feats = self.encoder(x)
        logits = self.head(feats)
        return (logits, feats) if return_features else logits


@register("resnet_small")
def resnet_small(cfg: ClassifierModelConfig, num_classes: int) -> Classifier:
    """CIFAR-style ResNet: stem + three stages (w, 2w, 4w), one BasicBlock each."""
    w = cfg.width
    enc = nn.Sequential(
        nn.Conv2d(3, w, 3, 1, 1, bias=False),
        nn.BatchNorm2d(w),
        nn.ReLU(inplace=True),
        BasicBlock(w, w, 1),
        BasicBlock(w, 2 * w, 2),
        BasicBlock(2 * w, 4 * w, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return Classifier(enc, 4 * w, num_classes)


@register("cnn")
def cnn(cfg: ClassifierModelConfig, num_classes: int) -> Classifier:
    """Three conv → ReLU → max-pool stages (w, 2w, 2w) and a flattened 4×4 map: no BatchNorm, no global pooling.

    On 32×32 images with a strong global shortcut (colour) this keeps the spatial layout that shape needs: with
    group-balanced resampling it reached 0.70–0.72 unbiased accuracy on 99 % Colored MNIST where ``resnet_small``
    (BatchNorm + global average pooling) reached 0.23–0.42 (BENCHMARKS.md, "Classifier backbone").
    """
    w = cfg.width
    enc = nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(4),  # identity at 32 px; other sizes give the same 4×4 map
        nn.Flatten(),
    )
    # channels_last weights: oneDNN's NHWC convolution and max-pool kernels, ≈ 1.2× faster training on 2 CPU cores
    # at the same test AGA (BENCHMARKS.md, "Classifier memory format"). The function, the flattened feature order
    # and the saved (contiguous) weights are unchanged. Not for the ResNets: this torch build's oneDNN hangs in the
    # backward pass of a 1×1 stride-2 convolution with 4 input channels in channels_last (resnet_small, width 4).
    return Classifier(enc, 2 * w * 16, num_classes).to(memory_format=torch.channels_last)


@register("resnet18")
def resnet18(cfg: ClassifierModelConfig, num_classes: int) -> Classifier:
    """torchvision ResNet-18 (random init; no hub weights), head split off."""
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    feat = net.fc.in_features
    net.fc = nn.Identity()
    return Classifier(net, feat, num_classes)


def create_classifier(cfg: ClassifierModelConfig, num_classes: int) -> Classifier:
    if cfg.arch not in _REGISTRY:
        raise ValueError(f"unknown classifier arch {cfg.arch!r}; available: {available()}")
    return _REGISTRY[cfg.arch](cfg, num_classes)


@torch.no_grad()
def predict(model: torch.nn.Module, x: np.ndarray, batch_size: int = 512, device: str = "cpu") -> np.ndarray:
    """Softmax probabilities for uint8 NHWC images."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        out.append(torch.softmax(model(to_model_input(x[i : i + batch_size]).to(device)), dim=1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def load_classifier(model_dir: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a trained classifier (safetensors + meta.json) for evaluation or serving."""
    model_dir = as_path(model_dir)
    meta = json.loads((model_dir / "meta.json").read_text())
    model = create_classifier(ClassifierModelConfig(**meta["classifier"]), meta["num_classes"])
    model.load_state_dict(load_safetensors(model_dir / "model.safetensors"))
    model.eval()
    return model, meta
