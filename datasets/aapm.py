"""AAPM CT-MAR datasets and Lightning datamodule on the suite's batch convention (``marbench.datasets.batch``).

Each item is a dict (a batch adds the leading ``B``):

* ``gt_image``, ``ma_image``: ``(1, N, N)`` float32 HU;
* ``gt_sinogram``, ``ma_sinogram``: ``(1, V, C)`` float32 post-log line integrals, water BHC applied;
* ``metal_mask``: ``(1, N, N)`` bool, the non-zero pixels of the release's metal-only image;
* ``metal_trace``: ``(1, V, C)`` bool, ``fp(metal_mask) > 0`` with the anatomy's geometry;
* ``li_sinogram`` ``(1, V, C)`` and ``li_image`` ``(1, N, N)`` HU: the LI prior (Kalender 1987), computed once
  per case and cached under ``$MARBENCH_CACHE/li``;
* ``tissue_labels``: ``(1, N, N)`` int64 tissue class per pixel (``datasets.synthetic.tissues``), synthetic
  benchmark only (not among the default keys);
* ``category`` (str), ``anatomy`` (``body``/``head``), ``slice_id`` (str), ``fov_mm`` (float), ``geometry`` (the
  anatomy's geometry preset name, resolved by ``marbench.physics.CTPhysics``).

The geometry comes from the anatomy (``aapm_body`` / ``aapm_head`` presets); a ``manifest.json`` at the root
(written by the synthetic benchmark) may name other presets per anatomy, e.g. ``aapm_body_256``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from marbench.physics import Geometry, Projector, geometry_key, li_correction, metal_trace, mu_to_hu, preset
from marbench.physics.backends import default_cache_dir

from .aapm_format import ANATOMIES, AAPMCase, case_files, discover_cases, read_raw, write_raw
from .batch import TENSOR_KEYS, seeded_loader
from .splits import read_split

__all__ = ["ALL_KEYS", "SYNTHETIC_KEYS", "AAPMCTMARDataset", "AAPMCTMARDataModule", "geometries_for_root"]

SYNTHETIC_KEYS = ("tissue_labels",)  # files the synthetic benchmark adds to the release layout
ALL_KEYS = tuple(k for k in TENSOR_KEYS if k not in SYNTHETIC_KEYS)  # what the release provides
_RELEASE_PRESETS = {"body": "aapm_body", "head": "aapm_head"}


def geometries_for_root(root: str | os.PathLike) -> dict[str, Geometry]:
    """Geometry per anatomy: the root's ``manifest.json`` ``geometry_presets`` if present, else the release's.

    Raises:
        ValueError: a manifest naming an unknown preset or anatomy.
    """
    names = dict(_RELEASE_PRESETS)
    manifest = Path(root) / "manifest.json"
    if manifest.is_file():
        given = json.loads(manifest.read_text()).get("geometry_presets", {})
        for anatomy, name in given.items():
            if anatomy not in ANATOMIES:
                raise ValueError(f"{manifest}: geometry_presets: unknown anatomy {anatomy!r}, expected {ANATOMIES}")
            names[anatomy] = name
    try:
        return {a: preset(n) for a, n in names.items()}
    except KeyError as e:
        raise ValueError(f"{manifest}: {e.args[0]}") from None


def _anatomy_of(case_id: str) -> str:
    """``"body"`` for ``"body1/body12"``."""
    return case_id.split("/")[1].rstrip("0123456789")


class AAPMCTMARDataset(Dataset):
    """Cases of the AAPM CT-MAR release layout as batch-convention dicts (see the module docstring).

    Args:
        root: release root (holding the ``body{N}`` / ``head{N}`` part folders).
        cases: the cases to serve, in order.
        keys: which batch keys to load (metadata keys are always present).
        categories: optional ``slice_id -> category`` labels (default: the anatomy).
        projector_backend: backend for the metal trace and LI reconstruction.

    Raises:
        ValueError: an unknown key; at item access, any file of the wrong size or with NaN/Inf.
        FileNotFoundError: at item access, a missing file (named).
    """

    def __init__(self, root: str | os.PathLike, cases: Sequence[AAPMCase], keys: Iterable[str] = ALL_KEYS,
                 categories: dict[str, str] | None = None, projector_backend: str = "sparse"):
        keys = tuple(keys)
        unknown = sorted(set(keys) - set(ALL_KEYS) - set(SYNTHETIC_KEYS))
        if unknown:
            raise ValueError(f"unknown batch keys {unknown}; expected a subset of {ALL_KEYS + SYNTHETIC_KEYS}")
        self.root = Path(root)
        self.cases = list(cases)
        self.keys = keys
        self.categories = categories or {}
        self.geometries = geometries_for_root(root)
        self.geometry_keys = {a: geometry_key(g) for a, g in self.geometries.items()}
        self.projector_backend = projector_backend
        self._projectors: dict[str, Projector] = {}

    def __len__(self) -> int:
        return len(self.cases)

    def projector(self, anatomy: str) -> Projector:
        if anatomy not in self._projectors:
            self._projectors[anatomy] = Projector(self.geometries[anatomy], backend=self.projector_backend)
        return self._projectors[anatomy]

    def _li_prior(self, case: AAPMCase, ma_sinogram: np.ndarray, trace: torch.Tensor):
        g = self.geometries[case.anatomy]
        key = hashlib.sha256(ma_sinogram.tobytes() + trace.numpy().tobytes()).hexdigest()[:24]
        folder = default_cache_dir() / "li" / g.hash
        sino_path, img_path = folder / f"{key}_sino.raw", folder / f"{key}_img.raw"
        if sino_path.is_file() and img_path.is_file():
            return read_raw(sino_path, g.sinogram_shape), read_raw(img_path, g.image_shape)
        li_sino, li_mu = li_correction(self.projector(case.anatomy), torch.from_numpy(ma_sinogram)[None, None],
                                       trace[None])
        li_sino = li_sino[0, 0].numpy()
        li_img = mu_to_hu(li_mu, g.mu_water_per_mm)[0, 0].numpy()
        write_raw(img_path, li_img)
        write_raw(sino_path, li_sino)
        return li_sino, li_img

    def __getitem__(self, i: int) -> dict:
        case = self.cases[i]
        g = self.geometries[case.anatomy]
        files = case_files(self.root, case, g)
        need = set(self.keys)
        item: dict = {"slice_id": case.case_id, "category": self.categories.get(case.case_id, case.anatomy),
                      "anatomy": case.anatomy, "fov_mm": g.fov_mm, "geometry": self.geometry_keys[case.anatomy]}
        arrays: dict[str, np.ndarray] = {}
        for key in ("gt_image", "ma_image", "gt_sinogram", "ma_sinogram"):
            if key in need or (key == "ma_sinogram" and need & {"li_sinogram", "li_image"}):
                shape = g.image_shape if key.endswith("image") else g.sinogram_shape
                arrays[key] = read_raw(files[key], shape)
        if need & {"metal_mask", "metal_trace", "li_sinogram", "li_image"}:
            metal = torch.from_numpy(read_raw(files["metal_only_image"], g.image_shape) > 0)[None]
            if "metal_mask" in need:
                item["metal_mask"] = metal
            if need & {"metal_trace", "li_sinogram", "li_image"}:
                trace = metal_trace(self.projector(case.anatomy), metal[None])[0]
                if "metal_trace" in need:
                    item["metal_trace"] = trace
                if need & {"li_sinogram", "li_image"}:
                    li_sino, li_img = self._li_prior(case, arrays["ma_sinogram"], trace)
                    arrays["li_sinogram"], arrays["li_image"] = li_sino, li_img
        if "tissue_labels" in need:
            labels = read_raw(files["tissue_labels"], g.image_shape)
            item["tissue_labels"] = torch.from_numpy(labels.astype(np.int64))[None]
        for key, value in arrays.items():
            if key in need:
                item[key] = torch.from_numpy(np.ascontiguousarray(value))[None]
        return item


class AAPMCTMARDataModule(L.LightningDataModule):
    """Train/val/test splits of an AAPM CT-MAR root (the release or the suite's synthetic benchmark).

    Args:
        root: release root.
        anatomy: anatomies to include.
        split: path of a split file (``datasets/splits/*.txt``: lines ``<split> <part>/<anatomy><index>``
            [``<category>``]); its cases of other anatomies are left out. ``None`` serves every case found as
            ``test``.
        keys: batch keys to load.
        batch_size, num_workers: DataLoader settings; the training order is shuffled with the run's seed
            (``seed_everything``), so that the same seed gives the same order.

    Raises:
        ValueError: unknown anatomy or key; a split naming a case that is not on disk.
    """

    def __init__(self, root: str | os.PathLike, anatomy: Sequence[str] = ANATOMIES, split: str | None = None,
                 keys: Sequence[str] = ALL_KEYS, batch_size: int = 4, num_workers: int = 0,
                 projector_backend: str = "sparse"):
        super().__init__()
        for a in anatomy:
            if a not in ANATOMIES:
                raise ValueError(f"unknown anatomy {a!r}; expected one of {ANATOMIES}")
        self.root, self.anatomy, self.split_path = Path(root), tuple(anatomy), split
        self.keys, self.batch_size, self.num_workers = tuple(keys), batch_size, num_workers
        self.projector_backend = projector_backend
        self.datasets: dict[str, AAPMCTMARDataset] = {}
        self.split_sha256: str | None = None
        self.geometries: dict = {}

    def setup(self, stage: str | None = None) -> None:
        geometries = geometries_for_root(self.root)
        self.geometries = {a: geometries[a] for a in self.anatomy}
        available = {c.case_id: c for a in self.anatomy for c in discover_cases(self.root, a, geometries[a])}
        if self.split_path is None:
            assignment = {"test": [(cid, None) for cid in sorted(available)]}
        else:
            split = read_split(self.split_path)
            self.split_sha256 = split.sha256
            wanted = {name: [(cid, cat) for cid, cat in rows if _anatomy_of(cid) in self.anatomy]
                      for name, rows in split.cases.items()}
            missing = [cid for rows in wanted.values() for cid, _ in rows if cid not in available]
            if missing:
                raise ValueError(f"{self.split_path}: names {len(missing)} case(s) not found under {self.root}, "
                                 f"first {missing[:3]}")
            assignment = wanted
        self._parts = {name: ([available[cid] for cid, _ in rows], {cid: cat for cid, cat in rows if cat})
                       for name, rows in assignment.items()}
        for name in self._parts:
            self.datasets[name] = self.dataset(name, self.keys)

    def dataset(self, part: str, keys: Sequence[str]) -> AAPMCTMARDataset:
        """The cases of one part of the split (``train``, ``val``, ``test``) with other batch keys than the
        datamodule's own (e.g. the segmentation protocol's segmenter trains on ``gt_image`` and ``tissue_labels``).

        Raises:
            ValueError: ``setup`` has not run, or the split has no such part.
        """
        if not hasattr(self, "_parts"):
            raise ValueError("call setup() before dataset()")
        if part not in self._parts:
            raise ValueError(f"{self.split_path}: the split has no part {part!r}; it has {sorted(self._parts)}")
        cases, labels = self._parts[part]
        return AAPMCTMARDataset(self.root, cases, keys, labels, self.projector_backend)

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        if name not in self.datasets:
            raise ValueError(f"split {name!r} is not defined by {self.split_path}; defined: {sorted(self.datasets)}")
        return seeded_loader(self.datasets[name], self.batch_size, shuffle, self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", False)
