"""A row of the leaderboard: one method config merged over the shared base config, built as a LightningCLI and
evaluated.

A row config (``configs/bench/<row>.yaml``) holds its model, the batch keys it needs and any trainer setting it
changes; the base (``configs/bench/_base.yaml``) holds the data, the trainer and the evaluator. ``build_row``
merges the two for one training seed; ``evaluate_row`` evaluates a built (and, if trainable, trained) row on the
test split and, for protocols that score them (``perceptual-indicators``), on the benchmark's metal sweeps
(``marbench.datasets.sweeps``). The grid runner (``marbench.grid``) and ``marbench verify`` run rows through
these two.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["build_row", "evaluate_row", "row_configs", "BENCH_CONFIGS", "BASE_CONFIG"]

BENCH_CONFIGS = Path("configs/bench")
BASE_CONFIG = BENCH_CONFIGS / "_base.yaml"


def row_configs(folder: Path = BENCH_CONFIGS) -> list[Path]:
    """Every row config of a folder: its ``*.yaml`` but those starting with ``_`` (the shared base).

    Raises:
        FileNotFoundError: no row config.
    """
    found = sorted(p for p in folder.glob("*.yaml") if not p.name.startswith("_"))
    if not found:
        raise FileNotFoundError(f"no row configs under {folder}")
    return found


def build_row(cfg: Path, base: Path | None = BASE_CONFIG, seed: int = 0, example: bool = True,
              protocols: list[str] | None = None, overrides: list[str] | tuple[str, ...] = (),
              dataset: str | None = None):
    """The LightningCLI of one row (``base`` then ``cfg`` merged, then the command-line style ``overrides`` such as
    ``--data.init_args.root=data/smoke``; ``seed_everything`` = ``seed``), not run; every ``Evaluator`` of it
    writes records of training seed ``seed`` (and the qualitative example only if ``example``: one seed of a row
    draws the panel), under ``protocols`` if given (replacing the config's list), named for ``dataset`` if given
    (in the evaluators and in the configuration the records keep, so that ``marbench verify`` re-runs the same).

    Raises:
        ValueError: the config has no marbench ``Evaluator`` callback.
    """
    from marbench.evaluation.protocols import get_protocol
    from marbench.lightning_cli import build_cli

    args = (["--config", str(base)] if base is not None and base.is_file() else []) + ["--config", str(cfg)]
    cli = build_cli(args + list(overrides) + ["--seed_everything", str(seed)], run=False)
    if not cli.evaluators():
        raise ValueError(f"{cfg}: the config has no marbench Evaluator callback (trainer.callbacks)")
    for ev in cli.evaluators():
        ev.seed = seed
        ev.save_example = ev.save_example and example
        if protocols:
            ev.protocols = [get_protocol(p) for p in protocols]
        if dataset:
            ev.dataset = dataset
    if dataset:
        for cb in cli.config.trainer.callbacks or []:
            if cb.class_path.endswith(".Evaluator"):
                cb.init_args.dataset = dataset
    return cli


def evaluate_row(cli) -> None:
    """Evaluate a built row on the test split, then on the metal sweeps if a protocol scores them."""
    from marbench.datasets.sweeps import SweepDataModule

    cli.attach_config()
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    if any(p.data == "sweeps" for ev in cli.evaluators() for p in ev.protocols):
        dm = cli.datamodule
        keys = tuple(dict.fromkeys([*dm.keys, "gt_image", "metal_mask"]))
        sweeps = SweepDataModule(dm.root, keys=keys, batch_size=dm.batch_size)
        cli.trainer.test(cli.model, datamodule=sweeps, verbose=False)
