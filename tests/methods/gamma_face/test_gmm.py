"""GAMMA-FACE core: the split reverse process against ``sample`` as an oracle, BIC model selection, balanced
per-component sampling and generation, the BIC plot."""

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture

from raydebias.methods.gamma_face.gmm import (
    bic_plot,
    collect_latents,
    continue_reverse,
    fit_gmm_bic,
    generate_balanced,
    latent_shape,
    reverse_timesteps,
    sample_components,
    split_index,
)
from raydebias.models.sampling import sample

torch.set_num_threads(1)

def test_split_index_and_timesteps(tiny_diffusion):
    assert split_index(20, 0.5) == 10
    assert split_index(4, 0.0) == 1 and split_index(4, 1.0) == 3  # clamped: at least one step on each side
    assert split_index(10, 0.26) == 3
    with pytest.raises(ValueError):
        split_index(1, 0.5)
    with pytest.raises(ValueError):
        split_index(10, 1.5)
    sched, ts = reverse_timesteps(tiny_diffusion, 5)
    assert len(ts) == 5 and int(ts[0]) == 999  # trailing spacing starts from pure noise
    assert sched.config.prediction_type == tiny_diffusion.noise_scheduler.config.prediction_type


@pytest.mark.parametrize("prompt,guidance", [("", 1.0), ("a red digit 1", 3.0)])
@pytest.mark.parametrize("t_frac", [0.25, 0.5])
def test_collect_then_continue_equals_sample(tiny_diffusion, prompt, guidance, t_frac):
    seeds = [3, 7, 11]
    z = collect_latents(tiny_diffusion, seeds, num_steps=4, t_frac=t_frac, prompt=prompt, guidance_scale=guidance)
    assert z.shape == (3, *latent_shape(tiny_diffusion)) and z.dtype == tiny_diffusion.dtype
    got = continue_reverse(tiny_diffusion, z, 4, t_frac, prompt=prompt, guidance_scale=guidance)
    ref = sample(tiny_diffusion, [prompt] * 3, num_steps=4, guidance_scale=guidance, seeds=seeds)
    assert got.dtype == np.uint8 and got.shape == ref.shape == (3, 16, 16, 3)
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    assert np.array_equal(got, ref)  # exact in practice: the same ops in the same order
    wrong_split = continue_reverse(tiny_diffusion, z, 4, 0.75, prompt=prompt, guidance_scale=guidance)  # negative control
    assert np.abs(wrong_split.astype(int) - ref.astype(int)).max() > 10


def test_collect_latents_is_per_seed(tiny_diffusion):
    z = collect_latents(tiny_diffusion, [5, 6, 7, 8], num_steps=4, batch_size=4)
    z2 = collect_latents(tiny_diffusion, [7, 5], num_steps=4, batch_size=1)
    torch.testing.assert_close(z2, z[[2, 0]])
    assert not torch.equal(z[0], z[1])
    with pytest.raises(ValueError):
        continue_reverse(tiny_diffusion, z[:, :3], 4, 0.5)


def blobs(centers, n, d, scale, seed):
    rng = np.random.default_rng(seed)
    return np.concatenate([c + scale * rng.standard_normal((n, d)) for c in centers])


def test_fit_gmm_bic_finds_three_blobs():
    centers = [np.full(5, -10.0), np.zeros(5), np.r_[10.0, -10.0, 10.0, -10.0, 10.0]]
    gmm, bics = fit_gmm_bic(blobs(centers, 60, 5, 1.0, 0), k_max=6)
    assert len(bics) == 6 and gmm.n_components == 3
    assert int(np.argmin(bics)) + 1 == 3
    assert gmm.covariance_type == "diag" and gmm.init_params == "k-means++"
    got = gmm.means_[np.argsort(gmm.means_[:, 0])]
    np.testing.assert_allclose(got, np.stack(centers), atol=0.5)  # centers are sorted by their first coordinate


def test_fit_gmm_bic_single_gaussian_and_validation():
    gmm, bics = fit_gmm_bic(blobs([np.zeros(4)], 200, 4, 1.0, 1), k_max=4)
    assert gmm.n_components == 1 and len(bics) == 4
    _, few = fit_gmm_bic(blobs([np.zeros(2)], 3, 2, 1.0, 2), k_max=11)
    assert len(few) == 3  # K never exceeds the number of samples
    with pytest.raises(ValueError, match="2-D"):
        fit_gmm_bic(np.zeros(10))
    bad = np.zeros((10, 2))
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        fit_gmm_bic(bad)


def _fixed_gmm(means, variances, covariance_type="diag") -> GaussianMixture:
    gmm = GaussianMixture(len(means), covariance_type=covariance_type)
    gmm.means_, gmm.covariances_ = np.asarray(means, float), np.asarray(variances, float)
    gmm.weights_ = np.full(len(means), 1 / len(means))
    return gmm


