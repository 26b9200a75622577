"""Metal masks: the AAPM CT-MAR random fractal shapes and anatomical implants, on the geometry's image grid.

Fractal shapes follow the AAPM CT-MAR data generation (xcist/example ``AAPM_datachallenge/data_generation.md``):
a hexagon whose edge midpoints are displaced by a uniform gain in ``+/- 0.67 x`` the edge length, repeated
until edges are below a pixel, vertices smoothed by a circular moving average of length ``10^U(2.15, 2.7)``,
rasterised on a 256 x 256 grid; the effective diameter ``d = 2 sqrt(A / pi)`` (pixels) sets the pixel size
``D / d`` mm that gives the requested diameter ``D`` mm.

Implants are built from primitives in mm around an anchor point; every function returns a bool ``(N, N)``
numpy mask on the geometry's image grid (row 0 at the top, see ``geometry``).
"""
from __future__ import annotations

import math

import numpy as np
from skimage.draw import polygon as rasterise_polygon

from .geometry import Geometry

__all__ = [
    "dental_fillings",
    "effective_diameter_px",
    "fixation_plate",
    "fractal_shape",
    "hip_prostheses",
    "pedicle_screws",
    "place_shape",
    "surgical_clips",
]

_FRACTAL_GRID = 256


def fractal_shape(rng: np.random.Generator, size: int = _FRACTAL_GRID, gain: float = 0.67) -> np.ndarray:
    """AAPM random fractal metal shape: bool ``(size, size)`` mask (see module docstring)."""
    angles = np.arange(6) * (math.pi / 3)
    pts = np.stack([np.cos(angles), np.sin(angles)], axis=1) * (size / 6)
    while True:
        nxt = np.roll(pts, -1, axis=0)
        edge = nxt - pts
        length = np.hypot(edge[:, 0], edge[:, 1])
        if np.median(length) < 1.0:  # pixel scale: further subdivision changes no pixel
            break
        normal = np.stack([-edge[:, 1], edge[:, 0]], axis=1) / np.maximum(length, 1e-12)[:, None]
        mid = (pts + nxt) / 2 + normal * (rng.uniform(-gain, gain, len(pts)) * length)[:, None]
        pts = np.stack([pts, mid], axis=1).reshape(-1, 2)
    window = int(round(10 ** rng.uniform(2.15, 2.7)))
    window = min(window, len(pts))
    kernel = np.ones(window) / window
    smooth = np.stack([np.convolve(np.concatenate([p[-window:], p, p[:window]]), kernel, mode="same")[window:-window]
                       for p in pts.T], axis=1)
    smooth -= smooth.mean(axis=0)
    extent = np.abs(smooth).max()
    smooth = smooth * (0.45 * size / max(extent, 1e-9)) + size / 2
    # after a moving average over >= 141 vertices the outline is smooth: every 16th vertex rasterises the same
    smooth = smooth[:: max(1, min(16, window // 8))]
    mask = np.zeros((size, size), dtype=bool)
    rr, cc = rasterise_polygon(smooth[:, 1], smooth[:, 0], shape=mask.shape)
    mask[rr, cc] = True
    return mask


def effective_diameter_px(mask: np.ndarray) -> float:
    """``d = 2 sqrt(A / pi)`` with ``A`` the number of mask pixels (AAPM data generation)."""
    return 2 * math.sqrt(mask.sum() / math.pi)


def _grid_mm(geometry: Geometry, supersample: int):
    n = geometry.image_size * supersample
    px = geometry.pixel_size_mm / supersample
    c = (n - 1) / 2
    idx = np.arange(n)
    return (idx - c)[None, :] * px, (c - idx)[:, None] * px


def _downsample(fine: np.ndarray, supersample: int) -> np.ndarray:
    n = fine.shape[0] // supersample
    cover = fine.reshape(n, supersample, n, supersample).mean(axis=(1, 3))
    return cover >= 0.5


def place_shape(shape: np.ndarray, diameter_mm: float, centre_mm: tuple[float, float], geometry: Geometry,
                angle_rad: float = 0.0, supersample: int = 4) -> np.ndarray:
    """Place a binary shape scaled to effective diameter ``diameter_mm`` at ``centre_mm`` (x, y) on the image grid.

    A pixel is metal when at least half of it is covered (``supersample``^2 sub-pixels).

    Raises:
        ValueError: an empty shape or a non-positive diameter.
    """
    d_px = effective_diameter_px(shape)
    if d_px == 0 or diameter_mm <= 0:
        raise ValueError(
            f"place_shape: need a non-empty shape and a positive diameter, found {d_px} px, {diameter_mm} mm")
    scale = diameter_mm / d_px  # mm per shape pixel
    x, y = _grid_mm(geometry, supersample)
    dx, dy = x - centre_mm[0], y - centre_mm[1]
    ca, sa = math.cos(angle_rad), math.sin(angle_rad)
    u = (ca * dx + sa * dy) / scale + (shape.shape[1] - 1) / 2
    v = -(-sa * dx + ca * dy) / scale + (shape.shape[0] - 1) / 2
    col, row = np.rint(u).astype(np.int64), np.rint(v).astype(np.int64)
    inside = (col >= 0) & (col < shape.shape[1]) & (row >= 0) & (row < shape.shape[0])
    fine = np.zeros(inside.shape, dtype=bool)
    fine[inside] = shape[row[inside], col[inside]]
    return _downsample(fine, supersample)


def _ellipse(geometry: Geometry, centre, axes_mm, angle_rad=0.0, supersample=4) -> np.ndarray:
    x, y = _grid_mm(geometry, supersample)
    dx, dy = x - centre[0], y - centre[1]
    ca, sa = math.cos(angle_rad), math.sin(angle_rad)
    u, v = ca * dx + sa * dy, -sa * dx + ca * dy
    return _downsample((u / axes_mm[0]) ** 2 + (v / axes_mm[1]) ** 2 <= 1.0, supersample)


def _rectangle(geometry: Geometry, centre, length_mm, width_mm, angle_rad, supersample=4) -> np.ndarray:
    x, y = _grid_mm(geometry, supersample)
    dx, dy = x - centre[0], y - centre[1]
    ca, sa = math.cos(angle_rad), math.sin(angle_rad)
    u, v = ca * dx + sa * dy, -sa * dx + ca * dy
    return _downsample((np.abs(u) <= length_mm / 2) & (np.abs(v) <= width_mm / 2), supersample)


def hip_prostheses(geometry: Geometry, rng: np.random.Generator, centres_mm,
                   head_diameter_mm=(26.0, 36.0)) -> np.ndarray:
    """Bilateral hip prostheses: a femoral head (disk) with a neck/stem taper at each of two centres (x, y) mm."""
    mask = np.zeros(geometry.image_shape, dtype=bool)
    for side, centre in zip((-1, 1), centres_mm, strict=True):
        r = rng.uniform(*head_diameter_mm) / 2
        mask |= _ellipse(geometry, centre, (r, r))
        neck = (centre[0] + side * 0.9 * r, centre[1] - 0.6 * r)
        mask |= _ellipse(geometry, neck, (0.9 * r, 0.45 * r), angle_rad=side * rng.uniform(0.5, 0.8))
    return mask


def pedicle_screws(geometry: Geometry, rng: np.random.Generator, vertebra_centre_mm, length_mm=(40.0, 50.0),
                   diameter_mm=(5.5, 7.0)) -> np.ndarray:
    """Two pedicle screws converging from the posterior elements into the vertebral body (y up = anterior)."""
    mask = np.zeros(geometry.image_shape, dtype=bool)
    cx, cy = vertebra_centre_mm
    length, width = rng.uniform(*length_mm), rng.uniform(*diameter_mm)
    for side in (-1, 1):
        tilt = math.pi / 2 + side * rng.uniform(0.2, 0.35)  # from vertical, converging anteriorly
        mid = (cx + side * 0.35 * length * math.cos(math.pi / 2 - abs(tilt - math.pi / 2)) * 0.5, cy - 0.3 * length)
        mask |= _rectangle(geometry, mid, length, width, tilt)
        head = (mid[0] - 0.5 * length * math.cos(tilt), mid[1] - 0.5 * length * math.sin(tilt))
        mask |= _ellipse(geometry, head, (width, width))
    return mask


def dental_fillings(geometry: Geometry, rng: np.random.Generator, arch_centre_mm, arch_radius_mm=25.0,
                    count=(2, 5)) -> np.ndarray:
    """Amalgam-sized fillings (3-6 mm blobs) on teeth along a parabolic dental arch opening posteriorly."""
    mask = np.zeros(geometry.image_shape, dtype=bool)
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        t = rng.uniform(-1.0, 1.0)
        pos = (arch_centre_mm[0] + arch_radius_mm * t, arch_centre_mm[1] + arch_radius_mm * (1 - 1.2 * t * t))
        mask |= _ellipse(geometry, pos, (rng.uniform(1.5, 3.0), rng.uniform(1.5, 3.0)), rng.uniform(0, math.pi))
    return mask


def surgical_clips(geometry: Geometry, rng: np.random.Generator, centre_mm, spread_mm=30.0, count=(1, 4)) -> np.ndarray:
    """Haemostatic clips: 1 x 6-10 mm bars scattered around ``centre_mm``."""
    mask = np.zeros(geometry.image_shape, dtype=bool)
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        pos = (centre_mm[0] + rng.uniform(-spread_mm, spread_mm), centre_mm[1] + rng.uniform(-spread_mm, spread_mm))
        mask |= _rectangle(geometry, pos, rng.uniform(6.0, 10.0), 1.2, rng.uniform(0, math.pi))
    return mask


def fixation_plate(geometry: Geometry, rng: np.random.Generator, centre_mm, radius_mm, arc_rad=(0.5, 1.0),
                   thickness_mm=2.0) -> np.ndarray:
    """A bone plate: an arc of ``thickness_mm`` hugging a bone surface of radius ``radius_mm`` around ``centre_mm``,
    with two screws into the bone."""
    x, y = _grid_mm(geometry, 4)
    dx, dy = x - centre_mm[0], y - centre_mm[1]
    r = np.hypot(dx, dy)
    phi0 = rng.uniform(0, 2 * math.pi)
    half = rng.uniform(*arc_rad) / 2
    dphi = np.angle(np.exp(1j * (np.arctan2(dy, dx) - phi0)))
    fine = (np.abs(r - radius_mm - thickness_mm / 2) <= thickness_mm / 2) & (np.abs(dphi) <= half)
    mask = _downsample(fine, 4)
    for a in (phi0 - 0.6 * half, phi0 + 0.6 * half):
        mid = (centre_mm[0] + (radius_mm - 4) * math.cos(a), centre_mm[1] + (radius_mm - 4) * math.sin(a))
        mask |= _rectangle(geometry, mid, 10.0, 2.5, a)
    return mask
