import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from marbench.physics import (
    Projector,
    SimulationConfig,
    li_correction,
    linear_interpolation,
    metal_trace,
    mu_to_hu,
    nmar_correction,
    preset,
    simulate_scan,
)
from marbench.physics.metal_masks import _ellipse


def test_li_is_exact_on_a_sinogram_linear_across_the_trace():
    gen = torch.Generator().manual_seed(0)
    v, c = 20, 50
    slope = torch.rand((2, 1, v, 1), generator=gen)
    offset = torch.rand((2, 1, v, 1), generator=gen)
    sino = offset + slope * torch.arange(c, dtype=torch.float32)
    trace = torch.zeros((2, 1, v, c), dtype=torch.bool)
    trace[..., 10:17] = True
    trace[1, 0, 5, 30:45] = True
    corrupted = torch.where(trace, torch.full_like(sino, 99.0), sino)
    torch.testing.assert_close(linear_interpolation(corrupted, trace), sino, rtol=0, atol=1e-5)


def test_li_keeps_values_outside_the_trace_and_extends_at_edges():
    sino = torch.arange(10, dtype=torch.float32).reshape(1, 1, 1, 10) ** 2
    trace = torch.zeros_like(sino, dtype=torch.bool)
    trace[..., :3] = True
    trace[..., 8:] = True
    out = linear_interpolation(sino, trace)
    assert torch.equal(out[..., 3:8], sino[..., 3:8])
    assert out[0, 0, 0, :3].tolist() == [9.0, 9.0, 9.0]
    assert out[0, 0, 0, 8:].tolist() == [49.0, 49.0]


def test_li_refuses_a_trace_on_the_wrong_grid():
    with pytest.raises(ValueError, match="metal_trace: expected shape"):
        linear_interpolation(torch.zeros(1, 1, 4, 5), torch.zeros(1, 1, 4, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool mask"):
        linear_interpolation(torch.zeros(1, 1, 4, 5), torch.zeros(1, 1, 4, 5))


def test_metal_trace_covers_exactly_the_rays_through_metal():
    g = preset("aapm_body_128")
    p = Projector(g)
    mask = torch.tensor(_ellipse(g, (40.0, -30.0), (6.0, 6.0)))[None, None]
    trace = metal_trace(p, mask)
    assert trace.dtype == torch.bool and trace.shape == (1, 1, *g.sinogram_shape)
    assert bool(trace.any(-1).all())  # every view sees the metal
    assert 0 < trace.float().mean() < 0.2


def _bone_metal_phantom(g):
    xs, ys = g.pixel_centres_mm()
    hu = np.full(g.image_shape, -1000.0)
    body = np.hypot(xs / 1.3, ys) < 140
    hu[body] = 40.0
    ring = np.hypot(xs, ys + 60)
    hu[(ring < 25) & (ring >= 15)] = 1200.0
    hu[ring < 15] = 250.0
    hu = gaussian_filter(hu, 0.7)
    metal = _ellipse(g, (-50.0, 0.0), (8.0, 8.0)) | _ellipse(g, (50.0, 0.0), (8.0, 8.0))
    return torch.tensor(hu, dtype=torch.float32)[None, None], torch.tensor(metal)[None, None], body


def test_nmar_beats_li_on_a_bone_and_metal_phantom():
    g = preset("aapm_body_128")
    p = Projector(g)
    hu, metal, body = _bone_metal_phantom(g)
    scan = simulate_scan(p, hu, {"stainless_steel": metal}, SimulationConfig(noise=False))
    region = torch.tensor(body)[None, None] & ~metal

    def rmse(mu):
        return float((mu_to_hu(mu, g.mu_water_per_mm) - scan.gt_image)[region].pow(2).mean().sqrt())

    _, li = li_correction(p, scan.ma_sinogram, scan.metal_trace)
    li_sino, _ = li_correction(p, scan.ma_sinogram, scan.metal_trace)
    nmar_sino, nmar = nmar_correction(p, scan.ma_sinogram, scan.metal_trace)
    uncorrected = float((scan.ma_image - scan.gt_image)[region].pow(2).mean().sqrt())
    assert rmse(nmar) < rmse(li) < uncorrected
    outside = ~scan.metal_trace
    assert torch.equal(nmar_sino[outside], scan.ma_sinogram[outside])
    assert torch.equal(li_sino[outside], scan.ma_sinogram[outside])
