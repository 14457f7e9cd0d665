import pytest

from raydebias.core.seeds import SEED_STRIDE, derived_seed, sample_seeds


def test_runs_with_different_seeds_share_no_sample_seed():
    run0 = set(sample_seeds(0, 1000)) | set(sample_seeds(0, 1000, offset=500_000))
    run1 = set(sample_seeds(1, 1000)) | set(sample_seeds(1, 1000, offset=500_000))
    assert len(run0) == 2000 and not run0 & run1


def test_sample_seeds_follow_derived_seed():
    assert sample_seeds(3, 4, offset=10) == [derived_seed(3, i) for i in range(10, 14)]
    assert derived_seed(2, 5) == 2 * SEED_STRIDE + 5


def test_index_outside_the_run_range_is_an_error():
    with pytest.raises(ValueError, match="outside"):
        derived_seed(0, SEED_STRIDE)
