"""The batch convention: one dict layout that every datamodule yields and every method and protocol reads.

A batch is a ``dict`` (``Batch`` below documents its keys; absent keys are ones a dataset cannot provide, e.g. the
AAPM scoring set has no ``gt_image``). Shapes carry a leading batch dimension ``B``; images are on the dataset's
``N x N`` grid, sinograms ``V`` views x ``C`` detector channels as the AAPM CT-MAR release stores them:

=================  ==================  =======  ==========================================================
key                shape               dtype    meaning
=================  ==================  =======  ==========================================================
``ma_image``       ``(B, 1, N, N)``    float32  metal-affected image, HU
``gt_image``       ``(B, 1, N, N)``    float32  metal-free target, HU (ArtifactGSI: the GSI image)
``li_image``       ``(B, 1, N, N)``    float32  linear-interpolation (LI) prior, HU, computed once, cached
``ma_sinogram``    ``(B, 1, V, C)``    float32  metal-affected post-log line integrals, water BHC applied
``gt_sinogram``    ``(B, 1, V, C)``    float32  metal-free post-log line integrals
``li_sinogram``    ``(B, 1, V, C)``    float32  ``ma_sinogram`` with the metal trace linearly interpolated
``metal_mask``     ``(B, 1, N, N)``    bool     metal pixels
``metal_trace``    ``(B, 1, V, C)``    bool     detector bins whose rays cross the metal (``fp(mask) > 0``)
``tissue_labels``  ``(B, 1, N, N)``    int64    tissue class per pixel (synthetic benchmark)
``slice_id``       ``list[str]``                unique slice name, e.g. ``body1/body12``
``category``       ``list[str]``                reporting group (anatomical category, metal-size group)
``anatomy``        ``list[str]``                ``body`` or ``head`` (the body part, nothing else)
``geometry``       ``list[str]``                the slice's scanner geometry: a preset name or geometry key
                                                (``marbench.physics.geometry_key``), resolved by ``CTPhysics``
``fov_mm``         ``(B,)``            float64  reconstruction field of view, mm
=================  ==================  =======  ==========================================================

Datasets add their own keys beside these (documented where they are produced), e.g. the metal sweeps'
``sweep_base``, ``n_objects`` and ``largest_metal_area_mm2``.
"""
from __future__ import annotations

import os
from typing import Callable, TypedDict

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["Batch", "IMAGE_KEYS", "SINOGRAM_KEYS", "TENSOR_KEYS", "METADATA_KEYS", "seeded_loader"]

IMAGE_KEYS = ("ma_image", "gt_image", "li_image", "metal_mask", "tissue_labels")
SINOGRAM_KEYS = ("ma_sinogram", "gt_sinogram", "li_sinogram", "metal_trace")
TENSOR_KEYS = IMAGE_KEYS + SINOGRAM_KEYS
METADATA_KEYS = ("slice_id", "category", "anatomy", "geometry", "fov_mm")


class Batch(TypedDict, total=False):
    """A batch of the convention above (``total=False``: a dataset omits what it cannot provide)."""

    ma_image: torch.Tensor
    gt_image: torch.Tensor
    li_image: torch.Tensor
    ma_sinogram: torch.Tensor
    gt_sinogram: torch.Tensor
    li_sinogram: torch.Tensor
    metal_mask: torch.Tensor
    metal_trace: torch.Tensor
    tissue_labels: torch.Tensor
    slice_id: list[str]
    category: list[str]
    anatomy: list[str]
    geometry: list[str]
    fov_mm: torch.Tensor


def seeded_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int,
                  collate_fn: Callable | None = None) -> DataLoader:
    """A ``DataLoader`` of ``dataset`` whose order follows the run's seed.

    ``seed_everything`` / ``--seed_everything`` sets ``PL_GLOBAL_SEED`` (0 without one); a generator of the
    loader's own keeps the order independent of how many random numbers the model drew, and Lightning seeds the
    workers from it (``seed_everything(workers=True)``). ``collate_fn=None``: PyTorch's default collation.
    """
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed))
