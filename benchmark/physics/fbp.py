"""Filtered backprojection for the suite's geometries, in physical units (``fbp(fp(mu)) ~ mu`` in mm^-1).

Source: Kak & Slaney, *Principles of Computerized Tomographic Imaging* (1988), Sec. 3.4:

* equi-angular fan (curved detector), Eq. 3.4.2: ``f(x) = int_0^{2pi} L^-2 Q_beta(gamma') dbeta`` with
  ``Q = R'_beta * g``, ``R' = R D cos(gamma)`` (cosine weighting), the discrete kernel
  ``g(n alpha) = 1/(8 alpha^2)`` (n = 0), ``0`` (n even), ``-1/(2 pi^2 sin^2(n alpha))`` (n odd), ``L`` the
  source-to-pixel distance and ``D`` the source-to-isocentre distance;
* equi-spaced fan (flat detector), Eq. 3.4.3: data rescaled to the isocentre, weighted by ``D / sqrt(D^2+s^2)``,
  filtered with half the Ram-Lak kernel and backprojected with ``U^-2``, ``U`` = (source-to-pixel distance
  along the central ray) / ``D``;
* parallel beam, Eq. 3.3: Ram-Lak kernel ``h(na) = 1/(4a^2), 0, -1/(n^2 pi^2 a^2)``, unweighted backprojection.

Fan-beam FBP requires a full rotation (no short-scan weighting). The filter window (``ram-lak``, ``shepp-logan``
``sinc(f)``, ``hann`` ``(1 + cos 2 pi f)/2``, f in cycles per channel) multiplies the kernel's spectrum.
The backprojection is pixel-driven (linear interpolation along channels); it is evaluated either by
``grid_sample`` (matrix-free) or from a cached sparse matrix, and has its own adjoint, so the reconstruction is
differentiable without storing per-view sampling grids.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .geometry import FanBeamGeometry, Geometry, ParallelBeamGeometry
from .interpolation import bilinear_sample, bilinear_sample_adjoint, view_chunks

__all__ = ["FILTERS", "ramp_kernel", "filter_sinogram", "backprojection_samples", "backprojection_entries",
           "SampledBackprojection", "SparseBackprojection", "check_full_rotation"]

FILTERS = ("ram-lak", "shepp-logan", "hann")


def ramp_kernel(geometry: Geometry) -> tuple[np.ndarray, float]:
    """Spatial kernel for ``n = -(C-1) .. C-1`` (float64, ``(2C-1,)``) and the sample spacing it is scaled by."""
    c = geometry.n_channels
    n = np.arange(-(c - 1), c)
    odd = (n % 2) == 1
    kernel = np.zeros(2 * c - 1)
    if isinstance(geometry, FanBeamGeometry) and geometry.detector == "curved":
        a = geometry.dalpha_rad
        kernel[n == 0] = 1 / (8 * a * a)
        kernel[odd] = -1 / (2 * math.pi**2 * np.sin(n[odd] * a) ** 2)
        return kernel, a
    a = geometry.channel_pitch_mm
    if isinstance(geometry, FanBeamGeometry):
        a = a * geometry.sid_mm / geometry.sdd_mm  # virtual detector through the isocentre
    kernel[n == 0] = 1 / (4 * a * a)
    kernel[odd] = -1 / (n[odd].astype(float) ** 2 * math.pi**2 * a * a)
    if isinstance(geometry, FanBeamGeometry):
        kernel = kernel / 2  # fan-beam g = h/2 (Kak & Slaney Eq. 3.4.3)
    return kernel, a


def _pre_weights(geometry: Geometry) -> np.ndarray:
    """Per-channel data weights ``(C,)`` applied before filtering (cosine / distance weighting)."""
    if isinstance(geometry, ParallelBeamGeometry):
        return np.ones(geometry.n_channels)
    d = geometry.sid_mm
    if geometry.detector == "curved":
        return d * np.cos(geometry.fan_angles())
    s = geometry.channel_indices_centred() * geometry.channel_pitch_mm * d / geometry.sdd_mm
    return d / np.sqrt(d * d + s * s)


def filter_sinogram(sinogram: torch.Tensor, geometry: Geometry, filter_name: str = "ram-lak") -> torch.Tensor:
    """Weighted, ramp-filtered projections ``Q`` of ``(B, V, C)`` line integrals, same shape and dtype.

    Raises:
        ValueError: unknown filter name.
    """
    if filter_name not in FILTERS:
        raise ValueError(f"unknown FBP filter {filter_name!r}; expected one of {FILTERS}")
    c = geometry.n_channels
    size = 1 << int(math.ceil(math.log2(2 * c)))
    kernel, spacing = ramp_kernel(geometry)
    padded = np.zeros(size)
    padded[: c] = kernel[c - 1:]
    padded[size - (c - 1):] = kernel[: c - 1]
    spectrum = np.fft.rfft(padded).real * spacing
    f = np.fft.rfftfreq(size)
    if filter_name == "shepp-logan":
        spectrum = spectrum * np.sinc(f)
    elif filter_name == "hann":
        spectrum = spectrum * 0.5 * (1 + np.cos(2 * math.pi * f))
    dev, dt = sinogram.device, sinogram.dtype
    weighted = sinogram * torch.as_tensor(_pre_weights(geometry), device=dev, dtype=dt)
    freq = torch.fft.rfft(weighted, n=size, dim=-1) * torch.as_tensor(spectrum, device=dev, dtype=dt)
    return torch.fft.irfft(freq, n=size, dim=-1)[..., :c]


def backprojection_samples(geometry: Geometry, views: slice) -> tuple[np.ndarray, np.ndarray]:
    """Where each pixel reads each view of the filtered sinogram, and with what weight.

    Returns:
        ``channel`` (continuous channel index) and ``weight`` (``dbeta / L^2`` curved, ``dbeta / U^2`` flat,
        ``dtheta * pi / span`` parallel), each ``(v, N*N)`` float64 for the ``v`` views of ``views``.
    """
    g = geometry
    x, y = (a.reshape(-1) for a in g.pixel_centres_mm())
    beta = g.view_angles()[views][:, None]
    dbeta = g.view_span_rad / g.n_views
    centre = (g.n_channels - 1) / 2 - g.channel_offset
    if isinstance(g, ParallelBeamGeometry):
        s = -x[None, :] * np.cos(beta) + y[None, :] * np.sin(beta)
        return s / g.channel_pitch_mm + centre, np.full((beta.shape[0], x.size), dbeta * math.pi / g.view_span_rad)
    vx = x[None, :] - g.sid_mm * np.sin(beta)
    vy = y[None, :] - g.sid_mm * np.cos(beta)
    gamma = np.angle(np.exp(1j * (np.arctan2(-vx, -vy) - beta)))  # wrapped to (-pi, pi]
    dist2 = vx * vx + vy * vy
    if g.detector == "curved":
        return gamma / g.dalpha_rad + centre, dbeta / dist2
    u = np.sqrt(dist2) * np.cos(gamma) / g.sid_mm
    return g.sdd_mm * np.tan(gamma) / g.channel_pitch_mm + centre, dbeta / (u * u)


def backprojection_entries(geometry: Geometry, views: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """COO entries ``(ray, pixel, weight)`` of the transpose of the FBP backprojection for ``views``: linear
    interpolation between the two channels around each pixel's channel position (zero outside the detector),
    rays numbered from the first view of ``views``."""
    channel, weight = backprojection_samples(geometry, views)
    c = geometry.n_channels
    lo = np.floor(channel).astype(np.int64)
    frac = channel - lo
    view = np.arange(channel.shape[0])[:, None]
    pixel = np.broadcast_to(np.arange(channel.shape[1])[None, :], channel.shape)
    rays, pixels, values = [], [], []
    for k, w in ((lo, 1.0 - frac), (lo + 1, frac)):
        keep = (k >= 0) & (k < c) & (w > 0)
        rays.append((view * c + k)[keep])
        pixels.append(pixel[keep])
        values.append((w * weight)[keep])
    return np.concatenate(rays), np.concatenate(pixels), np.concatenate(values)


class SampledBackprojection:
    """Pixel-driven backprojection ``(B, V, C) -> (B, N, N)`` with FBP's weights, evaluated with ``grid_sample``
    a chunk of views at a time (low memory). ``apply`` is the linear map, ``adjoint`` its exact adjoint."""

    def __init__(self, geometry: Geometry, chunk_bytes: int = 128 * 2**20):
        self.geometry = geometry
        self.chunk_bytes = chunk_bytes

    def _chunks(self, batch: int, itemsize: int):
        g = self.geometry
        # per pixel and view: the batch's samples, grid and weight, and the float64 geometry temporaries
        per_view = g.image_size**2 * (batch * itemsize + 3 * itemsize + 64)
        return view_chunks(g.n_views, per_view, self.chunk_bytes)

    def _grid(self, views: slice, device, dtype):
        """Sampling grid ``(1, v, N*N, 2)`` into the ``(V, C)`` sinogram and weights ``(v, N*N)``."""
        g = self.geometry
        channel, weight = backprojection_samples(g, views)
        rows = np.broadcast_to(np.arange(views.start, views.stop)[:, None], channel.shape)
        grid = np.stack([channel / (g.n_channels - 1) * 2 - 1, rows / max(g.n_views - 1, 1) * 2 - 1], axis=-1)
        return (torch.from_numpy(grid).to(device=device, dtype=dtype)[None],
                torch.from_numpy(weight).to(device=device, dtype=dtype))

    def apply(self, q: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        b = q.shape[0]
        src = q.unsqueeze(0)
        out = torch.zeros((b, g.image_size**2), dtype=q.dtype, device=q.device)
        for views in self._chunks(b, q.element_size()):
            grid, weight = self._grid(views, q.device, q.dtype)
            out += (bilinear_sample(src, grid)[0] * weight).sum(1)
        return out.reshape(b, g.image_size, g.image_size)

    def adjoint(self, image: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        b = image.shape[0]
        flat = image.reshape(b, 1, -1)
        out = torch.zeros((b, g.n_views, g.n_channels), dtype=image.dtype, device=image.device)
        for views in self._chunks(b, image.element_size()):
            grid, weight = self._grid(views, image.device, image.dtype)
            out += bilinear_sample_adjoint((flat * weight)[None], grid, g.sinogram_shape)[0]
        return out


class SparseBackprojection:
    """The same backprojection as ``SampledBackprojection`` (same interpolation and weights), stored as a cached
    CSR matrix with quarter-turn symmetry (see ``sparse_cache``): the fast default for the sparse backend."""

    def __init__(self, geometry: Geometry, cache_dir=None, device: torch.device | str = "cpu"):
        from .backends import quarter_turn_operator

        self.geometry = geometry
        self.operator = quarter_turn_operator(geometry, "fbp-backprojection-v1", backprojection_entries,
                                              cache_dir, device)

    def apply(self, q: torch.Tensor) -> torch.Tensor:
        return self.operator.transpose(q)

    def adjoint(self, image: torch.Tensor) -> torch.Tensor:
        return self.operator.forward(image)


def check_full_rotation(geometry: Geometry) -> None:
    """Raise ``ValueError`` for a fan-beam geometry whose views do not cover 2*pi (no short-scan weights)."""
    if isinstance(geometry, FanBeamGeometry) and abs(geometry.view_span_rad - 2 * math.pi) > 1e-9:
        raise ValueError(f"fan-beam FBP needs views over 2*pi, found view_span_rad={geometry.view_span_rad}")
