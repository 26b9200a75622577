"""Shared, tested converters between HU and the ranges methods and protocols work in.

Every method converts inside itself with these functions, so two methods that claim the same convention
really use the same one (methods with their own published conventions add theirs here).

>>> window(torch.tensor([-1000.0, 400.0, 2000.0]), -500.0, 1300.0).tolist()
[0.0, 0.5, 1.0]
>>> hu_to_unit(torch.tensor([-1000.0, 0.0])).tolist()
[0.0, 0.5]
>>> [round(v, 4) for v in hu_to_adn(torch.tensor([-1000.0, 0.0, 4000.0])).tolist()]
[-1.0, -0.232, 1.0]
>>> round(float(oscnet_to_hu(hu_to_oscnet(torch.tensor(250.0)))), 3)
250.0
"""
from __future__ import annotations

import torch

from marbench.physics.units import hu_to_mu, mu_to_hu

__all__ = ["hu_to_mu", "mu_to_hu", "window", "hu_to_unit", "unit_to_hu", "DEEPLESION_MU_WATER_PER_CM",
           "hu_to_deeplesion_mu", "hu_to_adn", "adn_to_hu", "hu_to_oscnet", "oscnet_to_hu"]

# DeepLesion-trained methods (ADN, OSCNet) work on attenuation images with water at 0.192 cm^-1
# (Emirdagi et al., 'Leveraging Image Editing Foundation Models for Data-Efficient CT Metal Artifact
# Reduction', Sec. 3.2: ``att = HU/1000*0.192 + 0.192``).
DEEPLESION_MU_WATER_PER_CM = 0.192


def window(hu: torch.Tensor, low_hu: float, high_hu: float) -> torch.Tensor:
    """Map the HU window ``[low_hu, high_hu]`` linearly to ``[0, 1]`` and clip (a display/metric window)."""
    return ((hu - low_hu) / (high_hu - low_hu)).clamp(0.0, 1.0)


def hu_to_unit(hu: torch.Tensor) -> torch.Tensor:
    """Unclipped network scaling ``(HU + 1000) / 2000``: air 0, water 0.5, dense bone ~1.25, metal > 2."""
    return (hu + 1000.0) / 2000.0


def unit_to_hu(unit: torch.Tensor) -> torch.Tensor:
    """Inverse of ``hu_to_unit``."""
    return unit * 2000.0 - 1000.0


def hu_to_deeplesion_mu(hu: torch.Tensor) -> torch.Tensor:
    """Attenuation in cm^-1 on the DeepLesion scale ``HU/1000*0.192 + 0.192`` (water 0.192, air 0); unclipped.
    (``hu_to_mu`` is unit-agnostic: its water value here is per cm.)"""
    return hu_to_mu(hu, DEEPLESION_MU_WATER_PER_CM)


def hu_to_adn(hu: torch.Tensor) -> torch.Tensor:
    """ADN's input range (liaohaofu/adn ``DeepLesion.normalize`` with ``get_minmax() = (0, 0.5)``): DeepLesion
    attenuation clipped to ``[0, 0.5]`` cm^-1 (-1000 to ~1604 HU), mapped linearly to ``[-1, 1]``."""
    return hu_to_deeplesion_mu(hu).clamp(0.0, 0.5) / 0.5 * 2.0 - 1.0


def adn_to_hu(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``hu_to_adn`` on ``[-1, 1]`` (ADN's tanh output range)."""
    return mu_to_hu((x + 1.0) / 2.0 * 0.5, DEEPLESION_MU_WATER_PER_CM)


def hu_to_oscnet(hu: torch.Tensor) -> torch.Tensor:
    """OSCNet's input range (hongwang01/OSCNet ``Dataset.py``): DeepLesion attenuation clipped to ``[0, 1]``
    cm^-1 (-1000 to ~4208 HU), times 255."""
    return hu_to_deeplesion_mu(hu).clamp(0.0, 1.0) * 255.0


def oscnet_to_hu(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``hu_to_oscnet`` (not clipped: OSCNet's output is unbounded)."""
    return mu_to_hu(x / 255.0, DEEPLESION_MU_WATER_PER_CM)
