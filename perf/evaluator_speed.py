"""The evaluator's cost over its backbones: the ``perceptual`` protocol (LPIPS, LPIPS-Rad, FID, FID-Rad) on the
smoke benchmark's test split, against the backbones' forward passes alone on the same images (VGG16 on
prediction and target, RadImageNet ResNet50 on both, InceptionV3 on the prediction: what a split costs once
the reference features are cached), measured in the same run. Goal: at most 1.2x.

The method is ``uncorrected`` (no restoration cost), backbones are the ``auto`` ones (random where the weight
files are absent: the same arithmetic). Usage: ``python perf/evaluator_speed.py [--data data/smoke]``.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="data/smoke")
    args = parser.parse_args()
    import torch

    from marbench.converters import window
    from marbench.datasets.aapm import AAPMCTMARDataModule
    from marbench.datasets.synthetic import generate
    from marbench.evaluation.evaluator import evaluate
    from marbench.evaluation.perceptual import backbones
    from marbench.evaluation.protocols import get_protocol
    from marbench.methods.classic import Uncorrected

    generate(args.data, "smoke")  # resumes: nothing to do when the benchmark exists
    split = Path(args.data) / "split.txt"
    keys = ("ma_image", "gt_image", "metal_mask")
    protocol = get_protocol("perceptual")
    bb = backbones(protocol.weights)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MARBENCH_CACHE"] = tmp  # a fresh reference-feature cache, filled by the warm-up run
        dm = AAPMCTMARDataModule(args.data, split=str(split), keys=keys, batch_size=4)
        evaluate(Uncorrected(), dm, ["perceptual"], "perf", out_dir=str(Path(tmp) / "warm"))
        t = time.perf_counter()
        evaluate(Uncorrected(), dm, ["perceptual"], "perf", out_dir=str(Path(tmp) / "timed"))
        evaluator = time.perf_counter() - t
        dm.setup("test")
        batches = list(dm.test_dataloader())
        slices = sum(b["ma_image"].shape[0] for b in batches)
        t = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                p = window(b["ma_image"], protocol.low_hu, protocol.high_hu)
                g = window(b["gt_image"], protocol.low_hu, protocol.high_hu)
                bb.lpips(p, g)
                bb.radimagenet.layer4(p)
                bb.radimagenet.layer4(g)
                bb.inception(p)
        forward = time.perf_counter() - t
    print(f"evaluator, protocol perceptual, {slices} test slices of {args.data}, {torch.get_num_threads()} threads")
    print(f"{'evaluator s (reference features cached)':42s} {evaluator:8.2f}")
    print(f"{'backbone forward passes alone s':42s} {forward:8.2f}")
    ratio = evaluator / forward
    print(f"{'ratio':42s} {ratio:8.2f}   (goal <= 1.20: {'met' if ratio <= 1.2 else 'not met'})")


if __name__ == "__main__":
    main()
