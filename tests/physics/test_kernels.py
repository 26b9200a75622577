"""The FBP kernels: XCIST's soft / standard / bone windows (gecatsim ``createHSP.py``) and the default filter a
geometry names (the AAPM presets reconstruct with ``standard``, as the release)."""
import dataclasses

import numpy as np
import pytest
import torch

from marbench.physics import FanBeamGeometry, Projector, SimulationConfig, preset, simulate_scan
from marbench.physics.fbp import FILTERS, XCIST_WINDOW_POINTS, filter_sinogram, filter_window

# createHSP.py: the window's values at u = f / f_Nyquist = 0, 0.25, 0.5, 0.75, 1
CREATEHSP = {
    "soft": [1, 0.815, 0.4564, 0.1636, 0],
    "standard": [1, 0.9338, 0.7441, 0.4425, 0.0531],
    "bone": [1, 1.0485, 1.17, 1.2202, 0.9201],
}
GEOMETRY = FanBeamGeometry(n_views=192, n_channels=160, image_size=96, fov_mm=240.0, channel_pitch_mm=2.5,
                           channel_offset=-1.25)


@pytest.mark.parametrize("name", sorted(CREATEHSP))
def test_xcist_windows_pass_through_the_five_points(name):
    u = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(filter_window(name, u * 0.5), CREATEHSP[name], atol=1e-12)
    assert XCIST_WINDOW_POINTS[name] == tuple(CREATEHSP[name])


@pytest.mark.parametrize("name", sorted(CREATEHSP))
def test_xcist_windows_are_createhsp_quadratic_interpolation(name):
    from scipy.interpolate import interp1d

    u = np.linspace(0, 1, 1001)
    expected = interp1d([0, 0.25, 0.5, 0.75, 1], CREATEHSP[name], kind="quadratic")(u)
    np.testing.assert_allclose(filter_window(name, u * 0.5), expected, atol=1e-12)


def test_every_filter_has_a_window_that_keeps_the_mean():
    assert set(FILTERS) == {"ram-lak", "shepp-logan", "hann", "soft", "standard", "bone"}
    for name in FILTERS:
        assert filter_window(name, np.array([0.0]))[0] == 1.0
    with pytest.raises(ValueError, match="unknown FBP filter 'sharp'; expected one of"):
        filter_window("sharp", np.array([0.0]))


def test_standard_kernel_has_less_noise_and_the_same_mean():
    g = GEOMETRY
    p = Projector(g, backend="raysampling")
    xs, ys = g.pixel_centres_mm()
    disk = torch.tensor(np.hypot(xs, ys) < 80.0, dtype=torch.float64)[None, None] * 0.02
    sino = p.fp(disk)
    noisy = sino + 0.01 * torch.randn(sino.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    inside = torch.tensor(np.hypot(xs, ys) < 60.0)
    rec = {f: p.fbp(noisy, f)[0, 0][inside] for f in ("ram-lak", "soft", "standard", "bone")}
    std = {f: float(r.std()) for f, r in rec.items()}
    assert std["soft"] < std["standard"] < 0.8 * std["ram-lak"] < std["bone"]
    clean = {f: float(p.fbp(sino, f)[0, 0][inside].mean()) for f in ("ram-lak", "standard")}
    assert abs(clean["standard"] - clean["ram-lak"]) / 0.02 * 1000 < 0.5  # HU
    assert abs(float(rec["standard"].mean()) - float(rec["ram-lak"].mean())) / 0.02 * 1000 < 1.0


def test_the_geometry_names_the_default_kernel():
    assert preset("aapm_body").default_filter == "standard"
    assert preset("syndeeplesion").default_filter == "ram-lak"
    assert GEOMETRY.default_filter == "ram-lak"
    sino = torch.rand((1, *GEOMETRY.sinogram_shape), generator=torch.Generator().manual_seed(2))
    standard = dataclasses.replace(GEOMETRY, default_filter="standard")
    torch.testing.assert_close(filter_sinogram(sino, standard), filter_sinogram(sino, GEOMETRY, "standard"))
    p = Projector(standard, backend="raysampling")
    torch.testing.assert_close(p.fbp(sino[None], None), p.fbp(sino[None], "standard"))
    with pytest.raises(ValueError, match="default_filter must be one of .* found 'sharp'"):
        dataclasses.replace(GEOMETRY, default_filter="sharp")
    with pytest.raises(ValueError, match="rotation_direction must be 1 or -1, found 0"):
        dataclasses.replace(GEOMETRY, rotation_direction=0)


def test_simulation_reconstructs_with_the_geometry_default_kernel():
    assert SimulationConfig().filter_name is None
    g = dataclasses.replace(GEOMETRY, default_filter="standard")
    p = Projector(g, backend="raysampling")
    xs, ys = g.pixel_centres_mm()
    hu = torch.tensor(np.where(np.hypot(xs, ys) < 80.0, 0.0, -1000.0), dtype=torch.float32)[None, None]
    cfg = SimulationConfig(noise=False)
    scan = simulate_scan(p, hu, {}, cfg)
    explicit = simulate_scan(p, hu, {}, dataclasses.replace(cfg, filter_name="standard"))
    ramlak = simulate_scan(p, hu, {}, dataclasses.replace(cfg, filter_name="ram-lak"))
    assert torch.equal(scan.gt_image, explicit.gt_image) and not torch.equal(scan.gt_image, ramlak.gt_image)
