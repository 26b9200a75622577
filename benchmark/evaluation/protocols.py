"""Named, versioned evaluation protocols: each pins every convention of its metrics.

A protocol turns a batch (the batch convention of ``marbench.datasets``) and a method's prediction (HU) into
per-slice metric values. Changing any convention means a new ``version``; the leaderboard never merges
records of different versions.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import binary_fill_holes

from marbench.converters import hu_to_mu, window

from .metrics import PSNR, RMSE, SSIM, SliceMetric

__all__ = ["Protocol", "AAPMHU", "EditMAR", "SynDeepLesionProtocol", "PROTOCOLS", "get_protocol"]


def _dilate(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    if pixels <= 0:
        return mask
    k = 2 * pixels + 1
    return F.max_pool2d(mask.float(), k, stride=1, padding=pixels) > 0


@dataclass(frozen=True)
class Protocol:
    """Base: ``name``, ``version``, and ``metric_specs`` (metric name -> higher is better)."""

    name: str
    version: str

    def metrics(self) -> dict[str, SliceMetric]:
        raise NotImplementedError

    def update(self, metrics: dict[str, SliceMetric], pred_hu: torch.Tensor, batch: dict) -> None:
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {**asdict(self), "kind": type(self).__name__}

    @property
    def directions(self) -> dict[str, bool]:
        """Metric name -> higher is better."""
        return {k: m.higher_is_better for k, m in self.metrics().items()}


@dataclass(frozen=True)
class AAPMHU(Protocol):
    """``aapm-hu``: the AAPM CT-MAR conventions.

    * ``rmse_hu``: RMSE in HU inside the body (target above ``body_threshold_hu``, holes filled), the metal
      mask dilated by ``metal_dilation_px`` pixels excluded.
    * ``psnr``, ``ssim``: as the AAPM tool's ``AAPMmetric.py`` (xcist/example, ``AAPM_datachallenge/metric``):
      images + 1000 HU, metal pixels set to 0, scaled by ``[scale_min, scale_max]`` to ``[0, 1]`` and clipped,
      body slices zeroed outside a ``fov_ring_mm`` diameter circle, data range 1, SSIM with an 11-tap Gaussian
      window. (``scale_max`` is 20000 in that script; an earlier project note gave 6000.)
    """

    name: str = "aapm-hu"
    version: str = "1"
    body_threshold_hu: float = -500.0
    metal_dilation_px: int = 2
    scale_min: float = -2000.0
    scale_max: float = 20000.0
    fov_ring_mm: float = 470.0

    def metrics(self) -> dict[str, SliceMetric]:
        return {"rmse_hu": RMSE(), "psnr": PSNR(data_range=1.0), "ssim": SSIM(data_range=1.0)}

    def body_mask(self, target_hu: torch.Tensor) -> torch.Tensor:
        body = (target_hu > self.body_threshold_hu).cpu().numpy()
        filled = np.stack([binary_fill_holes(b[0])[None] for b in body])
        return torch.from_numpy(filled).to(target_hu.device)

    def scaled(self, hu: torch.Tensor, metal: torch.Tensor, batch: dict) -> torch.Tensor:
        x = torch.where(metal, torch.zeros_like(hu), hu + 1000.0)
        x = ((x - self.scale_min) / (self.scale_max - self.scale_min)).clamp(0.0, 1.0)
        n = hu.shape[-1]
        out = []
        for i in range(hu.shape[0]):
            if batch.get("anatomy", ["body"] * hu.shape[0])[i] == "body":
                pixel = float(batch["fov_mm"][i]) / n
                c = (n - 1) / 2
                yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
                ring = ((yy - c) ** 2 + (xx - c) ** 2) * pixel**2 < (self.fov_ring_mm / 2) ** 2
                out.append(torch.where(ring.to(x.device), x[i], torch.zeros_like(x[i])))
            else:
                out.append(x[i])
        return torch.stack(out)

    def update(self, metrics, pred_hu, batch) -> None:
        target, metal = batch["gt_image"], batch["metal_mask"]
        region = self.body_mask(target) & ~_dilate(metal, self.metal_dilation_px)
        metrics["rmse_hu"].update(pred_hu, target, region)
        p, t = self.scaled(pred_hu, metal, batch), self.scaled(target, metal, batch)
        metrics["psnr"].update(p, t)
        metrics["ssim"].update(p, t)


@dataclass(frozen=True)
class EditMAR(Protocol):
    """``editmar`` (Emirdagi et al., Sec. 3.1): HU window ``[-500, 1300]`` mapped to ``[0, 1]`` (metal saturates
    at the top), quantised to 8 bits (``round(255 x)``), PSNR and SSIM with data range 255 on the whole image."""

    name: str = "editmar"
    version: str = "1"
    low_hu: float = -500.0
    high_hu: float = 1300.0

    def metrics(self) -> dict[str, SliceMetric]:
        return {"psnr": PSNR(data_range=255.0), "ssim": SSIM(data_range=255.0)}

    def eight_bit(self, hu: torch.Tensor) -> torch.Tensor:
        return torch.round(window(hu, self.low_hu, self.high_hu) * 255.0)

    def update(self, metrics, pred_hu, batch) -> None:
        p, t = self.eight_bit(pred_hu), self.eight_bit(batch["gt_image"])
        metrics["psnr"].update(p, t)
        metrics["ssim"].update(p, t)


@dataclass(frozen=True)
class SynDeepLesionProtocol(Protocol):
    """``syndeeplesion`` (InDuDoNet+ / OSCNet evaluation): attenuation (water 0.192) clipped to ``[0, 0.5]`` and
    divided by 0.5, metal pixels set to 0 in both images (non-metal region only), PSNR and SSIM with data range
    1; the leaderboard reports them per metal-size group (the dataset's ``category``)."""

    name: str = "syndeeplesion"
    version: str = "1"
    mu_water: float = 0.192
    mu_max: float = 0.5

    def metrics(self) -> dict[str, SliceMetric]:
        return {"psnr": PSNR(data_range=1.0), "ssim": SSIM(data_range=1.0)}

    def unit(self, hu: torch.Tensor, metal: torch.Tensor) -> torch.Tensor:
        x = hu_to_mu(hu, self.mu_water).clamp(0.0, self.mu_max) / self.mu_max
        return torch.where(metal, torch.zeros_like(x), x)

    def update(self, metrics, pred_hu, batch) -> None:
        metal = batch["metal_mask"]
        p, t = self.unit(pred_hu, metal), self.unit(batch["gt_image"], metal)
        metrics["psnr"].update(p, t)
        metrics["ssim"].update(p, t)


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (AAPMHU(), EditMAR(), SynDeepLesionProtocol())}


def get_protocol(name: str) -> Protocol:
    """The named protocol.

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    if name not in PROTOCOLS:
        raise KeyError(f"unknown evaluation protocol {name!r}; known: {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]
