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

Fan-beam FBP requires a full rotation (no short-scan weighting). A window multiplies the kernel's spectrum; with
``f`` in cycles per channel and ``u = f / 0.5`` the frequency relative to Nyquist:

* ``ram-lak``: 1; ``shepp-logan``: ``sinc(f)``; ``hann``: ``(1 + cos 2 pi f) / 2``;
* ``soft``, ``standard``, ``bone``: XCIST's reconstruction kernels (xcist/main
  ``gecatsim/reconstruction/pyfiles/createHSP.py``), a window through five points at ``u = 0, 0.25, 0.5, 0.75,
  1`` interpolated by a quadratic spline (``scipy.interpolate.interp1d(kind='quadratic')`` there,
  ``make_interp_spline(k=2)`` here): ``soft`` ``(1, 0.815, 0.4564, 0.1636, 0)``, ``standard`` ``(1, 0.9338,
  0.7441, 0.4425, 0.0531)``, ``bone`` ``(1, 1.0485, 1.17, 1.2202, 0.9201)``. The AAPM CT-MAR release is
  reconstructed with ``standard`` (``AAPMRecon.py``: ``kernelType = 'standard'``). Departures from
  ``createHSP``: XCIST multiplies its ramp by 0.997 and offsets it by 0.003 frequency bins (so its images read
  about 3 HU low in water); here every window is 1 at ``u = 0``, so all kernels keep the mean.

A geometry names its default kernel (``Geometry.default_filter``, ``"standard"`` for the AAPM presets), used
wherever the kernel is ``None``.
The backprojection is pixel-driven (linear interpolation along channels); it is evaluated either by
``grid_sample`` (matrix-free) or from a cached sparse matrix, and has its own adjoint, so the reconstruction is
differentiable without storing per-view sampling grids.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .geometry import FILTER_NAMES, FanBeamGeometry, Geometry, ParallelBeamGeometry
from .interpolation import bilinear_sample, bilinear_sample_adjoint, view_chunks

__all__ = ["FILTERS", "XCIST_WINDOW_POINTS", "filter_window", "resolve_filter", "ramp_kernel", "filter_sinogram",
           "backprojection_samples", "backprojection_entries", "SampledBackprojection", "SparseBackprojection",
           "check_full_rotation"]

FILTERS = FILTER_NAMES

# createHSP.py: the window's values at u = f / f_Nyquist = 0, 0.25, 0.5, 0.75, 1
XCIST_WINDOW_NODES = (0.0, 0.25, 0.5, 0.75, 1.0)
XCIST_WINDOW_POINTS = {
    "soft": (1.0, 0.815, 0.4564, 0.1636, 0.0),
    "standard": (1.0, 0.9338, 0.7441, 0.4425, 0.0531),
    "bone": (1.0, 1.0485, 1.17, 1.2202, 0.9201),
}


def resolve_filter(geometry: Geometry, filter_name: str | None) -> str:
    """``filter_name``, or the geometry's ``default_filter`` when it is ``None``.

    Raises:
        ValueError: an unknown filter name (the message lists the known ones).
    """
    name = geometry.default_filter if filter_name is None else filter_name
    if name not in FILTERS:
        raise ValueError(f"unknown FBP filter {name!r}; expected one of {FILTERS}")
    return name


def filter_window(filter_name: str, frequency: np.ndarray) -> np.ndarray:
    """Window of a named kernel at ``frequency`` (cycles per channel, ``0 .. 0.5``), float64, same shape.

    The ramp times this window is the kernel's frequency response; every window is 1 at zero frequency.

    Raises:
        ValueError: an unknown filter name.

    >>> filter_window("standard", np.array([0.0, 0.125, 0.25, 0.375, 0.5])).round(4).tolist()
    [1.0, 0.9338, 0.7441, 0.4425, 0.0531]
    """
    f = np.asarray(frequency, dtype=np.float64)
    if filter_name == "ram-lak":
        return np.ones_like(f)
    if filter_name == "shepp-logan":
        return np.sinc(f)
    if filter_name == "hann":
        return 0.5 * (1 + np.cos(2 * math.pi * f))
    if filter_name in XCIST_WINDOW_POINTS:
        from scipy.interpolate import make_interp_spline

        spline = make_interp_spline(XCIST_WINDOW_NODES, XCIST_WINDOW_POINTS[filter_name], k=2)
        return spline(np.clip(f / 0.5, 0.0, 1.0))
    raise ValueError(f"unknown FBP filter {filter_name!r}; expected one of {FILTERS}")


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


def filter_sinogram(sinogram: torch.Tensor, geometry: Geometry, filter_name: str | None = None) -> torch.Tensor:
    """Weighted, ramp-filtered projections ``Q`` of ``(B, V, C)`` line integrals, same shape and dtype.

    Args:
        sinogram: ``(B, V, C)`` line integrals.
        geometry: the scanner geometry.
        filter_name: one of ``FILTERS``; ``None``: ``geometry.default_filter``.
    Raises:
        ValueError: unknown filter name.
    """
    filter_name = resolve_filter(geometry, filter_name)
    c = geometry.n_channels
    size = 1 << int(math.ceil(math.log2(2 * c)))
    kernel, spacing = ramp_kernel(geometry)
    padded = np.zeros(size)
    padded[: c] = kernel[c - 1:]
    padded[size - (c - 1):] = kernel[: c - 1]
    spectrum = np.fft.rfft(padded).real * spacing * filter_window(filter_name, np.fft.rfftfreq(size))
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
    psi = g.display_angles()[views][:, None]
    dbeta = g.view_span_rad / g.n_views
    centre = (g.n_channels - 1) / 2 - g.channel_offset
    if isinstance(g, ParallelBeamGeometry):
        s = g.channel_direction * (x[None, :] * np.cos(psi) + y[None, :] * np.sin(psi))
        return s / g.channel_pitch_mm + centre, np.full((psi.shape[0], x.size), dbeta * math.pi / g.view_span_rad)
    vx = x[None, :] + g.sid_mm * np.sin(psi)  # source (-sin psi, cos psi) sid to pixel
    vy = y[None, :] - g.sid_mm * np.cos(psi)
    # the ray to the pixel leaves along (sin phi, -cos phi), phi = psi + channel_direction * gamma
    gamma = g.channel_direction * np.angle(np.exp(1j * (np.arctan2(vx, -vy) - psi)))  # wrapped to (-pi, pi]
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
