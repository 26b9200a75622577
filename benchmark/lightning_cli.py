"""LightningCLI for marbench: ``marbench fit|validate|test|predict --config configs/....yaml``.

The model is any ``MARMethod`` (``model.class_path``), the data any LightningDataModule; an ``Evaluator`` in
``trainer.callbacks`` turns ``test`` into a leaderboard record. The resolved configuration is stored in the
record's manifest.
"""
from __future__ import annotations

import json

import lightning as L
from lightning.pytorch.cli import LightningCLI

from marbench.evaluation.evaluator import Evaluator
from marbench.method import MARMethod

__all__ = ["MarbenchCLI", "build_cli"]


class MarbenchCLI(LightningCLI):
    def _resolved_config(self) -> dict:
        cfg = json.loads(self.parser.dump(self.config, format="json", skip_check=True))
        return cfg.get(self.subcommand, cfg) if self.subcommand else cfg

    def _attach_config(self) -> None:
        for cb in self.trainer.callbacks:
            if isinstance(cb, Evaluator):
                cb.config = self._resolved_config()

    def before_test(self) -> None:
        self._attach_config()


def build_cli(args: list[str] | None = None, run: bool = True) -> MarbenchCLI:
    """Build the CLI (``run=False``: instantiate model, data and trainer from ``--config`` without running)."""
    return MarbenchCLI(MARMethod, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       args=args, run=run, save_config_callback=None, auto_configure_optimizers=False)
