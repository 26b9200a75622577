import numpy as np
import pytest
import torch

from marbench.datasets.aapm import AAPMCTMARDataModule
from marbench.evaluation.evaluator import evaluate
from marbench.evaluation.protocols import Segmentation
from marbench.evaluation.records import read_record
from marbench.evaluation.segmentation import SegmentationRecipe, segmenter
from marbench.methods.classic import CleanImage, LinearInterpolation, Uncorrected

RECIPE = SegmentationRecipe(base=8, depth=3, steps=40, crop_px=64, batch_size=8)  # 10 training slices
KEYS = ("ma_image", "gt_image", "metal_mask", "li_image", "tissue_labels")


def test_segmentation_rows_rank_clean_above_li_above_uncorrected(tiny_benchmark, tmp_path):
    """Runs first: the segmenter is trained inside the evaluation (under Lightning's inference mode)."""
    out, _ = tiny_benchmark
    miou = {}
    for method in (CleanImage(), LinearInterpolation(), Uncorrected()):
        dm = AAPMCTMARDataModule(out, split=str(out / "split.txt"), batch_size=4, keys=KEYS)
        (path,) = evaluate(method, dm, [Segmentation(recipe=RECIPE)], "tiny", out_dir=str(tmp_path))
        record = read_record(path)
        miou[method.card.name] = record.metrics["overall"]["miou"]["mean"]
    assert len(record.protocol["weights_sha256"]["segmenter"]) == 64 and "_datamodule" not in record.protocol
    overall = record.metrics["overall"]
    assert {f"iou_{c}" for c in RECIPE.class_names} <= set(overall)
    assert overall["iou_air"]["n"] == record.dataset["slices"]  # air is in every slice
    assert 0 <= overall["iou_air"]["mean"] <= 1
    assert miou["clean-image"] > miou["li"] > miou["uncorrected"]


def test_the_segmenter_learns_the_tissue_labels_and_is_cached(tiny_benchmark):
    out, _ = tiny_benchmark
    dm = AAPMCTMARDataModule(out, split=str(out / "split.txt"), keys=("gt_image", "tissue_labels"), batch_size=8)
    dm.setup("fit")
    net, digest = segmenter(dm, RECIPE, log=lambda *_: None)
    again, digest_again = segmenter(dm, RECIPE)
    assert again is net and digest_again == digest  # loaded once per process, trained once per cache
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        pred = net(RECIPE.inputs(batch["gt_image"])).argmax(1)
    labels = batch["tissue_labels"][:, 0]
    accuracy = (pred == labels).float().mean()
    majority = labels.flatten().bincount().max() / labels.numel()  # always answering the commonest class
    assert accuracy > 0.75 and accuracy > majority + 0.1  # a short schedule (40 steps): 0.77-0.83; majority 0.64


def test_an_unbound_protocol_says_so():
    with pytest.raises(ValueError, match="bound to a datamodule"):
        Segmentation().score(torch.zeros(1, 1, 8, 8), {"tissue_labels": torch.zeros(1, 1, 8, 8, dtype=torch.long)})


def test_soft_dice_loss_against_a_hand_computation():
    from marbench.evaluation.segmentation import soft_dice_loss

    labels = torch.tensor([[[0, 1], [1, 1]]])
    # uniform softmax over 4 classes (0.25 per pixel): class 0 (1 pixel) Dice (2 * 0.25 + 1) / (1 + 1 + 1) = 0.5,
    # class 1 (3 pixels) (2 * 0.75 + 1) / (1 + 3 + 1) = 0.5; classes 2 and 3 are absent and skipped
    assert float(soft_dice_loss(torch.zeros(1, 4, 2, 2), labels)) == pytest.approx(0.5)
    # two classes: class 0 (2 * 0.5 + 1) / (2 + 1 + 1) = 0.5, class 1 (2 * 1.5 + 1) / (2 + 3 + 1) = 2/3
    assert float(soft_dice_loss(torch.zeros(1, 2, 2, 2), labels)) == pytest.approx(1 - (0.5 + 2 / 3) / 2)
    confident = 50 * torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    assert float(soft_dice_loss(confident, labels)) < 1e-6


def test_per_slice_iou_against_numpy_skipping_classes_absent_from_the_labels():
    from marbench.evaluation.segmentation import iou_of_maps

    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (3, 1, 16, 16), generator=gen)
    labels[1][labels[1] == 3] = 0  # slice 1 has no class 3 ...
    pred = torch.randint(0, 4, (3, 16, 16), generator=gen)
    pred[1, 0, 0] = 3  # ... but a pixel predicted as it
    got = iou_of_maps(pred, labels, 4).numpy()
    for b in range(3):
        for k in range(4):
            truth, guess = labels[b, 0].numpy() == k, pred[b].numpy() == k
            if not truth.any():
                assert np.isnan(got[b, k])
            else:
                assert got[b, k] == pytest.approx((truth & guess).sum() / (truth | guess).sum(), abs=1e-6)
    assert np.isnan(got[1, 3]) and not np.isnan(got[0, 3])
