import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from marbench.evaluation.protocols import PROTOCOLS, MetricSpec, get_protocol


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


@pytest.mark.parametrize("version, max2", [("2", 6000.0), ("1", 20000.0)])
def test_aapm_hu_follows_aapm_metric_py(version, max2):
    """v2: AAPMmetric.py since 2024-02-19 (min2 -2000, max2 6000); v1: its first revisions (max2 20000)."""
    gt, metal = _phantom()
    pred = gt + torch.randn(gt.shape, generator=torch.Generator().manual_seed(0)) * 20
    pred[metal] = 5000.0  # metal put back: excluded by the protocol
    scores = get_protocol("aapm-hu", version=version).score(pred, _batch(gt, metal))
    # independent: the AAPMmetric.py recipe in numpy/skimage

    def scale(x):
        x = x[0, 0].numpy().astype(np.float64) + 1000
        x[metal[0, 0].numpy()] = 0
        return np.clip((x + 2000) / (max2 + 2000), 0, 1)  # whole 64 x 64 body image lies inside the 470 mm ring

    g, q = scale(gt), scale(pred)
    n = 64
    yy, xx = np.mgrid[:n, :n]
    ring = ((yy - 31.5) ** 2 + (xx - 31.5) ** 2) * (400 / n) ** 2 < 235**2
    g[~ring], q[~ring] = 0, 0
    assert float(scores["psnr"]) == pytest.approx(peak_signal_noise_ratio(g, q, data_range=1), abs=1e-4)
    ssim_ref = structural_similarity(g, q, win_size=11, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=1)
    assert float(scores["ssim"]) == pytest.approx(ssim_ref, abs=1e-4)
    # RMSE: inside the body, metal dilated by 2 px excluded -> the 5000 HU metal does not count
    keep = np.hypot(yy - 32, xx - 32) < 64 * 0.4  # the body
    keep[28:35, 28:35] = False  # the 3 x 3 metal dilated by 2 pixels
    ref = np.sqrt(np.mean(((pred - gt)[0, 0].numpy()[keep]) ** 2))
    assert float(scores["rmse_hu"]) == pytest.approx(ref, rel=1e-5)


def test_aapm_hu_versions_current_and_older():
    assert get_protocol("aapm-hu").version == "2" and get_protocol("aapm-hu").scale_max == 6000.0
    v1 = get_protocol("aapm-hu", version="1")
    assert v1.to_dict()["version"] == "1" and v1.scale_max == 20000.0 and v1.metric_names == ("rmse_hu", "psnr", "ssim")
    assert get_protocol("editmar", version="1") is get_protocol("editmar")
    with pytest.raises(KeyError, match=r"protocol 'aapm-hu' has no version '7'; defined: \['1', '2'\]"):
        get_protocol("aapm-hu", version="7")


def test_aapm_clinical_is_registered_with_its_metrics_declared_once():
    p = get_protocol("aapm-clinical")
    assert p.version == "1" and p.reference_dir is None and "synthetic" in p.to_dict()["rois"]
    assert [m.name for m in p.metrics if m.level == "set"] == ["challenge_score"]
    assert [m.name for m in p.metrics if m.figure] == ["score"]
    with pytest.raises(KeyError, match=r"protocol 'aapm-clinical' needs batch keys \['ma_image', 'tissue_labels'\]"):
        p.check_batch({"gt_image": torch.zeros(1, 1, 8, 8), "metal_mask": torch.zeros(1, 1, 8, 8, dtype=torch.bool),
                       "fov_mm": torch.ones(1)})


def test_editmar_quantises_the_window_to_8_bits():
    gt, metal = _phantom()
    p = get_protocol("editmar")
    assert p.eight_bit(torch.tensor([-2000.0, -500.0, 400.0, 1300.0, 4000.0])).tolist() == [0, 0, 128, 255, 255]
    pred = gt + 30.0
    g8, p8 = (np.round(np.clip((x[0, 0].numpy() + 500) / 1800, 0, 1) * 255) for x in (gt, pred))
    psnr = float(p.score(pred, _batch(gt, metal))["psnr"])
    assert psnr == pytest.approx(peak_signal_noise_ratio(g8, p8, data_range=255), abs=1e-4)


def test_syndeeplesion_zeroes_the_metal_and_clips_attenuation():
    gt, metal = _phantom()
    p = get_protocol("syndeeplesion")
    u = p.unit(torch.tensor([[-1000.0, 0.0, 3000.0]]), torch.tensor([[False, False, True]]))
    assert u.tolist() == [[0.0, pytest.approx(0.384), 0.0]]
    pred = gt.clone()
    pred[metal] = 9999.0
    assert torch.isinf(p.score(pred, _batch(gt, metal))["psnr"]).all()  # metal differences do not count


@pytest.mark.parametrize("name", ["aapm-hu", "editmar", "syndeeplesion", "perceptual"])
def test_each_declared_direction_ranks_the_target_above_a_degraded_image(name):
    """``higher_is_better`` is declared once per metric; here it must agree with what the metric computes."""
    gt, metal = _phantom()
    p = get_protocol(name)
    noise = torch.randn(gt.shape, generator=torch.Generator().manual_seed(1)) * 150
    degraded = torch.where(metal, gt, gt + noise + 80)
    perfect, worse = p.score(gt, _batch(gt, metal)), p.score(degraded, _batch(gt, metal))
    for spec in p.metrics:
        if spec.level != "slice":
            continue
        a, b = float(perfect[spec.name][0]), float(worse[spec.name][0])
        assert (a > b) if spec.higher_is_better else (a < b), f"{name}/{spec.name}: {a} vs {b}"


def test_every_protocol_declares_its_metrics_once_and_scores_only_those():
    for name, p in PROTOCOLS.items():
        d = p.to_dict()
        assert d["name"] == name and d["version"] and d["kind"] == type(p).__name__
        names = [m["name"] for m in d["metrics"]]
        assert len(names) == len(set(names)) and all(isinstance(m, MetricSpec) for m in p.metrics)
    with pytest.raises(KeyError, match="unknown evaluation protocol 'aapm'; known: \\["):
        get_protocol("aapm")


def test_a_batch_missing_a_key_is_named():
    with pytest.raises(KeyError, match=r"protocol 'segmentation' needs batch keys \['tissue_labels'\]"):
        get_protocol("segmentation").check_batch({"gt_image": torch.zeros(1, 1, 8, 8)})
