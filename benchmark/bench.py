"""``marbench bench``: the whole grid on one machine.

Generates (or resumes) the synthetic benchmark, then for each config under ``configs/bench/`` trains the method
if it is trainable (the weights go to ``runs/bench/<config>.ckpt``, so that a row can be re-evaluated without
retraining), evaluates it on the test split (its ``Evaluator`` writes the records) and on the benchmark's
metal sweeps (PI_q / PI_s, ``evaluation.indicators``), then rebuilds the leaderboard.
"""
from __future__ import annotations

import time
from pathlib import Path

__all__ = ["run_bench", "rerun", "BENCH_CONFIGS", "BENCH_CHECKPOINTS"]

BENCH_CONFIGS = Path("configs/bench")
BENCH_CHECKPOINTS = Path("runs/bench")


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
            BENCH_CHECKPOINTS.mkdir(parents=True, exist_ok=True)
            cli.trainer.save_checkpoint(BENCH_CHECKPOINTS / f"{cfg.stem}.ckpt", weights_only=True)
        cli._attach_config()
        cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
        _indicators(cli, data_root)
        timings[cfg.stem] = time.perf_counter() - t
    _clean_image_row(cli)
    t = time.perf_counter()
    build_leaderboards(leaderboard_root)
    timings["leaderboard"] = time.perf_counter() - t
    return timings


def _evaluator(cli):
    from marbench.evaluation.evaluator import Evaluator

    found = [cb for cb in cli.trainer.callbacks if isinstance(cb, Evaluator)]
    if not found:
        raise ValueError("the config has no marbench Evaluator callback (trainer.callbacks)")
    return found[0]


def _indicators(cli, data_root: str) -> None:
    from marbench.evaluation.indicators import evaluate_indicators

    ev = _evaluator(cli)
    evaluate_indicators(cli.model, data_root, ev.dataset, ev.out_dir, ev.seed, config=cli._resolved_config())


def _clean_image_row(cli) -> None:
    """The segmentation reference row of the metal-free images, when the configs evaluate segmentation."""
    from marbench.evaluation.evaluator import evaluate
    from marbench.evaluation.segmentation import CleanImage

    ev = _evaluator(cli)
    if "segmentation" not in [p.name for p in ev.protocols]:
        return
    dm = type(cli.datamodule)(cli.datamodule.root, anatomy=cli.datamodule.anatomy, split=cli.datamodule.split_path,
                              keys=("ma_image", "gt_image", "tissue_labels"), batch_size=cli.datamodule.batch_size)
    evaluate(CleanImage(), dm, ["segmentation"], ev.dataset, out_dir=str(ev.out_dir), seed=ev.seed)


def rerun(configs: list[Path] | None = None, protocols: list[str] | None = None, indicators: bool = False,
          data_root: str = "data/smoke") -> list[str]:
    """Re-evaluate configs already run by ``run_bench`` without retraining (trained methods load
    ``runs/bench/<config>.ckpt``): under ``protocols`` (replacing the config's list) and/or the PI_q / PI_s
    sweeps; returns the configs done.

    Raises:
        FileNotFoundError: a trainable method's checkpoint is missing.
    """
    import torch

    from marbench.evaluation.protocols import get_protocol
    from marbench.lightning_cli import build_cli

    done, cli = [], None
    for cfg in sorted(configs or BENCH_CONFIGS.glob("*.yaml")):
        cli = build_cli(["--config", str(cfg)], run=False)
        if cli.model.card.trainable:
            ckpt = BENCH_CHECKPOINTS / f"{cfg.stem}.ckpt"
            if not ckpt.is_file():
                raise FileNotFoundError(f"{ckpt} not found: run `marbench bench {cfg}` first")
            cli.model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
        if protocols:
            _evaluator(cli).protocols = [get_protocol(p) for p in protocols]
            if "segmentation" in protocols:
                cli.datamodule.keys = tuple(sorted(set(cli.datamodule.keys) | {"tissue_labels"}))
            cli._attach_config()
            cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
        if indicators:
            _indicators(cli, data_root)
        done.append(cfg.stem)
    if cli is not None and protocols:
        _clean_image_row(cli)
    return done
