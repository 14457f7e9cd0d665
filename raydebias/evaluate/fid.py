"""FID / KID of a synthetic set against real images with torchmetrics and a configurable feature network:
the run's own CLIP image encoder offline (bootstrap), or Inception weights from a file (pretrained runs)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class ClipFeatures(nn.Module):
    """torchmetrics feature extractor: uint8 NCHW images → CLIP image embeddings."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.num_features = int(encoder.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x.permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)
        return torch.from_numpy(self.encoder.encode_images(pixels)).double()


class Precomputed(nn.Module):
    """torchmetrics feature extractor for features computed elsewhere (the ``embed`` stage's CLIP embeddings):
    the "images" given to ``update`` are already (N, D) features."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = int(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


def fid_kid_features(real: np.ndarray, fake: np.ndarray, kid_subset: int = 50) -> dict[str, float | None]:
    """:func:`fid_kid` on precomputed (N, D) features: nothing is encoded again."""
    return _fid_kid(real, fake, Precomputed(real.shape[1]), None, kid_subset, images=False)


def fid_kid(real: np.ndarray, fake: np.ndarray, feature: nn.Module | int = 2048,
            inception_weights: str | None = None, kid_subset: int = 50) -> dict[str, float | None]:
    """FID and KID (mean ± std) between uint8 NHWC ``real`` and ``fake`` images."""
    return _fid_kid(real, fake, feature, inception_weights, kid_subset, images=True)


def _fid_kid(real: np.ndarray, fake: np.ndarray, feature: nn.Module | int, inception_weights: str | None,
             kid_subset: int, images: bool) -> dict[str, float | None]:
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    kw = {"feature_extractor_weights_path": inception_weights} if inception_weights else {}
    n = min(len(real), len(fake))
    if n < 2:
        return {"fid": None, "kid": None, "kid_std": None, "n_real": len(real), "n_fake": len(fake)}
    fid = FrechetInceptionDistance(feature=feature, normalize=False, **kw)
    kid = KernelInceptionDistance(feature=feature, subset_size=min(kid_subset, n), normalize=False, **kw)
    for metric in (fid, kid):
        for imgs, is_real in ((real, True), (fake, False)):
            for i in range(0, len(imgs), 256):
                batch = torch.from_numpy(np.ascontiguousarray(imgs[i : i + 256]))
                metric.update(batch.permute(0, 3, 1, 2) if images else batch, real=is_real)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std),
            "n_real": len(real), "n_fake": len(fake)}
