"""Projector speed at the ``aapm_body`` geometry, batch of 8, against ASTRA measured in the same run.

Each case runs in its own process so that its peak resident memory is its own. ASTRA's CPU projector has no
curved detector, so it runs ``line_fanflat`` on the flat-detector twin of ``aapm_body`` (same source, detector
distance, channel count and views), which costs the same per ray. Usage: ``python perf/projector_speed.py``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

BATCH = 8


def _case(name: str) -> dict:
    import numpy as np
    import torch

    from marbench.physics import Projector, preset

    g = preset("aapm_body")
    rng = np.random.default_rng(0)
    if name == "astra":
        from marbench.physics.astra_reference import AstraProjector

        flat = dataclasses.replace(g, detector="flat")
        a = AstraProjector(flat)
        img = rng.random(g.image_shape, dtype=np.float32)
        t = time.perf_counter()
        sino = a.fp(img)
        t_fp = time.perf_counter() - t
        t = time.perf_counter()
        a.bp(sino)
        t_bp = time.perf_counter() - t
        setup = 0.0
    else:
        t = time.perf_counter()
        p = Projector(g, backend=name)
        setup = time.perf_counter() - t
        x = torch.from_numpy(rng.random((BATCH, 1, *g.image_shape), dtype=np.float32))
        p.fp(x[:1])  # warm-up: page in a memory-mapped matrix
        t = time.perf_counter()
        sino = p.fp(x)
        t_fp = (time.perf_counter() - t) / BATCH
        t = time.perf_counter()
        p.bp(sino)
        t_bp = (time.perf_counter() - t) / BATCH
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"backend": name, "setup_s": setup, "fp_s": t_fp, "bp_s": t_bp, "peak_rss_gb": rss_gb}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--case":
        print(json.dumps(_case(sys.argv[2])))
        return
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as cache:  # a fresh cache: the first sparse run really builds
        env = {**os.environ, "MARBENCH_CACHE": cache}
        for name in ("astra", "sparse", "sparse", "raysampling"):  # sparse twice: build, then cached load
            out = subprocess.run([sys.executable, __file__, "--case", name], check=True, capture_output=True,
                                 text=True, env=env)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows[1]["backend"], rows[2]["backend"] = "sparse (first: build)", "sparse (cached, mmap)"
    ref = rows[0]
    print(f"aapm_body (512x512, 1000 views x 900 channels), batch {BATCH}, {torch.get_num_threads()} threads; "
          "times per slice")
    print(f"{'backend':24s} {'setup s':>8s} {'FP s':>8s} {'BP s':>8s} {'FP x ASTRA':>11s} {'BP x ASTRA':>11s} "
          f"{'peak RAM GB':>12s}")
    for r in rows:
        print(f"{r['backend']:24s} {r['setup_s']:8.2f} {r['fp_s']:8.3f} {r['bp_s']:8.3f} "
              f"{ref['fp_s'] / r['fp_s']:11.2f} {ref['bp_s'] / r['bp_s']:11.2f} {r['peak_rss_gb']:12.2f}")
    print("ASTRA: line_fanflat (CPU) on the flat-detector twin, one slice per call; 'x ASTRA' = ASTRA time / ours")


if __name__ == "__main__":
    main()
