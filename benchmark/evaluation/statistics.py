"""Uncertainty of leaderboard numbers: bootstrap confidence intervals of a mean over slices and paired tests.

Both use SciPy (``scipy.stats.bootstrap``, percentile method, seeded; ``scipy.stats.wilcoxon`` on the
per-slice differences of two methods on the same slices).
"""
from __future__ import annotations

import numpy as np
from scipy import stats

__all__ = ["bootstrap_ci", "paired_wilcoxon"]


def bootstrap_ci(values, level: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (finite entries only; ``(nan, nan)`` if fewer
    than two)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size < 2 or np.all(v == v[0]):
        m = float(v.mean()) if v.size else float("nan")
        return (m, m) if v.size else (float("nan"), float("nan"))
    res = stats.bootstrap((v,), np.mean, confidence_level=level, n_resamples=n_resamples, method="percentile",
                          random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_wilcoxon(a, b) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired per-slice values (1.0 when every difference is 0).

    Raises:
        ValueError: ``a`` and ``b`` of different lengths.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired test needs equal lengths, found {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    if not np.any(d != 0):
        return 1.0
    return float(stats.wilcoxon(a[keep], b[keep]).pvalue)
