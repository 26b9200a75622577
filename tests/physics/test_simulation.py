import numpy as np
import pytest
import torch

from marbench.physics import Projector, SimulationConfig, preset, simulate_scan
from marbench.physics.simulation import apply_polynomial, water_bhc_coefficients
from marbench.physics.spectrum import MATERIALS, effective_energy_kev, tube_spectrum

from .test_inpainting import _bone_metal_phantom


@pytest.fixture(scope="module")
def setup():
    g = preset("aapm_body_128")
    return g, Projector(g)


def test_water_bhc_linearises_water_path_lengths():
    cfg = SimulationConfig()
    spec = cfg.spectrum()
    coeffs = water_bhc_coefficients(spec, 0.02)
    length = np.linspace(0, 300, 61)
    mu = MATERIALS["water"].mu_per_mm(spec.energies_kev)
    poly = -np.log(np.exp(-np.outer(length, mu)) @ spec.energy_weights)
    # beam hardening: the effective attenuation falls along the path
    assert poly[1] / length[1] > 1.1 * poly[-1] / length[-1]
    corrected = apply_polynomial(coeffs, torch.tensor(poly)).numpy()
    np.testing.assert_allclose(corrected, 0.02 * length, atol=2e-3)


def test_effective_energy_of_the_aapm_water_convention():
    e = effective_energy_kev(0.02)
    assert 60 < e < 70
    assert MATERIALS["water"].mu_per_mm(np.array([e]))[0] == pytest.approx(0.02, rel=1e-3)


def test_spectrum_is_a_120kvp_tungsten_spectrum():
    assert 10 <= len(SimulationConfig().spectrum().energies_kev) <= 14  # AAPM: 12 energies
    spec = tube_spectrum(120.0, 7.0, 3.0, bin_kev=1.0)
    assert spec.weights.sum() == pytest.approx(1.0)
    assert spec.energies_kev.max() <= 120 and 50 < spec.mean_energy_kev < 75
    # tungsten K lines (59.3, 67.2 keV) stand out of the bremsstrahlung
    e = spec.energies_kev
    k_alpha = spec.weights[(e > 57) & (e < 60)].max()
    assert k_alpha > 1.5 * spec.weights[np.argmin(np.abs(e - 54.5))]


def test_metal_free_images_match_the_phantom_within_noise(setup):
    g, p = setup
    hu, _, body = _bone_metal_phantom(g)
    ramlak = SimulationConfig(filter_name="ram-lak")  # the sharp kernel: the error is the noise alone
    a = simulate_scan(p, hu, {}, ramlak, seed=1)
    b = simulate_scan(p, hu, {}, ramlak, seed=2)
    inside = torch.tensor(body)[None, None]
    noise_std = float((a.gt_image - b.gt_image)[inside].std()) / np.sqrt(2)
    err = (a.gt_image - hu)[inside]
    assert noise_std > 5.0
    assert abs(float(err.mean())) < 10.0
    assert float(err.pow(2).mean().sqrt()) < 1.25 * noise_std
    torch.testing.assert_close(a.ma_image, a.gt_image)  # no metal: the same noise realisation
    # the preset's default kernel (XCIST standard, as the release): less noise, the same mean
    c = simulate_scan(p, hu, {}, SimulationConfig(), seed=1)
    d = simulate_scan(p, hu, {}, SimulationConfig(), seed=2)
    assert float((c.gt_image - d.gt_image)[inside].std()) / np.sqrt(2) < 0.9 * noise_std
    assert abs(float((c.gt_image - hu)[inside].mean())) < 10.0


def test_metal_makes_streaks_along_the_line_joining_two_metals(setup):
    g, p = setup
    hu, metal, _ = _bone_metal_phantom(g)
    scan = simulate_scan(p, hu, {"stainless_steel": metal}, SimulationConfig(), seed=3)
    xs, ys = g.pixel_centres_mm()
    between = torch.tensor((np.abs(ys) < 3) & (np.abs(xs) < 35))[None, None]
    away = torch.tensor((np.abs(ys - 80) < 3) & (np.abs(xs) < 35))[None, None]
    streak = float((scan.ma_image - scan.gt_image)[between].mean())
    assert streak < -300.0  # the dark band between two metal objects
    assert abs(float((scan.ma_image - scan.gt_image)[away].mean())) < abs(streak) / 3
    assert scan.metal_trace.any() and bool(torch.isfinite(scan.ma_sinogram).all())
    assert float(scan.ma_image[metal].mean()) > 3000.0


def test_photon_starvation_is_counted_not_logged(setup):
    g, p = setup
    hu, metal, _ = _bone_metal_phantom(g)
    cfg = SimulationConfig(photons_per_ray=2e3)
    scan = simulate_scan(p, hu, {"amalgam": metal}, cfg, seed=0)
    assert int(scan.starved_rays[0]) > 0
    assert bool(torch.isfinite(scan.ma_sinogram).all())


def test_same_seed_same_bytes(setup):
    g, p = setup
    hu, metal, _ = _bone_metal_phantom(g)
    a = simulate_scan(p, hu, {"titanium": metal}, seed=7)
    b = simulate_scan(p, hu, {"titanium": metal}, seed=7)
    c = simulate_scan(p, hu, {"titanium": metal}, seed=8)
    assert torch.equal(a.ma_sinogram, b.ma_sinogram) and torch.equal(a.gt_image, b.gt_image)
    assert not torch.equal(a.ma_sinogram, c.ma_sinogram)


def test_denser_metal_makes_stronger_artifacts(setup):
    g, p = setup
    hu, metal, body = _bone_metal_phantom(g)
    region = torch.tensor(body)[None, None] & ~metal
    errs = {}
    for m in ("titanium", "stainless_steel"):
        s = simulate_scan(p, hu, {m: metal}, SimulationConfig(noise=False))
        errs[m] = float((s.ma_image - s.gt_image)[region].pow(2).mean().sqrt())
    assert errs["titanium"] < errs["stainless_steel"]


def test_bad_simulation_input(setup):
    g, p = setup
    hu = torch.zeros((1, 1, *g.image_shape))
    good = torch.zeros((1, 1, *g.image_shape), dtype=torch.bool)
    with pytest.raises(ValueError, match="unknown material 'gold'"):
        simulate_scan(p, hu, {"gold": good})
    with pytest.raises(ValueError, match=r"metal_masks\['titanium'\]: expected shape"):
        simulate_scan(p, hu, {"titanium": torch.zeros((1, 1, 64, 64), dtype=torch.bool)})
    with pytest.raises(ValueError, match="bool mask"):
        simulate_scan(p, hu, {"titanium": good.float()})
    with pytest.raises(ValueError, match="hu_image: expected finite"):
        simulate_scan(p, hu * float("nan"), {})


def test_a_slice_gets_the_same_bytes_in_any_batch(setup):
    g, p = setup
    hu, metal, _ = _bone_metal_phantom(g)
    pair = simulate_scan(p, hu.repeat(2, 1, 1, 1), {"titanium": metal.repeat(2, 1, 1, 1)}, seed=[11, 12])
    alone = simulate_scan(p, hu, {"titanium": metal}, seed=[12])
    assert torch.equal(pair.ma_sinogram[1], alone.ma_sinogram[0])
    assert not torch.equal(pair.ma_sinogram[0], pair.ma_sinogram[1])
