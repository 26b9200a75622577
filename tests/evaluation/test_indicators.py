import numpy as np
import pytest
import torch

from marbench.evaluation.indicators import evaluate_indicators, level_lpips, metal_objects
from marbench.evaluation.perceptual import LPIPSVGG
from marbench.evaluation.records import read_record
from marbench.method import MethodCard
from marbench.methods.classic import Uncorrected


class _Oracle(Uncorrected):
    card = MethodCard(name="oracle", paper="test", needs=("gt_image",), trainable=False)

    def restore(self, batch):
        return batch["gt_image"].clone()


def test_objects_are_connected_components_largest_first():
    mask = np.zeros((20, 20), bool)
    mask[2:4, 2:4] = True  # 4 pixels
    mask[10:15, 10:13] = True  # 15 pixels
    mask[4, 4] = True  # touches the first diagonally: 8-connected, one object of 5
    sizes = [int(o.sum()) for o in metal_objects(mask)]
    assert sizes == [15, 5]


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


def test_indicators_on_the_sweeps(tiny_benchmark, tmp_path):
    out, _ = tiny_benchmark
    unc = read_record(evaluate_indicators(Uncorrected(), out, "tiny", tmp_path))
    oracle = read_record(evaluate_indicators(_Oracle(), out, "tiny", tmp_path))
    assert unc["protocol"]["name"] == "perceptual-indicators" and set(unc["metrics"]["set"]) == {"pi_q", "pi_s"}
    quantity = [r for r in unc["slices"] if r["category"] == "quantity"]
    assert [r["x"] for r in quantity] == [1.0, 2.0, 3.0, 4.0, 5.0]
    sizes = [r["x"] for r in unc["slices"] if r["category"] == "size"]
    assert sizes == sorted(sizes) and sizes[0] > 0  # mm^2 of the largest object, growing along the sweep
    assert oracle["metrics"]["set"] == {"pi_q": 0.0, "pi_s": 0.0}
    # more metal, more artifact: the uncorrected input's LP grows along both sweeps
    assert unc["metrics"]["set"]["pi_q"] > 0 and unc["metrics"]["set"]["pi_s"] > 0
