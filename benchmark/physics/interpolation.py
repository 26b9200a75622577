"""Bilinear sampling of a batch of 2D arrays at arbitrary points, and its exact adjoint.

Both matrix-free operators of the suite (the Joseph projector and the pixel-driven FBP backprojection) are a
bilinear sampling followed by a weighted sum; their adjoints scatter the weights back with the transpose of
the same interpolation, which is ``grid_sample``'s gradient with respect to its input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["bilinear_sample", "bilinear_sample_adjoint", "view_chunks"]


def view_chunks(n_views: int, bytes_per_view: int, budget_bytes: int):
    """Consecutive slices of ``range(n_views)`` whose working memory stays under ``budget_bytes`` (at least
    one view per slice)."""
    step = max(1, min(n_views, budget_bytes // bytes_per_view))
    for start in range(0, n_views, step):
        yield slice(start, min(start + step, n_views))


def bilinear_sample(src: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Sample ``src`` ``(1, B, H, W)`` at ``grid`` ``(1, P, Q, 2)`` (normalised x, y; ``align_corners=True``,
    zero outside) -> ``(1, B, P, Q)``."""
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def bilinear_sample_adjoint(values: torch.Tensor, grid: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Exact adjoint of ``bilinear_sample``: scatter ``values`` ``(1, B, P, Q)`` at ``grid`` onto a zero
    ``(1, B, *shape)`` array with the interpolation weights."""
    with torch.enable_grad():
        probe = torch.zeros((1, values.shape[1], *shape), dtype=values.dtype, device=values.device,
                            requires_grad=True)
        (grad,) = torch.autograd.grad(bilinear_sample(probe, grid), probe, values)
    return grad
