"""Sinogram completion over the metal trace: linear interpolation (LI) and normalised MAR (NMAR).

* LI: Kalender, Hebel & Ebersberger, Radiology 1987; per view, the line integrals inside the metal trace are
  replaced by the straight line between the nearest unaffected channels on either side (Yu et al., *Metal
  Artifact Reduction in 2D CT Images with Self-supervised Cross-domain Learning*, Eq. 9 residual LI uses it).
* NMAR: Meyer, Raupach, Lell, Schmidt & Kachelriess, Med. Phys. 37(10), 2010: a prior image is obtained by
  thresholding the (smoothed) LI image into air / soft tissue / bone, the sinogram is divided by the prior's
  forward projection, linearly interpolated over the trace, and multiplied back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .projector import Projector
from .units import mu_to_hu
from .validation import check_mask, check_sinogram

__all__ = ["li_correction", "linear_interpolation", "metal_trace", "nmar_correction", "nmar_prior"]


def metal_trace(projector: Projector, metal_mask: torch.Tensor) -> torch.Tensor:
    """Metal trace ``fp(metal_mask) > 0``: bool ``(B, 1, V, C)`` from a bool ``(B, 1, N, N)`` metal mask
    (projected through its few pixels only, ``Projector.fp_small_support``).

    Raises:
        ValueError: a mask that is not bool or not on the image grid.
    """
    check_mask(metal_mask, projector.geometry.image_shape, "metal_mask", "image")
    return projector.fp_small_support(metal_mask.to(torch.float32)) > 0


def linear_interpolation(sinogram: torch.Tensor, trace: torch.Tensor) -> torch.Tensor:
    """Per-view linear interpolation across the metal trace (Kalender 1987).

    Args:
        sinogram: ``(B, 1, V, C)`` line integrals.
        trace: bool ``(B, 1, V, C)``; True marks metal-affected channels.
    Returns:
        ``(B, 1, V, C)``: values outside the trace unchanged; inside, the line between the nearest unaffected
        channels of the same view (the nearest one where only one side exists; zero where a whole view is
        in the trace).
    Raises:
        ValueError: mismatching shapes or a non-bool trace.
    """
    check_sinogram(sinogram, tuple(sinogram.shape[-2:]), "sinogram")
    check_mask(trace, tuple(sinogram.shape[-2:]), "metal_trace", "sinogram")
    if trace.shape[0] != sinogram.shape[0]:
        raise ValueError(f"metal_trace: expected batch {sinogram.shape[0]}, found {trace.shape[0]}")
    c = sinogram.shape[-1]
    idx = torch.arange(c, device=sinogram.device).expand_as(sinogram)
    valid = ~trace
    left = torch.where(valid, idx, torch.full_like(idx, -1)).cummax(dim=-1).values
    right = torch.where(valid, idx, torch.full_like(idx, c)).flip(-1).cummin(dim=-1).values.flip(-1)
    has_left, has_right = left >= 0, right < c
    v_left = sinogram.gather(-1, left.clamp(0, c - 1))
    v_right = sinogram.gather(-1, right.clamp(0, c - 1))
    span = (right - left).clamp(min=1).to(sinogram.dtype)
    t = (idx - left).to(sinogram.dtype) / span
    both = v_left + t * (v_right - v_left)
    filled = torch.where(has_left & has_right, both,
                         torch.where(has_left, v_left, torch.where(has_right, v_right, torch.zeros_like(both))))
    return torch.where(trace, filled, sinogram)


def li_correction(projector: Projector, sinogram: torch.Tensor, trace: torch.Tensor,
                  filter_name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LI-corrected sinogram ``(B, 1, V, C)`` and its FBP ``(B, 1, N, N)`` in mm^-1 (``filter_name``: the FBP
    kernel, ``None`` for the geometry's ``default_filter``)."""
    li = linear_interpolation(sinogram, trace)
    return li, projector.fbp(li, filter_name)


def nmar_prior(li_image_mu: torch.Tensor, mu_water_per_mm: float, air_threshold_hu: float = -500.0,
               bone_threshold_hu: float = 300.0, smoothing_sigma_px: float = 1.0) -> torch.Tensor:
    """NMAR prior (Meyer et al. 2010, Sec. II.B): LI image smoothed, air -> 0, soft tissue -> water, bone kept.

    Args:
        li_image_mu: ``(B, 1, N, N)`` LI reconstruction, mm^-1.
        mu_water_per_mm: water attenuation of this scanner's convention.
        air_threshold_hu, bone_threshold_hu: class boundaries in HU.
        smoothing_sigma_px: Gaussian smoothing before thresholding (suppresses residual streaks).
    Returns:
        ``(B, 1, N, N)`` prior attenuation, mm^-1.
    """
    k = int(3 * smoothing_sigma_px) * 2 + 1
    x = torch.arange(k, dtype=li_image_mu.dtype, device=li_image_mu.device) - k // 2
    g = torch.exp(-0.5 * (x / smoothing_sigma_px) ** 2)
    g = g / g.sum()
    smooth = F.conv2d(F.pad(li_image_mu, (k // 2,) * 4, mode="replicate"), g.view(1, 1, 1, k))
    smooth = F.conv2d(smooth, g.view(1, 1, k, 1))
    hu = mu_to_hu(smooth, mu_water_per_mm)
    water = torch.full_like(smooth, mu_water_per_mm)
    prior = torch.where(hu < air_threshold_hu, torch.zeros_like(smooth), water)
    return torch.where(hu > bone_threshold_hu, smooth, prior)


def nmar_correction(projector: Projector, sinogram: torch.Tensor, trace: torch.Tensor,
                    filter_name: str | None = None, offset: float = 0.1,
                    **prior_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """NMAR-corrected sinogram ``(B, 1, V, C)`` and its FBP ``(B, 1, N, N)`` in mm^-1 (Meyer et al. 2010).

    The normalisation is ``(p + offset) / (p_prior + offset)`` (``offset`` in line-integral units, 0.1 = 5 mm of
    water): rays that graze the body have a near-zero prior, and dividing their noise by it, then multiplying
    back inside the trace, would paint streaks across small bodies (measured on the knee and neck phantoms).
    ``filter_name`` is the FBP kernel of both reconstructions, ``None`` for the geometry's ``default_filter``.
    """
    _, li_image = li_correction(projector, sinogram, trace, filter_name)
    prior = nmar_prior(li_image, projector.geometry.mu_water_per_mm, **prior_kwargs)
    prior_sino = projector.fp(prior) + offset
    normalised = linear_interpolation((sinogram + offset) / prior_sino, trace)
    corrected = torch.where(trace, normalised * prior_sino - offset, sinogram)
    return corrected, projector.fbp(corrected, filter_name)
