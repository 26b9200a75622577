"""Image-quality metrics, per slice, as torchmetrics ``Metric``s (distributed-safe: per-slice values are
concatenated across processes).

* ``psnr``: ``10 log10(data_range^2 / MSE)``, MSE over the mask (all pixels by default), as
  ``skimage.metrics.peak_signal_noise_ratio``.
* ``ssim``: Wang et al., IEEE TIP 2004, computed as ``skimage.metrics.structural_similarity`` with
  ``gaussian_weights=True, sigma=1.5, win_size=11, use_sample_covariance=False, K1=0.01, K2=0.03``: local
  statistics by an 11-tap Gaussian, mean of the SSIM map over the image less a 5-pixel border.
* ``rmse``: root mean squared error over the mask, in the input's unit (HU for ``aapm-hu``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics import Metric

__all__ = ["psnr", "ssim", "rmse", "SliceMetric", "PSNR", "SSIM", "RMSE"]


def _flat_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(x, dtype=torch.bool) if mask is None else mask.expand_as(x)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """PSNR in dB per slice, ``(B,)``, of ``(B, 1, H, W)`` images over ``mask`` (bool, same shape)."""
    m = _flat_mask(pred, mask).reshape(pred.shape[0], -1).double()
    err = ((pred.double() - target.double()) ** 2).reshape(pred.shape[0], -1)
    mse = (err * m).sum(1) / m.sum(1).clamp(min=1)
    return 10 * torch.log10(data_range**2 / mse)


def rmse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Root mean squared error per slice, ``(B,)``, over ``mask``."""
    m = _flat_mask(pred, mask).reshape(pred.shape[0], -1).double()
    err = ((pred.double() - target.double()) ** 2).reshape(pred.shape[0], -1)
    return ((err * m).sum(1) / m.sum(1).clamp(min=1)).sqrt()


def _gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)  # scipy.ndimage.gaussian_filter's support: 11 taps for sigma 1.5
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float) -> torch.Tensor:
    """SSIM per slice, ``(B,)``, of ``(B, 1, H, W)`` images (see the module docstring for the definition)."""
    w = _gaussian_window().to(pred.device)
    k = w.numel()

    def blur(t: torch.Tensor) -> torch.Tensor:  # valid convolution == skimage's map cropped by the radius
        return F.conv2d(F.conv2d(t, w.view(1, 1, 1, k)), w.view(1, 1, k, 1))

    x, y = pred.double(), target.double()
    ux, uy = blur(x), blur(y)
    vx, vy, vxy = blur(x * x) - ux * ux, blur(y * y) - uy * uy, blur(x * y) - ux * uy
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


class SliceMetric(Metric):
    """A per-slice metric: ``update`` appends one value per slice, ``compute`` returns the mean; ``values``
    (after ``compute`` or ``sync``) holds every slice's value across processes."""

    full_state_update = False
    higher_is_better: bool = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def _append(self, v: torch.Tensor) -> None:
        self.values.append(v.detach().double())

    def all_values(self) -> torch.Tensor:
        v = self.values
        if isinstance(v, list):
            return torch.cat(v) if v else torch.zeros(0, dtype=torch.float64)
        return v

    def compute(self) -> torch.Tensor:
        v = self.all_values()
        return v.mean() if v.numel() else torch.tensor(math.nan)


class PSNR(SliceMetric):
    higher_is_better = True

    def __init__(self, data_range: float, **kwargs):
        super().__init__(**kwargs)
        self.data_range = data_range

    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        self._append(psnr(pred, target, self.data_range, mask))


class SSIM(SliceMetric):
    higher_is_better = True

    def __init__(self, data_range: float, **kwargs):
        super().__init__(**kwargs)
        self.data_range = data_range

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self._append(ssim(pred, target, self.data_range))


class RMSE(SliceMetric):
    higher_is_better = False

    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        self._append(rmse(pred, target, mask))
