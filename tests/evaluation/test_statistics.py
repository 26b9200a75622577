import numpy as np
import pytest

from marbench.evaluation.statistics import bootstrap_ci, paired_wilcoxon


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_more_slices():
    rng = np.random.default_rng(0)
    small, large = rng.normal(30, 3, 20), rng.normal(30, 3, 500)
    lo, hi = bootstrap_ci(small)
    assert lo < small.mean() < hi
    assert bootstrap_ci(small) == (lo, hi)  # seeded
    lo2, hi2 = bootstrap_ci(large)
    assert hi2 - lo2 < (hi - lo) / 3
    # about 1.96 standard errors each side for a normal sample
    assert (hi2 - lo2) / 2 == pytest.approx(1.96 * large.std() / np.sqrt(large.size), rel=0.15)
    assert bootstrap_ci([5.0, 5.0, 5.0]) == (5.0, 5.0)


def test_paired_wilcoxon():
    rng = np.random.default_rng(1)
    a = rng.normal(0, 1, 40)
    assert paired_wilcoxon(a, a) == 1.0
    assert paired_wilcoxon(a + 0.5 + rng.normal(0, 0.1, 40), a) < 1e-6
    assert paired_wilcoxon(a + rng.normal(0, 1, 40), a) > 0.01
    with pytest.raises(ValueError, match="equal lengths"):
        paired_wilcoxon(a, a[:-1])
