"""``marbench bench``: the smoke grid on one machine.

Generates (or resumes) the synthetic benchmark, then for each row config under ``configs/bench/`` (merged over
``configs/bench/_base.yaml``) trains the method if it is trainable (the weights go to
``runs/bench/<config>.ckpt``, so that a row can be re-evaluated without retraining), evaluates it on the test
split and, for protocols that score the metal sweeps (``perceptual-indicators``), on the benchmark's sweeps
(``marbench.datasets.sweeps``); its ``Evaluator`` writes the records. Then it rebuilds the leaderboard.
"""
from __future__ import annotations

import time
from pathlib import Path

__all__ = ["run_bench", "run_row", "rerun", "row_configs", "BENCH_CONFIGS", "BASE_CONFIG", "BENCH_CHECKPOINTS"]

BENCH_CONFIGS = Path("configs/bench")
BASE_CONFIG = BENCH_CONFIGS / "_base.yaml"
BENCH_CHECKPOINTS = Path("runs/bench")


def row_configs(configs: list[Path] | None = None) -> list[Path]:
    """The row configs to run: the given ones, or every ``configs/bench/*.yaml`` but the base.

    Raises:
        FileNotFoundError: no row config.
    """
    found = sorted(configs or (p for p in BENCH_CONFIGS.glob("*.yaml") if p.name != BASE_CONFIG.name))
    if not found:
        raise FileNotFoundError(f"no bench configs under {BENCH_CONFIGS}")
    return found


def _cli(cfg: Path, base: Path | None):
    from marbench.lightning_cli import build_cli

    args = (["--config", str(base)] if base is not None and base.is_file() else []) + ["--config", str(cfg)]
    cli = build_cli(args, run=False)
    if not cli.evaluators():
        raise ValueError(f"{cfg}: the config has no marbench Evaluator callback (trainer.callbacks)")
    return cli


def _test(cli) -> None:
    """Evaluate on the test split, then on the metal sweeps if a protocol scores them."""
    from marbench.datasets.sweeps import SweepDataModule

    cli.attach_config()
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    if any(p.data == "sweeps" for ev in cli.evaluators() for p in ev.protocols):
        dm = cli.datamodule
        keys = tuple(dict.fromkeys([*dm.keys, "gt_image", "metal_mask"]))
        sweeps = SweepDataModule(dm.root, keys=keys, batch_size=dm.batch_size)
        cli.trainer.test(cli.model, datamodule=sweeps, verbose=False)


def run_row(cfg: Path, base: Path | None = BASE_CONFIG, checkpoints: Path = BENCH_CHECKPOINTS) -> float:
    """Train (if trainable; weights to ``<checkpoints>/<cfg stem>.ckpt``) and evaluate one row; returns seconds."""
    t = time.perf_counter()
    cli = _cli(cfg, base)
    if cli.model.card.trainable:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        checkpoints.mkdir(parents=True, exist_ok=True)
        cli.trainer.save_checkpoint(checkpoints / f"{cfg.stem}.ckpt", weights_only=True)
    _test(cli)
    return time.perf_counter() - t


def run_bench(configs: list[Path] | None = None, data_root: str = "data/smoke", preset: str = "smoke",
              leaderboard_root: str = "leaderboards") -> dict[str, float]:
    """Run the grid; returns wall seconds per step.

    Raises:
        FileNotFoundError: no config found.
    """
    from marbench.datasets.synthetic import generate
    from marbench.leaderboard import build_leaderboards

    rows = row_configs(configs)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    generate(data_root, preset)
    timings["simulate"] = time.perf_counter() - t
    for cfg in rows:
        timings[cfg.stem] = run_row(cfg)
    t = time.perf_counter()
    build_leaderboards(leaderboard_root)
    timings["leaderboard"] = time.perf_counter() - t
    return timings


def rerun(configs: list[Path] | None = None, protocols: list[str] | None = None) -> list[str]:
    """Re-evaluate rows already run by ``run_bench`` without retraining (trained methods load
    ``runs/bench/<config>.ckpt``), under ``protocols`` (replacing the config's list) if given; returns the rows.

    Raises:
        FileNotFoundError: a trainable method's checkpoint is missing.
    """
    import torch

    from marbench.evaluation.protocols import get_protocol

    done = []
    for cfg in row_configs(configs):
        cli = _cli(cfg, BASE_CONFIG)
        if cli.model.card.trainable:
            ckpt = BENCH_CHECKPOINTS / f"{cfg.stem}.ckpt"
            if not ckpt.is_file():
                raise FileNotFoundError(f"{ckpt} not found: run `marbench bench {cfg}` first")
            cli.model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
        if protocols:
            for ev in cli.evaluators():
                ev.protocols = [get_protocol(p) for p in protocols]
        _test(cli)
        done.append(cfg.stem)
    return done
