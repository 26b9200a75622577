import math

import numpy as np
import pytest

from marbench.physics import preset
from marbench.physics.metal_masks import (
    dental_fillings,
    effective_diameter_px,
    fixation_plate,
    fractal_shape,
    hip_prostheses,
    pedicle_screws,
    place_shape,
    surgical_clips,
)


def test_fractal_shapes_are_seeded_and_varied():
    a = fractal_shape(np.random.default_rng(3))
    b = fractal_shape(np.random.default_rng(3))
    c = fractal_shape(np.random.default_rng(4))
    assert a.shape == (256, 256) and a.dtype == bool
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert 0.05 < a.mean() < 0.8
    assert not a[0].any() and not a[-1].any()  # fits inside the grid


@pytest.mark.parametrize("diameter_mm", [5.0, 20.0])
def test_placed_shape_has_the_requested_effective_diameter(diameter_mm):
    g = preset("aapm_body_256")
    shape = fractal_shape(np.random.default_rng(0))
    mask = place_shape(shape, diameter_mm, (20.0, -30.0), g)
    area_mm2 = mask.sum() * g.pixel_size_mm**2
    assert 2 * math.sqrt(area_mm2 / math.pi) == pytest.approx(diameter_mm, rel=0.1)
    rows, cols = np.nonzero(mask)
    x = (cols.mean() - (g.image_size - 1) / 2) * g.pixel_size_mm
    y = ((g.image_size - 1) / 2 - rows.mean()) * g.pixel_size_mm
    assert abs(x - 20.0) < 3 and abs(y + 30.0) < 3


def test_effective_diameter_of_a_disk():
    yy, xx = np.mgrid[:101, :101]
    disk = np.hypot(xx - 50, yy - 50) <= 40
    assert effective_diameter_px(disk) == pytest.approx(80, rel=0.01)


def test_implants_are_non_empty_and_where_asked():
    g = preset("aapm_body_256")
    rng = np.random.default_rng(0)
    hips = hip_prostheses(g, rng, [(-90.0, -20.0), (90.0, -20.0)])
    cols = np.nonzero(hips)[1]
    assert (cols < g.image_size / 2).any() and (cols > g.image_size / 2).any()  # bilateral
    for mask in (hips, pedicle_screws(g, rng, (0.0, -60.0)), dental_fillings(g, rng, (0.0, 40.0)),
                 surgical_clips(g, rng, (10.0, 10.0)), fixation_plate(g, rng, (40.0, 0.0), 20.0)):
        assert mask.dtype == bool and mask.shape == g.image_shape and 0 < mask.sum() < 0.05 * mask.size


def test_place_shape_refuses_an_empty_shape():
    with pytest.raises(ValueError, match="non-empty shape"):
        place_shape(np.zeros((256, 256), bool), 10.0, (0.0, 0.0), preset("aapm_body_256"))
