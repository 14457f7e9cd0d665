"""Tempered group-balanced sampling of the bootstrap generator's training images."""

import numpy as np
import pytest

from raydebias.diffusion.base import tempered_group_weights


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0])
def test_group_mass_is_count_to_the_one_minus_tau(tau):
    groups = np.repeat([0, 1, 2, 5], [400, 100, 4, 1])
    w = tempered_group_weights(groups, tau)
    mass = np.array([w[groups == g].sum() for g in (0, 1, 2, 5)])
    counts = np.array([400, 100, 4, 1], float)
    np.testing.assert_allclose(mass / mass.sum(), counts ** (1 - tau) / (counts ** (1 - tau)).sum())
