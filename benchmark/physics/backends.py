"""Projector backends: each maps ``(B, N, N)`` images to ``(B, V, C)`` line integrals (``fp``) and back with the
exact adjoint (``bp``). ``projector.Projector`` wraps them in autograd; they are not differentiated themselves.

* ``RaySamplingBackend`` (matrix-free): Joseph samples evaluated by ``grid_sample`` a chunk of views at a time;
  the adjoint is ``grid_sample``'s input gradient, so memory stays bounded (default chunk ~128 MB).
* ``SparseMatrixBackend`` (default): the same Joseph weights assembled once into a CSR system matrix with int32
  indices, its transpose stored explicitly, cached on disk per geometry hash and memory-mapped on reuse. When
  the views cover a full turn in a multiple of four, only the first quarter of the views is stored and view
  ``v + q V/4`` is applied to the image rotated by ``q`` quarter turns (4x less memory, and the four rotated
  copies batch into one sparse-dense product).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import Geometry
from .joseph import matrix_entries, sample_grid

__all__ = ["RaySamplingBackend", "SparseMatrixBackend", "default_cache_dir"]

_MATRIX_FORMAT_VERSION = "joseph-csr-v1"


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
        step = max(1, min(g.n_views, self.chunk_bytes // per_view))
        for start in range(0, g.n_views, step):
            yield slice(start, min(start + step, g.n_views))

    def fp(self, image: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        b = image.shape[0]
        src = image.unsqueeze(0)  # (1, B, N, N): the batch rides in grid_sample's channel dimension
        out = []
        for views in self._view_chunks(b, image.element_size()):
            grid, step = sample_grid(g, views, image.device, image.dtype)
            samples = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            out.append((samples.sum(-1) * step)[0])
        return torch.cat(out, dim=1).reshape(b, g.n_views, g.n_channels)

    def bp(self, sinogram: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        b = sinogram.shape[0]
        flat = sinogram.reshape(b, -1)
        result = torch.zeros((b, g.image_size, g.image_size), dtype=sinogram.dtype, device=sinogram.device)
        with torch.enable_grad():
            for views in self._view_chunks(b, sinogram.element_size()):
                grid, step = sample_grid(g, views, sinogram.device, sinogram.dtype)
                probe = torch.zeros((1, b, g.image_size, g.image_size), dtype=sinogram.dtype,
                                    device=sinogram.device, requires_grad=True)
                samples = F.grid_sample(probe, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
                rays = flat[:, views.start * g.n_channels: views.stop * g.n_channels]
                weight = (rays * step)[None, :, :, None].expand_as(samples)
                (grad,) = torch.autograd.grad(samples, probe, weight)
                result += grad[0]
        return result


class SparseMatrixBackend:
    """Precomputed CSR system matrix (and its transpose) of the Joseph projector.

    Args:
        geometry: the scanner geometry.
        cache_dir: folder for the on-disk cache (default ``default_cache_dir()/projectors``); ``None`` entries
            are built once per geometry hash and reused, memory-mapped, by later processes.
        device: where the matrices live (CUDA uses cuSPARSE).

    Raises:
        ValueError: the matrix would exceed int32 indexing (more than 2**31 - 1 non-zeros).
    """

    name = "sparse"

    def __init__(self, geometry: Geometry, cache_dir: str | os.PathLike | None = None,
                 device: torch.device | str = "cpu"):
        self.geometry = geometry
        self.symmetric = geometry.has_quarter_turn_symmetry()
        self.stored_views = geometry.n_views // 4 if self.symmetric else geometry.n_views
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "projectors"
        self.path = root / f"{geometry.hash}-{_MATRIX_FORMAT_VERSION}{'-quarter' if self.symmetric else ''}"
        self.device = torch.device(device)
        self._arrays = self._load_or_build()
        self._matrices: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- construction and cache -------------------------------------------------------------------------
    def _build(self) -> dict[str, np.ndarray]:
        import scipy.sparse as sp

        g = self.geometry
        n_pix = g.image_size ** 2
        blocks = []
        views_per_chunk = max(1, 2**24 // (g.n_channels * g.image_size))
        for start in range(0, self.stored_views, views_per_chunk):
            views = slice(start, min(start + views_per_chunk, self.stored_views))
            ray, pix, w = matrix_entries(g, views)
            n_rays = (views.stop - views.start) * g.n_channels
            block = sp.csr_matrix((w.astype(np.float32), (ray, pix)), shape=(n_rays, n_pix))
            block.sort_indices()
            blocks.append(block)
        a = sp.vstack(blocks, format="csr")
        if a.nnz >= 2**31 - 1:
            raise ValueError(f"system matrix for {g} has {a.nnz} non-zeros; int32 indexing holds at most 2**31-1")
        at = a.T.tocsr()
        at.sort_indices()
        arrays = {}
        for key, m in (("a", a), ("at", at)):
            arrays[f"{key}_crow"] = m.indptr.astype(np.int32)
            arrays[f"{key}_col"] = m.indices.astype(np.int32)
            arrays[f"{key}_val"] = m.data.astype(np.float32)
        return arrays

    def _load_or_build(self) -> dict[str, np.ndarray]:
        names = [f"{k}_{p}" for k in ("a", "at") for p in ("crow", "col", "val")]
        if not all((self.path / f"{n}.npy").is_file() for n in names):
            arrays = self._build()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=self.path.name + ".", dir=self.path.parent))
            try:
                for n in names:
                    np.save(tmp / f"{n}.npy", arrays[n])
                (tmp / "geometry.json").write_text(str(self.geometry.to_dict()))
                try:
                    os.rename(tmp, self.path)  # atomic: another process may have won the race
                except OSError:
                    shutil.rmtree(tmp, ignore_errors=True)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        # copy-on-write mapping: pages are read lazily and torch gets writable buffers without a copy
        return {n: np.load(self.path / f"{n}.npy", mmap_mode="c") for n in names}

    def _csr(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if dtype not in self._matrices:
            g = self.geometry
            n_rays = self.stored_views * g.n_channels
            n_pix = g.image_size ** 2
            mats = []
            for key, shape in (("a", (n_rays, n_pix)), ("at", (n_pix, n_rays))):
                crow = torch.from_numpy(self._arrays[f"{key}_crow"])
                col = torch.from_numpy(self._arrays[f"{key}_col"])
                val = torch.from_numpy(self._arrays[f"{key}_val"]).to(dtype)
                with warnings.catch_warnings():  # CSR support is "beta" in torch; the matrices are scipy-checked
                    warnings.simplefilter("ignore", UserWarning)
                    m = torch.sparse_csr_tensor(crow, col, val, size=shape, check_invariants=False)
                mats.append(m.to(self.device))
            self._matrices[dtype] = (mats[0], mats[1])
        return self._matrices[dtype]

    @property
    def nbytes(self) -> int:
        """Bytes of the stored matrix and transpose (float32 values, int32 indices)."""
        return sum(a.nbytes for a in self._arrays.values())

    # -- operators ----------------------------------------------------------------------------------------
    def fp(self, image: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        a, _ = self._csr(image.dtype)
        b = image.shape[0]
        turns = 4 if self.symmetric else 1
        stack = torch.cat([torch.rot90(image, q, dims=(-2, -1)) for q in range(turns)], dim=0)
        cols = stack.reshape(turns * b, -1).T.contiguous()
        rays = torch.sparse.mm(a, cols)  # (stored_views * C, turns * B)
        rays = rays.reshape(self.stored_views, g.n_channels, turns, b)
        return rays.permute(3, 2, 0, 1).reshape(b, g.n_views, g.n_channels)

    def bp(self, sinogram: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        _, at = self._csr(sinogram.dtype)
        b = sinogram.shape[0]
        turns = 4 if self.symmetric else 1
        parts = sinogram.reshape(b, turns, self.stored_views * g.n_channels)
        cols = parts.permute(2, 1, 0).reshape(self.stored_views * g.n_channels, turns * b).contiguous()
        pix = torch.sparse.mm(at, cols).T.reshape(turns, b, g.image_size, g.image_size)
        return sum(torch.rot90(pix[q], -q, dims=(-2, -1)) for q in range(turns))
