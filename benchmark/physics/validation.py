"""Input checks shared by the physics operators: every failure is a ``ValueError`` naming expected and found."""
from __future__ import annotations

import torch

__all__ = ["check_image", "check_mask", "check_sinogram"]


def _check_tensor(x: object, name: str, shape: tuple[int, int], grid: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(
            f"{name}: expected a torch.Tensor of shape (B, 1, {shape[0]}, {shape[1]}), found {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 1 or tuple(x.shape[-2:]) != tuple(shape):
        raise ValueError(
            f"{name}: expected shape (B, 1, {shape[0]}, {shape[1]}) on the geometry's {grid} grid, "
            f"found {tuple(x.shape)}"
        )
    return x


def check_image(x: object, shape: tuple[int, int], name: str = "image") -> torch.Tensor:
    """Validate an image batch ``(B, 1, N, N)`` of float32/float64 with finite values.

    Raises:
        ValueError: not a tensor, wrong shape, integer/complex dtype, NaN or Inf.
    """
    x = _check_tensor(x, name, shape, "image")
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name}: expected dtype float32 or float64, found {x.dtype}")
    if not torch.isfinite(x).all():
        n = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: expected finite values, found {n} NaN/Inf entries")
    return x


def check_sinogram(y: object, shape: tuple[int, int], name: str = "sinogram") -> torch.Tensor:
    """Validate a sinogram batch ``(B, 1, V, C)``: float32/float64, finite, size matching the geometry.

    Raises:
        ValueError: not a tensor, wrong shape (e.g. a sinogram of another geometry), dtype, NaN or Inf.
    """
    y = _check_tensor(y, name, shape, "sinogram (views x channels)")
    if y.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name}: expected dtype float32 or float64, found {y.dtype}")
    if not torch.isfinite(y).all():
        n = int((~torch.isfinite(y)).sum())
        raise ValueError(f"{name}: expected finite values, found {n} NaN/Inf entries")
    return y


def check_mask(m: object, shape: tuple[int, int], name: str, grid: str) -> torch.Tensor:
    """Validate a boolean mask ``(B, 1, H, W)`` on the named grid (``"image"`` or ``"sinogram"``).

    Raises:
        ValueError: not a tensor, not bool, or not on the expected grid.
    """
    m = _check_tensor(m, name, shape, grid)
    if m.dtype != torch.bool:
        raise ValueError(f"{name}: expected a bool mask, found dtype {m.dtype}")
    return m
