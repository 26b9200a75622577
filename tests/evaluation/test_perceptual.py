import numpy as np
import pytest
import torch
from scipy import linalg

from marbench.datasets.aapm import AAPMCTMARDataModule
from marbench.evaluation.evaluator import evaluate
from marbench.evaluation.perceptual import (
    LPIPSVGG,
    InceptionFeatures,
    RadImageNetFeatures,
    frechet_distance,
    frechet_distance_of_features,
    lpips_rad,
    perceptual_indicator,
)
from marbench.evaluation.protocols import Perceptual
from marbench.evaluation.records import read_record
from marbench.methods.classic import CleanImage, Uncorrected


def _images(seed=0, b=2, n=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, n, n, generator=g)
    return x, (x + 0.1 * torch.randn(b, 1, n, n, generator=g)).clamp(0, 1)


def test_radimagenet_preprocessing_and_lpips_rad():
    feats = RadImageNetFeatures(weights=None)
    assert feats.weights_sha256 is None  # random backbone: a record made with it says so
    x, y = _images()
    assert feats.layer4(x).shape == (2, 2048, 2, 2) and feats(x).shape == (2, 2048)
    # BGR mean subtraction on a repeated grey channel, as the RadImageNet convention asks
    grey = torch.full((1, 1, 64, 64), 0.5)
    expected = feats.trunk(torch.tensor([0.5 - 0.406, 0.5 - 0.456, 0.5 - 0.485]).view(1, 3, 1, 1).expand(1, 3, 64, 64))
    torch.testing.assert_close(feats.layer4(grey), expected)
    d = lpips_rad(feats, x, y)
    assert d.shape == (2,) and (d > 0).all()
    assert torch.allclose(lpips_rad(feats, x, x), torch.zeros(2), atol=1e-7)
    f1 = torch.nn.functional.normalize(feats.layer4(x), dim=1)
    f2 = torch.nn.functional.normalize(feats.layer4(y), dim=1)
    torch.testing.assert_close(d, ((f1 - f2) ** 2).sum(1).mean((1, 2)))


def test_lpips_equals_the_lpips_package_on_the_same_weights():
    import lpips

    ours = LPIPSVGG(weights=None, seed=3)
    ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    ref.net.load_state_dict(ours.model.net.state_dict())
    x, y = _images(1)
    expected = ref(x.repeat(1, 3, 1, 1) * 2 - 1, y.repeat(1, 3, 1, 1) * 2 - 1).flatten()
    torch.testing.assert_close(ours(x, y), expected, rtol=0, atol=1e-5)
    assert float(ours(x, x).abs().max()) < 1e-6


def test_frechet_distance_against_an_independent_computation():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (500, 8)), rng.normal(0.3, 1.2, (400, 8))
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # independent: tr(sqrt(S1 S2)) from the eigenvalues of sqrt(S1) S2 sqrt(S1)
    r1 = linalg.sqrtm(s1).real
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-3)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_from_features_equals_the_covariance_formula():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, (30, 64)), rng.normal(0.2, 1.3, (25, 64))  # fewer samples than dimensions, as FID here
    ref = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance_of_features(a, b) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance_of_features(a, a) == pytest.approx(0.0, abs=1e-9)


def test_fid_rad_through_torchmetrics_matches_the_formula():
    from torchmetrics.image.fid import FrechetInceptionDistance

    feats = RadImageNetFeatures(weights=None)
    fid = FrechetInceptionDistance(feature=feats, normalize=True)
    x, y = _images(2, b=6)
    fid.update(x, real=True)
    fid.update(y, real=False)
    with torch.no_grad():
        fx, fy = feats(x).double().numpy(), feats(y).double().numpy()
    ref = frechet_distance(fx.mean(0), np.cov(fx, rowvar=False), fy.mean(0), np.cov(fy, rowvar=False))
    assert float(fid.compute()) == pytest.approx(ref, rel=1e-3)


def test_perceptual_indicator_is_the_mean_finite_difference_slope():
    sweeps = [[(1, 0.10), (2, 0.16), (3, 0.20)], [(1, 0.05), (3, 0.15)]]
    assert perceptual_indicator(sweeps) == pytest.approx(np.mean([0.06, 0.04, 0.05]))
    with pytest.raises(ValueError, match="must increase"):
        perceptual_indicator([[(2, 0.1), (2, 0.2)]])
    with pytest.raises(ValueError, match="at least two levels"):
        perceptual_indicator([[(1, 0.1)]])


def test_perceptual_protocol_records_lpips_fid_and_reuses_reference_features(tiny_benchmark, tmp_path, monkeypatch):
    out, _ = tiny_benchmark
    calls = []
    original = Perceptual.features

    def counting(self, hu, batch):
        calls.append(hu.shape[0])
        return original(self, hu, batch)

    monkeypatch.setattr(Perceptual, "features", counting)
    records = {}
    for method in (Uncorrected(), CleanImage()):
        dm = AAPMCTMARDataModule(out, anatomy=("body",), split=str(out / "split.txt"), batch_size=4,
                                 keys=("ma_image", "gt_image", "metal_mask", "li_image"))
        calls.clear()
        (path,) = evaluate(method, dm, ["perceptual"], "tiny", out_dir=str(tmp_path))
        records[method.card.name] = (read_record(path), sum(calls))
    (unc, unc_calls), (oracle, oracle_calls) = records["uncorrected"], records["clean-image"]
    n = unc.dataset["slices"]
    assert unc_calls == n and oracle_calls == 0  # the second method reuses the cached reference features
    assert unc.protocol["weights_sha256"] == {"vgg16-lpips": "random", "inception-v3-fid": "random",
                                                 "radimagenet-resnet50": "random"}
    assert set(unc.slices[0]) >= {"lpips", "lpips_rad"} and set(unc.metrics["set"]) == {"fid", "fid_rad"}
    assert unc.metrics["overall"]["lpips"]["mean"] > 0 and unc.metrics["set"]["fid"] > 0
    assert oracle.metrics["overall"]["lpips"]["mean"] < 1e-6
    assert oracle.metrics["overall"]["lpips_rad"]["mean"] < 1e-6
    for m in ("fid", "fid_rad"):  # identical feature sets (up to the sqrtm of a rank-deficient covariance)
        assert abs(oracle.metrics["set"][m]) < 1e-3 * unc.metrics["set"][m]


def test_inception_features_follow_the_fid_input_convention():
    feats = InceptionFeatures(weights=None)
    x = torch.rand(2, 1, 64, 64)
    assert feats(x).shape == (2, 2048)
    # 8-bit quantisation of the grey image repeated to RGB: a sub-quantum change gives the same features
    torch.testing.assert_close(feats(x), feats((torch.round(x * 255) + 0.2) / 255), rtol=0, atol=0)
