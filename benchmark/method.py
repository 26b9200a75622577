"""The method API: every MAR method is a ``MARMethod`` (a LightningModule) with a method card.

A method declares the batch keys it needs (``required_keys``, see the batch convention in
``marbench.datasets.aapm``) and implements ``restore(batch) -> (B, 1, H, W)`` restored images **in HU on the
input grid**. Its input conversion (HU -> its own range) happens inside the method with the shared converters
of ``marbench.converters``. ``predict_step`` and ``test_step`` call ``restore`` and check its output, so the
evaluator always receives a finite ``(B, 1, H, W)`` float tensor.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import lightning as L
import torch

from marbench.physics import Projector

__all__ = ["MethodCard", "MARMethod"]


@dataclass(frozen=True)
class MethodCard:
    """What a leaderboard reader needs to know about a method."""

    name: str
    paper: str
    needs: tuple[str, ...]
    trainable: bool
    departures: tuple[str, ...] = field(default_factory=tuple)
    metal: str = "metal pixels are returned as in the input (metal is put back)"

    def to_dict(self) -> dict:
        return asdict(self)


class MARMethod(L.LightningModule):
    """Base class of MAR methods.

    Subclasses set ``card`` (a ``MethodCard``) and implement ``restore``; trainable ones also implement
    ``training_step`` / ``configure_optimizers`` as usual in Lightning.
    """

    card: MethodCard

    @property
    def required_keys(self) -> tuple[str, ...]:
        return self.card.needs

    def attach_geometries(self, geometries: dict) -> None:
        """Called by the evaluator (and at ``setup``) with the datamodule's ``anatomy -> Geometry`` (for
        physics-based methods)."""
        self.geometries = dict(geometries)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if getattr(datamodule, "geometries", None):
            self.attach_geometries(datamodule.geometries)

    def projector(self, anatomy: str, device: torch.device) -> Projector:
        """The ``Projector`` of an anatomy's geometry on ``device``, built once per (anatomy, device).

        Raises:
            ValueError: no geometry was attached for ``anatomy``.
        """
        cache = self.__dict__.setdefault("_projector_cache", {})
        key = (anatomy, str(device))
        if key not in cache:
            geometries = getattr(self, "geometries", {})
            if anatomy not in geometries:
                raise ValueError(f"{self.card.name}: no geometry for anatomy {anatomy!r}; the datamodule provides "
                                 f"{sorted(geometries)}")
            cache[key] = Projector(geometries[anatomy], device=device)
        return cache[key]

    def restore(self, batch: dict) -> torch.Tensor:
        """Restored images ``(B, 1, H, W)`` in HU on the grid of ``batch['ma_image']``."""
        raise NotImplementedError

    def _checked_restore(self, batch: dict) -> torch.Tensor:
        missing = [k for k in self.required_keys if k not in batch]
        if missing:
            raise ValueError(f"method {self.card.name!r} needs batch keys {missing}; the batch has {sorted(batch)}")
        out = self.restore(batch)
        expected = tuple(batch["ma_image"].shape)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            found = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"method {self.card.name!r}: expected a prediction of shape {expected} (HU on the "
                             f"input grid), found {found}")
        if not torch.isfinite(out).all():
            raise ValueError(f"method {self.card.name!r}: prediction holds {int((~torch.isfinite(out)).sum())} "
                             "NaN/Inf values")
        return out.float()

    def predict_step(self, batch: dict, batch_idx: int = 0) -> torch.Tensor:
        return self._checked_restore(batch)

    def test_step(self, batch: dict, batch_idx: int = 0) -> torch.Tensor:
        return self._checked_restore(batch)
