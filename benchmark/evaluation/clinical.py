"""The AAPM CT-MAR challenge's clinical scoring: eight metrics per case, each mapped to a 0-4 score.

Sources (xcist/example, ``AAPM_datachallenge``): ``scoring_metric.md`` (section "Scoring metrics", items 1-8),
``scoring/score.py`` (which masks each metric uses, how the scores combine) and ``scoring/utils.py`` (the metric
functions, the CT-number-to-SPR curve and ``scoring_axes``, the per-case score tables). The code here is written
anew; where the scoring program does something the document does not say, this module does the same and says so.

Per case, with ``ref`` the metal-free reference and ``img`` the method's image (HU), ``external`` the patient
outline and ``metal`` the ground-truth metal (score.py removes the metal from ``external`` for every metric, the
proton range included, because it edits that mask in place):

1. CT-number accuracy ``rmse_hu``: RMSE over ``external`` less the metal dilated twice (3 x 3 cross, i.e. a
   diamond of radius 2 px).
2. Noise ``noise_hu``: population standard deviation of ``img`` in the case's homogeneous ROI.
3. Sharpness ``sharpness``: for each edge ROI (soft tissue/bone, soft tissue/fat), the 90th percentile of the Sobel
   gradient magnitude (``scipy.ndimage.sobel`` along both axes) of ``img`` over that of ``ref``; their mean. The
   scores 1..4 correspond to Gaussian blurs of sigma 0.4, 0.5, 0.75 and 1 px (``utils.scoring_axes``: ratios 0.94,
   0.85, 0.67, 0.56 on the challenge's cases).
4. Streak amplitude ``streak_hu``: in the streak ROI, the mean of the highest 5 % of ``img - ref`` minus the mean
   of the lowest 5 % (``int(n / 20)`` pixels each).
5. Overall integrity ``ssim``: SSIM (Wang et al. 2004; Gaussian window sigma 1.5 truncated at 3.5, population
   covariance, ``K1 = 0.01``, ``K2 = 0.03``, data range 5000, ``reflect`` borders) of both images with the dilated
   metal set to 100 HU, averaged over the RMSE mask.
6. Bone integrity: bone is ``150 <= HU < 2500`` inside ``external``; ``bone_volume_change = |1 - V_img / V_ref|``
   and ``bone_dice`` (Sørensen-Dice of the two bone masks); the score is the mean of their two scores.
7. Metal integrity: metal is ``HU > bonetrs + 250`` inside the case's metal region (``bonetrs``: the highest
   non-metal value near the metal, ``parameters.pkl``; the document lists ``bonetrs`` per case), against the
   ground-truth metal: ``metal_volume_change`` and ``metal_dice``, score the mean of both. Case 03's metal (a hollow
   shell) has its holes filled, and its metal score is fixed at 2 (score.py: participants were told of no hollow
   objects).
8. Proton range ``range_shift``: images rotated by the beam angle (``scipy.ndimage.rotate``, cubic, no reshape;
   score.py applies the unrotated ``external`` to the rotated images), HU -> SPR by the MGH curve (``SPR_CURVE``,
   zero outside it), SPR zeroed outside ``external``; for every row of the target but its last, the water-equivalent
   thickness ``voxel * sum(SPR[row, :distal column])`` from the image's left edge to the target's distal edge;
   ``range_shift = max |WET_ref - WET_img| / max WET_ref``. Scores 0..4 for 0..2 % (linear).

Scores: each metric's value is mapped piecewise-linearly onto ``SCORE_Y = (0, 0, 1, 2, 3, 4, 4)`` through the
case's axis of seven values (``utils.scoring_axes``; ``scipy.interpolate.interp1d`` sorts an axis by its values, so
this module does too, stably; values beyond an axis' ends score its end). The per-case ``score`` is the mean of the
eight scores; the challenge's overall score is the mean over the eight metrics of each metric's mean over cases.

Two sources of ROIs:

* The real scoring set (``load_reference``): ``1_data_dicts/{base,structures,parameters}.pkl`` from a folder,
  read with ``safe_pickle`` (no code runs): ``base[case]`` the reference image; ``structures[case]`` the masks
  ``external``, ``metal``, ``metalregion``, ``noise``, ``sobel_soft``, ``sobel_bone``, ``roi_amplitude``,
  ``tumor``; ``parameters[case]`` ``voxelsize``, ``bonetrs``, ``beamangle``. Score axes: ``CASE_AXES``.
* The synthetic benchmark (``synthetic_case``): the same kinds of ROIs from the phantom's own structures and
  score axes calibrated per slice; see that function.

>>> round(score_from_axis(45.0, axis("increasing", (30, 60, 90, 120))), 3)
1.5
>>> round(float(hu_to_spr(np.array([0.0]))[0]), 4)  # water: between -20 HU (1.003) and 50 HU (1.038)
1.013
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from .safe_pickle import load_restricted_file

__all__ = ["SCORE_Y", "SPR_CURVE", "CASE_AXES", "METRICS", "SCORES", "ClinicalCase", "axis", "score_from_axis",
           "hu_to_spr", "sobel_magnitude", "sharpness_ratio", "streak_amplitude", "ssim_map", "volume_dice",
           "range_shift", "measure", "scores", "load_reference", "reference_case", "synthetic_case", "case_key"]

SCORE_Y = np.array([0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 4.0])
"""The scores at the seven points of every axis (``utils.scoring_axes``: ``score_y``)."""

SPR_CURVE = (np.array([-1000, -200, -120, -20, 50, 100, 140, 2990, 2995, 999960], dtype=np.float64),
             np.array([0, 0.788, 0.897, 1.003, 1.038, 1.084, 1.097, 2.732, 3.2, 3.2]))
"""The MGH CT-number (HU) to stopping-power-ratio curve of ``utils.hlut_apply``; SPR 0 outside it."""

METRICS = ("rmse_hu", "noise_hu", "sharpness", "streak_hu", "ssim", "bone_volume_change", "bone_dice",
           "metal_volume_change", "metal_dice", "range_shift")
SCORES = ("score_ct_number", "score_noise", "score_sharpness", "score_streak", "score_ssim", "score_bone",
          "score_metal", "score_range")

BONE_HU = (150.0, 2500.0)
METAL_MARGIN_HU = 250.0
SHARPNESS_BLURS = (0.4, 0.5, 0.75, 1.0)
_CAP = {"increasing": 99999.0}
_ENDS = {"increasing": (0.0, 0.0, 99999.0), "ssim": (20.0, 1.0, -20.0), "dice": (1.0, 1.0, 0.0),
         "sharpness": (10.0, 1.0, 0.0)}


def axis(kind: str, steps) -> tuple[float, ...]:
    """A seven-point score axis from the values at scores 1, 2, 3, 4 (``kind``: ``increasing`` for errors,
    ``ssim``, ``dice``, ``sharpness``), or ``noise`` from the five values at scores 0..4.

    >>> axis("dice", (0.9, 0.8, 0.7, 0.6))
    (1.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.0)
    """
    steps = tuple(float(s) for s in steps)
    if kind == "noise":
        return (0.0, *steps, 9999.0)
    lo0, lo1, hi = _ENDS[kind]
    return (lo0, lo1, *steps, hi)


# utils.scoring_axes, per case: the values at scores 1..4 for rmse (HU), streak (HU), ssim, metal volume change,
# metal Dice, bone volume change, bone Dice; noise (HU) at scores 0..4 (case 23's row, 48 before 45, is as published
# and sorted like the rest). Sharpness and range share one axis over all cases.
_TABLE = {
    "01": ((15, 30, 45, 60), (8, 10, 12, 14, 16), (20, 40, 60, 80), (0.99, 0.98, 0.97, 0.96), (0.35, 0.7, 1.05, 1.4), (0.85, 0.7, 0.55, 0.4), (0.01, 0.02, 0.03, 0.04), (0.99, 0.98, 0.97, 0.96)),  # noqa: E501
    "02": ((30, 60, 90, 120), (10, 12, 14, 16, 18), (50, 100, 150, 200), (0.98, 0.96, 0.94, 0.92), (0.5, 1, 1.5, 2), (0.8, 0.6, 0.5, 0.4), (0.04, 0.08, 0.1, 0.12), (0.98, 0.96, 0.94, 0.92)),  # noqa: E501
    "03": ((40, 80, 120, 160), (12, 15, 18, 21, 24), (150, 300, 450, 600), (0.92, 0.84, 0.76, 0.68), (0.05, 0.1, 0.15, 0.2), (0.97, 0.95, 0.93, 0.9), (0.05, 0.1, 0.13, 0.15), (0.9, 0.8, 0.7, 0.6)),  # noqa: E501
    "04": ((20, 40, 60, 80), (36, 42, 46, 50, 54), (100, 200, 300, 400), (0.96, 0.93, 0.9, 0.87), (0.25, 0.5, 0.75, 1), (0.95, 0.9, 0.85, 0.8), (0.01, 0.02, 0.03, 0.04), (0.95, 0.9, 0.85, 0.8)),  # noqa: E501
    "05": ((20, 40, 60, 80), (36, 42, 46, 50, 54), (150, 300, 450, 600), (0.96, 0.93, 0.9, 0.87), (0.2, 0.4, 0.6, 0.8), (0.8, 0.6, 0.5, 0.4), (0.01, 0.02, 0.03, 0.04), (0.95, 0.9, 0.85, 0.8)),  # noqa: E501
    "06": ((35, 70, 105, 140), (12, 15, 18, 21, 24), (40, 80, 120, 160), (0.99, 0.98, 0.97, 0.96), (0.25, 0.5, 0.75, 1), (0.8, 0.6, 0.5, 0.4), (0.1, 0.2, 0.25, 0.3), (0.95, 0.9, 0.85, 0.8)),  # noqa: E501
    "07": ((50, 100, 150, 200), (12, 15, 18, 21, 24), (50, 100, 150, 200), (0.99, 0.98, 0.97, 0.96), (0.25, 0.5, 0.75, 1), (0.8, 0.6, 0.5, 0.4), (0.1, 0.2, 0.25, 0.3), (0.95, 0.9, 0.85, 0.8)),  # noqa: E501
    "08": ((40, 80, 120, 160), (12, 15, 18, 21, 24), (40, 80, 120, 160), (0.99, 0.98, 0.97, 0.96), (0.15, 0.3, 0.45, 0.6), (0.8, 0.6, 0.5, 0.4), (0.1, 0.2, 0.25, 0.3), (0.95, 0.9, 0.85, 0.8)),  # noqa: E501
    "09": ((50, 100, 150, 200), (12, 15, 18, 21, 24), (40, 80, 120, 160), (0.99, 0.98, 0.97, 0.96), (0.25, 0.5, 0.75, 1), (0.85, 0.7, 0.55, 0.4), (0.1, 0.2, 0.25, 0.3), (0.95, 0.9, 0.85, 0.8)),  # noqa: E501
    "10": ((65, 130, 195, 260), (12, 15, 18, 21, 24), (50, 100, 150, 200), (0.97, 0.95, 0.92, 0.89), (0.25, 0.5, 0.75, 1), (0.8, 0.6, 0.5, 0.4), (0.15, 0.3, 0.35, 0.4), (0.9, 0.8, 0.7, 0.6)),  # noqa: E501
    "11": ((75, 150, 225, 300), (18, 22, 26, 30, 34), (150, 300, 450, 600), (0.94, 0.89, 0.84, 0.79), (0.3, 0.6, 0.9, 1.2), (0.9, 0.8, 0.7, 0.6), (0.02, 0.04, 0.06, 0.08), (0.95, 0.9, 0.85, 0.8)),  # noqa: E501
    "12": ((15, 30, 45, 60), (18, 22, 26, 30, 34), (100, 200, 300, 400), (0.98, 0.96, 0.94, 0.92), (0.25, 0.5, 0.75, 1), (0.9, 0.8, 0.7, 0.6), (0.02, 0.04, 0.06, 0.08), (0.98, 0.96, 0.94, 0.92)),  # noqa: E501
    "13": ((25, 50, 75, 100), (22, 28, 33, 38, 42), (150, 300, 450, 600), (0.95, 0.9, 0.85, 0.8), (0.25, 0.5, 0.75, 1), (0.9, 0.8, 0.7, 0.6), (0.04, 0.08, 0.1, 0.12), (0.95, 0.9, 0.85, 0.8)),  # noqa: E501
    "14": ((20, 40, 60, 80), (18, 22, 26, 30, 34), (150, 300, 450, 600), (0.98, 0.96, 0.94, 0.92), (0.35, 0.7, 1.05, 1.4), (0.85, 0.7, 0.55, 0.4), (0.02, 0.04, 0.06, 0.08), (0.95, 0.9, 0.85, 0.8)),  # noqa: E501
    "15": ((50, 100, 150, 200), (12, 15, 18, 21, 24), (150, 300, 450, 600), (0.95, 0.9, 0.85, 0.8), (0.15, 0.3, 0.45, 0.6), (0.95, 0.9, 0.85, 0.8), (0.1, 0.2, 0.25, 0.3), (0.95, 0.9, 0.85, 0.8)),  # noqa: E501
    "16": ((50, 100, 150, 200), (12, 15, 18, 21, 24), (100, 200, 300, 400), (0.96, 0.92, 0.89, 0.86), (0.2, 0.4, 0.6, 0.8), (0.9, 0.8, 0.7, 0.6), (0.1, 0.2, 0.25, 0.3), (0.95, 0.9, 0.85, 0.8)),  # noqa: E501
    "17": ((85, 170, 255, 340), (12, 15, 18, 21, 24), (150, 300, 450, 600), (0.92, 0.84, 0.76, 0.68), (0.25, 0.5, 0.75, 1), (0.9, 0.8, 0.7, 0.6), (0.15, 0.3, 0.35, 0.4), (0.9, 0.8, 0.7, 0.6)),  # noqa: E501
    "18": ((50, 100, 150, 200), (8, 10, 12, 14, 16), (40, 80, 120, 160), (0.98, 0.96, 0.94, 0.92), (0.25, 0.5, 0.75, 1), (0.85, 0.7, 0.55, 0.4), (0.1, 0.2, 0.25, 0.3), (0.95, 0.9, 0.85, 0.8)),  # noqa: E501
    "19": ((50, 100, 150, 200), (10, 12, 14, 16, 18), (35, 60, 105, 140), (0.99, 0.98, 0.97, 0.96), (0.25, 0.5, 0.75, 1), (0.85, 0.7, 0.55, 0.4), (0.05, 0.1, 0.13, 0.15), (0.95, 0.9, 0.85, 0.8)),  # noqa: E501
    "20": ((65, 130, 195, 260), (10, 12, 14, 16, 18), (100, 200, 300, 400), (0.97, 0.94, 0.91, 0.88), (0.25, 0.5, 0.75, 1), (0.85, 0.7, 0.55, 0.4), (0.15, 0.3, 0.35, 0.4), (0.95, 0.9, 0.85, 0.8)),  # noqa: E501
    "21": ((150, 300, 450, 600), (20, 25, 30, 35, 40), (150, 300, 450, 600), (0.9, 0.8, 0.7, 0.6), (0.7, 1.4, 2.1, 2.8), (0.8, 0.6, 0.5, 0.4), (0.02, 0.04, 0.06, 0.08), (0.85, 0.7, 0.6, 0.5)),  # noqa: E501
    "22": ((150, 300, 450, 600), (18, 22, 26, 30, 34), (150, 300, 450, 600), (0.91, 0.82, 0.73, 0.64), (0.6, 1.2, 1.8, 2.4), (0.8, 0.6, 0.5, 0.4), (0.04, 0.08, 0.1, 0.12), (0.85, 0.7, 0.6, 0.5)),  # noqa: E501
    "23": ((65, 130, 195, 260), (48, 45, 64, 72, 80), (150, 300, 450, 600), (0.94, 0.89, 0.84, 0.79), (0.13, 0.25, 0.38, 0.5), (0.95, 0.9, 0.85, 0.8), (0.02, 0.04, 0.06, 0.08), (0.9, 0.8, 0.7, 0.6)),  # noqa: E501
    "24": ((85, 170, 255, 340), (38, 45, 52, 59, 66), (150, 300, 450, 600), (0.91, 0.82, 0.73, 0.64), (0.25, 0.5, 0.75, 1), (0.85, 0.7, 0.55, 0.4), (0.02, 0.04, 0.06, 0.08), (0.85, 0.7, 0.6, 0.5)),  # noqa: E501
    "25": ((150, 300, 450, 600), (20, 25, 30, 35, 40), (150, 300, 450, 600), (0.9, 0.8, 0.7, 0.6), (0.25, 0.5, 0.75, 1), (0.8, 0.6, 0.5, 0.4), (0.02, 0.04, 0.06, 0.08), (0.85, 0.7, 0.6, 0.5)),  # noqa: E501
    "26": ((150, 300, 450, 600), (18, 22, 26, 30, 34), (150, 300, 450, 600), (0.91, 0.82, 0.73, 0.64), (0.25, 0.5, 0.75, 1), (0.8, 0.6, 0.5, 0.4), (0.04, 0.08, 0.1, 0.12), (0.85, 0.7, 0.6, 0.5)),  # noqa: E501
    "27": ((25, 50, 75, 100), (38, 45, 52, 59, 66), (150, 300, 450, 600), (0.94, 0.89, 0.84, 0.79), (0.07, 0.14, 0.21, 0.28), (0.95, 0.9, 0.85, 0.8), (0.05, 0.1, 0.13, 0.15), (0.85, 0.7, 0.6, 0.5)),  # noqa: E501
    "28": ((65, 130, 195, 260), (32, 38, 44, 50, 56), (150, 300, 450, 600), (0.94, 0.89, 0.84, 0.79), (0.07, 0.14, 0.21, 0.28), (0.95, 0.9, 0.85, 0.8), (0.02, 0.04, 0.06, 0.08), (0.9, 0.8, 0.7, 0.6)),  # noqa: E501
    "29": ((85, 170, 255, 340), (32, 38, 44, 50, 56), (150, 300, 450, 600), (0.91, 0.82, 0.73, 0.64), (0.07, 0.14, 0.21, 0.28), (0.95, 0.9, 0.85, 0.8), (0.1, 0.2, 0.25, 0.3), (0.85, 0.7, 0.6, 0.5)),  # noqa: E501
}
SHARPNESS_AXIS = axis("sharpness", (0.94, 0.85, 0.67, 0.56))
RANGE_AXIS = axis("increasing", (0.005, 0.01, 0.015, 0.02))


def _case_axes(row) -> dict[str, tuple[float, ...]]:
    rmse, noise, streak, ssim, metal_vol, metal_dice, bone_vol, bone_dice = row
    return {"rmse_hu": axis("increasing", rmse), "noise_hu": axis("noise", noise), "sharpness": SHARPNESS_AXIS,
            "streak_hu": axis("increasing", streak), "ssim": axis("ssim", ssim),
            "metal_volume_change": axis("increasing", metal_vol), "metal_dice": axis("dice", metal_dice),
            "bone_volume_change": axis("increasing", bone_vol), "bone_dice": axis("dice", bone_dice),
            "range_shift": RANGE_AXIS}


CASE_AXES: dict[str, dict[str, tuple[float, ...]]] = {case: _case_axes(row) for case, row in _TABLE.items()}
"""``utils.scoring_axes`` of the 29 scoring cases: case -> metric -> seven-point axis."""


def score_from_axis(value: float, xs) -> float:
    """The 0-4 score of ``value`` on a seven-point axis (``SCORE_Y``); NaN for NaN."""
    if not np.isfinite(value):
        return float("nan")
    xs = np.asarray(xs, dtype=np.float64)
    order = np.argsort(xs, kind="mergesort")
    return float(np.interp(value, xs[order], SCORE_Y[order]))


def hu_to_spr(hu: np.ndarray) -> np.ndarray:
    """SPR of HU values by ``SPR_CURVE`` (0 outside it)."""
    return np.interp(hu, *SPR_CURVE, left=0.0, right=0.0)


def sobel_magnitude(img: np.ndarray) -> np.ndarray:
    """``hypot(sobel_0, sobel_1)`` (``scipy.ndimage.sobel``, ``reflect`` borders)."""
    img = np.asarray(img, dtype=np.float64)
    return np.hypot(ndimage.sobel(img, 0), ndimage.sobel(img, 1))


def sharpness_ratio(ref: np.ndarray, img: np.ndarray, rois, percentile: float = 90.0) -> float:
    """Mean over the non-empty ROIs of ``P90(|Sobel img|) / P90(|Sobel ref|)``; NaN without one."""
    gi, gr = sobel_magnitude(img), sobel_magnitude(ref)
    ratios = [np.percentile(gi[r], percentile) / np.percentile(gr[r], percentile) for r in rois if r.any()]
    return float(np.mean(ratios)) if ratios else float("nan")


def streak_amplitude(ref: np.ndarray, img: np.ndarray, roi: np.ndarray, percent: float = 5.0) -> float:
    """Mean of the highest ``percent`` % of ``img - ref`` in ``roi`` minus the mean of the lowest (absolute);
    NaN where the ROI holds fewer than ``100 / percent`` pixels.

    >>> roi = np.ones((1, 40), bool)
    >>> streak_amplitude(np.zeros((1, 40)), np.arange(40.0)[None], roi)  # means of (38, 39) and (0, 1)
    38.0
    """
    values = np.sort((np.asarray(img, np.float64) - ref)[roi])
    cut = int(len(values) / (100.0 / percent))
    if cut == 0:
        return float("nan")
    return float(abs(values[:cut].mean() - values[len(values) - cut:].mean()))


def ssim_map(x: np.ndarray, y: np.ndarray, data_range: float) -> np.ndarray:
    """The full SSIM map (as ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, full=True)``: Gaussian statistics with ``reflect`` borders, no crop)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)

    def blur(a):
        return ndimage.gaussian_filter(a, 1.5, truncate=3.5, mode="reflect")

    ux, uy = blur(x), blur(y)
    vx, vy, vxy = blur(x * x) - ux * ux, blur(y * y) - uy * uy, blur(x * y) - ux * uy
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


