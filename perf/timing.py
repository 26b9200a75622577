"""The perf scripts' timing loop, in one place: seconds per call of a function after one warm-up call."""
from __future__ import annotations

import time
from collections.abc import Callable


def seconds_per_call(fn: Callable[[], object], repeats: int, device=None,
                     after_warmup: Callable[[], None] | None = None) -> float:
    """Mean wall seconds of ``repeats`` calls of ``fn``, after one warm-up call that is not timed.

    Args:
        fn: the call to time, no arguments.
        repeats: timed calls (>= 1).
        device: a ``torch.device``; on a CUDA device the timing synchronises before and after, so that it counts
            the queued kernels.
        after_warmup: run between the warm-up and the timed calls (e.g. ``torch.cuda.reset_peak_memory_stats``).
    Raises:
        ValueError: ``repeats < 1``.
    """
    if repeats < 1:
        raise ValueError(f"seconds_per_call: expected repeats >= 1, found {repeats}")
    cuda = device is not None and getattr(device, "type", str(device)) == "cuda"
    fn()
    if cuda:
        import torch

        torch.cuda.synchronize()
    if after_warmup is not None:
        after_warmup()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats
