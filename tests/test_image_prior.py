import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from marbench.image_prior import telea_inpainting, threshold_metal_mask


def test_threshold_mask_is_the_dilation_by_a_7x7_ellipse():
    rng = np.random.default_rng(0)
    hu = torch.from_numpy(rng.uniform(-1000, 1900, (2, 1, 40, 40))).float()
    hu[0, 0, 10, 12] = hu[0, 0, 30, 5] = hu[1, 0, 20:23, 20:25] = 3000.0
    ellipse = np.array([[0, 0, 0, 1, 0, 0, 0]] + [[0, 1, 1, 1, 1, 1, 0]] + [[1] * 7] * 3 + [[0, 1, 1, 1, 1, 1, 0]]
                       + [[0, 0, 0, 1, 0, 0, 0]], bool)  # OpenCV's MORPH_ELLIPSE of size 7
    expected = np.stack([ndi.binary_dilation(h[0] > 2000, structure=ellipse)[None] for h in hu.numpy()])
    assert np.array_equal(threshold_metal_mask(hu).numpy(), expected)


def test_telea_fills_a_smooth_ramp_and_keeps_the_rest():
    x = torch.linspace(-400.0, 600.0, 48)
    hu = (x[None, :] + 0.5 * x[:, None]).expand(1, 1, 48, 48).clone()
    mask = torch.zeros(1, 1, 48, 48, dtype=torch.bool)
    mask[..., 20:28, 18:26] = True
    out = telea_inpainting(torch.where(mask, torch.full_like(hu, 3000.0), hu), mask)
    assert torch.equal(out[~mask], hu[~mask].round())
    # the ramp spans 1500 HU; a fill from the border reaches within a few percent of it
    assert (out - hu)[mask].abs().max() < 60.0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"expected images \(B, 1, H, W\), found \(4, 4\)"):
        threshold_metal_mask(torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"\[-1024, 64511\] HU, found \[-3000"):
        telea_inpainting(torch.full((1, 1, 8, 8), -3000.0), torch.zeros(1, 1, 8, 8, dtype=torch.bool))
