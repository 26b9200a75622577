"""LightningCLI for marbench: ``marbench fit|validate|test|predict --config configs/bench/_base.yaml --config
configs/bench/<row>.yaml``.

The model is any ``MARMethod`` (``model.class_path``), the data any LightningDataModule; an ``Evaluator`` in
``trainer.callbacks`` turns ``test`` into leaderboard records. Several ``--config`` files merge in order, so the
trainer and evaluator settings shared by every row live once in ``configs/bench/_base.yaml``. The resolved
configuration is stored in each record's manifest.
"""
from __future__ import annotations

import json

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from marbench.evaluation.evaluator import Evaluator
from marbench.evaluation.protocols import Protocol
from marbench.method import MARMethod

# protocols are dataclasses, which jsonargparse parses as plain types; a config names a configured protocol by
# class_path (e.g. ``AAPMClinical`` with its ``reference_dir``), so subclasses must be accepted
set_parsing_settings(subclasses_enabled=[Protocol])

__all__ = ["MarbenchCLI", "build_cli"]


class MarbenchCLI(LightningCLI):
    def resolved_config(self) -> dict:
        """The run's resolved configuration (model, data, trainer, seed) as plain JSON types."""
        cfg = json.loads(self.parser.dump(self.config, format="json", skip_check=True))
        return cfg.get(self.subcommand, cfg) if self.subcommand else cfg

    def evaluators(self) -> list[Evaluator]:
        """The ``Evaluator`` callbacks of the trainer."""
        return [cb for cb in self.trainer.callbacks if isinstance(cb, Evaluator)]

    def attach_config(self) -> None:
        """Give every evaluator the resolved configuration (for the records' manifests)."""
        for cb in self.evaluators():
            cb.config = self.resolved_config()

    def before_test(self) -> None:
        self.attach_config()


def build_cli(args: list[str] | None = None, run: bool = True) -> MarbenchCLI:
    """Build the CLI (``run=False``: instantiate model, data and trainer from ``--config`` without running)."""
    return MarbenchCLI(MARMethod, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       args=args, run=run, save_config_callback=None, auto_configure_optimizers=False)
