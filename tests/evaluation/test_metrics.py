import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from marbench.evaluation.metrics import psnr, rmse, ssim


def _pair(seed=0, shape=(64, 80)):
    rng = np.random.default_rng(seed)
    a = rng.random(shape)
    b = np.clip(a + rng.normal(0, 0.05, shape), 0, 1)
    return a, b


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_psnr_and_ssim_match_scikit_image(seed):
    a, b = _pair(seed)
    ta, tb = (torch.tensor(x)[None, None] for x in (a, b))
    assert float(psnr(tb, ta, 1.0)) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-4)
    ref = structural_similarity(a, b, win_size=11, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                data_range=1.0)
    assert float(ssim(tb, ta, 1.0)) == pytest.approx(ref, abs=1e-4)


def test_ssim_on_8bit_data_range_255():
    a, b = _pair(3)
    a8, b8 = np.round(a * 255), np.round(b * 255)
    ref = structural_similarity(a8, b8, win_size=11, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                data_range=255.0)
    ours = ssim(torch.tensor(b8)[None, None], torch.tensor(a8)[None, None], 255.0)
    assert float(ours) == pytest.approx(ref, abs=1e-4)


def test_masked_rmse_and_psnr_use_only_the_mask():
    a = torch.zeros(1, 1, 4, 4)
    b = torch.zeros(1, 1, 4, 4)
    b[..., 0, 0] = 100.0
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    assert float(rmse(b, a, mask)) == pytest.approx(100 / 4)
    mask[..., 0, 0] = False
    assert float(rmse(b, a, mask)) == 0.0
    mask[:] = False
    assert torch.isnan(rmse(b, a, mask)).all()  # an empty region has no RMSE


def test_per_slice_values_of_a_batch():
    a, b = _pair(4)
    ta, tb = torch.tensor(np.stack([a, b]))[:, None], torch.tensor(np.stack([b, b]))[:, None]
    p, s = psnr(tb, ta, 1.0), ssim(tb, ta, 1.0)
    assert p.shape == s.shape == (2,) and p.dtype == s.dtype == torch.float64
    assert float(p[0]) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-4)
    assert torch.isinf(p[1]) and float(s[1]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 11 x 11"):
        ssim(tb[..., :8, :8], ta[..., :8, :8], 1.0)
