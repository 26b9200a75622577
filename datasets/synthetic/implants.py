"""Metal implants that fit each phantom category, built from ``marbench.physics.metal_masks``.

Each category draws from its typical implants (hip prostheses in ``bilateral_hip``, pedicle screws in
``lumbar_spine``, dental fillings in ``dental``, clips, plates), and any category may instead receive AAPM
random fractal shapes placed in soft tissue or bone; materials follow the AAPM list (amalgam, stainless steel,
copper, cobalt(-chrome), titanium).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from marbench.physics import Geometry
from marbench.physics import metal_masks as mm

from .anatomy import CaseSpec, anchor
from .tissues import TISSUES

__all__ = ["MetalObject", "sample_implants", "fractal_objects", "host_centres", "AAPM_METALS"]

AAPM_METALS = ("amalgam", "stainless_steel", "copper", "cobalt_chrome", "titanium")
_HOST = [TISSUES[n].label for n in ("fat", "muscle", "organ", "cancellous_bone", "cortical_bone", "brain")]


@dataclass
class MetalObject:
    """One metal object: ``mask`` bool ``(N, N)`` on the image grid, its material and where it is."""

    kind: str
    material: str
    mask: np.ndarray

    def info(self, geometry: Geometry) -> dict:
        rows, cols = np.nonzero(self.mask)
        c = (geometry.image_size - 1) / 2
        area_mm2 = float(self.mask.sum()) * geometry.pixel_size_mm**2
        return {
            "kind": self.kind, "material": self.material, "pixels": int(self.mask.sum()),
            "diameter_mm": round(2 * math.sqrt(area_mm2 / math.pi), 3),
            "centre_mm": [round(float((cols.mean() - c) * geometry.pixel_size_mm), 3),
                          round(float((c - rows.mean()) * geometry.pixel_size_mm), 3)] if rows.size else None,
        }


def host_centres(geometry: Geometry, labels: np.ndarray, rng: np.random.Generator, count: int) -> list:
    """``count`` random soft-tissue or bone pixel centres ``(x, y)`` in mm (``labels``: tissue labels)."""
    rows, cols = np.nonzero(np.isin(labels, _HOST))
    c = (geometry.image_size - 1) / 2
    picks = rng.integers(len(rows), size=count)
    return [((cols[j] - c) * geometry.pixel_size_mm, (c - rows[j]) * geometry.pixel_size_mm) for j in picks]


def fractal_objects(geometry: Geometry, labels: np.ndarray, rng: np.random.Generator, count: int,
                    diameters_mm, material: str, shapes=None, centres=None) -> list[MetalObject]:
    """``count`` AAPM fractal shapes of ``diameters_mm`` (one value or one per object) centred on random
    soft-tissue or bone pixels; ``shapes`` and ``centres`` may be given to reuse objects across a sweep."""
    shapes = shapes if shapes is not None else [mm.fractal_shape(rng) for _ in range(count)]
    centres = centres if centres is not None else host_centres(geometry, labels, rng, count)
    diameters = np.broadcast_to(np.asarray(diameters_mm, dtype=float), (count,))
    return [MetalObject("fractal", material, mm.place_shape(shapes[i], float(diameters[i]), centres[i], geometry,
                                                            angle_rad=float(rng.uniform(0, 2 * math.pi))))
            for i in range(count)]


def _anatomical(spec: CaseSpec, geometry: Geometry, labels: np.ndarray, rng: np.random.Generator):
    cat = spec.category
    if cat == "bilateral_hip":
        heads = [s for s in spec.shapes if s["kind"] == "ellipse" and s["tissue"] == "cortical_bone"
                 and abs(s["ax"] - anchor(spec, "femoral_heads")["radius"]) < 1e-9]
        centres = [(s["cx"], s["cy"]) for s in heads]
        material = str(rng.choice(["cobalt_chrome", "titanium"]))
        return [MetalObject("hip_prosthesis", material, mm.hip_prostheses(geometry, rng, centres))]
    if cat == "lumbar_spine":
        body = next(s for s in spec.shapes if s["kind"] == "ellipse" and s["tissue"] == "cancellous_bone")
        return [MetalObject("pedicle_screws", "titanium", mm.pedicle_screws(geometry, rng, (body["cx"], body["cy"])))]
    if cat == "dental":
        arch = next(s for s in spec.shapes if s.get("inner"))
        centre = (arch["cx"], arch["cy"] - 0.9 * arch["ay"] + 6)
        return [MetalObject("dental_fillings", "amalgam",
                            mm.dental_fillings(geometry, rng, centre, arch_radius_mm=arch["ax"] - 5))]
    if cat in ("head", "upper_abdomen", "mid_abdomen"):
        host = next(s for s in spec.shapes if s["kind"] == "ellipse" and s["tissue"] in ("brain", "organ"))
        material = str(rng.choice(["titanium", "stainless_steel"]))
        return [MetalObject("surgical_clips", material,
                            mm.surgical_clips(geometry, rng, (host["cx"], host["cy"]), spread_mm=0.4 * host["ax"]))]
    if cat in ("neck", "knee", "pelvis", "thorax"):
        bones = [s for s in spec.shapes if s["kind"] == "ellipse" and s["tissue"] == "cortical_bone" and s["ax"] > 8]
        bone = bones[int(rng.integers(len(bones)))]
        material = str(rng.choice(["titanium", "stainless_steel"]))
        return [MetalObject("fixation_plate", material,
                            mm.fixation_plate(geometry, rng, (bone["cx"], bone["cy"]), max(bone["ax"], bone["ay"])))]
    raise ValueError(f"no anatomical implant defined for category {cat!r}")


def sample_implants(spec: CaseSpec, geometry: Geometry, labels: np.ndarray, rng: np.random.Generator,
                    fractal_probability: float = 0.4) -> list[MetalObject]:
    """Implants for one case: the category's typical implant, or (with ``fractal_probability``) 1-3 AAPM fractal
    shapes of 3-20 mm in one AAPM material. Every object lies inside the body, so no mask is empty."""
    if rng.random() < fractal_probability:
        count = int(rng.integers(1, 4))
        objects = fractal_objects(geometry, labels, rng, count, rng.uniform(3.0, 20.0, count),
                                  str(rng.choice(AAPM_METALS)))
    else:
        objects = _anatomical(spec, geometry, labels, rng)
    return objects
