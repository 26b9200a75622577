"""``marbench bench``: the whole grid on one machine.

Generates (or resumes) the synthetic benchmark, then for each config under ``configs/bench/`` trains the method
if it is trainable and evaluates it on the test split (its ``Evaluator`` writes the records), then rebuilds
the leaderboard.
"""
from __future__ import annotations

import time
from pathlib import Path

__all__ = ["run_bench", "BENCH_CONFIGS"]

BENCH_CONFIGS = Path("configs/bench")


def run_bench(configs: list[Path] | None = None, data_root: str = "data/smoke", preset: str = "smoke",
              leaderboard_root: str = "leaderboards") -> dict[str, float]:
    """Run the grid; returns wall seconds per step.

    Raises:
        FileNotFoundError: no config found.
    """
    from marbench.datasets.synthetic import generate
    from marbench.leaderboard import build_leaderboards
    from marbench.lightning_cli import build_cli

    configs = sorted(configs or BENCH_CONFIGS.glob("*.yaml"))
    if not configs:
        raise FileNotFoundError(f"no bench configs under {BENCH_CONFIGS}")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    generate(data_root, preset)
    timings["simulate"] = time.perf_counter() - t
    for cfg in configs:
        t = time.perf_counter()
        cli = build_cli(["--config", str(cfg)], run=False)
        if cli.model.card.trainable:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        cli._attach_config()
        cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
        timings[cfg.stem] = time.perf_counter() - t
    t = time.perf_counter()
    build_leaderboards(leaderboard_root)
    timings["leaderboard"] = time.perf_counter() - t
    return timings
