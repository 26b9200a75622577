"""Projector backends: each maps ``(B, N, N)`` images to ``(B, V, C)`` line integrals (``fp``) and back with the
exact adjoint (``bp``). ``projector.Projector`` wraps them in autograd; they are not differentiated themselves.

* ``RaySamplingBackend`` (matrix-free): Joseph samples evaluated by ``grid_sample`` a chunk of views at a time;
  the adjoint is ``grid_sample``'s input gradient, so memory stays bounded (default chunk ~128 MB).
* ``SparseMatrixBackend`` (default): the same Joseph weights assembled once into a CSR system matrix with int32
  indices, its transpose stored explicitly, cached on disk per geometry hash and memory-mapped on reuse. When
  the views cover a full turn in a multiple of four, only the first quarter of the views is stored and view
  ``v + q V/4`` is applied to the image rotated by ``q`` quarter turns against the gantry's rotation
  (``torch.rot90(image, q * geometry.quarter_turn_rot90())``, either rotation sense; 4x less memory, and the
  four rotated copies batch into one sparse-dense product).
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import torch

from .geometry import Geometry
from .interpolation import bilinear_sample, bilinear_sample_adjoint, view_chunks
from .joseph import matrix_entries, sample_grid
from .sparse_cache import CachedCSRPair, QuarterTurnOperator

__all__ = ["RaySamplingBackend", "SparseMatrixBackend", "default_cache_dir", "quarter_turn_operator"]

_MATRIX_FORMAT_VERSION = "joseph-csr-v2"
CPU_PRODUCT_COLUMNS = 8


def default_cache_dir() -> Path:
    """``$MARBENCH_CACHE`` or ``~/.cache/marbench``: where system matrices are cached."""
    return Path(os.environ.get("MARBENCH_CACHE", Path.home() / ".cache" / "marbench"))


def _pin_glibc_mmap_threshold(threshold_bytes: int = 2**20) -> None:
    """Serve allocations above 1 MB by mmap so freed chunk buffers return to the OS.

    glibc raises its mmap threshold after each large free, so the per-chunk buffers of a matrix-free pass are
    then carved from the heap and never returned: measured at ``aapm_body`` batch 8, a forward projection
    peaked at 7.4 GB instead of 0.7 GB. Setting the threshold once (process-wide) switches that off.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to pin
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, threshold_bytes)


class RaySamplingBackend:
    """Matrix-free Joseph projector; ``chunk_bytes`` bounds the per-chunk sample buffer."""

    name = "raysampling"

    def __init__(self, geometry: Geometry, chunk_bytes: int = 128 * 2**20):
        self.geometry = geometry
        self.chunk_bytes = chunk_bytes
        _pin_glibc_mmap_threshold()

    def _view_chunks(self, batch: int, itemsize: int):
        g = self.geometry
        # per sample: the batch's values, the float grid, and ~10 float64 temporaries of the ray geometry
        per_view = g.n_channels * g.image_size * (batch * itemsize + 2 * itemsize + 80)
        return view_chunks(g.n_views, per_view, self.chunk_bytes)

    def fp(self, image: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        b = image.shape[0]
        src = image.unsqueeze(0)  # (1, B, N, N): the batch rides in grid_sample's channel dimension
        out = []
        for views in self._view_chunks(b, image.element_size()):
            grid, step = sample_grid(g, views, image.device, image.dtype)
            out.append((bilinear_sample(src, grid).sum(-1) * step)[0])
        return torch.cat(out, dim=1).reshape(b, g.n_views, g.n_channels)

    def bp(self, sinogram: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        b = sinogram.shape[0]
        flat = sinogram.reshape(b, -1)
        result = torch.zeros((b, g.image_size, g.image_size), dtype=sinogram.dtype, device=sinogram.device)
        for views in self._view_chunks(b, sinogram.element_size()):
            grid, step = sample_grid(g, views, sinogram.device, sinogram.dtype)
            rays = flat[:, views.start * g.n_channels: views.stop * g.n_channels]
            weight = (rays * step)[None, :, :, None].expand(1, b, grid.shape[1], grid.shape[2])
            result += bilinear_sample_adjoint(weight, grid, g.image_shape)[0]
        return result


def operator_cache_path(geometry: Geometry, tag: str, cache_dir: str | os.PathLike | None) -> Path:
    """Cache folder of one operator of ``geometry``: ``<cache_dir>/<geometry hash>-<tag>[-quarter]``."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "projectors"
    return root / f"{geometry.hash}-{tag}{'-quarter' if geometry.has_quarter_turn_symmetry() else ''}"


def quarter_turn_operator(geometry: Geometry, tag: str, entries, cache_dir, device) -> QuarterTurnOperator:
    """Build (or load) the cached CSR operator whose rows for a slice of views are given by ``entries``.

    ``entries(geometry, views) -> (ray, pixel, weight)`` returns COO entries with rays numbered from the first
    view of ``views``.
    """
    import scipy.sparse as sp

    g = geometry
    k = g.quarter_turn_rot90()  # +-1: view v + V/4 is view v of torch.rot90(image, k); 0: no symmetry
    turns = 4 if k else 1
    stored = g.n_views // turns
    shape = (stored * g.n_channels, g.image_size**2)

    def build():
        blocks = []
        per_chunk = max(1, 2**24 // (g.n_channels * g.image_size))
        for start in range(0, stored, per_chunk):
            views = slice(start, min(start + per_chunk, stored))
            ray, pix, w = entries(g, views)
            rows = (views.stop - views.start) * g.n_channels
            blocks.append(sp.csr_matrix((w.astype(np.float32), (ray, pix)), shape=(rows, shape[1])))
        return sp.vstack(blocks, format="csr")

    device = torch.device(device)
    pair = CachedCSRPair(operator_cache_path(g, tag, cache_dir), shape, build, device)
    # 8 columns per sparse product was fastest on the 2-core CPU (perf/projector_speed.py); cuSPARSE takes all
    width = CPU_PRODUCT_COLUMNS if device.type == "cpu" else 2**30
    return QuarterTurnOperator(pair, g.image_size, g.n_views, g.n_channels, turns, width, width, k=k)


class SparseMatrixBackend:
    """Precomputed CSR system matrix (and its transpose) of the Joseph projector.

    Args:
        geometry: the scanner geometry.
        cache_dir: folder for the on-disk cache (default ``default_cache_dir()/projectors``); matrices are built
            once per geometry hash and reused, memory-mapped, by later processes.
        device: where the matrices live (CUDA uses cuSPARSE).

    Raises:
        ValueError: the matrix would exceed int32 indexing (more than 2**31 - 1 non-zeros).
    """

    name = "sparse"

    def __init__(self, geometry: Geometry, cache_dir: str | os.PathLike | None = None,
                 device: torch.device | str = "cpu"):
        self.geometry = geometry
        self.operator = quarter_turn_operator(geometry, _MATRIX_FORMAT_VERSION, matrix_entries, cache_dir, device)

    @property
    def path(self) -> Path:
        return self.operator.matrix.path

    @property
    def nbytes(self) -> int:
        """Bytes of the stored matrix and transpose (float32 values, int32 indices)."""
        return self.operator.matrix.nbytes

    def fp(self, image: torch.Tensor) -> torch.Tensor:
        return self.operator.forward(image)

    def bp(self, sinogram: torch.Tensor) -> torch.Tensor:
        return self.operator.transpose(sinogram)
