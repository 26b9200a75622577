"""One projector interface for every backend: ``fp``, its exact adjoint ``bp``, and ``fbp``.

All three take and return batched tensors, ``(B, 1, N, N)`` images (attenuation, mm^-1) and ``(B, 1, V, C)``
sinograms (line integrals, unitless), float32 or float64, on CPU or CUDA, and are differentiable: the
gradient of ``fp`` is computed with ``bp`` (and vice versa), and the gradient of the FBP backprojection with
its own exact adjoint, so autograd never stores per-ray sampling grids.
"""
from __future__ import annotations

import os
from typing import Literal

import torch

from .backends import RaySamplingBackend, SparseMatrixBackend
from .fbp import SampledBackprojection, SparseBackprojection, check_full_rotation, filter_sinogram
from .geometry import Geometry
from .validation import check_image, check_sinogram

__all__ = ["BACKENDS", "Projector"]

BACKENDS = ("sparse", "raysampling")


class _LinearOp(torch.autograd.Function):
    """``y = forward_op(x)`` whose vector-Jacobian product is ``adjoint_op(grad_y)``."""

    @staticmethod
    def forward(ctx, x, forward_op, adjoint_op):
        ctx.adjoint_op = adjoint_op
        ctx.forward_op = forward_op
        return forward_op(x)

    @staticmethod
    def backward(ctx, grad):
        return _LinearOp.apply(grad.contiguous(), ctx.adjoint_op, ctx.forward_op), None, None


class Projector:
    """Fan- or parallel-beam projector on one geometry.

    Args:
        geometry: a ``FanBeamGeometry`` or ``ParallelBeamGeometry``.
        backend: ``"sparse"`` (precomputed CSR system matrix and FBP backprojection matrix, the fast default)
            or ``"raysampling"`` (matrix-free, low memory). Both implement the same Joseph projector and the
            same FBP. ASTRA is available only as
            a test/benchmark reference (``marbench.physics.astra_reference``).
        device: where the operator runs; inputs must be on the same device.
        cache_dir: system-matrix cache (sparse backend), default ``$MARBENCH_CACHE/projectors``.

    Raises:
        ValueError: unknown backend; a fan-beam geometry that does not cover a full rotation (FBP).
    """

    def __init__(self, geometry: Geometry, backend: Literal["sparse", "raysampling"] = "sparse",
                 device: torch.device | str = "cpu", cache_dir: str | os.PathLike | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown projector backend {backend!r}; expected one of {BACKENDS}")
        self.geometry = geometry
        self.device = torch.device(device)
        check_full_rotation(geometry)
        if backend == "sparse":
            self.backend = SparseMatrixBackend(geometry, cache_dir=cache_dir, device=self.device)
            self._backprojection = SparseBackprojection(geometry, cache_dir=cache_dir, device=self.device)
        else:
            self.backend = RaySamplingBackend(geometry)
            self._backprojection = SampledBackprojection(geometry)

    def _check_device(self, x: torch.Tensor, name: str) -> None:
        if x.device.type != self.device.type:
            raise ValueError(f"{name}: expected a tensor on {self.device}, found one on {x.device}")

    def fp(self, image: torch.Tensor) -> torch.Tensor:
        """Line integrals of an attenuation image.

        Args:
            image: ``(B, 1, N, N)`` attenuation in mm^-1 on the geometry's image grid.
        Returns:
            ``(B, 1, V, C)`` line integrals (unitless).
        Raises:
            ValueError: wrong shape, dtype or device, NaN/Inf.
        """
        check_image(image, self.geometry.image_shape)
        self._check_device(image, "image")
        out = _LinearOp.apply(image[:, 0].contiguous(), self.backend.fp, self.backend.bp)
        return out.unsqueeze(1)

    def fp_small_support(self, image: torch.Tensor) -> torch.Tensor:
        """``fp`` of images that are zero outside a small region (metal objects), without autograd.

        With the sparse backend only the system-matrix columns of non-zero pixels are summed (cost grows with
        the support, not the grid); other backends fall back to ``fp``.

        Args:
            image: ``(B, 1, N, N)`` attenuation (or density) image, mostly zeros.
        Returns:
            ``(B, 1, V, C)``, equal to ``fp(image)`` up to float rounding.
        Raises:
            ValueError: as ``fp``.
        """
        check_image(image, self.geometry.image_shape)
        self._check_device(image, "image")
        if isinstance(self.backend, SparseMatrixBackend):
            return self.backend.operator.forward_small_support(image[:, 0]).unsqueeze(1)
        return self.fp(image)

    def bp(self, sinogram: torch.Tensor) -> torch.Tensor:
        """Exact adjoint of ``fp``: ``<fp(x), y> = <x, bp(y)>``.

        Args:
            sinogram: ``(B, 1, V, C)``.
        Returns:
            ``(B, 1, N, N)`` (mm: the adjoint sums path lengths).
        Raises:
            ValueError: wrong shape, dtype or device, NaN/Inf.
        """
        check_sinogram(sinogram, self.geometry.sinogram_shape)
        self._check_device(sinogram, "sinogram")
        out = _LinearOp.apply(sinogram[:, 0].contiguous(), self.backend.bp, self.backend.fp)
        return out.unsqueeze(1)

    def fbp(self, sinogram: torch.Tensor, filter_name: str | None = None) -> torch.Tensor:
        """Filtered backprojection (Kak & Slaney Sec. 3.3-3.4) in physical units.

        Args:
            sinogram: ``(B, 1, V, C)`` line integrals.
            filter_name: one of ``fbp.FILTERS`` (``"ram-lak"``, ``"shepp-logan"``, ``"hann"``, ``"soft"``,
                ``"standard"``, ``"bone"``); ``None``: the geometry's ``default_filter``.
        Returns:
            ``(B, 1, N, N)`` attenuation in mm^-1.
        Raises:
            ValueError: wrong shape, dtype or device, NaN/Inf, unknown filter.
        """
        check_sinogram(sinogram, self.geometry.sinogram_shape)
        self._check_device(sinogram, "sinogram")
        q = filter_sinogram(sinogram[:, 0], self.geometry, filter_name)
        bp = self._backprojection
        return _LinearOp.apply(q.contiguous(), bp.apply, bp.adjoint).unsqueeze(1)
