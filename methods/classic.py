"""Classic sinogram-completion MAR: linear interpolation (LI) and normalised MAR (NMAR), no training.

Both wrap ``marbench.physics.inpainting``. They reconstruct with the dataset's geometry (per anatomy) and put
the metal back: pixels of the metal mask take the metal-affected image's values, as the AAPM CT-MAR protocol
asks for images that still contain the metal.
"""
from __future__ import annotations

import torch

from marbench.method import MARMethod, MethodCard
from marbench.physics import mu_to_hu, nmar_correction
from marbench.registry import register

__all__ = ["LinearInterpolation", "NormalizedMAR", "Uncorrected"]

_PUT_BACK = "metal-mask pixels take the metal-affected image's values (metal put back)"


def _put_metal_back(restored: torch.Tensor, batch: dict) -> torch.Tensor:
    return torch.where(batch["metal_mask"], batch["ma_image"], restored)


@register("li")
class LinearInterpolation(MARMethod):
    """LI (Kalender, Hebel & Ebersberger, Radiology 164(2), 1987): the FBP of the metal-affected sinogram with
    the metal trace linearly interpolated per view. Uses the batch's cached ``li_image``."""

    card = MethodCard(
        name="li", paper="Kalender, Hebel & Ebersberger, Radiology 164(2):576-577, 1987",
        needs=("ma_image", "li_image", "metal_mask"), trainable=False, metal=_PUT_BACK,
        departures=("interpolation across channels within each view, FBP with a Ram-Lak filter",
                    "runtime excludes the LI prior, which the datamodule computes once per case and caches"),
    )

    def __init__(self):
        super().__init__()

    def restore(self, batch: dict) -> torch.Tensor:
        return _put_metal_back(batch["li_image"], batch)


@register("nmar")
class NormalizedMAR(MARMethod):
    """NMAR (Meyer et al., Med. Phys. 37(10):5482, 2010): LI in the sinogram normalised by the forward projection
    of a thresholded prior image (air / water / bone).

    Args:
        air_threshold_hu, bone_threshold_hu: prior-image class boundaries (HU).
    """

    card = MethodCard(
        name="nmar", paper="Meyer, Raupach, Lell, Schmidt & Kachelriess, Med. Phys. 37(10):5482-5493, 2010",
        needs=("ma_image", "ma_sinogram", "metal_trace", "metal_mask", "anatomy"), trainable=False, metal=_PUT_BACK,
        departures=("prior classes by fixed HU thresholds after 1-pixel Gaussian smoothing instead of k-means",),
    )

    def __init__(self, air_threshold_hu: float = -500.0, bone_threshold_hu: float = 300.0):
        super().__init__()
        self.air_threshold_hu, self.bone_threshold_hu = air_threshold_hu, bone_threshold_hu

    def restore(self, batch: dict) -> torch.Tensor:
        out = torch.empty_like(batch["ma_image"])
        for i, anatomy in enumerate(batch["anatomy"]):
            p = self.projector(anatomy, out.device)
            _, mu = nmar_correction(p, batch["ma_sinogram"][i: i + 1], batch["metal_trace"][i: i + 1],
                                    air_threshold_hu=self.air_threshold_hu, bone_threshold_hu=self.bone_threshold_hu)
            out[i] = mu_to_hu(mu, p.geometry.mu_water_per_mm)[0]
        return _put_metal_back(out, batch)


@register("uncorrected")
class Uncorrected(MARMethod):
    """The metal-affected image itself: the reference row every MAR method must beat."""

    card = MethodCard(name="uncorrected", paper="(reference: no artifact reduction)", needs=("ma_image",),
                      trainable=False, metal="the input, metal included")

    def __init__(self):
        super().__init__()

    def restore(self, batch: dict) -> torch.Tensor:
        return batch["ma_image"]