def test_sample_components_moments_and_determinism():
    means = [[0.0, 5.0, -3.0], [10.0, -2.0, 1.0]]
    var = [[1.0, 0.25, 4.0], [0.01, 9.0, 1.0]]
    gmm = _fixed_gmm(means, var)
    z, ids = sample_components(gmm, 20000, seed=0)
    assert z.shape == (40000, 3) and z.dtype == np.float32 and ids.dtype == np.int64
    assert np.array_equal(np.bincount(ids), [20000, 20000])
    for k in range(2):
        np.testing.assert_allclose(z[ids == k].mean(0), means[k], atol=0.05)
        np.testing.assert_allclose(z[ids == k].var(0), var[k], rtol=0.05)
    z2, _ = sample_components(gmm, 20000, seed=0)
    assert np.array_equal(z, z2)
    assert not np.array_equal(z, sample_components(gmm, 20000, seed=1)[0])
    zs, ids_s = sample_components(_fixed_gmm(means, [4.0, 0.25], "spherical"), 20000, seed=0)
    np.testing.assert_allclose(zs[ids_s == 0].var(0), [4.0] * 3, rtol=0.05)
    np.testing.assert_allclose(zs[ids_s == 1].var(0), [0.25] * 3, rtol=0.05)
    with pytest.raises(ValueError, match="covariance_type"):
        sample_components(GaussianMixture(1, covariance_type="full").fit(np.random.rand(10, 3)), 2, 0)


def test_generate_balanced(tiny_diffusion):
    d = int(np.prod(latent_shape(tiny_diffusion)))
    gmm = _fixed_gmm([np.full(d, -2.0), np.full(d, 2.0)], np.full((2, d), 0.01))
    imgs, ids = generate_balanced(tiny_diffusion, gmm, per_component=2, seed=0, num_steps=4, t_frac=0.5)
    assert imgs.shape == (4, 16, 16, 3) and imgs.dtype == np.uint8
    assert ids.tolist() == [0, 0, 1, 1]
    assert np.abs(imgs[ids == 0].astype(float).mean() - imgs[ids == 1].astype(float).mean()) > 20
    again, _ = generate_balanced(tiny_diffusion, gmm, per_component=2, seed=0, num_steps=4, t_frac=0.5)
    assert np.array_equal(imgs, again)
    with pytest.raises(ValueError, match="latent shape"):
        generate_balanced(tiny_diffusion, _fixed_gmm([[0.0, 1.0]], [[1.0, 1.0]]), 1, 0, 4, 0.5)


def test_pipeline_end_to_end(tiny_diffusion):
    """collect → flatten → BIC fit → balanced generation, on the real (random-weight) model."""
    z = collect_latents(tiny_diffusion, list(range(8)), num_steps=4, t_frac=0.5)
    gmm, bics = fit_gmm_bic(z.flatten(1).numpy(), k_max=3)
    assert len(bics) == 3 and all(np.isfinite(bics))
    imgs, ids = generate_balanced(tiny_diffusion, gmm, per_component=1, seed=1, num_steps=4, t_frac=0.5)
    assert imgs.shape == (gmm.n_components, 16, 16, 3)
    assert np.bincount(ids).tolist() == [1] * gmm.n_components


def test_bic_plot():
    from matplotlib.figure import Figure

    fig = bic_plot([1, 2, 3, 4], [10.0, 5.0, 6.0, 7.0], chosen=2)
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert len(ax.lines) == 1
    assert ax.get_xlabel() and ax.get_ylabel() == "BIC"


def test_forward_latents_are_noised_to_the_resume_level(tiny_diffusion):
    """Forward latents sit at timesteps[split]: for a blank image (z_0 = −1 everywhere) their mean is −√ᾱ_t and
    their std √(1 − ᾱ_t); continuing the reverse process from them returns images."""
    from raydebias.methods.gamma_face.gmm import forward_latents

    sched, ts = reverse_timesteps(tiny_diffusion, 4)
    t = ts[split_index(4, 0.5)]
    ab = float(sched.alphas_cumprod[t])
    blank = np.zeros((64, 16, 16, 3), np.uint8)
    z = forward_latents(tiny_diffusion, blank, 4, 0.5, seed=0)
    assert z.shape == (64, *latent_shape(tiny_diffusion))
    assert float(z.mean()) == pytest.approx(-ab**0.5, abs=0.02)
    assert float(z.std()) == pytest.approx((1 - ab) ** 0.5, abs=0.02)
    torch.testing.assert_close(z, forward_latents(tiny_diffusion, blank, 4, 0.5, seed=0))
    assert continue_reverse(tiny_diffusion, z[:2], 4, 0.5).shape == (2, 16, 16, 3)
