"""Where a training step of the self-supervised cross-domain method (``sscd``, variant ``joint``) spends its time:
the projector (two metal traces, FBP of both completions and of the reference, the FBP adjoints in the
backward pass) against the networks (SinoNet and ImgNet, forward and backward), at the smoke geometry
(``aapm_body_256``: 500 views x 450 channels, 256 x 256 images), batch 4, on this machine's CPU.

The projector share is measured by replaying exactly the projector calls of a step on the same tensors; the
networks' share is the rest of the step. Usage: ``python perf/sscd_training_step.py [--steps N]``.
"""
from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    import torch

    from marbench.methods.sscd import SelfSupervisedCrossDomainMAR
    from marbench.physics import metal_trace, preset

    torch.manual_seed(0)
    geometry = preset("aapm_body_256")
    model = SelfSupervisedCrossDomainMAR(variant="joint", base=16, depth=4)
    projector = model.physics.projector("aapm_body_256")
    n, b = geometry.image_shape[0], args.batch
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    body = (((yy - n / 2) / (0.4 * n)) ** 2 + ((xx - n / 2) / (0.45 * n)) ** 2 < 1).float()
    sinogram = projector.fp((0.02 * body + 0.002 * torch.rand(b, 1, n, n)) * body)
    masks = torch.zeros(b, 1, n, n, dtype=torch.bool)
    for i in range(b):
        cy, cx = 96 + 16 * i, 100 + 12 * i
        masks[i, 0, cy - 4:cy + 4, cx - 6:cx + 6] = True
    pair = (masks.roll(1, 0), masks.roll(2, 0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> float:
        t = time.perf_counter()
        losses = model.losses(sinogram, pair, projector)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        return time.perf_counter() - t

    def projector_calls() -> float:
        t = time.perf_counter()
        traces = [metal_trace(projector, m) for m in pair]
        for trace in traces:
            s = sinogram.masked_fill(trace, 0.0).requires_grad_()
            projector.fbp(s).sum().backward()
        with torch.no_grad():
            projector.fbp(sinogram)
        return time.perf_counter() - t

    step()
    projector_calls()  # warm-up: matrices mapped, threads started
    steps = [step() for _ in range(args.steps)]
    proj = [projector_calls() for _ in range(args.steps)]
    total, p = statistics.median(steps), statistics.median(proj)
    print(f"sscd training step (variant joint, base 16, depth 4), aapm_body_256, batch {b}, "
          f"{torch.get_num_threads()} threads, median of {args.steps}")
    print(f"{'step s':32s} {total:8.3f}")
    print(f"{'  projector (FP traces, 3 FBP, 2 FBP adjoints) s':32s} {p:8.3f}   {100 * p / total:5.1f} %")
    print(f"{'  networks and the rest s':32s} {total - p:8.3f}   {100 * (total - p) / total:5.1f} %")


if __name__ == "__main__":
    main()
