"""HU <-> linear attenuation (mm^-1).

``mu = mu_water * (1 + HU / 1000)``; AAPM CT-MAR uses ``mu_water = 0.02`` mm^-1 (``mu = HU/1000*0.02 + 0.02``,
xcist/example ``AAPMRecon.py``: ``recon.mu = 0.02``), SynDeepLesion 0.192 cm^-1 (= 0.0192 mm^-1).
"""
from __future__ import annotations

import torch

__all__ = ["hu_to_mu", "mu_to_hu"]


def hu_to_mu(hu: torch.Tensor, mu_water_per_mm: float) -> torch.Tensor:
    """Attenuation in mm^-1 of an image in HU (any shape); values are not clipped."""
    return mu_water_per_mm * (1.0 + hu / 1000.0)


def mu_to_hu(mu: torch.Tensor, mu_water_per_mm: float) -> torch.Tensor:
    """HU of an attenuation image in mm^-1 (any shape); values are not clipped."""
    return (mu / mu_water_per_mm - 1.0) * 1000.0
