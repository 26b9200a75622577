"""SynDeepLesion (Wang et al., InDuDoNet+; hongwang01/InDuDoNet_plus ``deeplesion/``) on the suite's batch
convention.

Layout (facts from ``deeplesion/Dataset.py``): ``<root>/train_640geo_dir.txt`` / ``test_640geo_dir.txt`` list
``<slice folder>/gt.h5`` paths relative to ``<root>/train_640geo/`` / ``test_640geo/``; each slice folder holds
``gt.h5`` (``image``: 416 x 416 metal-free attenuation; also ``poly_CT`` and ``poly_sinogram`` 640 x 641) and one
file per metal mask ``0.h5``, ``1.h5``, ... (``ma_CT``, ``LI_CT``: 416 x 416; ``ma_sinogram``, ``LI_sinogram``:
640 x 641; ``metal_trace``: uint8 640 x 641). Attenuation is in their units with water 0.192 (cm^-1). Masks are
``trainmask.npy`` / ``testmask.npy`` of shape (512, 512, N), resized bilinearly to 416 x 416 as their loader does
(an explicit step of the protocol, thresholded at 0.5 here). Protocol: 1000 training slices x 90 masks, 200
test slices x 10 masks; the metal-free sinogram is the projection of ``image`` (they use ODL's ray transform,
here the suite's ``syndeeplesion`` geometry).

Known gap: ``ma_sinogram``, ``li_sinogram`` and ``metal_trace`` are passed through as stored (ODL's view and
bin order), while ``gt_sinogram`` is computed with the suite's projector; whether ODL's angle origin and
direction match the suite's convention has not been checked against the released files, so sinogram-domain
training on SynDeepLesion should verify ``fp(image)`` against ``poly_sinogram`` first.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import h5py
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from marbench.physics import Projector, mu_to_hu, preset

__all__ = ["SynDeepLesionDataset", "SynDeepLesionDataModule", "read_h5"]

IMAGE = (416, 416)
SINOGRAM = (640, 641)
MU_WATER = 0.192  # their units (cm^-1); HU = (mu / 0.192 - 1) * 1000


def read_h5(path: Path, key: str, shape: tuple[int, int]) -> np.ndarray:
    """One dataset of an h5 file as float32, checked.

    Raises:
        FileNotFoundError: missing file.
        ValueError: missing key, wrong shape, NaN/Inf (the message names file, key, expected and found).
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    with h5py.File(path, "r") as f:
        if key not in f:
            raise ValueError(f"{path}: expected dataset {key!r}, found keys {sorted(f.keys())}")
        data = f[key][()]
    if data.shape != shape:
        raise ValueError(f"{path}: dataset {key!r}: expected shape {shape}, found {data.shape}")
    data = data.astype(np.float32)
    if not np.isfinite(data).all():
        raise ValueError(f"{path}: dataset {key!r}: expected finite values, found NaN/Inf")
    return data


