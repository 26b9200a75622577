import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from marbench.evaluation.protocols import PROTOCOLS, get_protocol


def _batch(gt, metal, anatomy="body", fov=400.0):
    return {"gt_image": gt, "metal_mask": metal, "anatomy": [anatomy] * gt.shape[0],
            "fov_mm": torch.full((gt.shape[0],), fov)}


def _phantom(n=64):
    yy, xx = np.mgrid[:n, :n]
    gt = np.where(np.hypot(yy - n / 2, xx - n / 2) < n * 0.4, 40.0, -1000.0)
    metal = np.zeros((n, n), bool)
    metal[30:33, 30:33] = True
    gt[metal] = 0.0
    return torch.tensor(gt, dtype=torch.float32)[None, None], torch.tensor(metal)[None, None]


def test_aapm_hu_follows_aapm_metric_py():
    gt, metal = _phantom()
    pred = gt + torch.randn(gt.shape, generator=torch.Generator().manual_seed(0)) * 20
    pred[metal] = 5000.0  # metal put back: excluded by the protocol
    p = get_protocol("aapm-hu")
    metrics = p.metrics()
    p.update(metrics, pred, _batch(gt, metal))
    # independent: the AAPMmetric.py recipe in numpy/skimage
    def scale(x):
        x = x[0, 0].numpy().astype(np.float64) + 1000
        x[metal[0, 0].numpy()] = 0
        return np.clip((x + 2000) / 22000, 0, 1)  # whole 64 x 64 body image lies inside the 470 mm ring
    g, q = scale(gt), scale(pred)
    n = 64
    yy, xx = np.mgrid[:n, :n]
    ring = ((yy - 31.5) ** 2 + (xx - 31.5) ** 2) * (400 / n) ** 2 < 235**2
    g[~ring], q[~ring] = 0, 0
    assert float(metrics["psnr"].compute()) == pytest.approx(peak_signal_noise_ratio(g, q, data_range=1), abs=1e-4)
    ssim_ref = structural_similarity(g, q, win_size=11, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=1)
    assert float(metrics["ssim"].compute()) == pytest.approx(ssim_ref, abs=1e-4)
    # RMSE: inside the body, metal dilated by 2 px excluded -> the 5000 HU metal does not count
    assert 15 < float(metrics["rmse_hu"].compute()) < 25


def test_editmar_quantises_the_window_to_8_bits():
    gt, metal = _phantom()
    p = get_protocol("editmar")
    assert p.eight_bit(torch.tensor([-2000.0, -500.0, 400.0, 1300.0, 4000.0])).tolist() == [0, 0, 128, 255, 255]
    metrics = p.metrics()
    pred = gt + 30.0
    p.update(metrics, pred, _batch(gt, metal))
    g8, p8 = (np.round(np.clip((x[0, 0].numpy() + 500) / 1800, 0, 1) * 255) for x in (gt, pred))
    assert float(metrics["psnr"].compute()) == pytest.approx(peak_signal_noise_ratio(g8, p8, data_range=255), abs=1e-4)


def test_syndeeplesion_zeroes_the_metal_and_clips_attenuation():
    gt, metal = _phantom()
    p = get_protocol("syndeeplesion")
    u = p.unit(torch.tensor([[-1000.0, 0.0, 3000.0]]), torch.tensor([[False, False, True]]))
    assert u.tolist() == [[0.0, pytest.approx(0.384), 0.0]]
    metrics = p.metrics()
    pred = gt.clone()
    pred[metal] = 9999.0
    p.update(metrics, pred, _batch(gt, metal))
    assert torch.isinf(metrics["psnr"].compute())  # metal differences do not count


def test_protocols_are_named_and_versioned():
    for name, p in PROTOCOLS.items():
        d = p.to_dict()
        assert d["name"] == name and d["version"]
        assert set(p.directions) == set(p.metrics())
    with pytest.raises(KeyError, match="unknown evaluation protocol 'aapm'"):
        get_protocol("aapm")
