"""The AAPM CT-MAR scoring set: 29 clinical cases without ground truth, each with its own field of view.

Layout expected here (the release gives the cases as ``01.raw`` ... ``29.raw``; the scoring program reads
512 x 512 float32 HU images): ``<root>/images/NN.raw`` (metal-affected image, HU), ``<root>/sinograms/NN.raw``
(``[1000 views, 1, 900 channels]`` post-log) and ``<root>/fov.csv`` with columns ``case,fov_mm`` (the
per-case reconstruction FOV, e.g. 500, 650, 360 or 355 mm, from the challenge's case description). Each case
gets the ``aapm_body`` scanner with its own FOV; the batch's ``geometry`` names it by its geometry key
(``marbench.physics.geometry_key``). No metal mask is released: ``metal_mask`` is
``ma_image > metal_threshold_hu`` (2000 HU by default), ``metal_trace`` its projection.
"""
from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from marbench.physics import Projector, geometry_key, metal_trace, preset

from .aapm_format import read_raw

__all__ = ["AAPMScoringDataset", "AAPMScoringDataModule"]


class AAPMScoringDataset(Dataset):
    """Scoring cases as batch-convention dicts (``ma_image``, ``ma_sinogram``, ``metal_mask``, ``metal_trace``).

    Raises:
        FileNotFoundError: missing ``fov.csv``; at item access, a missing image or sinogram (named).
        ValueError: a malformed ``fov.csv`` row (file, line, expected, found).
    """

    def __init__(self, root: str | os.PathLike, metal_threshold_hu: float = 2000.0):
        self.root = Path(root)
        self.metal_threshold_hu = metal_threshold_hu
        table = self.root / "fov.csv"
        if not table.is_file():
            raise FileNotFoundError(f"{table}: per-case FOV table not found (columns case,fov_mm)")
        self.cases: list[tuple[str, float]] = []
        with open(table, newline="") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):
                try:
                    self.cases.append((f"{int(row['case']):02d}", float(row["fov_mm"])))
                except (KeyError, TypeError, ValueError):
                    raise ValueError(f"{table}:{line}: expected 'case,fov_mm' with an integer case and a number, "
                                     f"found {row}") from None
        self._projectors: dict[float, Projector] = {}

    def __len__(self) -> int:
        return len(self.cases)

    def geometry(self, fov_mm: float):
        """``aapm_body`` with the case's FOV."""
        return dataclasses.replace(preset("aapm_body"), fov_mm=fov_mm)

    def __getitem__(self, i: int) -> dict:
        case, fov = self.cases[i]
        g = self.geometry(fov)
        image = torch.from_numpy(read_raw(self.root / "images" / f"{case}.raw", g.image_shape))[None]
        sino = torch.from_numpy(read_raw(self.root / "sinograms" / f"{case}.raw", g.sinogram_shape))[None]
        if fov not in self._projectors:
            self._projectors[fov] = Projector(g)
        mask = image > self.metal_threshold_hu
        trace = metal_trace(self._projectors[fov], mask[None])[0]
        return {"ma_image": image, "ma_sinogram": sino, "metal_mask": mask, "metal_trace": trace,
                "category": "scoring", "anatomy": "body", "slice_id": case, "fov_mm": fov,
                "geometry": geometry_key(g)}


class AAPMScoringDataModule(L.LightningDataModule):
    """``predict``/``test`` loader over the scoring set (batch size 1: every case has its own geometry)."""

    def __init__(self, root: str | os.PathLike, metal_threshold_hu: float = 2000.0, num_workers: int = 0):
        super().__init__()
        self.root, self.metal_threshold_hu, self.num_workers = root, metal_threshold_hu, num_workers
        self.dataset: AAPMScoringDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        self.dataset = AAPMScoringDataset(self.root, self.metal_threshold_hu)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=1, num_workers=self.num_workers)

    test_dataloader = predict_dataloader
