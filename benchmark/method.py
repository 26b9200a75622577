"""The method API: every MAR method is a ``MARMethod`` (a LightningModule) with a method card.

A method implements ``restore(batch, physics) -> (B, 1, H, W)``: restored images **in HU on the input grid**,
from a batch of the suite's convention (``marbench.datasets.batch``) and the physics its slices name
(``marbench.physics.CTPhysics``: projector, FBP and geometry of each slice's ``batch["geometry"]``), passed
explicitly as deepinv passes its physics operator. Its card declares what a leaderboard reader and the evaluator
need: the batch keys inference needs (``inputs``) apart from those only training needs (``training_inputs``), so
that a method that needs no ground truth at inference runs on a dataset without it (the AAPM scoring set); and
whether the metal pixels of its output are the input's (``puts_metal_back``), which the contract test checks.

Input conversion (HU -> the method's own range) happens inside the method with the shared converters of
``marbench.converters``. ``test_step`` and ``predict_step`` check the declared inputs and the output, so the
evaluator always receives a finite ``(B, 1, H, W)`` float tensor.

Methods are found by name in ``METHODS``, a ``marbench.registry.Registry`` fed by the ``marbench.methods``
entry-point group: the suite's own methods are declared in its ``pyproject.toml``, a third-party package declares
``[project.entry-points."marbench.methods"] my-mar = "my_package:MyMAR"``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar

import lightning as L
import torch

from marbench.datasets.batch import Batch
from marbench.physics import CTPhysics
from marbench.registry import Registry

__all__ = ["MethodCard", "PaperTable", "MARMethod", "METHODS", "ENTRY_POINT_GROUP", "put_metal_back"]

ENTRY_POINT_GROUP = "marbench.methods"


@dataclass(frozen=True)
class MethodCard:
    """What a leaderboard reader and the evaluator need to know about a method (row).

    Attributes:
        name: the leaderboard row (the registered name for a class's default card).
        paper: authors, title, venue and year.
        inputs: batch keys ``restore`` needs.
        training_inputs: further batch keys training needs (``()`` for a method without training).
        trainable: the method is fitted on the training split.
        puts_metal_back: the output's metal-mask pixels are the input's (``ma_image``) exactly.
        metal: how the output treats the metal pixels, in words.
        departures: where the implementation departs from the paper, and why.
    """

    name: str
    paper: str
    inputs: tuple[str, ...]
    trainable: bool
    training_inputs: tuple[str, ...] = ()
    puts_metal_back: bool = True
    metal: str = "metal-mask pixels take the metal-affected image's values (metal put back)"
    departures: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PaperTable:
    """A table of a paper that the leaderboard reproduces: rows of the suite beside the paper's numbers.

    Attributes:
        name: file stem of the table (``leaderboards/<dataset>__<name>.md``), e.g. ``sscd-ablation``.
        source: authors, title and table number.
        protocol: the protocol whose metrics are compared.
        rows: ``(leaderboard row, the paper's row label)`` in the paper's order.
        values: the paper's row label -> metric name -> value.
        order_metric: the metric whose order across rows the paper reports (``""``: none).
        note: how the paper's setting differs from the suite's rows (data, schedule, weights).
    """

    name: str
    source: str
    protocol: str
    rows: tuple[tuple[str, str], ...]
    values: dict[str, dict[str, float]]
    order_metric: str = ""
    note: str = ""


def put_metal_back(restored: torch.Tensor, batch: Batch) -> torch.Tensor:
    """``restored`` with the metal-mask pixels taken from ``batch["ma_image"]`` (both ``(B, 1, H, W)`` HU): the AAPM
    CT-MAR protocol scores images that still contain the metal."""
    return torch.where(batch["metal_mask"], batch["ma_image"], restored)


class MARMethod(L.LightningModule):
    """Base class of MAR methods.

    Subclasses set ``card`` (a ``MethodCard``) and implement ``restore``; trainable ones also implement
    ``training_step`` / ``configure_optimizers`` as usual in Lightning (using ``self.physics`` for projections).
    ``paper_tables`` lists the tables of the method's paper that the leaderboard puts beside its rows.
    """

    card: MethodCard
    paper_tables: ClassVar[tuple[PaperTable, ...]] = ()
    test_time_args: ClassVar[tuple[str, ...]] = ()
    """Init arguments read only by ``restore`` (never in training): two rows whose configs differ only in these
    and in their evaluators train the same weights, so a grid row may take another's (``weights_from``)."""

    @classmethod
    def contract_instance(cls) -> "MARMethod":
        """A small instance for the contract test (CPU, seconds to build); the default constructor by default."""
        return cls()

    @property
    def physics(self) -> CTPhysics:
        """The ``CTPhysics`` of this module's current device (one per device, reused across steps)."""
        cached = self.__dict__.get("_physics")
        if cached is None or cached.device != self.device:
            cached = CTPhysics(self.device)
            self.__dict__["_physics"] = cached
        return cached

    def weights_info(self) -> dict[str, str]:
        """Weight files or stand-ins the method uses beyond its own trained parameters: name -> sha256, or
        ``"random"`` / ``"stand-in <sha256>"``; goes into every record."""
        return {}

    def restore(self, batch: Batch, physics: CTPhysics) -> torch.Tensor:
        """Restored images ``(B, 1, H, W)`` in HU on the grid of ``batch['ma_image']``."""
        raise NotImplementedError

    def checked_restore(self, batch: Batch, physics: CTPhysics | None = None) -> torch.Tensor:
        """``restore`` with the card's inputs checked first and the output checked after.

        Raises:
            ValueError: a missing input key; an output of the wrong shape, or with NaN/Inf.
        """
        missing = [k for k in self.card.inputs if k not in batch]
        if missing:
            raise ValueError(f"method {self.card.name!r} needs batch keys {missing}; the batch has {sorted(batch)}")
        out = self.restore(batch, physics if physics is not None else self.physics)
        grid = batch["ma_image"] if "ma_image" in batch else batch["gt_image"]  # reference rows may read only gt
        expected = tuple(grid.shape)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            found = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"method {self.card.name!r}: expected a prediction of shape {expected} (HU on the "
                             f"input grid), found {found}")
        if not torch.isfinite(out).all():
            raise ValueError(f"method {self.card.name!r}: prediction holds {int((~torch.isfinite(out)).sum())} "
                             "NaN/Inf values")
        return out.float()

    def predict_step(self, batch: Batch, batch_idx: int = 0) -> torch.Tensor:
        return self.checked_restore(batch)

    def test_step(self, batch: Batch, batch_idx: int = 0) -> torch.Tensor:
        return self.checked_restore(batch)


def _card_matches_name(name: str, cls) -> None:
    if cls.card.name != name:
        raise ValueError(f"method registered as {name!r} has card name {cls.card.name!r}; they must be equal")


METHODS: Registry[type[MARMethod]] = Registry("method", base=MARMethod, entry_point_group=ENTRY_POINT_GROUP,
                                              check=_card_matches_name)
