"""Named, versioned evaluation protocols: each pins every convention of its metrics.

A protocol turns a batch (the batch convention of ``marbench.datasets``) and a method's prediction (HU) into
per-slice metric values. Changing any convention means a new ``version``; the leaderboard never merges
records of different versions.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import binary_fill_holes

from marbench.converters import hu_to_mu, window

from .metrics import PSNR, RMSE, SSIM, SliceMetric
from .perceptual import backbones, frechet_distance_of_features, layer4_distance
from .segmentation import ClassIoUMetric, MeanIoUMetric, SegmentationRecipe, segmenter

__all__ = ["Protocol", "AAPMHU", "EditMAR", "SynDeepLesionProtocol", "Perceptual", "Segmentation", "BackboneMetric",
           "PROTOCOLS", "get_protocol"]


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

    def update(self, metrics: dict[str, SliceMetric], pred_hu: torch.Tensor, batch: dict) -> dict | None:
        """Update the per-slice metrics; protocols with set-level metrics return the prediction's features
        (``set_features`` of ``pred_hu``, computed along with the per-slice metrics to share backbone passes)."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {**asdict(self), "kind": type(self).__name__}

    def bind(self, datamodule) -> "Protocol":
        """The protocol for one datamodule (protocols whose metrics depend on the data, e.g. a segmenter trained on
        its training split, return a bound copy)."""
        return self

    @property
    def directions(self) -> dict[str, bool]:
        """Metric name -> higher is better."""
        return {k: m.higher_is_better for k, m in self.metrics().items()}

    # Set-level metrics (a value for the whole split, e.g. FID) come from per-slice features.
    @property
    def set_directions(self) -> dict[str, bool]:
        """Set-level metric name -> higher is better (none by default)."""
        return {}

    def set_features(self, hu: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """Per-slice features ``(B, D)`` of images ``(B, 1, H, W)`` in HU for each set-level metric."""
        return {}

    def set_metric(self, name: str, features: np.ndarray, reference: np.ndarray) -> float:
        """The set-level metric ``name`` from the method's and the reference images' features ``(N, D)``."""
        raise KeyError(f"protocol {self.name!r} has no set-level metric {name!r}")

    def weights_sha256(self) -> dict[str, str]:
        """Weight files the protocol's metrics use: registry name -> sha256 or ``"random"``."""
        return {}


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


class BackboneMetric(SliceMetric):
    """A per-slice distance ``fn(backbone, pred, target) -> (B,)`` on a feature backbone (registered as a child
    module, so it moves with the metric); lower is better."""

    higher_is_better = False

    def __init__(self, backbone: torch.nn.Module, fn, **kwargs):
        super().__init__(**kwargs)
        self.backbone, self.fn = backbone, fn

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        with torch.no_grad():
            self._append(self.fn(self.backbone, pred, target))


@dataclass(frozen=True)
class Perceptual(Protocol):
    """``perceptual``: LPIPS (VGG16, v0.1) and LPIPS-Rad per slice; FID (InceptionV3 pool3) and FID-Rad
    (RadImageNet ResNet50 pooled layer4) over the split, against the split's metal-free images.

    Images: the HU window ``[low_hu, high_hu]`` mapped to ``[0, 1]`` (the ``editmar`` window; metal, put back
    by the methods, saturates at 1), whole image, grey repeated to three channels by each backbone. Backbone
    weights (``weights``): see ``perceptual.Backbones``; the record lists each file's sha256 or ``random``, and
    the leaderboard never merges records whose weights differ. FID over few slices is biased upward (Chong &
    Forsyth 2020): compare only rows of one split, as the leaderboard does.
    """

    name: str = "perceptual"
    version: str = "1"
    low_hu: float = -500.0
    high_hu: float = 1300.0
    weights: str = "auto"

    def _unit(self, hu: torch.Tensor) -> torch.Tensor:
        return window(hu, self.low_hu, self.high_hu)

    def metrics(self) -> dict[str, SliceMetric]:
        bb = backbones(self.weights)
        return {"lpips": BackboneMetric(bb.lpips, lambda m, p, t: m(p, t)),
                "lpips_rad": BackboneMetric(bb.radimagenet, lambda m, fp, ft: layer4_distance(fp, ft))}

    def update(self, metrics, pred_hu, batch) -> dict[str, torch.Tensor]:
        bb = backbones(self.weights).to(pred_hu.device)
        p, t = self._unit(pred_hu), self._unit(batch["gt_image"])
        metrics["lpips"].update(p, t)
        with torch.no_grad():  # one RadImageNet pass per image serves LPIPS-Rad and the FID-Rad features
            fp = bb.radimagenet.layer4(p)
            metrics["lpips_rad"].update(fp, bb.radimagenet.layer4(t))
            return {"fid": bb.inception(p), "fid_rad": fp.mean(dim=(2, 3))}

    @property
    def set_directions(self) -> dict[str, bool]:
        return {"fid": False, "fid_rad": False}

    def set_features(self, hu: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        bb = backbones(self.weights).to(hu.device)
        x = self._unit(hu)
        with torch.no_grad():
            return {"fid": bb.inception(x), "fid_rad": bb.radimagenet(x)}

    def set_metric(self, name: str, features: np.ndarray, reference: np.ndarray) -> float:
        if name not in self.set_directions:
            return super().set_metric(name, features, reference)
        return frechet_distance_of_features(features, reference)

    def weights_sha256(self) -> dict[str, str]:
        return backbones(self.weights).weights_sha256()


@dataclass(frozen=True)
class Segmentation(Protocol):
    """``segmentation`` (ArtifactGSI Table 2): a tissue-segmentation U-Net trained on the clean images of the
    split's training part (``evaluation.segmentation.SegmentationRecipe``) segments each restored image;
    ``miou`` per slice is torchmetrics' mean IoU against the tissue labels over the classes present, and
    ``iou_<class>`` each class's IoU (slices where the class is in neither map are skipped). Needs
    ``tissue_labels`` in the batch (synthetic benchmark). The record carries the segmenter's sha256.
    """

    name: str = "segmentation"
    version: str = "1"
    recipe: SegmentationRecipe = field(default_factory=SegmentationRecipe)
    root: str | None = None
    split: str | None = None

    def bind(self, datamodule) -> "Segmentation":
        from dataclasses import replace

        return replace(self, root=str(datamodule.root), split=datamodule.split_path)

    def _segmenter(self):
        if self.root is None:
            raise ValueError("the segmentation protocol is bound to a datamodule (its training split) first")
        return segmenter(self.root, self.split, self.recipe)

    def metrics(self) -> dict[str, SliceMetric]:
        # unbound: only the metric names and directions are asked for
        net = torch.nn.Identity() if self.root is None else self._segmenter()[0]
        return {"miou": MeanIoUMetric(net, self.recipe),
                **{f"iou_{name}": ClassIoUMetric() for name in self.recipe.class_names}}

    def update(self, metrics, pred_hu, batch) -> None:
        if "tissue_labels" not in batch:
            raise ValueError("the segmentation protocol needs 'tissue_labels' in the batch (data keys); the "
                             "synthetic benchmark writes them")
        mean, per_class = metrics["miou"].score(pred_hu, batch["tissue_labels"])
        metrics["miou"].update(mean)
        for c, name in enumerate(self.recipe.class_names):
            metrics[f"iou_{name}"].update(per_class[:, c])

    def to_dict(self) -> dict:
        return {k: v for k, v in super().to_dict().items() if k not in ("root", "split")}

    def weights_sha256(self) -> dict[str, str]:
        return {"segmenter": self._segmenter()[1]} if self.root is not None else {}


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (AAPMHU(), EditMAR(), SynDeepLesionProtocol(), Perceptual(),
                                                      Segmentation())}


def get_protocol(name: str) -> Protocol:
    """The named protocol.

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    if name not in PROTOCOLS:
        raise KeyError(f"unknown evaluation protocol {name!r}; known: {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]