class SynDeepLesionDataset(Dataset):
    """(slice, mask) pairs of one SynDeepLesion split as batch-convention dicts (HU images, ``(1, H, W)``).

    Args:
        root: folder holding ``train_640geo/``, ``test_640geo/``, the ``*_dir.txt`` lists and mask ``.npy`` files.
        split: ``"train"`` or ``"test"``.
        masks: mask indices to pair with every slice (protocol: ``range(90)`` train, ``range(10)`` test).

    Raises:
        ValueError: unknown split; a mask array not of shape (512, 512, N) or with fewer masks than asked.
        FileNotFoundError: the list or mask file is missing.
    """

    def __init__(self, root: str | os.PathLike, split: str = "test", masks: Sequence[int] | None = None):
        if split not in ("train", "test"):
            raise ValueError(f"unknown SynDeepLesion split {split!r}; expected 'train' or 'test'")
        self.root = Path(root)
        listing = self.root / f"{split}_640geo_dir.txt"
        if not listing.is_file():
            raise FileNotFoundError(f"{listing}: SynDeepLesion slice list not found")
        self.folders = [self.root / f"{split}_640geo" / Path(line.strip()).parent
                        for line in listing.read_text().splitlines() if line.strip()]
        mask_file = self.root / f"{split}mask.npy"
        if not mask_file.is_file():
            raise FileNotFoundError(f"{mask_file}: SynDeepLesion metal masks not found")
        self.mask_array = np.load(mask_file, mmap_mode="r")
        self.masks = list(masks) if masks is not None else list(range(10 if split == "test" else 90))
        if self.mask_array.ndim != 3 or self.mask_array.shape[:2] != (512, 512):
            raise ValueError(f"{mask_file}: expected shape (512, 512, N), found {self.mask_array.shape}")
        if max(self.masks) >= self.mask_array.shape[2]:
            raise ValueError(f"{mask_file}: expected at least {max(self.masks) + 1} masks, "
                             f"found {self.mask_array.shape[2]}")
        self.geometry = preset("syndeeplesion")
        self._projector: Projector | None = None

    def __len__(self) -> int:
        return len(self.folders) * len(self.masks)

    def metal_mask(self, j: int) -> torch.Tensor:
        """Mask ``j`` resized 512 -> 416 bilinearly (their loader's step), bool ``(1, 416, 416)``."""
        m = torch.from_numpy(np.asarray(self.mask_array[:, :, j], dtype=np.float32))[None, None]
        return F.interpolate(m, size=IMAGE, mode="bilinear", align_corners=False)[0] >= 0.5

    def __getitem__(self, i: int) -> dict:
        folder, j = self.folders[i // len(self.masks)], self.masks[i % len(self.masks)]
        gt = read_h5(folder / "gt.h5", "image", IMAGE)
        ma = folder / f"{j}.h5"
        to_hu = lambda a: mu_to_hu(torch.from_numpy(a), MU_WATER)[None]  # noqa: E731
        if self._projector is None:
            self._projector = Projector(self.geometry)
        gt_sino = self._projector.fp(torch.from_numpy(gt)[None, None] * (self.geometry.mu_water_per_mm / MU_WATER))
        return {
            "gt_image": to_hu(gt),
            "ma_image": to_hu(read_h5(ma, "ma_CT", IMAGE)),
            "li_image": to_hu(read_h5(ma, "LI_CT", IMAGE)),
            "ma_sinogram": torch.from_numpy(read_h5(ma, "ma_sinogram", SINOGRAM))[None],
            "li_sinogram": torch.from_numpy(read_h5(ma, "LI_sinogram", SINOGRAM))[None],
            "gt_sinogram": gt_sino[0],
            "metal_trace": torch.from_numpy(read_h5(ma, "metal_trace", SINOGRAM) > 0)[None],
            "metal_mask": self.metal_mask(j),
            "category": f"metal_size_{j}",
            "anatomy": "body",  # DeepLesion: body CT (chest, abdomen, pelvis)
            "geometry": "syndeeplesion",
            "slice_id": f"{folder.name}/{j}",
            "fov_mm": self.geometry.fov_mm,
        }


class SynDeepLesionDataModule(L.LightningDataModule):
    """Train (and a validation subset of it) / test loaders of SynDeepLesion.

    Args:
        root: dataset root; ``train_masks`` / ``test_masks``: mask indices per split (protocol defaults);
        ``val_slices``: the last slices of the training list held out for validation.
    """

    def __init__(self, root: str | os.PathLike, batch_size: int = 4, num_workers: int = 0,
                 train_masks: Sequence[int] | None = None, test_masks: Sequence[int] | None = None,
                 val_slices: int = 0):
        super().__init__()
        self.root, self.batch_size, self.num_workers = Path(root), batch_size, num_workers
        self.train_masks, self.test_masks, self.val_slices = train_masks, test_masks, val_slices
        self.datasets: dict[str, Dataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            train = SynDeepLesionDataset(self.root, "train", self.train_masks)
            if self.val_slices:
                val = SynDeepLesionDataset(self.root, "train", self.train_masks)
                val.folders, train.folders = train.folders[-self.val_slices:], train.folders[: -self.val_slices]
                self.datasets["val"] = val
            self.datasets["train"] = train
        if stage in (None, "test", "predict"):
            self.datasets["test"] = SynDeepLesionDataset(self.root, "test", self.test_masks)

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        return DataLoader(self.datasets[name], batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, generator=torch.Generator().manual_seed(0))

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)

    def test_dataloader(self):
        return self._loader("test", False)
