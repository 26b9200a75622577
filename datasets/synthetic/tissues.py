"""Tissue classes of the synthetic phantoms: label ids (for segmentation metrics), HU and texture amplitude.

HU values are typical adult values at 120 kVp (e.g. Hounsfield-scale tables in Buzug, *Computed Tomography*,
2008, Fig. 1.6; lung parenchyma about -850, fat -100, muscle 40-50, liver 55-65, cancellous bone 200-400,
cortical bone 1000-1900, brain 25-45, CSF 0-15).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Tissue", "TISSUES", "LABELS", "label_names"]


@dataclass(frozen=True)
class Tissue:
    label: int
    name: str
    hu: float
    texture_hu: float  # standard deviation of the tissue's texture


TISSUES: dict[str, Tissue] = {t.name: t for t in (
    Tissue(0, "air", -1000.0, 0.0),
    Tissue(1, "lung", -850.0, 45.0),
    Tissue(2, "fat", -100.0, 12.0),
    Tissue(3, "muscle", 45.0, 10.0),
    Tissue(4, "organ", 55.0, 8.0),
    Tissue(5, "cancellous_bone", 280.0, 80.0),
    Tissue(6, "cortical_bone", 1300.0, 120.0),
    Tissue(7, "brain", 35.0, 4.0),
    Tissue(8, "csf", 8.0, 3.0),
)}
LABELS = {t.label: t for t in TISSUES.values()}


def label_names() -> list[str]:
    """Class names ordered by label id."""
    return [LABELS[i].name for i in sorted(LABELS)]
