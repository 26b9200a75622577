"""Synthetic-benchmark generation speed: slices per second at the ``aapm`` preset (512 x 512, 1000 x 900), body
anatomy, against the goal of 1 slice/s on 2 cores. The one-off system-matrix builds and a warm-up batch (spectrum model,
attenuation tables) are timed apart, then ``SLICES`` slices (whole batches: phantom, implants, polychromatic
simulation, two FBPs, writing) are timed.
Usage: ``python perf/simulation_speed.py [--preset aapm|smoke]``.
"""
from __future__ import annotations

import argparse
import tempfile
import time

SLICES = 16


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="aapm")
    args = parser.parse_args()
    import torch

    from marbench.datasets.synthetic import PRESETS, generate
    from marbench.physics import Projector, preset

    p = PRESETS[args.preset]
    t = time.perf_counter()
    Projector(preset(p.geometry_presets["body"]))  # builds or maps the projector and FBP matrices
    setup = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        generate(out, args.preset, seed=0, limit=p.batch_size, progress=False)  # warm-up: spectra, tables
        warm = time.perf_counter() - t
        t = time.perf_counter()
        generate(out, args.preset, seed=0, limit=SLICES, progress=False)
        elapsed = time.perf_counter() - t
    rate = SLICES / elapsed
    print(f"synthetic benchmark '{args.preset}' ({p.geometry_presets['body']}), {torch.get_num_threads()} threads")
    print(f"{'matrices (build or load) s':30s} {setup:8.1f}")
    print(f"{'first batch (warm-up) s':30s} {warm:8.1f}")
    print(f"{'slices timed':30s} {SLICES:8d}")
    print(f"{'seconds per slice':30s} {elapsed / SLICES:8.3f}")
    print(f"{'slices per second':30s} {rate:8.2f}   (goal >= 1.00: {'met' if rate >= 1 else 'not met'})")


if __name__ == "__main__":
    main()
