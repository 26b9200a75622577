import math

import numpy as np
import pytest

from marbench.physics import FanBeamGeometry, ParallelBeamGeometry, preset
from marbench.physics.geometry import PRESETS


def test_aapm_presets_match_the_release_geometry():
    body, head = preset("aapm_body"), preset("aapm_head")
    for g in (body, head):
        assert (g.sid_mm, g.sdd_mm, g.n_channels, g.n_views, g.image_size) == (550.0, 950.0, 900, 1000, 512)
        assert g.sinogram_shape == (1000, 900)
        dalpha = 2 * math.atan2(0.5, 950)
        assert g.dalpha_rad == pytest.approx(dalpha, rel=1e-15)
        k = np.arange(900)
        np.testing.assert_allclose(g.fan_angles(), (k - (900 - 1) / 2 - 1.25) * dalpha, rtol=0, atol=1e-15)
        np.testing.assert_allclose(g.view_angles()[:2], [0.0, 2 * math.pi / 1000])
        assert (g.rotation_direction, g.channel_direction, g.default_filter) == (1, 1, "standard")
    assert body.fov_mm == 400.0 and head.fov_mm == 220.16
    assert body.mu_water_per_mm == 0.02


def test_syndeeplesion_preset_matches_indudonet_plus():
    g = preset("syndeeplesion")
    reso_mm = 512 / 416 * 0.03 * 10
    assert (g.image_size, g.n_views, g.n_channels, g.detector) == (416, 640, 641, "flat")
    assert g.pixel_size_mm == pytest.approx(reso_mm)
    assert g.sid_mm == pytest.approx(1075 * reso_mm) and g.sdd_mm == pytest.approx(2 * 1075 * reso_mm)
    assert g.channel_pitch_mm * 641 == pytest.approx(2 * math.sqrt(2) * 416 * reso_mm)
    assert g.mu_water_per_mm == pytest.approx(0.0192)
    # ODL: counterclockwise from the midpoint of the first of 640 angle cells, source on the left (ODL -y)
    assert (g.rotation_direction, g.channel_direction) == (1, -1)
    assert g.view_start_rad == pytest.approx(math.pi / 2 + math.pi / 640)


def test_reduced_presets_keep_the_physical_fan():
    full, small = preset("aapm_body"), preset("aapm_body_256")
    assert small.fan_angles()[0] == pytest.approx(full.fan_angles()[0], abs=full.dalpha_rad)
    assert small.channel_offset * small.dalpha_rad == pytest.approx(-1.25 * full.dalpha_rad, rel=1e-3)
    assert all(p.quarter_turn_rot90() == -1 for _, p in PRESETS.items())  # all turn counterclockwise


def test_hash_is_stable_and_field_sensitive():
    g = preset("aapm_body")
    assert g.hash == FanBeamGeometry(**{k: v for k, v in g.to_dict().items() if k != "kind"}).hash
    assert g.hash != preset("aapm_head").hash
    assert len({p.hash for _, p in PRESETS.items()}) == len(PRESETS)


def test_rays_start_at_the_top_and_turn_counterclockwise():
    g = preset("aapm_body")
    src, direction = g.rays()
    np.testing.assert_allclose(src[0, 0], [0.0, 550.0], atol=1e-9)
    assert src[1, 0, 0] < 0  # counterclockwise in the displayed image: from the top towards -x
    np.testing.assert_allclose(np.linalg.norm(direction, axis=-1), 1.0)
    mirror = FanBeamGeometry(**{**{k: v for k, v in g.to_dict().items() if k != "kind"},
                                "rotation_direction": -1, "channel_direction": -1})
    m_src, m_dir = mirror.rays()
    np.testing.assert_allclose(m_src * [-1, 1], src, atol=1e-9)  # the mirror image in x
    np.testing.assert_allclose(m_dir * [-1, 1], direction, atol=1e-12)


@pytest.mark.parametrize("bad", [dict(sid_mm=-1.0), dict(sdd_mm=500.0), dict(detector="spherical"),
                                 dict(n_views=0), dict(fov_mm=float("nan")), dict(fov_mm=900.0),
                                 dict(rotation_direction=2), dict(channel_direction=0), dict(default_filter="x")])
def test_bad_geometry_is_refused(bad):
    args = dict(n_views=8, n_channels=8, image_size=8, fov_mm=100.0) | bad
    with pytest.raises(ValueError):
        FanBeamGeometry(**args)


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(KeyError, match="aapm_body"):
        preset("aapm_bdy")


def test_parallel_geometry_rays():
    g = ParallelBeamGeometry(n_views=4, n_channels=3, image_size=8, fov_mm=10.0)
    start, direction = g.rays()
    assert start.shape == (4, 3, 2) and direction.shape == (4, 1, 2)
