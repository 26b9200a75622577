"""The AAPM CT-MAR Grand Challenge release format: folder layout, file names, headerless float32 files.

Facts from the AAPM CT-MAR benchmark tool (xcist/example ``AAPM_datachallenge``): each training case ``i`` of an
anatomy (``body`` or ``head``) lives in a part folder (``body{N}`` / ``head{N}``) as five files and a JSON::

    Target/training_{anatomy}_nometal_img{i}_512x512x1.raw      metal-free image, HU
    Target/training_{anatomy}_nometal_sino{i}_900x1000.raw      metal-free sinogram [1000 views, 1, 900 ch]
    Baseline/training_{anatomy}_metalart_img{i}_512x512x1.raw   metal-affected image, HU
    Baseline/training_{anatomy}_metalart_sino{i}_900x1000.raw   metal-affected sinogram
    Mask/training_{anatomy}_metalonlymask_img{i}_512x512x1.raw  metal-only image (0 outside metal)
    Mask/training_{anatomy}_metalinfo{i}.json                   metal material / size information

Files are headerless little-endian float32; sinograms are post-log with water BHC applied. The size tags in
the names (``512x512x1``, ``900x1000``) follow the geometry, so reduced-geometry data written by the synthetic
benchmark (e.g. ``256x256x1``, ``450x500``) keeps the same layout and is read by the same code.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from marbench.files import atomic_write
from marbench.physics import Geometry

__all__ = ["ANATOMIES", "AAPMCase", "case_files", "read_raw", "write_raw", "discover_cases"]

ANATOMIES = ("body", "head")
IMAGE_KEYS = ("gt_image", "ma_image", "metal_only_image")
SINOGRAM_KEYS = ("gt_sinogram", "ma_sinogram")


@dataclass(frozen=True, order=True)
class AAPMCase:
    """One training case: ``root/part/{Target,Baseline,Mask}/training_{anatomy}_..._{index}...``."""

    part: str
    anatomy: str
    index: int

    @property
    def case_id(self) -> str:
        return f"{self.part}/{self.anatomy}{self.index}"


def _tags(geometry: Geometry) -> tuple[str, str]:
    n = geometry.image_size
    return f"{n}x{n}x1", f"{geometry.n_channels}x{geometry.n_views}"


def case_files(root: str | os.PathLike, case: AAPMCase, geometry: Geometry) -> dict[str, Path]:
    """Paths of the case's files, keyed ``gt_image, gt_sinogram, ma_image, ma_sinogram, metal_only_image,
    metal_info`` and (synthetic benchmark only) ``tissue_labels``."""
    img, sino = _tags(geometry)
    base = Path(root) / case.part
    stem = f"training_{case.anatomy}"
    i = case.index
    return {
        "gt_image": base / "Target" / f"{stem}_nometal_img{i}_{img}.raw",
        "gt_sinogram": base / "Target" / f"{stem}_nometal_sino{i}_{sino}.raw",
        "ma_image": base / "Baseline" / f"{stem}_metalart_img{i}_{img}.raw",
        "ma_sinogram": base / "Baseline" / f"{stem}_metalart_sino{i}_{sino}.raw",
        "metal_only_image": base / "Mask" / f"{stem}_metalonlymask_img{i}_{img}.raw",
        "metal_info": base / "Mask" / f"{stem}_metalinfo{i}.json",
        # not in the AAPM release: per-pixel tissue labels written by the synthetic benchmark
        "tissue_labels": base / "Labels" / f"{stem}_tissuelabels_img{i}_{img}.raw",
    }


def read_raw(path: str | os.PathLike, shape: tuple[int, ...]) -> np.ndarray:
    """Read a headerless little-endian float32 file of exactly ``shape``.

    Raises:
        FileNotFoundError: the file is missing (the message names it).
        ValueError: the byte size differs from ``prod(shape) * 4`` (names expected and found) or the data holds
            NaN/Inf.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found (expected a float32 array of shape {shape})")
    expected = int(np.prod(shape)) * 4
    found = path.stat().st_size
    if found != expected:
        raise ValueError(f"{path}: expected {expected} bytes (float32 {shape}), found {found} bytes")
    data = np.fromfile(path, dtype="<f4").reshape(shape)
    if not np.isfinite(data).all():
        raise ValueError(f"{path}: expected finite values, found {int((~np.isfinite(data)).sum())} NaN/Inf")
    return data


def write_raw(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as headerless little-endian float32, atomically (temporary name, then rename)."""
    atomic_write(path, np.ascontiguousarray(array, dtype="<f4").tobytes())


def discover_cases(root: str | os.PathLike, anatomy: str, geometry: Geometry) -> list[AAPMCase]:
    """All cases of ``anatomy`` under ``root`` (one level of part folders), found by their metal-free image.

    Raises:
        ValueError: unknown anatomy.
        FileNotFoundError: ``root`` does not exist.
    """
    if anatomy not in ANATOMIES:
        raise ValueError(f"unknown anatomy {anatomy!r}; expected one of {ANATOMIES}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: AAPM CT-MAR root folder not found")
    img_tag, _ = _tags(geometry)
    pattern = re.compile(rf"training_{anatomy}_nometal_img(\d+)_{img_tag}\.raw$")
    cases = []
    for f in root.glob(f"*/Target/training_{anatomy}_nometal_img*_{img_tag}.raw"):
        m = pattern.search(f.name)
        if m:
            cases.append(AAPMCase(part=f.parent.parent.name, anatomy=anatomy, index=int(m.group(1))))
    return sorted(cases)
