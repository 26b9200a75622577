"""The physics a batch names, handed explicitly to whatever reconstructs (deepinv's ``model(y, physics)``).

Every batch names the scanner geometry of each slice in ``batch["geometry"]``: a registered preset name
(``aapm_body_256``) or, for a geometry that is no preset (e.g. the AAPM scoring cases, each with its own field of
view), the geometry's canonical JSON (``geometry_key``). ``CTPhysics`` turns those keys into ``Projector``s on
one device, builds each once, and groups a batch's slices by geometry, so a method never needs to know which
dataset it runs on.

>>> physics = CTPhysics()
>>> geometry_key(preset("aapm_body"))
'aapm_body'
>>> physics.geometry("aapm_head").fov_mm
220.16
"""
from __future__ import annotations

import json
from typing import Iterator

import torch

from .geometry import PRESETS, FanBeamGeometry, Geometry, ParallelBeamGeometry, preset
from .projector import Projector

__all__ = ["CTPhysics", "geometry_key", "geometry_from_key"]

_KINDS = {"FanBeamGeometry": FanBeamGeometry, "ParallelBeamGeometry": ParallelBeamGeometry}


def geometry_key(geometry: Geometry) -> str:
    """The key a batch uses for ``geometry``: its preset name if a registered preset equals it, else its canonical
    JSON (sorted keys; ``geometry_from_key`` inverts it)."""
    for name, g in PRESETS.items():
        if g == geometry:
            return name
    return json.dumps(geometry.to_dict(), sort_keys=True)


def geometry_from_key(key: str) -> Geometry:
    """The geometry a batch key names (a preset name or a geometry's canonical JSON).

    Raises:
        KeyError: neither a registered preset nor geometry JSON (the message lists the presets).
        ValueError: JSON of an unknown geometry kind or with unknown fields.
    """
    if not key.lstrip().startswith("{"):
        return preset(key)
    fields = json.loads(key)
    kind = fields.pop("kind", None)
    if kind not in _KINDS:
        raise ValueError(f"geometry key names kind {kind!r}; expected one of {sorted(_KINDS)}")
    try:
        return _KINDS[kind](**fields)
    except TypeError as e:
        raise ValueError(f"geometry key for {kind}: {e}") from None


class CTPhysics:
    """Projectors of the geometries batches name, on one device, each built once.

    Args:
        device: where the projectors' operators live (that of the tensors they are applied to).
        backend: ``Projector`` backend (``sparse``: cached system matrices; ``raysampling``: matrix-free).
    """

    def __init__(self, device: torch.device | str = "cpu", backend: str = "sparse"):
        self.device, self.backend = torch.device(device), backend
        self._projectors: dict[str, Projector] = {}

    def geometry(self, key: str) -> Geometry:
        """The geometry named by ``key`` (see ``geometry_from_key``)."""
        return geometry_from_key(key)

    def projector(self, key: str) -> Projector:
        """The ``Projector`` (``fp``, ``bp``, ``fbp``) of the geometry named by ``key``, built on first use."""
        if key not in self._projectors:
            self._projectors[key] = Projector(self.geometry(key), backend=self.backend, device=self.device)
        return self._projectors[key]

    def groups(self, batch: dict) -> Iterator[tuple[Projector, torch.Tensor]]:
        """``(projector, rows)`` for each geometry in ``batch["geometry"]`` (a list of keys, one per slice), with
        ``rows`` the LongTensor of the batch rows on that geometry, in order of first appearance.

        Raises:
            KeyError: the batch has no ``geometry`` key.
        """
        if "geometry" not in batch:
            raise KeyError(f"the batch names no 'geometry' (one preset name or geometry key per slice); it has "
                           f"{sorted(batch)}")
        keys = list(batch["geometry"])
        for key in dict.fromkeys(keys):
            rows = torch.tensor([i for i, k in enumerate(keys) if k == key], dtype=torch.long)
            yield self.projector(key), rows

    def to(self, device: torch.device | str) -> "CTPhysics":
        """The same physics on ``device`` (a new object when the device differs)."""
        device = torch.device(device)
        return self if device == self.device else CTPhysics(device, self.backend)

