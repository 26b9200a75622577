"""Image-quality metrics per slice, as functions of ``(B, 1, H, W)`` tensors returning ``(B,)`` float64 values.

* ``psnr``: ``10 log10(data_range^2 / MSE)`` over the whole image, torchmetrics'
  ``peak_signal_noise_ratio`` per slice (equal to ``skimage.metrics.peak_signal_noise_ratio``).
* ``ssim``: Wang, Bovik, Sheikh & Simoncelli, "Image quality assessment: from error visibility to structural
  similarity", IEEE TIP 13(4), 2004, computed exactly as ``skimage.metrics.structural_similarity`` with
  ``gaussian_weights=True, sigma=1.5, win_size=11, use_sample_covariance=False, K1=0.01, K2=0.03``: local
  statistics by an 11-tap Gaussian, mean of the SSIM map over the image less a 5-pixel border. (torchmetrics'
  SSIM pads and crops differently, and the published MAR scripts use scikit-image's.)
* ``rmse``: root mean squared error over a mask, in the input's unit (HU for ``aapm-hu``); torchmetrics has
  no masked variant.

>>> x = torch.zeros(1, 1, 16, 16)
>>> float(rmse(x + 3.0, x))
3.0
>>> round(float(psnr(x + 0.1, x, data_range=1.0)), 4)
20.0
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio

__all__ = ["psnr", "ssim", "rmse"]


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float) -> torch.Tensor:
    """PSNR in dB per slice, ``(B,)`` float64, of ``(B, 1, H, W)`` images with the given data range."""
    return peak_signal_noise_ratio(pred.double(), target.double(), data_range=data_range, reduction="none",
                                   dim=(1, 2, 3))


def rmse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Root mean squared error per slice, ``(B,)`` float64, over ``mask`` (bool, broadcastable; all pixels by
    default); NaN for a slice whose mask is empty."""
    m = (torch.ones_like(pred, dtype=torch.bool) if mask is None else mask.expand_as(pred))
    m = m.reshape(pred.shape[0], -1).double()
    err = ((pred.double() - target.double()) ** 2).reshape(pred.shape[0], -1)
    return ((err * m).sum(1) / m.sum(1)).sqrt()


def _gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)  # scikit-image's support for sigma 1.5: 11 taps
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float) -> torch.Tensor:
    """SSIM per slice, ``(B,)`` float64, of ``(B, 1, H, W)`` images (see the module docstring for the definition).

    Raises:
        ValueError: images smaller than the 11 x 11 window.
    """
    w = _gaussian_window().to(pred.device)
    k = w.numel()
    if min(pred.shape[-2:]) < k:
        raise ValueError(f"SSIM needs images of at least {k} x {k} pixels, found {tuple(pred.shape[-2:])}")

    def blur(t: torch.Tensor) -> torch.Tensor:  # a valid convolution equals scikit-image's map cropped by the radius
        return F.conv2d(F.conv2d(t, w.view(1, 1, 1, k)), w.view(1, 1, k, 1))

    x, y = pred.double(), target.double()
    ux, uy = blur(x), blur(y)
    vx, vy, vxy = blur(x * x) - ux * ux, blur(y * y) - uy * uy, blur(x * y) - ux * uy
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))
