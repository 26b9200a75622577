import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from marbench.evaluation.metrics import PSNR, RMSE, SSIM, psnr, rmse, ssim


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
    b[..., 1, 1] = 1.0
    assert float(psnr(b, a, 1.0, mask)) == pytest.approx(10 * np.log10(15))


def test_metric_objects_keep_per_slice_values():
    a, b = _pair(4)
    ta, tb = torch.tensor(np.stack([a, b]))[:, None], torch.tensor(np.stack([b, b]))[:, None]
    m = PSNR(data_range=1.0)
    m.update(tb, ta)
    values = m.all_values()
    assert values.shape == (2,) and torch.isinf(values[1])
    s = SSIM(data_range=1.0)
    s.update(tb[:1], ta[:1])
    s.update(tb[1:], ta[1:])
    assert s.all_values().shape == (2,) and float(s.all_values()[1]) == pytest.approx(1.0)
    r = RMSE()
    r.update(tb, ta)
    assert float(r.compute()) == pytest.approx(float(rmse(tb, ta).mean()))
    assert not RMSE.higher_is_better and PSNR.higher_is_better
