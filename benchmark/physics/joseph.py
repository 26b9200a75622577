"""Joseph's ray-driven line-integral discretisation (Joseph, IEEE TMI 1982), shared by both torch backends.

A ray is sampled once per image row (when it is closer to vertical) or once per column (otherwise), at the
row/column centre line; the image is linearly interpolated between the two neighbouring pixels of that
row/column (zero outside the grid) and each sample is weighted by the path length between two rows,
``pixel_size / max(|d_x|, |d_y|)`` for a unit direction ``d``. The matrix-free backend evaluates the samples
with ``grid_sample``; the sparse backend stores exactly the same weights, so the two backends implement one
operator.
"""
from __future__ import annotations

import numpy as np
import torch

from .geometry import Geometry

__all__ = ["matrix_entries", "ray_bundle", "sample_grid"]


def ray_bundle(geometry: Geometry, views: slice) -> tuple[np.ndarray, np.ndarray]:
    """Origins and unit directions of the rays of ``views``, each ``(v, C, 2)`` float64 in mm."""
    origin, direction = geometry.rays()
    n_v = len(range(*views.indices(geometry.n_views)))
    shape = (n_v, geometry.n_channels, 2)
    return (np.broadcast_to(origin[views], shape).reshape(-1, 2),
            np.broadcast_to(direction[views], shape).reshape(-1, 2))


def _samples(geometry: Geometry, origin: np.ndarray, direction: np.ndarray):
    """Continuous (row, col) indices ``(R, N)`` of every sample, which axis is exact, and the step (R,)."""
    n = geometry.image_size
    c = (n - 1) / 2
    px = geometry.pixel_size_mm
    idx = np.arange(n, dtype=np.float64)
    dx, dy = direction[:, :1], direction[:, 1:]
    ox, oy = origin[:, :1], origin[:, 1:]
    vertical = np.abs(dy) >= np.abs(dx)
    # vertical-ish rays: one sample per row i at y = (c - i) px
    t_row = ((c - idx)[None, :] * px - oy) / np.where(vertical, dy, 1.0)
    col_of_row = (ox + t_row * dx) / px + c
    # horizontal-ish rays: one sample per column j at x = (j - c) px
    t_col = ((idx - c)[None, :] * px - ox) / np.where(vertical, 1.0, dx)
    row_of_col = c - (oy + t_col * dy) / px
    rows = np.where(vertical, idx[None, :], row_of_col)
    cols = np.where(vertical, col_of_row, idx[None, :])
    step = px / np.maximum(np.abs(dx[:, 0]), np.abs(dy[:, 0]))
    return rows, cols, vertical[:, 0], step


def sample_grid(geometry: Geometry, views: slice, device: torch.device, dtype: torch.dtype):
    """``grid_sample`` grid ``(1, R, N, 2)`` (normalised x, y; ``align_corners=True``) and steps ``(R,)`` in mm."""
    origin, direction = ray_bundle(geometry, views)
    rows, cols, _, step = _samples(geometry, origin, direction)
    scale = (geometry.image_size - 1) / 2
    grid = np.stack([cols / scale - 1.0, rows / scale - 1.0], axis=-1)
    return (torch.from_numpy(grid).to(device=device, dtype=dtype)[None],
            torch.from_numpy(step).to(device=device, dtype=dtype))


def matrix_entries(geometry: Geometry, views: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """COO entries ``(ray, pixel, weight)`` of the system matrix rows of ``views`` (rays numbered from 0).

    ``pixel = row * N + col``; weights are path lengths in mm (float64); zero weights are dropped.
    """
    n = geometry.image_size
    origin, direction = ray_bundle(geometry, views)
    rows, cols, vertical, step = _samples(geometry, origin, direction)
    n_rays, n_samp = rows.shape
    ray = np.broadcast_to(np.arange(n_rays)[:, None], rows.shape)
    frac_axis = np.where(vertical[:, None], cols, rows)  # the interpolated coordinate
    exact_axis = np.where(vertical[:, None], rows, cols).astype(np.int64)
    lo = np.floor(frac_axis).astype(np.int64)
    w_hi = frac_axis - lo
    out_ray, out_pix, out_w = [], [], []
    for neighbour, weight in ((lo, 1.0 - w_hi), (lo + 1, w_hi)):
        keep = (neighbour >= 0) & (neighbour < n) & (weight > 0)
        r = np.where(vertical[:, None], exact_axis, neighbour)[keep]
        cidx = np.where(vertical[:, None], neighbour, exact_axis)[keep]
        out_ray.append(ray[keep])
        out_pix.append(r * n + cidx)
        out_w.append((weight * step[:, None])[keep])
    return np.concatenate(out_ray), np.concatenate(out_pix), np.concatenate(out_w)
