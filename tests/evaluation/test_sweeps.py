"""The metal sweeps (marbench.datasets.sweeps) and the perceptual-indicators protocol (DuDoCROP Eq. 18-19)."""
import numpy as np
import pytest
import torch

from marbench.datasets.sweeps import SweepDataModule, metal_objects
from marbench.evaluation.evaluator import evaluate
from marbench.evaluation.perceptual import LPIPSVGG
from marbench.evaluation.protocols import level_lpips
from marbench.evaluation.records import read_record
from marbench.methods.classic import CleanImage, Uncorrected


def test_objects_are_connected_components_largest_first():
    mask = np.zeros((20, 20), bool)
    mask[2:4, 2:4] = True  # 4 pixels
    mask[10:15, 10:13] = True  # 15 pixels
    mask[4, 4] = True  # touches the first diagonally: 8-connected, one object of 5
    assert [int(o.sum()) for o in metal_objects(mask)] == [15, 5]


def test_level_lp_is_local_mean_plus_global():
    torch.manual_seed(0)
    net = LPIPSVGG(weights=None)
    gt = torch.rand(1, 1, 64, 64)
    pred = (gt + 0.2 * torch.rand(1, 1, 64, 64)).clamp(0, 1)
    mask = np.zeros((64, 64), bool)
    mask[5:8, 5:8] = True
    mask[40:44, 50:54] = True
    with torch.no_grad():
        glob = float(net(pred, gt))
        big = float(net(pred[..., 26:58, 32:64], gt[..., 26:58, 32:64]))  # 32 px square shifted inside the image
        small = float(net(pred[..., 0:32, 0:32], gt[..., 0:32, 0:32]))
    assert level_lpips(net, pred, gt, mask, 32, largest_only=True) == pytest.approx(big + glob, rel=1e-6)
    assert level_lpips(net, pred, gt, mask, 32, largest_only=False) == pytest.approx((big + small) / 2 + glob,
                                                                                     rel=1e-6)
    with pytest.raises(ValueError, match="without metal"):
        level_lpips(net, pred, gt, np.zeros((64, 64), bool), 32, largest_only=True)


def test_sweep_batches_carry_their_levels(tiny_benchmark):
    out, _ = tiny_benchmark
    dm = SweepDataModule(out, batch_size=16)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    quantity = [i for i, c in enumerate(batch["category"]) if c == "quantity"]
    assert batch["n_objects"][quantity].tolist() == [1, 2, 3, 4, 5]
    assert len(set(batch["sweep_base"][i] for i in quantity)) == 1
    size = [i for i, c in enumerate(batch["category"]) if c == "size"]
    areas = batch["largest_metal_area_mm2"][size].tolist()
    assert areas == sorted(areas) and areas[0] > 0  # mm^2 of the largest object, growing along the sweep
    assert len(dm.split_sha256) == 64


def test_indicators_record_on_the_sweeps(tiny_benchmark, tmp_path):
    out, _ = tiny_benchmark
    records = {}
    for method in (Uncorrected(), CleanImage()):
        (path,) = evaluate(method, SweepDataModule(out), ["aapm-hu", "perceptual-indicators"], "tiny",
                           out_dir=str(tmp_path), save_example=False)  # aapm-hu scores the test split: skipped
        records[method.card.name] = read_record(path)
    unc, oracle = records["uncorrected"], records["clean-image"]
    assert unc.protocol["name"] == "perceptual-indicators" and unc.dataset["split_sha256"]
    assert set(unc.metrics["set"]) == {"pi_q", "pi_s"} and oracle.metrics["set"] == {"pi_q": 0.0, "pi_s": 0.0}
    # more metal, more artifact: the uncorrected input's LP grows along both sweeps
    assert unc.metrics["set"]["pi_q"] > 0 and unc.metrics["set"]["pi_s"] > 0
    assert {"sweep_base", "n_objects", "largest_metal_area_mm2", "lp"} <= set(unc.slices[0])
