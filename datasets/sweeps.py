"""The synthetic benchmark's metal sweeps as a datamodule (the data of the ``perceptual-indicators`` protocol).

The generator (``marbench.datasets.synthetic``) writes two sweeps beside the main cases, each an AAPM-layout root
of its own with a ``sweep.csv`` (``case_id, category, base_slice, n_objects, diameter_mm``):

* ``sweeps/quantity``: each base slice with 1..5 metal objects of one size (DuDoCROP's PI_q);
* ``sweeps/size``: each base slice with one object at growing sizes (PI_s).

Batches follow the suite's convention (``marbench.datasets.batch``) with ``category`` = ``quantity`` or ``size``,
``slice_id`` = ``<kind>/<case_id>``, and three more keys: ``sweep_base`` (``<kind>/<base slice>``: the levels of
one sweep share it), ``n_objects`` (int) and ``largest_metal_area_mm2`` (float, the largest 8-connected metal
object's area). The "split" of the sweeps is the pair of ``sweep.csv`` files; ``split_sha256`` hashes both.
"""
from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path
from typing import Sequence

import lightning as L
import numpy as np
from scipy import ndimage
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from .aapm import AAPMCTMARDataModule

__all__ = ["SWEEP_KINDS", "metal_objects", "SweepDataset", "SweepDataModule"]

SWEEP_KINDS = ("quantity", "size")


def metal_objects(metal_mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected components of a 2-D bool metal mask, largest first, each as a bool mask.

    >>> m = np.zeros((6, 6), bool); m[0, 0] = m[1, 1] = True; m[4:6, 4:6] = True
    >>> [int(o.sum()) for o in metal_objects(m)]
    [4, 2]
    """
    labels, n = ndimage.label(metal_mask, structure=np.ones((3, 3)))
    objects = [labels == k for k in range(1, n + 1)]
    return sorted(objects, key=lambda o: -int(o.sum()))


def _sweep_table(root: Path) -> dict[str, dict]:
    table = root / "sweep.csv"
    if not table.is_file():
        raise FileNotFoundError(f"{table} not found: the benchmark has no metal sweeps (generate it with "
                                "`marbench simulate`, which writes sweeps/quantity and sweeps/size)")
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    expected = {"case_id", "base_slice", "n_objects"}
    if not rows or not expected <= set(rows[0]):
        raise ValueError(f"{table}: expected columns {sorted(expected)}, found {sorted(rows[0]) if rows else 'none'}")
    return {r["case_id"]: r for r in rows}


class SweepDataset(Dataset):
    """One sweep kind's slices with their sweep keys (see the module docstring).

    Raises:
        FileNotFoundError: the sweep folder or its ``sweep.csv`` is missing.
        ValueError: ``sweep.csv`` without the expected columns, or naming a case that is not on disk.
    """

    def __init__(self, root: str | os.PathLike, kind: str, keys: Sequence[str]):
        if kind not in SWEEP_KINDS:
            raise ValueError(f"unknown sweep kind {kind!r}; expected one of {SWEEP_KINDS}")
        self.kind, self.root = kind, Path(root) / "sweeps" / kind
        self.table = _sweep_table(self.root)
        inner = AAPMCTMARDataModule(self.root, split=None, keys=tuple(dict.fromkeys([*keys, "metal_mask"])))
        inner.setup("test")
        self.inner = inner.datasets["test"]
        unknown = sorted(set(self.table) - {c.case_id for c in self.inner.cases})
        if unknown:
            raise ValueError(f"{self.root / 'sweep.csv'}: names cases not under {self.root}, first {unknown[:3]}")
        self.inner.cases = [c for c in self.inner.cases if c.case_id in self.table]

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> dict:
        item = self.inner[i]
        row = self.table[item["slice_id"]]
        metal = item["metal_mask"][0].numpy()
        objects = metal_objects(metal)
        pixel_mm = float(item["fov_mm"]) / metal.shape[-1]
        item.update({"slice_id": f"{self.kind}/{item['slice_id']}", "category": self.kind,
                     "sweep_base": f"{self.kind}/{row['base_slice']}", "n_objects": int(row["n_objects"]),
                     "largest_metal_area_mm2": float(objects[0].sum()) * pixel_mm**2 if objects else 0.0})
        return item


class SweepDataModule(L.LightningDataModule):
    """Test loader over both metal sweeps of a synthetic benchmark root (no training data).

    Args:
        root: the benchmark root (holding ``sweeps/``).
        keys: batch keys to load (``metal_mask`` is always loaded).
        batch_size, num_workers: DataLoader settings.
    """

    data = "sweeps"  # the protocols that score it (``Protocol.data``)

    def __init__(self, root: str | os.PathLike, keys: Sequence[str] = ("ma_image", "gt_image", "metal_mask"),
                 batch_size: int = 4, num_workers: int = 0):
        super().__init__()
        self.root, self.keys = Path(root), tuple(keys)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.split_path = str(self.root / "sweeps")
        self.split_sha256: str | None = None
        self.dataset: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        parts = [SweepDataset(self.root, kind, self.keys) for kind in SWEEP_KINDS]
        digest = hashlib.sha256()
        for kind in SWEEP_KINDS:
            digest.update((self.root / "sweeps" / kind / "sweep.csv").read_bytes())
        self.split_sha256 = digest.hexdigest()
        self.dataset = ConcatDataset(parts)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    predict_dataloader = test_dataloader
