"""FID/KID with a custom feature network against a hand-computed Fréchet distance (scipy) on the same features."""

import numpy as np
import pytest
import torch
from scipy import linalg

from raydebias.evaluate.fid import fid_kid


class MeanColour(torch.nn.Module):
    """A tiny deterministic feature net: per-channel mean and std → 6 features."""

    num_features = 6

    def forward(self, x):
        x = x.double() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def features(imgs):
    return MeanColour()(torch.from_numpy(imgs).permute(0, 3, 1, 2)).numpy()


def frechet(f1, f2):
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_matches_scipy_and_orders_distributions():
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (200, 8, 8, 3), dtype=np.uint8)
    close = np.clip(real.astype(int) + rng.integers(-10, 10, real.shape), 0, 255).astype(np.uint8)
    far = (real // 4).astype(np.uint8)
    r_close, r_far = fid_kid(real, close, MeanColour()), fid_kid(real, far, MeanColour())
    assert abs(r_close["fid"] - frechet(features(real), features(close))) < 1e-4
    assert abs(r_far["fid"] - frechet(features(real), features(far))) < 1e-4
    assert r_far["fid"] > r_close["fid"] and r_far["kid"] > r_close["kid"]


def test_fid_needs_two_images():
    one = np.zeros((1, 8, 8, 3), np.uint8)
    assert fid_kid(one, one, MeanColour())["fid"] is None


def test_fid_kid_on_precomputed_features_equals_the_image_path():
    from raydebias.evaluate.fid import fid_kid_features

    rng = np.random.default_rng(1)
    real = rng.integers(0, 256, (120, 8, 8, 3), dtype=np.uint8)
    fake = (real // 2 + 40).astype(np.uint8)
    from_images = fid_kid(real, fake, MeanColour())
    torch.manual_seed(0)  # KID's random subsets
    k1 = fid_kid(real, fake, MeanColour())["kid"]
    torch.manual_seed(0)
    from_features = fid_kid_features(features(real), features(fake))
    assert abs(from_features["fid"] - from_images["fid"]) < 1e-6
    assert abs(from_features["fid"] - frechet(features(real), features(fake))) < 1e-4
    assert from_features["kid"] == pytest.approx(k1, rel=1e-6)
