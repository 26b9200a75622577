"""Analytic test phantoms on a geometry's grid (band-limited by a 1-pixel Gaussian like a real CT image)."""
import numpy as np
import torch
from scipy.ndimage import gaussian_filter


def ellipses_mu(geometry, blur_px: float = 1.0) -> torch.Tensor:
    """Body ellipse of water with two inserts, attenuation in mm^-1, ``(1, 1, N, N)`` float32."""
    xs, ys = geometry.pixel_centres_mm()
    r = geometry.fov_mm / 2
    img = ((np.hypot(xs / (0.75 * r), ys / (0.6 * r)) < 1) * 0.02
           + (np.hypot(xs + 0.25 * r, ys - 0.15 * r) < 0.15 * r) * 0.01
           + (np.hypot(xs - 0.3 * r, ys + 0.1 * r) < 0.08 * r) * 0.02)
    img = gaussian_filter(img.astype(np.float64), blur_px) if blur_px else img
    return torch.tensor(img, dtype=torch.float32)[None, None]
