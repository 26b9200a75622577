"""Which convolution algorithm for the perceptual protocols' backbones (issue #16's 20 s evaluator bound): oneDNN's
direct convolutions (what the suite runs, channels-last) against NNPACK's Winograd convolutions
(``torch._nnpack_spatial_convolution``) for every 3 x 3 stride-1 convolution, the other layers unchanged, in the
same run. Per backbone on one 256 x 256 image (the smoke slices' size), one thread unless ``--threads``: seconds per
pass with each, the speed-up, the largest relative difference of the outputs, and for LPIPS (VGG16 v0.1) the
largest difference of the values over ``--pairs`` random image pairs.

The backbones are the ``auto`` ones (random where the weight files are absent: the same arithmetic). Nothing here
changes what the suite runs; it measures an option. Usage: ``python perf/backbone_convolutions.py [--threads 1]
[--repeats 4] [--pairs 8]``.
"""
from __future__ import annotations

import argparse
import copy

from timing import seconds_per_call


def nnpack_convolutions(module):
    """``module`` (in place) with its 3 x 3, stride-1, undilated, ungrouped ``nn.Conv2d`` layers computed by
    NNPACK; returns how many were changed."""
    import torch
    import torch.nn as nn

    class NNPACKConv2d(nn.Module):
        def __init__(self, conv: nn.Conv2d):
            super().__init__()
            self.weight = nn.Parameter(conv.weight.detach().contiguous())
            self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach())
            self.padding = list(conv.padding)

        def forward(self, x):
            return torch._nnpack_spatial_convolution(x.contiguous(), self.weight, self.bias, self.padding)

    changed = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Conv2d) and child.kernel_size == (3, 3) and child.stride == (1, 1) \
                and child.dilation == (1, 1) and child.groups == 1 and isinstance(child.padding, tuple):
            setattr(module, name, NNPACKConv2d(child))
            changed += 1
        else:
            changed += nnpack_convolutions(child)
    return changed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a bench worker uses one)")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=8, help="random image pairs for the LPIPS difference")
    args = parser.parse_args()
    import torch

    from marbench.evaluation.perceptual import backbones

    torch.set_num_threads(args.threads)
    if not torch._nnpack_available():
        raise SystemExit("this torch build has no NNPACK")
    ours = backbones("auto")
    nnp = copy.deepcopy(ours).to(memory_format=torch.contiguous_format)
    counts = {name: nnpack_convolutions(getattr(nnp, name)) for name in ("lpips", "radimagenet", "inception")}
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 256, 256, generator=g)

    def flat(out):
        return torch.cat([o.flatten() for o in out]) if isinstance(out, (list, tuple)) else out.flatten()

    print(f"perceptual backbones, one 256 x 256 image, {args.threads} thread(s), NNPACK on the 3 x 3 stride-1 "
          f"convolutions ({counts})")
    print("| backbone | oneDNN s | NNPACK s | speed-up | largest relative output difference |")
    print("|---|---:|---:|---:|---:|")
    for label, a, b in (("VGG16 (LPIPS trunk)", lambda: ours.lpips.normalized_features(x),
                         lambda: nnp.lpips.normalized_features(x)),
                        ("RadImageNet ResNet50 (layer4)", lambda: ours.radimagenet.layer4(x),
                         lambda: nnp.radimagenet.layer4(x)),
                        ("InceptionV3 (pool3)", lambda: ours.inception(x), lambda: nnp.inception(x))):
        with torch.no_grad():
            ta, tb = seconds_per_call(a, args.repeats), seconds_per_call(b, args.repeats)
            fa, fb = flat(a()), flat(b())
        rel = float((fa - fb).abs().max() / fa.abs().max())
        print(f"| {label} | {ta:.3f} | {tb:.3f} | {ta / tb:.2f} | {rel:.1e} |")
    with torch.no_grad():
        diffs = []
        for _ in range(args.pairs):
            p, t = torch.rand(1, 1, 256, 256, generator=g), torch.rand(1, 1, 256, 256, generator=g)
            diffs.append(float((ours.lpips(p, t) - nnp.lpips(p, t)).abs().max()))
    print(f"\nLPIPS (VGG16 v0.1) over {args.pairs} random pairs: largest difference {max(diffs):.1e}")


if __name__ == "__main__":
    main()