def volume_dice(ref_mask: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """``(|1 - |mask| / |ref_mask||, Dice)``; NaN for both where ``ref_mask`` is empty.

    >>> a = np.zeros((4, 4), bool); a[:2] = True          # 8 pixels
    >>> b = np.zeros((4, 4), bool); b[1:2] = True         # 4 pixels, all inside a
    >>> volume_dice(a, b)
    (0.5, 0.6666666666666666)
    """
    n_ref, n = int(ref_mask.sum()), int(mask.sum())
    if n_ref == 0:
        return float("nan"), float("nan")
    return abs(1.0 - n / n_ref), 2.0 * int((ref_mask & mask).sum()) / (n_ref + n)


def _beam_wet(spr: np.ndarray, target: np.ndarray, voxel_mm: float) -> np.ndarray:
    """WET (mm) from the left edge to the target's distal (rightmost) pixel, for each row of the target from its
    first row up to, not including, its last (as ``utils.metric_protonrange``)."""
    rows = np.nonzero(target.any(axis=1))[0]
    if rows.size == 0:
        return np.zeros(0)
    rows = rows[rows < rows.max()]
    distal = target.shape[1] - 1 - np.argmax(target[rows, ::-1], axis=1)  # column of the last target pixel
    cum = np.concatenate([np.zeros((spr.shape[0], 1)), np.cumsum(spr, axis=1)], axis=1)
    return voxel_mm * cum[rows, distal]


def range_shift(ref: np.ndarray, img: np.ndarray, target: np.ndarray, external: np.ndarray, voxel_mm: float,
                beam_angles=(0.0,), quarter_turns: bool = False) -> float:
    """The largest relative WET difference over the beams (item 8 of the module docstring).

    ``quarter_turns``: beams at multiples of 90 degrees are turned exactly (``np.rot90``, ``external`` turned
    with them; the synthetic benchmark); otherwise as score.py (``scipy.ndimage.rotate`` of the images and the target
    for a non-zero angle, ``external`` not rotated).
    """
    worst = float("nan")
    for angle in beam_angles:
        if quarter_turns:
            k = int(round(angle / 90.0)) % 4
            r, m, t, e = (np.rot90(a, k) for a in (ref, img, target, external))
        elif angle != 0:
            r, m, t = (ndimage.rotate(a, angle=angle, axes=(0, 1), reshape=False) for a in (ref, img, target))
            e = external
        else:
            r, m, t, e = ref, img, target, external
        t = np.asarray(t) == 1  # score.py: np.where(tumor_rot == True)
        s_ref, s_img = hu_to_spr(r), hu_to_spr(m)
        s_ref[~e], s_img[~e] = 0.0, 0.0
        w_ref, w_img = _beam_wet(s_ref, t, voxel_mm), _beam_wet(s_img, t, voxel_mm)
        if w_ref.size == 0 or w_ref.max() <= 0:
            continue
        rel = float(np.abs(w_ref - w_img).max() / w_ref.max())
        worst = rel if not np.isfinite(worst) else max(worst, rel)
    return worst


@dataclass(frozen=True)
class ClinicalCase:
    """One case's reference image, ROIs and score axes (all masks bool, on the image grid).

    Attributes:
        reference: metal-free image, HU (float64).
        external: the patient outline less the metal.
        metal: ground-truth metal; ``metal_dilated``: it dilated twice (3 x 3 cross).
        metal_region: where the method's metal is looked for; ``metal_threshold_hu``: ``bonetrs + 250``.
        noise_roi, edge_rois, streak_roi, target: the ROIs of metrics 2, 3, 4 and 8.
        voxel_mm, beam_angles, quarter_turns: proton range geometry (see ``range_shift``).
        axes: metric -> seven-point score axis; fixed_scores: score name -> value replacing the computed one.
        source: how the ROIs were obtained (kept in the record).
    """

    reference: np.ndarray
    external: np.ndarray
    metal: np.ndarray
    metal_region: np.ndarray
    metal_threshold_hu: float
    noise_roi: np.ndarray
    edge_rois: tuple[np.ndarray, ...]
    streak_roi: np.ndarray
    target: np.ndarray
    voxel_mm: float
    beam_angles: tuple[float, ...]
    quarter_turns: bool
    axes: dict = field(default_factory=dict)
    fixed_scores: dict = field(default_factory=dict)
    source: str = ""

    @property
    def metal_dilated(self) -> np.ndarray:
        return ndimage.binary_dilation(self.metal, iterations=2)


def measure(img: np.ndarray, case: ClinicalCase) -> dict[str, float]:
    """The ten metric values (``METRICS``) of ``img`` (HU, the case's grid) against ``case``."""
    img = np.asarray(img, dtype=np.float64)
    ref = case.reference
    if img.shape != ref.shape:
        raise ValueError(f"aapm-clinical: expected an image of shape {ref.shape} (the reference's), found {img.shape}")
    dil = case.metal_dilated
    keep = case.external & ~dil
    out = {"rmse_hu": float(np.sqrt(np.mean((img[keep] - ref[keep]) ** 2))) if keep.any() else float("nan"),
           "noise_hu": float(np.std(img[case.noise_roi])) if case.noise_roi.any() else float("nan"),
           "sharpness": sharpness_ratio(ref, img, case.edge_rois),
           "streak_hu": streak_amplitude(ref, img, case.streak_roi)}
    a, b = ref.copy(), img.copy()
    a[dil], b[dil] = 100.0, 100.0
    out["ssim"] = float(ssim_map(a, b, 5000.0)[keep].mean()) if keep.any() else float("nan")
    lo, hi = BONE_HU
    out["bone_volume_change"], out["bone_dice"] = volume_dice((ref >= lo) & (ref < hi) & case.external,
                                                              (img >= lo) & (img < hi) & case.external)
    out["metal_volume_change"], out["metal_dice"] = volume_dice(
        case.metal, (img > case.metal_threshold_hu) & case.metal_region)
    out["range_shift"] = range_shift(ref, img, case.target, case.external, case.voxel_mm, case.beam_angles,
                                     case.quarter_turns)
    return out


def scores(values: dict[str, float], case: ClinicalCase) -> dict[str, float]:
    """The eight 0-4 scores (``SCORES``) of ``measure``'s values and their mean ``score`` (NaN scores skipped)."""
    s = {name: score_from_axis(values[name], case.axes[name]) for name in METRICS}
    out = {"score_ct_number": s["rmse_hu"], "score_noise": s["noise_hu"], "score_sharpness": s["sharpness"],
           "score_streak": s["streak_hu"], "score_ssim": s["ssim"],
           "score_bone": float(np.mean([s["bone_volume_change"], s["bone_dice"]])),
           "score_metal": float(np.mean([s["metal_volume_change"], s["metal_dice"]])),
           "score_range": s["range_shift"]}
    out.update(case.fixed_scores)
    finite = [v for v in out.values() if np.isfinite(v)]
    out["score"] = float(np.mean(finite)) if finite else float("nan")
    return out


# --- the real scoring set -------------------------------------------------------------------------------------------

_STRUCTURES = ("external", "metal", "metalregion", "noise", "sobel_soft", "sobel_bone", "roi_amplitude", "tumor")


@lru_cache(maxsize=2)
def load_reference(reference_dir: str) -> tuple[dict, dict, dict, dict[str, str]]:
    """``(base, structures, parameters, sha256 per file)`` from ``<reference_dir>/1_data_dicts/*.pkl`` or
    ``<reference_dir>/*.pkl``, read with the restricted unpickler.

    Raises:
        FileNotFoundError: a pickle missing (names the paths tried).
        pickle.UnpicklingError: a pickle that is not plain data.
    """
    root = Path(reference_dir)
    folder = root / "1_data_dicts" if (root / "1_data_dicts").is_dir() else root
    out, digests = [], {}
    for name in ("base", "structures", "parameters"):
        path = folder / f"{name}.pkl"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the AAPM CT-MAR scoring reference {name}.pkl not found (expected "
                                    f"<reference_dir>/1_data_dicts/{{base,structures,parameters}}.pkl of "
                                    "xcist/example AAPM_datachallenge/scoring)")
        out.append(load_restricted_file(path))
        digests[f"{name}.pkl"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out[0], out[1], out[2], digests


def case_key(slice_id: str) -> str:
    """The scoring case of a slice id: ``"07"``, ``"scoring/07"`` and ``"07.raw"`` -> ``"07"``."""
    name = str(slice_id).replace("\\", "/").rsplit("/", 1)[-1]
    return name[:-4] if name.endswith(".raw") else name


def reference_case(reference_dir: str | os.PathLike, case: str) -> ClinicalCase:
    """The scoring case ``case`` (``"01"`` .. ``"29"``) from the challenge's pickles.

    Raises:
        KeyError: the case is not in one of the pickles, or lacks a structure or parameter (names what was found).
    """
    base, structures, parameters, _ = load_reference(str(reference_dir))
    for what, table in (("base.pkl", base), ("structures.pkl", structures), ("parameters.pkl", parameters)):
        if case not in table:
            raise KeyError(f"aapm-clinical: case {case!r} is not in {reference_dir}/{what} "
                           f"(cases there: {sorted(table)})")
    if case not in CASE_AXES:
        raise KeyError(f"aapm-clinical: case {case!r} has no score axes (known: {sorted(CASE_AXES)})")
    st, par = structures[case], parameters[case]
    missing = [k for k in _STRUCTURES if k not in st] + [k for k in ("voxelsize", "bonetrs", "beamangle")
                                                          if k not in par]
    if missing:
        raise KeyError(f"aapm-clinical: case {case!r} lacks {missing} (structures: {sorted(st)}, parameters: "
                       f"{sorted(par)})")
    metal = np.asarray(st["metal"]) != 0
    if case == "03":  # score.py: the hollow implant of case 03 is filled
        metal = ndimage.binary_fill_holes(metal)
    return ClinicalCase(
        reference=np.asarray(base[case], dtype=np.float64), external=(np.asarray(st["external"]) != 0) & ~metal,
        metal=metal, metal_region=np.asarray(st["metalregion"]) != 0,
        metal_threshold_hu=float(par["bonetrs"]) + METAL_MARGIN_HU, noise_roi=np.asarray(st["noise"]) == 1,
        edge_rois=(np.asarray(st["sobel_bone"]) == 1, np.asarray(st["sobel_soft"]) == 1),
        streak_roi=np.asarray(st["roi_amplitude"]) != 0, target=np.asarray(st["tumor"]),
        voxel_mm=float(np.asarray(par["voxelsize"]).ravel()[0]), beam_angles=(float(par["beamangle"]),),
        quarter_turns=False, axes=CASE_AXES[case], fixed_scores={"score_metal": 2.0} if case == "03" else {},
        source="reference")


# --- the synthetic benchmark ----------------------------------------------------------------------------------------

SOFT_LABELS = (3, 4, 7, 8)   # muscle, organ, brain, csf (marbench.datasets.synthetic.tissues)
FAT_LABELS = (2,)
BONE_LABELS = (5, 6)         # cancellous, cortical
AIR_LABEL = 0
# the narrowest spans (value at score 4 minus the value at score 0) of utils.scoring_axes, per metric
MIN_SPAN = {"rmse_hu": 60.0, "streak_hu": 80.0, "ssim": 0.04, "metal_volume_change": 0.2, "metal_dice": 0.2,
            "bone_volume_change": 0.04, "bone_dice": 0.04}


def _disk(radius_px: float) -> np.ndarray:
    r = int(np.ceil(radius_px))
    yy, xx = np.mgrid[-r: r + 1, -r: r + 1]
    return yy**2 + xx**2 <= radius_px**2


def _place_disk(shape, cy: int, cx: int, radius_px: float) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius_px**2


def _segment(shape, p, q) -> np.ndarray:
    n = int(np.ceil(np.hypot(q[0] - p[0], q[1] - p[1]))) * 2 + 2
    ys = np.clip(np.round(np.linspace(p[0], q[0], n)).astype(int), 0, shape[0] - 1)
    xs = np.clip(np.round(np.linspace(p[1], q[1], n)).astype(int), 0, shape[1] - 1)
    out = np.zeros(shape, bool)
    out[ys, xs] = True
    return out


def synthetic_case(gt: np.ndarray, ma: np.ndarray, metal: np.ndarray, labels: np.ndarray,
                   pixel_mm: float) -> ClinicalCase:
    """A ``ClinicalCase`` from a synthetic slice (``gt``, ``ma`` HU; ``metal`` bool; ``labels`` tissue ids).

    ROIs (the challenge's ROIs were drawn by hand; these are the same kinds, derived from the phantom):

    * external: every non-air pixel and the metal, holes filled (less the metal, as in score.py);
    * metal region: the metal dilated by 10 mm; ``bonetrs``: the highest target value there outside the metal;
    * noise: a disk of radius 8 mm (halved until one fits, down to 1 px) inside one soft-tissue class (muscle,
      organ, brain, CSF), the fitting centre farthest from the metal;
    * edges: soft tissue / bone and soft tissue / fat boundary bands (pixels of either class with a pixel of the
      other in their 3 x 3 neighbourhood), outside the metal region;
    * streaks: with several metal objects (8-connected), the lines joining each pair of object centroids, widened
      to 3 px; with one object (or lines shorter than 20 pixels), the ring 5-15 mm from the metal; inside the
      external, outside the dilated metal;
    * proton target: a 15 mm disk at the external's centroid, four beams (0, 90, 180, 270 degrees, exact quarter
      turns); ``range_shift`` is their largest.

    Score axes (the challenge's are per case, set so that 4 means no improvement over the uncorrected image): score
    0 at the ideal value (0 for errors and volume changes, 1 for SSIM and Dice, as every table of the challenge),
    score 4 at the uncorrected image's (``ma``) value, linear between, the span at least the narrowest of the
    challenge's tables (``MIN_SPAN``); noise from the reference's noise (score 0) to
    twice it (score 4) (item 2 of scoring_metric.md); sharpness at the ratios of the reference blurred with sigma
    0.4, 0.5, 0.75, 1 px (item 3); proton range 0-2 % (item 8, the challenge's one axis).
    """
    gt = np.asarray(gt, np.float64)
    metal = np.asarray(metal, bool)
    labels = np.asarray(labels)
    shape = gt.shape
    px = float(pixel_mm)
    body = ndimage.binary_fill_holes((labels != AIR_LABEL) | metal)
    external = body & ~metal
    region = ndimage.binary_dilation(metal, _disk(10.0 / px)) if metal.any() else np.zeros(shape, bool)
    near = region & ~metal
    bonetrs = float(gt[near].max()) if near.any() else float(BONE_HU[0])
    far = ndimage.distance_transform_edt(~metal) if metal.any() else np.full(shape, np.inf)

    noise_roi = np.zeros(shape, bool)
    radius = 8.0 / px
    while radius >= 1.0 and not noise_roi.any():
        best = (-1.0, None)
        for lab in SOFT_LABELS:
            inside = ndimage.distance_transform_edt(labels == lab) > radius
            if inside.any():
                d = np.where(inside, far, -1.0)
                i = np.unravel_index(int(np.argmax(d)), shape)
                if d[i] > best[0]:
                    best = (float(d[i]), i)
        if best[1] is not None:
            noise_roi = _place_disk(shape, *best[1], radius)
        radius /= 2.0

    soft, fat, bone = (np.isin(labels, ls) for ls in (SOFT_LABELS, FAT_LABELS, BONE_LABELS))
    edge_rois = tuple(((a & ndimage.binary_dilation(b, np.ones((3, 3), bool)))
                       | (b & ndimage.binary_dilation(a, np.ones((3, 3), bool)))) & ~region
                      for a, b in ((soft, bone), (soft, fat)))

    dilated = ndimage.binary_dilation(metal, iterations=2)
    streak = np.zeros(shape, bool)
    lab_metal, n_obj = ndimage.label(metal, np.ones((3, 3), bool))
    if n_obj >= 2:
        centres = ndimage.center_of_mass(metal, lab_metal, range(1, n_obj + 1))
        for i in range(n_obj):
            for j in range(i + 1, n_obj):
                streak |= _segment(shape, centres[i], centres[j])
        streak = ndimage.binary_dilation(streak) & external & ~dilated
    if streak.sum() < 20 and metal.any():
        streak = (far >= 5.0 / px) & (far <= 15.0 / px) & external & ~dilated

    cy, cx = (int(round(c)) for c in ndimage.center_of_mass(body)) if body.any() else (shape[0] // 2, shape[1] // 2)
    target = _place_disk(shape, cy, cx, 15.0 / px)

    case = ClinicalCase(reference=gt, external=external, metal=metal, metal_region=region,
                        metal_threshold_hu=bonetrs + METAL_MARGIN_HU, noise_roi=noise_roi, edge_rois=edge_rois,
                        streak_roi=streak, target=target, voxel_mm=px, beam_angles=(0.0, 90.0, 180.0, 270.0),
                        quarter_turns=True, source="synthetic")
    uncorrected = measure(ma, case)
    axes = {}
    for name in ("rmse_hu", "streak_hu", "metal_volume_change", "bone_volume_change"):
        span = max(_finite(uncorrected[name]), MIN_SPAN[name])
        axes[name] = axis("increasing", span * np.arange(1, 5) / 4)
    for name, kind in (("ssim", "ssim"), ("metal_dice", "dice"), ("bone_dice", "dice")):
        span = max(_finite(1.0 - uncorrected[name]), MIN_SPAN[name])
        axes[name] = axis(kind, 1.0 - span * np.arange(1, 5) / 4)
    sigma_ref = max(_finite(float(np.std(gt[noise_roi])) if noise_roi.any() else 0.0), 1.0)
    axes["noise_hu"] = axis("noise", sigma_ref * np.array([1.0, 1.25, 1.5, 1.75, 2.0]))
    blurred = [sharpness_ratio(gt, ndimage.gaussian_filter(gt, s), edge_rois) for s in SHARPNESS_BLURS]
    axes["sharpness"] = axis("sharpness", blurred) if np.all(np.isfinite(blurred)) else SHARPNESS_AXIS
    axes["range_shift"] = RANGE_AXIS
    return replace(case, axes=axes)


def _finite(x: float) -> float:
    return float(x) if np.isfinite(x) else 0.0
