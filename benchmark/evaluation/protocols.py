"""Named, versioned evaluation protocols: each pins every convention of its metrics.

A protocol has one job: ``score(pred_hu, batch) -> {metric: (B,)}``, the per-slice values of its metrics for a
method's prediction (HU, ``(B, 1, H, W)``) against a batch of the suite's convention. Each metric is declared
once, as a ``MetricSpec`` (name, whether higher is better, unit, display digits, per slice or per set), and the
evaluator, the records and the leaderboard all read that declaration. Set-level metrics (FID over a split,
PI_q / PI_s over the metal sweeps) come from ``set_metrics`` over the per-slice rows and features. The
computation itself lives in ``metrics`` (PSNR, SSIM, RMSE), ``clinical`` (the AAPM CT-MAR challenge's eight
clinical scores), ``perceptual`` (LPIPS, FID, their RadImageNet
variants, PI) and ``segmentation`` (the segmenter); a protocol only fixes how they are applied.

Changing any convention means a new ``version``; the leaderboard never merges records of different versions.
Protocols are found by name in ``PROTOCOLS`` (a ``marbench.registry.Registry``).

>>> get_protocol("editmar").metric_names
('psnr', 'ssim')
>>> get_protocol("artifactgsi").metric_names, get_protocol("artifactgsi").window_hu
(('psnr', 'ssim', 'lpips'), (-500.0, 1500.0))
>>> [m.unit for m in get_protocol("aapm-hu").metrics]
['HU', 'dB', '']
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import ClassVar, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.ndimage import binary_fill_holes

from marbench.content_cache import ContentCache
from marbench.converters import hu_to_mu, window
from marbench.datasets.sweeps import metal_objects
from marbench.registry import Registry

from . import clinical
from .metrics import psnr, rmse, ssim
from .perceptual import backbones, frechet_distance_of_features, layer4_distance, lpips_alex, perceptual_indicator
from .segmentation import ARTIFACTGSI_RECIPE, SegmentationRecipe, segment, segmenter

__all__ = ["MetricSpec", "Protocol", "AAPMHU", "AAPM_HU_V1", "AAPMClinical", "EditMAR", "SynDeepLesionProtocol",
           "Perceptual", "Segmentation", "ArtifactGSI", "ArtifactGSISegmentation",
           "PerceptualIndicators", "PROTOCOLS", "get_protocol", "level_lpips"]


@dataclass(frozen=True)
class MetricSpec:
    """One metric, declared once.

    Attributes:
        name: column name in records and tables.
        higher_is_better: the metric's direction.
        unit: ``"HU"``, ``"dB"``, ``""`` (unitless), ...
        digits: decimals shown in tables.
        level: ``"slice"`` (a value per slice, from ``score``) or ``"set"`` (one value per record, from
            ``set_metrics``).
        description: what it measures, for captions and the page.
        figure: drawn in the leaderboard's summary bar chart (per-class detail metrics are not).
    """

    name: str
    higher_is_better: bool
    unit: str = ""
    digits: int = 2
    level: Literal["slice", "set"] = "slice"
    description: str = ""
    figure: bool = True

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"

    def format(self, value: float) -> str:
        return f"{value:.{self.digits}f}"


@dataclass(frozen=True)
class Protocol:
    """Base class. Subclasses are frozen dataclasses whose fields are the protocol's conventions.

    Class attributes:
        data: which part of a benchmark the protocol scores: ``"test"`` (the split's test slices) or
            ``"sweeps"`` (the synthetic benchmark's metal sweeps, ``marbench.datasets.sweeps``).
        requires: batch keys ``score`` reads.
        row_keys: batch metadata kept beside each slice's values (``set_metrics`` reads them).
        reference_features: set-level metrics compare the method's ``features`` with the reference images' (the
            evaluator computes those once per split and caches them).
    """

    name: str
    version: str
    data: ClassVar[str] = "test"
    requires: ClassVar[tuple[str, ...]] = ("gt_image",)
    row_keys: ClassVar[tuple[str, ...]] = ()
    reference_features: ClassVar[bool] = False

    @property
    def metrics(self) -> tuple[MetricSpec, ...]:
        """Every metric of the protocol, per slice and per set."""
        raise NotImplementedError

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.metrics)

    def score(self, pred_hu: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """Per-slice values ``{metric: (B,) float64}`` of every slice-level metric."""
        raise NotImplementedError

    def features(self, hu: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """Per-slice features ``{set metric: (B, D)}`` of images ``(B, 1, H, W)`` (HU) that set-level metrics compare
        between the method and the references (FID); none by default."""
        return {}

    def score_and_features(self, pred_hu: torch.Tensor, batch: dict) -> tuple[dict, dict]:
        """``(score(...), features(...))`` of a prediction; protocols whose metrics share backbone passes override
        it to run each backbone once."""
        return self.score(pred_hu, batch), self.features(pred_hu, batch)

    def set_metrics(self, frame: pd.DataFrame, features: dict[str, np.ndarray],
                    reference: dict[str, np.ndarray]) -> dict[str, float]:
        """Set-level values from the per-slice rows (``slice_id``, ``category``, ``row_keys``, the slice metrics),
        the method's features and the reference images' features (``{metric: (N, D)}`` in ``frame``'s order)."""
        return {}

    def bind(self, datamodule) -> "Protocol":
        """The protocol for one datamodule (a protocol whose metrics depend on the data, such as a segmenter trained
        on its training split, returns a bound copy)."""
        return self

    def weights_sha256(self) -> dict[str, str]:
        """Weight files the protocol's metrics use: name -> sha256 or ``"random"``."""
        return {}

    def check_batch(self, batch: dict) -> None:
        """Raises ``KeyError`` naming the protocol, the missing keys and the batch's keys."""
        missing = [k for k in self.requires if k not in batch]
        if missing:
            raise KeyError(f"protocol {self.name!r} needs batch keys {missing} (add them to the datamodule's keys); "
                           f"the batch has {sorted(batch)}")

    def to_dict(self) -> dict:
        """The protocol's definition: its conventions (the dataclass fields), kind, data and metric specs."""
        d = {f.name: asdict(v) if is_dataclass(v) else v
             for f in fields(self) if not f.name.startswith("_") and (v := getattr(self, f.name)) is not None}
        return {**d, "kind": type(self).__name__, "data": self.data, "metrics": [asdict(m) for m in self.metrics],
                "weights_sha256": self.weights_sha256()}


def _dilate(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    if pixels <= 0:
        return mask
    k = 2 * pixels + 1
    return F.max_pool2d(mask.float(), k, stride=1, padding=pixels) > 0


@dataclass(frozen=True)
class AAPMHU(Protocol):
    """``aapm-hu``: the AAPM CT-MAR conventions.

    * ``rmse_hu``: RMSE in HU inside the body (target above ``body_threshold_hu``, holes filled), the metal
      mask dilated by ``metal_dilation_px`` pixels excluded.
    * ``psnr``, ``ssim``: as the challenge's ``AAPMmetric.py`` (xcist/example,
      ``AAPM_datachallenge/obsolete/metric/AAPMmetric.py``): images + 1000 HU, metal pixels set to 0,
      ``[scale_min, scale_max]`` mapped to ``[0, 1]`` and clipped, body slices zeroed outside a ``fov_ring_mm``
      diameter circle, data range 1, SSIM with an 11-tap Gaussian window.

    Versions: v2 (default) follows the script since its revision of 2024-02-19 (c23d351, still so at its latest,
    ebb770e): ``min2 = -2000, max2 = 6000``. v1 followed the script's first revisions (30e87d4 .. 4461eab,
    ``max2 = 20000``); ``get_protocol("aapm-hu", version="1")`` (``AAPM_HU_V1``) still scores and describes it, for
    the records made with it.
    """

    name: str = "aapm-hu"
    version: str = "2"
    body_threshold_hu: float = -500.0
    metal_dilation_px: int = 2
    scale_min: float = -2000.0
    scale_max: float = 6000.0
    fov_ring_mm: float = 470.0
    requires: ClassVar[tuple[str, ...]] = ("gt_image", "metal_mask", "anatomy", "fov_mm")

    @property
    def metrics(self) -> tuple[MetricSpec, ...]:
        return (MetricSpec("rmse_hu", False, "HU", 2, description="RMSE inside the body, metal (dilated) excluded"),
                MetricSpec("psnr", True, "dB", 2, description="PSNR on the AAPM scale"),
                MetricSpec("ssim", True, "", 4, description="SSIM on the AAPM scale"))

    def body_mask(self, target_hu: torch.Tensor) -> torch.Tensor:
        """Bool ``(B, 1, H, W)``: pixels above ``body_threshold_hu`` with the holes filled."""
        body = (target_hu > self.body_threshold_hu).cpu().numpy()
        filled = np.stack([binary_fill_holes(b[0])[None] for b in body])
        return torch.from_numpy(filled).to(target_hu.device)

    def scaled(self, hu: torch.Tensor, metal: torch.Tensor, batch: dict) -> torch.Tensor:
        """``(B, 1, H, W)`` HU -> the AAPM script's ``[0, 1]`` scale (see the class docstring)."""
        x = torch.where(metal, torch.zeros_like(hu), hu + 1000.0)
        x = ((x - self.scale_min) / (self.scale_max - self.scale_min)).clamp(0.0, 1.0)
        n = hu.shape[-1]
        c = (n - 1) / 2
        yy, xx = torch.meshgrid(torch.arange(n, device=x.device), torch.arange(n, device=x.device), indexing="ij")
        out = []
        for i in range(hu.shape[0]):
            if batch["anatomy"][i] == "body":
                pixel = float(batch["fov_mm"][i]) / n
                ring = ((yy - c) ** 2 + (xx - c) ** 2) * pixel**2 < (self.fov_ring_mm / 2) ** 2
                out.append(torch.where(ring, x[i], torch.zeros_like(x[i])))
            else:
                out.append(x[i])
        return torch.stack(out)

    def score(self, pred_hu, batch):
        target, metal = batch["gt_image"], batch["metal_mask"]
        region = self.body_mask(target) & ~_dilate(metal, self.metal_dilation_px)
        p, t = self.scaled(pred_hu, metal, batch), self.scaled(target, metal, batch)
        return {"rmse_hu": rmse(pred_hu, target, region), "psnr": psnr(p, t, 1.0), "ssim": ssim(p, t, 1.0)}


AAPM_HU_V1 = AAPMHU(version="1", scale_max=20000.0)
"""``aapm-hu`` v1 (``AAPMmetric.py`` before 2024-02-19: ``max2 = 20000``), for records made with it."""


@dataclass(frozen=True)
class AAPMClinical(Protocol):
    """``aapm-clinical``: the AAPM CT-MAR challenge's own scoring (xcist/example ``AAPM_datachallenge``:
    ``scoring_metric.md``, ``scoring/score.py``, ``scoring/utils.py``), computed per slice by ``clinical``.

    Per slice, the eight metrics and their 0-4 scores (0: as the reference; 4: no better than uncorrected): CT-number
    accuracy (``rmse_hu`` -> ``score_ct_number``), noise (``noise_hu``), sharpness (Sobel P90 ratio, scored against
    Gaussian blurs of sigma 0.4, 0.5, 0.75, 1), streak amplitude (``streak_hu``), overall integrity (``ssim``, data
    range 5000), bone integrity (> 150 HU: ``bone_volume_change``, ``bone_dice``), metal integrity
    (``metal_volume_change``, ``metal_dice``), proton range (``range_shift``: WET along in-plane beams through the
    MGH CT-number-to-SPR curve); ``score`` is their mean, and the set-level ``challenge_score`` combines them as
    score.py: the mean over the eight metrics of each score's mean over the slices. Definitions: ``clinical``'s
    module docstring.

    ROIs and score axes:

    * ``reference_dir`` set (the real scoring set, e.g. ``AAPMScoringDataModule``): the challenge's
      ``1_data_dicts/{base,structures,parameters}.pkl`` from that folder (or the folder itself), read by a
      restricted unpickler (``safe_pickle``), the case from each slice's ``slice_id`` (``"01"`` .. ``"29"``), the
      per-case score axes of ``utils.scoring_axes``. A case missing there is an error. The reference images come
      from ``base.pkl``, so the batch needs no ``gt_image``; the record lists the pickles' sha256.
    * no ``reference_dir`` (the synthetic benchmark): the challenge's hand-drawn ROIs do not exist, so each slice's
      are derived from the phantom's structures (``tissue_labels``, ``metal_mask``): the patient outline (non-air,
      holes filled); the metal region (metal + 10 mm); a homogeneous soft-tissue disk (radius 8 mm, or smaller where
      none fits) inside one tissue class, as far from the metal as possible; soft-tissue/bone and soft-tissue/fat
      boundary bands outside the metal region; streak lines joining the centroids of each pair of metal objects
      (one object: the ring 5-15 mm around it); a 15 mm proton target at the body's centroid reached by four
      beams. The score axes are calibrated per slice: 0 at the ideal value, 4 at the uncorrected image's
      (``ma_image``) value (at least the challenge's narrowest span), noise from the reference's to twice it,
      sharpness at the reference blurred with the four sigmas, range 0-2 %. See ``clinical.synthetic_case``.
    """

    name: str = "aapm-clinical"
    version: str = "1"
    reference_dir: str | None = None
    requires: ClassVar[tuple[str, ...]] = ("gt_image", "ma_image", "metal_mask", "tissue_labels", "fov_mm")

    @property
    def metrics(self) -> tuple[MetricSpec, ...]:
        def score(name, what, figure=False):
            return MetricSpec(name, False, "", 2, description=f"0-4 score: {what}", figure=figure)

        def detail(name, higher, unit, digits, what):
            return MetricSpec(name, higher, unit, digits, description=what, figure=False)

        return (score("score", "mean of the eight clinical scores", figure=True),
                score("score_ct_number", "CT-number accuracy (RMSE)"), score("score_noise", "noise"),
                score("score_sharpness", "sharpness"), score("score_streak", "streak amplitude"),
                score("score_ssim", "overall integrity (SSIM)"), score("score_bone", "bone integrity"),
                score("score_metal", "metal integrity"), score("score_range", "proton range"),
                detail("rmse_hu", False, "HU", 2, "RMSE inside the patient, metal (dilated) excluded"),
                detail("noise_hu", False, "HU", 2, "standard deviation in the homogeneous ROI"),
                detail("sharpness", True, "", 3, "Sobel P90 in the edge ROIs relative to the reference"),
                detail("streak_hu", False, "HU", 1, "streak amplitude (top 5 % minus bottom 5 % of the error)"),
                detail("ssim", True, "", 4, "SSIM (data range 5000) inside the patient"),
                detail("bone_volume_change", False, "", 4, "relative bone (> 150 HU) area change"),
                detail("bone_dice", True, "", 4, "Dice of the bone masks"),
                detail("metal_volume_change", False, "", 4, "relative metal area change"),
                detail("metal_dice", True, "", 4, "Dice of the metal masks"),
                detail("range_shift", False, "", 4, "largest WET difference relative to the largest range"),
                MetricSpec("challenge_score", False, "", 3, "set",
                           "score.py's overall score: mean over the eight metrics of their mean scores", figure=False))

    def check_batch(self, batch: dict) -> None:
        if self.reference_dir is None:
            return super().check_batch(batch)
        if "slice_id" not in batch:
            raise KeyError(f"protocol {self.name!r} with reference_dir needs batch key 'slice_id' (the scoring case); "
                           f"the batch has {sorted(batch)}")

    def cases(self, batch: dict) -> list[clinical.ClinicalCase]:
        """One ``clinical.ClinicalCase`` per slice of the batch."""
        if self.reference_dir is not None:
            return [clinical.reference_case(self.reference_dir, clinical.case_key(sid)) for sid in batch["slice_id"]]
        n = batch["gt_image"].shape[-1]

        def build(inputs) -> list[clinical.ClinicalCase]:
            gt, ma, metal, labels, fov_mm = (t.cpu().clone() for t in inputs)  # no view of a batch is kept
            return [clinical.synthetic_case(gt[i, 0].numpy(), ma[i, 0].numpy(), metal[i, 0].numpy(),
                                            labels[i, 0].numpy(), float(fov_mm[i]) / n) for i in range(len(gt))]

        # a slice's case is a function of its reference data alone, the same for every row a grid worker scores
        return _SYNTHETIC_CASES(tuple(batch[k] for k in ("gt_image", "ma_image", "metal_mask", "tissue_labels",
                                                         "fov_mm")), build, namespace="synthetic_case")

    def score(self, pred_hu, batch):
        rows = []
        for i, case in enumerate(self.cases(batch)):
            values = clinical.measure(pred_hu[i, 0].detach().cpu().double().numpy(), case)
            rows.append({**values, **clinical.scores(values, case)})
        names = [m.name for m in self.metrics if m.level == "slice"]
        return {k: torch.tensor([r[k] for r in rows], dtype=torch.float64) for k in names}

    def set_metrics(self, frame, features, reference):
        return {"challenge_score": float(np.mean([frame[s].astype(float).mean() for s in clinical.SCORES]))}

    def to_dict(self) -> dict:
        d = super().to_dict()
        if self.reference_dir is None:
            d["rois"] = "derived from the synthetic phantom's structures (marbench.evaluation.clinical.synthetic_case)"
        else:
            d["rois"] = "AAPM CT-MAR scoring pickles (1_data_dicts)"
            d["reference_sha256"] = clinical.load_reference(str(self.reference_dir))[3]
        return d


_SYNTHETIC_CASES = ContentCache(max_items=64)
"""``clinical.synthetic_case`` of the slices seen in this process (the smoke test split has 30; 72 ms each)."""


@dataclass(frozen=True)
class EditMAR(Protocol):
    """``editmar`` (Emirdagi et al., "Leveraging Image Editing Foundation Models for Data-Efficient CT Metal
    Artifact Reduction", Sec. 3.1): HU window ``[-500, 1300]`` mapped to ``[0, 1]`` (metal saturates at the top),
    quantised to 8 bits (``round(255 x)``), PSNR and SSIM with data range 255 on the whole image."""

    name: str = "editmar"
    version: str = "1"
    low_hu: float = -500.0
    high_hu: float = 1300.0

    @property
    def metrics(self) -> tuple[MetricSpec, ...]:
        return (MetricSpec("psnr", True, "dB", 2, description="PSNR of the 8-bit window"),
                MetricSpec("ssim", True, "", 4, description="SSIM of the 8-bit window"))

    def eight_bit(self, hu: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` HU -> 8-bit grey values 0..255 (float)."""
        return torch.round(window(hu, self.low_hu, self.high_hu) * 255.0)

    def score(self, pred_hu, batch):
        p, t = self.eight_bit(pred_hu), self.eight_bit(batch["gt_image"])
        return {"psnr": psnr(p, t, 255.0), "ssim": ssim(p, t, 255.0)}


@dataclass(frozen=True)
class SynDeepLesionProtocol(Protocol):
    """``syndeeplesion`` (the InDuDoNet+ / OSCNet evaluation): attenuation (water 0.192) clipped to ``[0, 0.5]``
    and divided by 0.5, metal pixels set to 0 in both images (non-metal region only), PSNR and SSIM with data
    range 1; the leaderboard reports them per metal-size group (the dataset's ``category``)."""

    name: str = "syndeeplesion"
    version: str = "1"
    mu_water: float = 0.192
    mu_max: float = 0.5
    requires: ClassVar[tuple[str, ...]] = ("gt_image", "metal_mask")

    @property
    def metrics(self) -> tuple[MetricSpec, ...]:
        return (MetricSpec("psnr", True, "dB", 2), MetricSpec("ssim", True, "", 4))

    def unit(self, hu: torch.Tensor, metal: torch.Tensor) -> torch.Tensor:
        x = hu_to_mu(hu, self.mu_water).clamp(0.0, self.mu_max) / self.mu_max
        return torch.where(metal, torch.zeros_like(x), x)

    def score(self, pred_hu, batch):
        metal = batch["metal_mask"]
        p, t = self.unit(pred_hu, metal), self.unit(batch["gt_image"], metal)
        return {"psnr": psnr(p, t, 1.0), "ssim": ssim(p, t, 1.0)}


@dataclass(frozen=True)
class Perceptual(Protocol):
    """``perceptual``: LPIPS (VGG16, v0.1) and LPIPS-Rad per slice; FID (InceptionV3 pool3) and FID-Rad
    (RadImageNet ResNet50 pooled layer4) over the split, against the split's metal-free images.

    Images: the HU window ``[low_hu, high_hu]`` mapped to ``[0, 1]`` (the ``editmar`` window; metal, put back
    by the methods, saturates at 1), whole image, grey repeated to three channels by each backbone. Backbone
    weights (``weights``): see ``perceptual.Backbones``; the record lists each file's sha256 or ``random``, and
    the leaderboard never merges records whose weights differ. FID over few slices is biased upward (Chong &
    Forsyth, CVPR 2020): compare only rows of one split, as the leaderboard does.
    """

    name: str = "perceptual"
    version: str = "1"
    low_hu: float = -500.0
    high_hu: float = 1300.0
    weights: str = "auto"
    reference_features: ClassVar[bool] = True

    @property
    def metrics(self) -> tuple[MetricSpec, ...]:
        return (MetricSpec("lpips", False, "", 4, description="LPIPS (VGG16 v0.1)"),
                MetricSpec("lpips_rad", False, "", 4, description="LPIPS on RadImageNet ResNet50 layer4"),
                MetricSpec("fid", False, "", 2, "set", "FID (InceptionV3 pool3) against the split's targets"),
                MetricSpec("fid_rad", False, "", 4, "set", "FID on RadImageNet ResNet50 pooled layer4"))

    def _unit(self, hu: torch.Tensor) -> torch.Tensor:
        return window(hu, self.low_hu, self.high_hu)

    def score_and_features(self, pred_hu, batch):
        bb = backbones(self.weights).to(pred_hu.device)
        p, t = self._unit(pred_hu), self._unit(batch["gt_image"])
        with torch.no_grad():  # one RadImageNet pass per image serves LPIPS-Rad and the FID-Rad features
            fp = bb.radimagenet.layer4(p)
            scores = {"lpips": bb.lpips(p, t).double(),
                      "lpips_rad": layer4_distance(fp, bb.radimagenet.reference_layer4(t)).double()}
            return scores, {"fid": bb.inception(p), "fid_rad": fp.mean(dim=(2, 3))}

    def score(self, pred_hu, batch):
        return self.score_and_features(pred_hu, batch)[0]

    def features(self, hu, batch):
        bb = backbones(self.weights).to(hu.device)
        x = self._unit(hu)
        with torch.no_grad():
            return {"fid": bb.inception(x), "fid_rad": bb.radimagenet(x)}

    def set_metrics(self, frame, features, reference):
        return {m: frechet_distance_of_features(features[m], reference[m]) for m in ("fid", "fid_rad")}

    def weights_sha256(self) -> dict[str, str]:
        return backbones(self.weights).weights_sha256()


@dataclass(frozen=True)
class Segmentation(Protocol):
    """``segmentation`` (downstream task, as Han et al., "Reducing CT Metal Artifacts by Learning Latent Space
    Alignment with Gemstone Spectral Imaging Data", Table 2): a tissue-segmentation network trained once on the
    clean images of the split's training part (``segmentation.SegmentationRecipe``) segments each restored image;
    ``iou_<class>`` is each class's IoU per slice (torchmetrics) over the slices whose label map holds the class
    (``segmentation.segment``) and ``miou`` their mean over the classes present. Needs ``tissue_labels``
    (synthetic benchmark). The record carries the segmenter's sha256, so rows are compared under one segmenter
    only. Version 3: a class absent from a slice's label map no longer scores 0 there when a few pixels are
    predicted as it (version 2 did; one stray pixel zeroed a slice).
    """

    name: str = "segmentation"
    version: str = "3"
    recipe: SegmentationRecipe = field(default_factory=SegmentationRecipe)
    _datamodule: object = field(default=None, compare=False, repr=False)
    requires: ClassVar[tuple[str, ...]] = ("tissue_labels",)
    first_scored_class: ClassVar[int] = 0  # classes before it are segmented but not scored
    miou_description: ClassVar[str] = "mean IoU over the tissue classes present"

    @property
    def structures(self) -> tuple[str, ...]:
        """The scored classes: ``recipe.class_names`` from ``first_scored_class`` on."""
        return self.recipe.class_names[self.first_scored_class:]

    @property
    def metrics(self) -> tuple[MetricSpec, ...]:
        return (MetricSpec("miou", True, "", 4, description=self.miou_description),
                *(MetricSpec(f"iou_{c}", True, "", 4, description=f"IoU of {c.replace('_', ' ')}", figure=False)
                  for c in self.structures))

    def bind(self, datamodule) -> "Segmentation":
        return replace(self, _datamodule=datamodule)

    def _segmenter(self):
        if self._datamodule is None:
            raise ValueError(f"the {self.name} protocol is bound to a datamodule (its training split) first")
        return segmenter(self._datamodule, self.recipe)

    def score(self, pred_hu, batch):
        per_class = segment(self._segmenter()[0], self.recipe, pred_hu, batch[self.recipe.label_key])
        per_class = per_class[:, self.first_scored_class:]
        out = {"miou": torch.nanmean(per_class, dim=1)}
        out.update({f"iou_{c}": per_class[:, k] for k, c in enumerate(self.structures)})
        return out

    def weights_sha256(self) -> dict[str, str]:
        return {"segmenter": self._segmenter()[1]} if self._datamodule is not None else {}


@dataclass(frozen=True)
class ArtifactGSI(Protocol):
    """``artifactgsi`` (Han et al., "Reducing CT Metal Artifacts by Learning Latent Space Alignment with Gemstone
    Spectral Imaging Data", Sec. 5, Table 3): PSNR, SSIM and LPIPS per slice of a method's output against the GSI
    image (``gt_image``) of the ArtifactGSI data (``marbench.datasets.artifactgsi``).

    Both images, ``(B, 1, H, W)`` HU, are

    1. resized to ``size_px`` x ``size_px`` (512: "we uniformly rescale the images to a size of 512x512"), bilinear,
       ``align_corners=False``, antialiased when down-sampling (``F.interpolate``); not resampled when already that
       size;
    2. mapped through the display window level ``level_hu`` / width ``width_hu`` (L500/W2000: ``[-500, 1500]`` HU
       -> ``[0, 1]``, clipped; ``window_hu``);

    then scored on the whole image: ``psnr`` in dB with data range 1 (``metrics.psnr``: ``inf`` for identical
    images), ``ssim`` with data range 1 (``metrics.ssim``: 11-tap Gaussian, sigma 1.5, as scikit-image's
    ``structural_similarity(gaussian_weights=True, use_sample_covariance=False)``), ``lpips`` (LPIPS v0.1,
    ``lpips_net``: the [0, 1] image repeated to three channels and mapped to [-1, 1], as the ``perceptual``
    protocol; ``"alex"``: ``LPIPSAlex``, ``"vgg"``: ``perceptual.LPIPSVGG``), lower is better.

    Readings and departures (the paper leaves these open; pinned here):

    * Metric range: the paper states L500/W2000 for display and no intensity range for its metrics; the display
      window is taken as the metric range (bone and metal above 1500 HU saturate at 1).
    * Resize: the paper does not name the interpolation; bilinear with antialiasing is pinned, in HU, before the
      window. Non-square slices are resized to 512 x 512 too.
    * Metal: scored as it is, not masked (the paper does not mask).
    * LPIPS network: AlexNet, the ``lpips`` package's default (the paper names none). Its trunk comes from a local
      file only (``weights``: ``"auto"`` uses it when present, else a seeded random trunk; ``"local"`` requires
      it); the record lists its sha256 or ``random``, and the leaderboard never merges records whose weights
      differ.
    """

    name: str = "artifactgsi"
    version: str = "1"
    size_px: int = 512
    level_hu: float = 500.0
    width_hu: float = 2000.0
    lpips_net: Literal["alex", "vgg"] = "alex"
    weights: str = "auto"

    def __post_init__(self):
        if self.lpips_net not in ("alex", "vgg"):
            raise ValueError(f"lpips_net must be 'alex' or 'vgg', found {self.lpips_net!r}")
        if self.size_px < 11 or self.width_hu <= 0:
            raise ValueError(f"need size_px >= 11 (the SSIM window) and width_hu > 0, found {self.size_px} and "
                             f"{self.width_hu}")

    @property
    def metrics(self) -> tuple[MetricSpec, ...]:
        how = f"against the GSI image, {self.size_px} px, L{self.level_hu:g}/W{self.width_hu:g}"
        net = "AlexNet" if self.lpips_net == "alex" else "VGG16"
        return (MetricSpec("psnr", True, "dB", 2, description=f"PSNR {how}"),
                MetricSpec("ssim", True, "", 4, description=f"SSIM {how}"),
                MetricSpec("lpips", False, "", 4, description=f"LPIPS ({net} v0.1) {how}"))

    @property
    def window_hu(self) -> tuple[float, float]:
        """The display window ``(low, high)`` in HU."""
        return self.level_hu - self.width_hu / 2, self.level_hu + self.width_hu / 2

    def display(self, hu: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` HU -> ``(B, 1, size_px, size_px)`` float32 in [0, 1]: resized, then windowed."""
        x = hu.float()
        h, w = x.shape[-2:]
        if (h, w) != (self.size_px, self.size_px):
            x = F.interpolate(x, size=(self.size_px, self.size_px), mode="bilinear", align_corners=False,
                              antialias=max(h, w) > self.size_px)
        return window(x, *self.window_hu)

    def _lpips(self) -> nn.Module:
        return lpips_alex(self.weights) if self.lpips_net == "alex" else backbones(self.weights).lpips

    def score(self, pred_hu, batch):
        p, t = self.display(pred_hu), self.display(batch["gt_image"])
        with torch.no_grad():
            lp = self._lpips().to(p.device)(p, t).double()
        return {"psnr": psnr(p, t, 1.0), "ssim": ssim(p, t, 1.0), "lpips": lp}

    def weights_sha256(self) -> dict[str, str]:
        if self.lpips_net == "vgg":
            return {"vgg16-lpips": backbones(self.weights).weights_sha256()["vgg16-lpips"]}
        return {"alexnet-lpips": lpips_alex(self.weights).weights_sha256 or "random"}


@dataclass(frozen=True)
class ArtifactGSISegmentation(Segmentation):
    """``artifactgsi-segmentation`` (Han et al., "Reducing CT Metal Artifacts by Learning Latent Space Alignment
    with Gemstone Spectral Imaging Data", Sec. 5.3, Table 2): a segmenter trained on the GSI images (``gt_image``)
    and ``labels`` of the ArtifactGSI split's training part (Table 2: "segmentation models, trained on GSI data";
    ``segmentation.ARTIFACTGSI_RECIPE``) segments each method's output, ``(B, 1, H, W)`` HU at the data's own size.

    Per slice, ``iou_<structure>`` is the IoU (torchmetrics) of each of the five foreground structures
    (``metal_implant``, ``left_pelvis``, ``right_pelvis``, ``left_femur``, ``right_femur``; background is segmented
    but not scored) and ``miou`` their mean over the structures scored on the slice, each in [0, 1]. As
    ``segmentation`` v3, a structure absent from the slice's label map is not scored there (NaN, skipped by the
    means), so a slice without it does not score 0 for it. Unlabelled pixels (``UNLABELLED``, -1: patients without a
    label volume) count neither in training nor in scoring; a wholly unlabelled slice scores NaN throughout.
    The record carries the segmenter's sha256, so rows are compared under one segmenter only.

    Readings: the paper names neither the segmentation network nor its training; the small U-Net of
    ``ARTIFACTGSI_RECIPE`` is pinned (the numbers are comparable between methods, not with the paper's). The images
    are segmented at their own size (not rescaled to 512). Left and right are not learned: the network segments
    pelvis and femur, and a pixel's side is its half of the image (``SegmentationRecipe.sided_pairs``; trained
    with sides, a U-Net on 96-pixel crops never found the left femur of the analogue's test patient).

    Raises (at ``score``): ValueError: not bound to a datamodule (``bind``).
    """

    name: str = "artifactgsi-segmentation"
    version: str = "1"
    recipe: SegmentationRecipe = field(default_factory=lambda: ARTIFACTGSI_RECIPE)
    requires: ClassVar[tuple[str, ...]] = ("labels",)
    first_scored_class: ClassVar[int] = 1  # the background is segmented, not scored
    miou_description: ClassVar[str] = "mean IoU over the implant, pelvis and femur structures present"


def level_lpips(lpips_net, pred01: torch.Tensor, target01: torch.Tensor, metal_mask: np.ndarray, side_px: int,
                largest_only: bool) -> float:
    """DuDoCROP Eq. 18 for one sweep level: the mean local LPIPS over the metal objects (or the largest one only)
    plus the global LPIPS.

    Args:
        lpips_net: ``perceptual.LPIPSVGG``; ``pred01``, ``target01``: ``(1, 1, H, W)`` in [0, 1];
        metal_mask: bool ``(H, W)``; side_px: side of the square window centred on each object.
    Raises:
        ValueError: a level without metal.
    """
    objects = metal_objects(metal_mask)
    if not objects:
        raise ValueError("a sweep level without metal: the local LPIPS of Eq. 18 needs at least one object")
    if largest_only:
        objects = objects[:1]
    with torch.no_grad():
        global_lp = float(lpips_net(pred01, target01))
        local = [float(lpips_net(pred01[..., sy, sx], target01[..., sy, sx]))
                 for sy, sx in (_square(o, side_px) for o in objects)]
    return float(np.mean(local)) + global_lp


def _square(obj: np.ndarray, side: int) -> tuple[slice, slice]:
    """A ``side`` x ``side`` window centred on the object's centroid, shifted to lie inside the image."""
    ys, xs = np.nonzero(obj)
    cy, cx = ys.mean(), xs.mean()
    h, w = obj.shape
    side = min(side, h, w)
    y0 = int(np.clip(round(cy - side / 2), 0, h - side))
    x0 = int(np.clip(round(cx - side / 2), 0, w - side))
    return slice(y0, y0 + side), slice(x0, x0 + side)


@dataclass(frozen=True)
class PerceptualIndicators(Protocol):
    """``perceptual-indicators``: PI_q and PI_s of Zhang et al., "Dual-Domain CLIP-Assisted Residual Optimization
    Perception Model for Metal Artifact Reduction" (DuDoCROP), Eq. 18-19, on the synthetic benchmark's metal
    sweeps (``marbench.datasets.sweeps``: each base slice with 1..5 metal objects, or one object at growing sizes;
    everything else shared along a sweep).

    Per level, ``lp = mean local LPIPS + global LPIPS`` (Eq. 18) between the method's output and the metal-free
    image in the ``editmar`` HU window, the local LPIPS on a ``local_window_mm`` square centred on each metal
    object (quantity sweeps: every object; size sweeps: the largest). PI is the mean slope of ``lp`` over
    consecutive levels (Eq. 19), against the number of objects (``pi_q``) or the largest object's area in mm^2
    (``pi_s``); lower is better. Pinned here (the paper leaves them open): the window, the square's side (at
    least 16 pixels), objects as 8-connected components of the metal mask, LPIPS VGG16 v0.1.
    """

    name: str = "perceptual-indicators"
    version: str = "2"
    low_hu: float = -500.0
    high_hu: float = 1300.0
    local_window_mm: float = 60.0
    weights: str = "auto"
    data: ClassVar[str] = "sweeps"
    requires: ClassVar[tuple[str, ...]] = ("gt_image", "metal_mask", "fov_mm", "sweep_base", "n_objects",
                                           "largest_metal_area_mm2")
    row_keys: ClassVar[tuple[str, ...]] = ("sweep_base", "n_objects", "largest_metal_area_mm2")

    @property
    def metrics(self) -> tuple[MetricSpec, ...]:
        return (MetricSpec("lp", False, "", 4, description="LP of Eq. 18 at each sweep level"),
                MetricSpec("pi_q", False, "1/object", 6, "set", "PI_q (Eq. 19): mean LP slope per metal object"),
                MetricSpec("pi_s", False, "1/mm^2", 7, "set", "PI_s (Eq. 19): mean LP slope per mm^2 of metal"))

    def score(self, pred_hu, batch):
        net = backbones(self.weights).lpips.to(pred_hu.device)
        p, t = window(pred_hu, self.low_hu, self.high_hu), window(batch["gt_image"], self.low_hu, self.high_hu)
        values = []
        for i in range(pred_hu.shape[0]):
            metal = batch["metal_mask"][i, 0].cpu().numpy()
            side = max(16, round(self.local_window_mm / (float(batch["fov_mm"][i]) / metal.shape[-1])))
            values.append(level_lpips(net, p[i: i + 1], t[i: i + 1], metal, side,
                                      largest_only=batch["category"][i] == "size"))
        return {"lp": torch.tensor(values, dtype=torch.float64)}

    def set_metrics(self, frame, features, reference):
        def indicator(kind: str, x: str) -> float:
            rows = frame[frame["category"] == kind]
            levels = [sorted(zip(g[x].astype(float), g["lp"].astype(float), strict=True))
                      for _, g in rows.groupby("sweep_base", sort=True)]
            return perceptual_indicator(levels)

        return {"pi_q": indicator("quantity", "n_objects"), "pi_s": indicator("size", "largest_metal_area_mm2")}

    def weights_sha256(self) -> dict[str, str]:
        return {"vgg16-lpips": backbones(self.weights).weights_sha256()["vgg16-lpips"]}


PROTOCOLS: Registry[Protocol] = Registry("evaluation protocol", base=Protocol)
for _protocol in (AAPMHU(), AAPMClinical(), EditMAR(), SynDeepLesionProtocol(), Perceptual(), Segmentation(),
                  PerceptualIndicators(), ArtifactGSI(), ArtifactGSISegmentation()):
    PROTOCOLS.register(_protocol.name, _protocol)


OLDER_VERSIONS: dict[tuple[str, str], Protocol] = {("aapm-hu", "1"): AAPM_HU_V1}
"""Earlier versions of registered protocols that are still defined, by ``(name, version)``."""


def get_protocol(name: str, version: str | None = None) -> Protocol:
    """The named protocol (``PROTOCOLS.get``), at its current version or at ``version``.

    >>> get_protocol("aapm-hu").version, get_protocol("aapm-hu", version="1").scale_max
    ('2', 20000.0)

    Raises:
        KeyError: unknown name (the message lists the known ones) or a version that is not defined (lists those that
            are).
    """
    current = PROTOCOLS.get(name)
    if version is None or str(version) == current.version:
        return current
    older = OLDER_VERSIONS.get((name, str(version)))
    if older is None:
        known = sorted([current.version, *(v for n, v in OLDER_VERSIONS if n == name)])
        raise KeyError(f"protocol {name!r} has no version {version!r}; defined: {known}")
    return older
