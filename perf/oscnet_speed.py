"""Speed of OSCNet's and OSCNet+'s rotation convolutions (``methods/oscnet.py``: the artifact layer ``A = C (*) M``
and its adjoint in the ``M`` step) against the official code's convolutions as the reference, in the same run:
``F.conv2d`` / ``F.conv_transpose2d`` with one filter (OSCNet) and grouped by image (OSCNet+). Seconds per call,
forward and forward with backward, at the smoke benchmark's test batch (4 slices of 256 x 256) and training batch
(8 patches of 64 x 64), ``C = num_M x num_rot = 32`` maps and 9 x 9 filters; then the whole smoke OSCNet+ network
(``S = 3, T = 2, num_Q = 16``) on the test batch with each, and the largest difference between their outputs.

Usage: ``python perf/oscnet_speed.py [--threads 1] [--repeats 5]``.
"""
from __future__ import annotations

import argparse

from timing import seconds_per_call


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a bench worker uses one)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import torch

    from marbench.methods import oscnet

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"rotation convolutions, {args.threads} thread(s), seconds per call (official / ours = speed-up)")
    print("| op | filters | batch | pass | official s | ours s | speed-up |")
    print("|---|---|---|---|---:|---:|---:|")
    for b, side in ((4, 256), (8, 64)):
        m = torch.randn(b, 32, side, side, generator=g)
        a = torch.randn(b, 1, side, side, generator=g)
        for filters in ("one", "per image"):
            c = torch.randn(1 if filters == "one" else b, 32, 9, 9, generator=g)
            for op, ref, ours, x in (
                    ("A = C (*) M", oscnet.official_rotation_conv, oscnet.rotation_conv, m),
                    ("adjoint", oscnet.official_rotation_conv_transpose, oscnet.rotation_conv_transpose, a)):
                for backward in (False, True):
                    def run(fn, x=x, c=c, backward=backward):
                        xi = x.detach().requires_grad_(backward)
                        ci = c.detach().requires_grad_(backward)
                        out = fn(xi, ci, 4)
                        if backward:
                            out.square().sum().backward()
                    with torch.set_grad_enabled(backward):
                        t_ref = seconds_per_call(lambda fn=ref, run=run: run(fn), args.repeats)
                        t_ours = seconds_per_call(lambda fn=ours, run=run: run(fn), args.repeats)
                    print(f"| {op} | {filters} | {b} x {side}^2 | {'fwd+bwd' if backward else 'fwd'} | "
                          f"{t_ref:.4f} | {t_ours:.4f} | {t_ref / t_ours:.1f} |")

    torch.manual_seed(0)
    net = oscnet.OSCNetwork(plus=True, S=3, T=2, num_Q=16).eval()
    xma = torch.rand(4, 1, 256, 256, generator=g) * 255
    xli, mask = xma.clamp(max=200), (torch.rand(4, 1, 256, 256, generator=g) > 0.01).float()
    outputs, seconds = {}, {}
    for name, conv, conv_t in (("official", oscnet.official_rotation_conv, oscnet.official_rotation_conv_transpose),
                               ("ours", oscnet.rotation_conv, oscnet.rotation_conv_transpose)):
        saved = oscnet.rotation_conv, oscnet.rotation_conv_transpose
        oscnet.rotation_conv, oscnet.rotation_conv_transpose = conv, conv_t
        try:
            with torch.no_grad():
                seconds[name] = seconds_per_call(lambda: net(xma, xli, mask), max(1, args.repeats // 2))
                outputs[name] = net(xma, xli, mask)[1][-1]
        finally:
            oscnet.rotation_conv, oscnet.rotation_conv_transpose = saved
    diff = float((outputs["official"] - outputs["ours"]).abs().max())
    print(f"\nsmoke OSCNet+ forward, 4 x 256^2: official {seconds['official']:.3f} s, ours {seconds['ours']:.3f} s "
          f"({seconds['official'] / seconds['ours']:.1f}x); largest output difference {diff:.2e} "
          f"(image values 0-255)")


if __name__ == "__main__":
    main()
