"""Shared, tested converters between HU and the ranges methods and protocols work in.

Every method converts inside itself with these functions, so two methods that claim the same convention
really use the same one (methods with their own published conventions add theirs here).
"""
from __future__ import annotations

import torch

from marbench.physics.units import hu_to_mu, mu_to_hu

__all__ = ["hu_to_mu", "mu_to_hu", "window", "hu_to_unit", "unit_to_hu"]


def window(hu: torch.Tensor, low_hu: float, high_hu: float) -> torch.Tensor:
    """Map the HU window ``[low_hu, high_hu]`` linearly to ``[0, 1]`` and clip (a display/metric window)."""
    return ((hu - low_hu) / (high_hu - low_hu)).clamp(0.0, 1.0)


def hu_to_unit(hu: torch.Tensor) -> torch.Tensor:
    """Unclipped network scaling ``(HU + 1000) / 2000``: air 0, water 0.5, dense bone ~1.25, metal > 2."""
    return (hu + 1000.0) / 2000.0


def unit_to_hu(unit: torch.Tensor) -> torch.Tensor:
    """Inverse of ``hu_to_unit``."""
    return unit * 2000.0 - 1000.0
