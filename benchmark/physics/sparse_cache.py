"""A sparse linear operator and its transpose as torch CSR matrices (int32 indices), cached on disk.

The matrices are built once per key (a geometry hash plus an operator tag), written atomically as ``.npy``
files (a temporary folder renamed into place, so concurrent builders never see half a cache) and memory-mapped
copy-on-write on reuse: a later process pages in only what it touches and pays no build cost.

With quarter-turn symmetry (``Geometry.has_quarter_turn_symmetry``) the operators store only the first quarter
of the views; ``QuarterTurnOperator`` applies view ``v + q V/4`` as view ``v`` on the image turned ``q``
quarter turns (``torch.rot90(image, k q)`` with ``k = Geometry.quarter_turn_rot90()``: against the direction the
gantry turns, so either rotation sense), which also batches the four quarters into one sparse-dense product.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

__all__ = ["CachedCSRPair", "QuarterTurnOperator"]

_NAMES = [f"{k}_{p}" for k in ("m", "mt") for p in ("crow", "col", "val")]


class CachedCSRPair:
    """``M`` of shape ``(rows, cols)`` and ``M^T``, as CSR.

    Args:
        path: cache folder of this operator.
        shape: ``(rows, cols)`` of ``M``.
        build: returns ``M`` as a ``scipy.sparse.csr_matrix`` (float32 values); called only on a cache miss.
        device: where the torch matrices live.

    Raises:
        ValueError: more non-zeros than int32 indexing holds, or a built matrix of the wrong shape.
    """

    def __init__(self, path: Path, shape: tuple[int, int], build: Callable, device: torch.device):
        self.path, self.shape, self.device = Path(path), shape, device
        if not self._complete():
            self._write(build())
        self.arrays = {n: np.load(self.path / f"{n}.npy", mmap_mode="c") for n in _NAMES}
        self._torch: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def _complete(self) -> bool:
        return all((self.path / f"{n}.npy").is_file() for n in _NAMES)

    def _write(self, m) -> None:
        if m.shape != self.shape:
            raise ValueError(f"{self.path}: built matrix has shape {m.shape}, expected {self.shape}")
        if m.nnz >= 2**31 - 1:
            raise ValueError(f"{self.path}: {m.nnz} non-zeros; int32 indexing holds at most 2**31-1")
        m.sort_indices()
        mt = m.T.tocsr()
        mt.sort_indices()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=self.path.name + ".", dir=self.path.parent))
        try:
            for key, mat in (("m", m), ("mt", mt)):
                np.save(tmp / f"{key}_crow.npy", mat.indptr.astype(np.int32))
                np.save(tmp / f"{key}_col.npy", mat.indices.astype(np.int32))
                np.save(tmp / f"{key}_val.npy", mat.data.astype(np.float32))
            try:
                os.rename(tmp, self.path)
            except OSError:
                if self._complete():  # another process finished the same cache first
                    shutil.rmtree(tmp, ignore_errors=True)
                else:  # a stale or partial folder of that name: set it aside, then take its place
                    stale = Path(tempfile.mkdtemp(prefix=self.path.name + ".stale.", dir=self.path.parent))
                    os.rename(self.path, stale / "old")
                    os.rename(tmp, self.path)
                    shutil.rmtree(stale, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def _matrices(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if dtype not in self._torch:
            mats = []
            for key, shape in (("m", self.shape), ("mt", self.shape[::-1])):
                crow = torch.from_numpy(self.arrays[f"{key}_crow"])
                col = torch.from_numpy(self.arrays[f"{key}_col"])
                val = torch.from_numpy(self.arrays[f"{key}_val"]).to(dtype)
                with warnings.catch_warnings():  # CSR support is "beta" in torch; the arrays come from scipy
                    warnings.simplefilter("ignore", UserWarning)
                    mat = torch.sparse_csr_tensor(crow, col, val, size=shape, check_invariants=False)
                mats.append(mat.to(self.device))
            self._torch[dtype] = (mats[0], mats[1])
        return self._torch[dtype]

    def _product(self, matrix: torch.Tensor, dense: torch.Tensor, width: int) -> torch.Tensor:
        # The product reads rows of ``dense`` at random: with more columns than ``width`` the operand leaves
        # the cache and every column costs more (aapm_body forward projection: 0.10 s per image with 4
        # columns, 0.27 s with 32), so wide operands go through in slices.
        if dense.shape[1] <= width:
            return torch.sparse.mm(matrix, dense)
        return torch.cat([torch.sparse.mm(matrix, dense[:, i: i + width].contiguous())
                          for i in range(0, dense.shape[1], width)], dim=1)

    def matmul(self, dense: torch.Tensor, width: int = 2**30) -> torch.Tensor:
        """``M @ dense`` for ``dense`` of shape ``(cols, K)``, ``width`` columns per sparse product."""
        return self._product(self._matrices(dense.dtype)[0], dense, width)

    def matmul_t(self, dense: torch.Tensor, width: int = 2**30) -> torch.Tensor:
        """``M^T @ dense`` for ``dense`` of shape ``(rows, K)``, ``width`` columns per sparse product."""
        return self._product(self._matrices(dense.dtype)[1], dense, width)


class QuarterTurnOperator:
    """An image-to-sinogram operator ``(B, N, N) -> (B, V, C)`` (``forward``) and its transpose (``transpose``)
    from the matrix ``M`` of its first ``stored_views`` views (all views when ``turns == 1``).

    View ``v + q V/4`` is view ``v`` of ``torch.rot90(image, k * q, dims=(-2, -1))``, ``k = +-1`` (the
    geometry's ``quarter_turn_rot90()``; ``+1`` turns counterclockwise as displayed, for a gantry turning
    clockwise). The transpose turns each quarter's back-projection back by ``rot90(., -k * q)``, the adjoint
    (and inverse) of ``rot90(., k * q)``.

    Raises:
        ValueError: ``turns`` not 1 or 4, ``k`` not +-1 with 4 turns, or ``n_views`` not a multiple of ``turns``.
    """

    def __init__(self, matrix: CachedCSRPair, image_size: int, n_views: int, n_channels: int, turns: int,
                 forward_width: int = 2**30, transpose_width: int = 2**30, k: int = 1):
        if turns not in (1, 4) or n_views % turns:
            raise ValueError(f"QuarterTurnOperator: turns must be 1 or 4 and divide n_views ({n_views}), "
                             f"found {turns}")
        if turns == 4 and k not in (1, -1):
            raise ValueError(f"QuarterTurnOperator: k must be 1 or -1 with four turns, found {k!r}")
        self.matrix, self.n, self.v, self.c, self.turns = matrix, image_size, n_views, n_channels, turns
        self.k = k if turns == 4 else 0
        self.stored_views = n_views // turns
        self.forward_width, self.transpose_width = forward_width, transpose_width

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        b = image.shape[0]
        stack = torch.cat([torch.rot90(image, self.k * q, dims=(-2, -1)) for q in range(self.turns)], dim=0)
        rays = self.matrix.matmul(stack.reshape(self.turns * b, -1).T.contiguous(), self.forward_width)
        rays = rays.reshape(self.stored_views, self.c, self.turns, b)
        return rays.permute(3, 2, 0, 1).reshape(b, self.v, self.c)

    def forward_small_support(self, image: torch.Tensor) -> torch.Tensor:
        """``forward`` for images that are zero almost everywhere (metal objects): sums only the rows of the
        stored transpose at non-zero pixels, so the cost scales with the support instead of the grid."""
        b = image.shape[0]
        arrays = self.matrix.arrays
        crow, col, val = arrays["mt_crow"], arrays["mt_col"], arrays["mt_val"]
        n_rays = self.stored_views * self.c
        out = np.zeros((b, self.turns, n_rays), dtype=np.float64)
        for q in range(self.turns):
            turned = torch.rot90(image, self.k * q, dims=(-2, -1)).reshape(b, -1).cpu().numpy()
            for i in range(b):
                pixels = np.flatnonzero(turned[i])
                if pixels.size == 0:
                    continue
                start, stop = crow[pixels].astype(np.int64), crow[pixels + 1].astype(np.int64)
                lengths = stop - start
                entries = np.repeat(start - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
                weights = val[entries] * np.repeat(turned[i, pixels], lengths)
                out[i, q] = np.bincount(col[entries], weights=weights, minlength=n_rays)
        rays = torch.from_numpy(out).to(image.dtype).reshape(b, self.turns, self.stored_views, self.c)
        return rays.reshape(b, self.v, self.c).to(image.device)

    def transpose(self, sinogram: torch.Tensor) -> torch.Tensor:
        b = sinogram.shape[0]
        parts = sinogram.reshape(b, self.turns, self.stored_views * self.c)
        cols = parts.permute(2, 1, 0).reshape(self.stored_views * self.c, self.turns * b).contiguous()
        pix = self.matrix.matmul_t(cols, self.transpose_width).T.reshape(self.turns, b, self.n, self.n)
        return sum(torch.rot90(pix[q], -self.k * q, dims=(-2, -1)) for q in range(self.turns))
