"""Classic sinogram-completion MAR (no training) and the reference rows.

LI and NMAR wrap ``marbench.physics.inpainting``. They reconstruct with each slice's geometry (``physics``) and put
the metal back: pixels of the metal mask take the metal-affected image's values, as the AAPM CT-MAR protocol
asks for images that still contain the metal. ``uncorrected`` (the metal-affected input) and ``clean-image``
(the metal-free target itself: the ceiling of the downstream segmentation protocol) are reference rows.
"""
from __future__ import annotations

import torch

from marbench.datasets.batch import Batch
from marbench.method import MARMethod, MethodCard, put_metal_back
from marbench.physics import CTPhysics, mu_to_hu, nmar_correction

__all__ = ["LinearInterpolation", "NormalizedMAR", "Uncorrected", "CleanImage"]


class LinearInterpolation(MARMethod):
    """LI (Kalender, Hebel & Ebersberger, Radiology 164(2), 1987): the FBP of the metal-affected sinogram with
    the metal trace linearly interpolated per view. Uses the batch's cached ``li_image``."""

    card = MethodCard(
        name="li", paper="Kalender, Hebel & Ebersberger, 'Reduction of CT artifacts caused by metallic implants', "
                         "Radiology 164(2):576-577, 1987",
        inputs=("ma_image", "li_image", "metal_mask"), trainable=False,
        departures=("interpolation across channels within each view, FBP with the dataset's reconstruction kernel",
                    "runtime excludes the LI prior, which the datamodule computes once per case and caches"),
    )

    def __init__(self):
        super().__init__()

    def restore(self, batch: Batch, physics: CTPhysics) -> torch.Tensor:
        return put_metal_back(batch["li_image"], batch)


class NormalizedMAR(MARMethod):
    """NMAR (Meyer et al., Med. Phys. 37(10):5482, 2010): LI in the sinogram normalised by the forward projection
    of a thresholded prior image (air / water / bone).

    Args:
        air_threshold_hu, bone_threshold_hu: prior-image class boundaries (HU).
    """

    card = MethodCard(
        name="nmar", paper="Meyer, Raupach, Lell, Schmidt & Kachelriess, 'Normalized metal artifact reduction "
                           "(NMAR) in computed tomography', Med. Phys. 37(10):5482-5493, 2010",
        inputs=("ma_image", "ma_sinogram", "metal_trace", "metal_mask", "geometry"), trainable=False,
        departures=("prior classes by fixed HU thresholds after 1-pixel Gaussian smoothing instead of k-means",),
    )

    def __init__(self, air_threshold_hu: float = -500.0, bone_threshold_hu: float = 300.0):
        super().__init__()
        self.air_threshold_hu, self.bone_threshold_hu = air_threshold_hu, bone_threshold_hu

    def restore(self, batch: Batch, physics: CTPhysics) -> torch.Tensor:
        out = torch.empty_like(batch["ma_image"])
        for p, rows in physics.groups(batch):
            _, mu = nmar_correction(p, batch["ma_sinogram"][rows], batch["metal_trace"][rows],
                                    air_threshold_hu=self.air_threshold_hu, bone_threshold_hu=self.bone_threshold_hu)
            out[rows] = mu_to_hu(mu, p.geometry.mu_water_per_mm)
        return put_metal_back(out, batch)


class Uncorrected(MARMethod):
    """The metal-affected image itself: the reference row every MAR method must beat."""

    card = MethodCard(name="uncorrected", paper="(reference row: no artifact reduction)", inputs=("ma_image",),
                      trainable=False, metal="the input, metal included")

    def __init__(self):
        super().__init__()

    def restore(self, batch: Batch, physics: CTPhysics) -> torch.Tensor:
        return batch["ma_image"]


class CleanImage(MARMethod):
    """The metal-free image itself: a reference row, the ceiling of the downstream segmentation protocol (a
    perfect method would give it); not a MAR method, it reads the target."""

    card = MethodCard(name="clean-image", paper="(reference row: the metal-free target image)",
                      inputs=("gt_image",), trainable=False, puts_metal_back=False,
                      metal="no metal (the metal-free image)")

    def __init__(self):
        super().__init__()

    def restore(self, batch: Batch, physics: CTPhysics) -> torch.Tensor:
        return batch["gt_image"].clone()
