"""Procedural anatomical phantoms for ten categories, in HU with per-pixel tissue labels.

A case is a set of shape parameters drawn once (``sample_case``) and rendered at any table position ``z_mm``
(``render``): structures change smoothly with ``z`` and the texture is a sum of random 3D plane waves
(wavelengths 2-20 mm), so adjacent slices of one case form a consistent volume. Coordinates are mm with x to
the patient's left on the image right and y anterior (up), as in ``marbench.physics.geometry``.

Categories and the AAPM anatomy (geometry preset) each is scanned with: ``head``, ``dental``, ``neck`` ->
``head`` (220.16 mm FOV); ``thorax``, ``upper_abdomen``, ``mid_abdomen``, ``pelvis``, ``bilateral_hip``,
``lumbar_spine``, ``knee`` -> ``body`` (400 mm FOV).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from marbench.physics import Geometry

from .tissues import TISSUES

__all__ = ["CATEGORIES", "ANATOMY_OF", "CaseSpec", "sample_case", "render"]

ANATOMY_OF = {
    "head": "head", "dental": "head", "neck": "head",
    "thorax": "body", "upper_abdomen": "body", "mid_abdomen": "body", "pelvis": "body",
    "bilateral_hip": "body", "lumbar_spine": "body", "knee": "body",
}
CATEGORIES = tuple(ANATOMY_OF)


@dataclass
class CaseSpec:
    """Random parameters of one phantom; ``shapes`` is a list of drawing commands (see ``render``)."""

    category: str
    shapes: list[dict] = field(default_factory=list)
    waves: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))  # kx, ky, kz (rad/mm), phase, amplitude
    hu_jitter: dict[str, float] = field(default_factory=dict)


class _Builder:
    """Collects shapes with per-structure random z-variation."""

    def __init__(self, rng: np.random.Generator, category: str):
        self.rng, self.spec = rng, CaseSpec(category)

    def ellipse(self, tissue: str, cx: float, cy: float, ax: float, ay: float, angle: float = 0.0,
                hu: float | None = None, wobble: float = 0.0) -> None:
        """Ellipse with semi-axes ``ax, ay`` mm; ``wobble`` perturbs the radius by low angular harmonics."""
        harmonics = self.rng.normal(0, wobble, 4) if wobble else np.zeros(4)
        phases = self.rng.uniform(0, 2 * math.pi, 4)
        dz = self.rng.uniform(-0.01, 0.01, 3)  # per-mm relative change of the axes and a drift of the centre
        self.spec.shapes.append(dict(kind="ellipse", tissue=tissue, cx=cx, cy=cy, ax=ax, ay=ay, angle=angle,
                                     hu=hu, harmonics=harmonics, phases=phases, dz=dz))

    def ring(self, tissue: str, cx, cy, ax, ay, thickness, angle=0.0, hu=None) -> None:
        """Elliptical shell of ``thickness`` mm inside the ellipse ``(ax, ay)``."""
        self.ellipse(tissue, cx, cy, ax, ay, angle, hu)
        self.spec.shapes[-1]["inner"] = thickness


def _vertebra(b: _Builder, cx: float, cy: float, r: float) -> None:
    b.ellipse("cortical_bone", cx, cy, r, 0.85 * r)
    b.ellipse("cancellous_bone", cx, cy, r - 2.0, 0.85 * r - 2.0)
    b.ellipse("cortical_bone", cx, cy - 1.5 * r, 0.45 * r, 0.55 * r)  # posterior arch
    b.ellipse("csf", cx, cy - 1.25 * r, 0.35 * r, 0.32 * r)  # spinal canal
    b.ellipse("cortical_bone", cx, cy - 2.2 * r, 0.18 * r, 0.5 * r)  # spinous process


def _trunk(b: _Builder, ax: float, ay: float, fat_mm: float) -> None:
    b.ellipse("fat", 0, 0, ax, ay, wobble=0.02)
    b.ellipse("muscle", 0, 0, ax - fat_mm, ay - fat_mm, wobble=0.02)
    b.ellipse("fat", 0, 0, ax - fat_mm - 12, ay - fat_mm - 12, wobble=0.03)


def _ribs(b: _Builder, ax: float, ay: float, count: int) -> None:
    for k in range(count):
        t = math.pi * (0.15 + 0.7 * k / max(count - 1, 1))
        for side in (-1, 1):
            x, y = side * 0.92 * ax * math.sin(t), 0.92 * ay * math.cos(t)
            b.ellipse("cortical_bone", x, y, 4.0, 2.5, angle=t)


def _head(b: _Builder) -> None:
    r = b.rng
    ax, ay = r.uniform(68, 78), r.uniform(82, 95)
    b.ellipse("muscle", 0, 0, ax, ay, wobble=0.01)  # scalp
    b.ellipse("cortical_bone", 0, 0, ax - 4, ay - 4)
    b.ellipse("cancellous_bone", 0, 0, ax - 6, ay - 6)  # diploe
    b.ellipse("cortical_bone", 0, 0, ax - 8, ay - 8)
    b.ellipse("csf", 0, 0, ax - 10, ay - 10)
    b.ellipse("brain", 0, 0, ax - 12, ay - 12, wobble=0.01)
    for side in (-1, 1):  # lateral ventricles
        b.ellipse("csf", side * r.uniform(6, 10), r.uniform(0, 10), r.uniform(4, 7), r.uniform(16, 24),
                  angle=side * r.uniform(0.1, 0.3))
    b.ellipse("brain", 0, -ay * 0.55, ax * 0.35, ay * 0.2, hu=42.0)  # grey matter of the cerebellum


def _dental(b: _Builder) -> None:
    r = b.rng
    ax, ay = r.uniform(62, 72), r.uniform(70, 82)
    b.ellipse("fat", 0, 0, ax, ay, wobble=0.02)
    b.ellipse("muscle", 0, -5, ax - 6, ay - 8)
    b.ellipse("air", 0, 18, 18, 10)  # oral cavity
    b.ellipse("muscle", 0, 14, 14, 7)  # tongue
    arch_r = r.uniform(24, 30)
    b.ring("cancellous_bone", 0, 25, arch_r + 5, arch_r * 0.9 + 5, thickness=10.0)  # alveolar bone
    for k in range(14):  # teeth along the arch: enamel-dense cortical class
        t = math.pi * (-0.45 + 0.9 * k / 13)
        b.ellipse("cortical_bone", arch_r * math.sin(t), 25 + 0.9 * arch_r * math.cos(t), 3.5, 4.5, angle=t,
                  hu=2200.0)
    for side in (-1, 1):  # rami of the mandible
        b.ellipse("cortical_bone", side * (ax - 18), -5, 5, 18, angle=side * 0.2)
    _vertebra(b, 0, -35, 9)


def _neck(b: _Builder) -> None:
    r = b.rng
    ax, ay = r.uniform(55, 65), r.uniform(50, 58)
    b.ellipse("fat", 0, 0, ax, ay, wobble=0.02)
    b.ellipse("muscle", 0, -3, ax - 6, ay - 8)
    b.ellipse("air", 0, 22, 8, 7)  # trachea
    b.ellipse("organ", -14, 22, 8, 10, hu=90.0)  # thyroid lobes (iodine-rich)
    b.ellipse("organ", 14, 22, 8, 10, hu=90.0)
    for side in (-1, 1):
        b.ellipse("organ", side * 24, 10, 4, 4, hu=40.0)  # carotid arteries
    _vertebra(b, 0, -5, 10)


def _thorax(b: _Builder) -> None:
    r = b.rng
    ax, ay = r.uniform(150, 175), r.uniform(100, 120)
    _trunk(b, ax, ay, r.uniform(8, 22))
    for side in (-1, 1):
        b.ellipse("lung", side * ax * 0.42, 5, ax * 0.36, ay * 0.7, wobble=0.03)
    b.ellipse("organ", ax * 0.08, ay * 0.15, ax * 0.28, ay * 0.42, angle=0.4, hu=40.0)  # heart
    b.ellipse("organ", -ax * 0.05, -ay * 0.35, 12, 12, hu=45.0)  # descending aorta
    b.ellipse("cortical_bone", 0, ay * 0.85, 14, 6)  # sternum
    b.ellipse("cancellous_bone", 0, ay * 0.85, 11, 3.5)
    _ribs(b, ax, ay, 6)
    _vertebra(b, 0, -ay * 0.62, 16)


def _upper_abdomen(b: _Builder) -> None:
    r = b.rng
    ax, ay = r.uniform(140, 170), r.uniform(100, 120)
    _trunk(b, ax, ay, r.uniform(10, 30))
    b.ellipse("organ", -ax * 0.38, ay * 0.1, ax * 0.42, ay * 0.55, angle=0.2, hu=60.0, wobble=0.03)  # liver
    b.ellipse("organ", ax * 0.5, -ay * 0.15, ax * 0.16, ay * 0.3, angle=-0.4, hu=48.0)  # spleen
    b.ellipse("organ", ax * 0.2, ay * 0.35, ax * 0.2, ay * 0.2, hu=15.0)  # stomach, fluid-filled
    b.ellipse("air", ax * 0.22, ay * 0.45, ax * 0.08, ay * 0.06)
    for side in (-1, 1):
        b.ellipse("organ", side * ax * 0.35, -ay * 0.4, 24, 32, angle=side * 0.4, hu=32.0)  # kidneys
    b.ellipse("organ", ax * 0.04, -ay * 0.38, 11, 11, hu=45.0)  # aorta
    _ribs(b, ax, ay, 4)
    _vertebra(b, 0, -ay * 0.55, 18)


def _mid_abdomen(b: _Builder) -> None:
    r = b.rng
    ax, ay = r.uniform(140, 170), r.uniform(105, 125)
    _trunk(b, ax, ay, r.uniform(12, 35))
    for _ in range(int(r.integers(8, 14))):  # bowel loops: wall, content, sometimes gas
        cx, cy = r.uniform(-0.6, 0.6) * ax, r.uniform(-0.1, 0.65) * ay
        rad = r.uniform(10, 20)
        b.ellipse("organ", cx, cy, rad, rad * r.uniform(0.7, 1.0), angle=r.uniform(0, math.pi), hu=40.0)
        b.ellipse("organ", cx, cy, rad - 3, rad * 0.6, hu=r.uniform(5, 25))
        if r.random() < 0.4:
            b.ellipse("air", cx, cy + rad * 0.3, rad * 0.5, rad * 0.25)
    for side in (-1, 1):
        b.ellipse("muscle", side * 32, -ay * 0.55, 16, 20)  # psoas
        b.ellipse("organ", side * ax * 0.4, -ay * 0.4, 20, 28, hu=32.0)  # lower kidney poles
    _vertebra(b, 0, -ay * 0.55, 19)


def _pelvis(b: _Builder) -> None:
    r = b.rng
    ax, ay = r.uniform(160, 185), r.uniform(100, 120)
    _trunk(b, ax, ay, r.uniform(12, 35))
    for side in (-1, 1):  # iliac wings
        b.ellipse("cortical_bone", side * ax * 0.55, -ay * 0.1, ax * 0.2, 11, angle=side * 0.9)
        b.ellipse("cancellous_bone", side * ax * 0.55, -ay * 0.1, ax * 0.2 - 3, 8, angle=side * 0.9)
        b.ellipse("muscle", side * ax * 0.45, -ay * 0.5, 35, 25)  # gluteal muscles
    b.ellipse("cortical_bone", 0, -ay * 0.6, 38, 18)  # sacrum
    b.ellipse("cancellous_bone", 0, -ay * 0.6, 34, 14)
    b.ellipse("organ", 0, ay * 0.35, r.uniform(30, 50), r.uniform(25, 40), hu=10.0)  # bladder
    b.ellipse("organ", 0, -ay * 0.25, 15, 12, hu=40.0)  # rectum
    b.ellipse("air", 0, -ay * 0.25, 7, 5)


def _bilateral_hip(b: _Builder) -> None:
    r = b.rng
    ax, ay = r.uniform(165, 190), r.uniform(100, 120)
    _trunk(b, ax, ay, r.uniform(15, 35))
    head_r = r.uniform(22, 26)
    for side in (-1, 1):
        cx = side * r.uniform(0.48, 0.55) * ax
        b.ellipse("cortical_bone", cx, 0, head_r + 12, head_r + 10)  # acetabulum
        b.ellipse("cancellous_bone", cx, 0, head_r + 9, head_r + 7)
        b.ellipse("muscle", cx, 0, head_r + 2, head_r + 2)  # joint space / cartilage
        b.ellipse("cortical_bone", cx, 0, head_r, head_r)  # femoral head
        b.ellipse("cancellous_bone", cx, 0, head_r - 3, head_r - 3)
        b.ellipse("muscle", cx + side * 25, -ay * 0.45, 40, 25)
    b.spec.shapes.append(dict(kind="anchor", name="femoral_heads", radius=head_r))
    b.ellipse("organ", 0, ay * 0.35, r.uniform(25, 40), r.uniform(20, 30), hu=10.0)  # bladder
    b.ellipse("organ", 0, -ay * 0.4, 14, 11, hu=40.0)


def _lumbar_spine(b: _Builder) -> None:
    r = b.rng
    ax, ay = r.uniform(140, 170), r.uniform(100, 125)
    _trunk(b, ax, ay, r.uniform(10, 30))
    for side in (-1, 1):
        b.ellipse("muscle", side * 35, -ay * 0.35, 18, 24)  # psoas
        b.ellipse("muscle", side * 30, -ay * 0.78, 24, 16)  # erector spinae
    b.ellipse("organ", -10, ay * 0.2, ax * 0.5, ay * 0.4, hu=38.0)  # bowel mass
    _vertebra(b, 0, -ay * 0.3, 22)


def _knee(b: _Builder) -> None:
    r = b.rng
    ax, ay = r.uniform(55, 70), r.uniform(50, 62)
    b.ellipse("fat", 0, 0, ax, ay, wobble=0.02)
    b.ellipse("muscle", 0, -8, ax - 10, ay - 14)
    for side in (-1, 1):  # femoral condyles
        b.ellipse("cortical_bone", side * 19, 2, 18, 22)
        b.ellipse("cancellous_bone", side * 19, 2, 16, 20)
    b.ellipse("csf", 0, -2, 5, 10)  # joint fluid in the notch
    b.ellipse("cortical_bone", 0, ay - 12, 18, 7)  # patella
    b.ellipse("cancellous_bone", 0, ay - 12, 15, 5)


_BUILDERS = {
    "head": _head, "dental": _dental, "neck": _neck, "thorax": _thorax, "upper_abdomen": _upper_abdomen,
    "mid_abdomen": _mid_abdomen, "pelvis": _pelvis, "bilateral_hip": _bilateral_hip,
    "lumbar_spine": _lumbar_spine, "knee": _knee,
}


def sample_case(category: str, rng: np.random.Generator, n_waves: int = 48) -> CaseSpec:
    """Draw the parameters of one phantom of ``category``.

    Raises:
        ValueError: unknown category.
    """
    if category not in _BUILDERS:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    b = _Builder(rng, category)
    _BUILDERS[category](b)
    wavelength = rng.uniform(2.0, 20.0, n_waves)
    direction = rng.normal(size=(n_waves, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    k = direction * (2 * math.pi / wavelength)[:, None]
    amplitude = np.sqrt(2.0 / n_waves) * np.ones(n_waves)  # unit variance in total
    b.spec.waves = np.column_stack([k, rng.uniform(0, 2 * math.pi, n_waves), amplitude])
    b.spec.hu_jitter = {name: float(rng.normal(0, 0.2 * t.texture_hu)) for name, t in TISSUES.items()}
    return b.spec


def _inside(shape: dict, x: np.ndarray, y: np.ndarray, z_mm: float) -> tuple[tuple[slice, slice], np.ndarray]:
    """The shape's pixels: a bounding box of the grid and the boolean mask inside it."""
    scale = 1 + shape["dz"][0] * z_mm
    cx, cy = shape["cx"] + shape["dz"][1] * z_mm * 10, shape["cy"] + shape["dz"][2] * z_mm * 10
    reach = max(shape["ax"], shape["ay"]) * scale * (1 + np.abs(shape["harmonics"]).sum()) + 1.0
    cols = np.nonzero(np.abs(x[0] - cx) <= reach)[0]
    rows = np.nonzero(np.abs(y[:, 0] - cy) <= reach)[0]
    if cols.size == 0 or rows.size == 0:
        return (slice(0, 0), slice(0, 0)), np.zeros((0, 0), dtype=bool)
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    xb, yb = x[box] - cx, y[box] - cy
    ca, sa = math.cos(shape["angle"]), math.sin(shape["angle"])
    u, v = ca * xb + sa * yb, -sa * xb + ca * yb
    wobble = 1.0
    if np.any(shape["harmonics"]):
        theta = np.arctan2(v, u)
        wobble = 1 + sum(h * np.cos((i + 2) * theta + p)
                         for i, (h, p) in enumerate(zip(shape["harmonics"], shape["phases"], strict=True)))
    ax, ay = shape["ax"] * scale * wobble, shape["ay"] * scale * wobble
    inside = (u / ax) ** 2 + (v / ay) ** 2 <= 1.0
    if "inner" in shape:
        t = shape["inner"]
        inside &= (u / np.maximum(ax - t, 1e-3)) ** 2 + (v / np.maximum(ay - t, 1e-3)) ** 2 > 1.0
    return box, inside


def texture(spec: CaseSpec, x: np.ndarray, y: np.ndarray, z_mm: float) -> np.ndarray:
    """Unit-variance 3D texture field on the grid ``x`` (columns) by ``y`` (rows) at ``z_mm``.

    The sum of plane waves ``a cos(kx x + ky y + kz z + phi)`` is evaluated as one matrix product through
    ``cos(p + q) = cos p cos q - sin p sin q`` with ``p = kx x`` along columns and ``q`` along rows.
    """
    kx, ky, kz, phase, amp = spec.waves.T
    p = np.outer(x[0], kx)  # (N, W)
    q = np.outer(y[:, 0], ky) + kz * z_mm + phase  # (N, W)
    rows = np.concatenate([np.cos(q) * amp, -np.sin(q) * amp], axis=1)
    cols = np.concatenate([np.cos(p), np.sin(p)], axis=1)
    return rows @ cols.T


def render(spec: CaseSpec, geometry: Geometry, z_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """HU image and tissue labels of ``spec`` at table position ``z_mm`` on ``geometry``'s grid.

    Returns:
        ``hu`` float32 ``(N, N)`` and ``labels`` uint8 ``(N, N)`` (ids of ``tissues.TISSUES``).
    """
    x, y = geometry.pixel_centres_mm()
    labels = np.zeros(geometry.image_shape, dtype=np.uint8)
    base = np.full(geometry.image_shape, TISSUES["air"].hu)
    for shape in spec.shapes:
        if shape["kind"] != "ellipse":
            continue
        box, inside = _inside(shape, x, y, z_mm)
        tissue = TISSUES[shape["tissue"]]
        labels[box][inside] = tissue.label
        base[box][inside] = (shape["hu"] if shape["hu"] is not None else tissue.hu) + spec.hu_jitter[tissue.name]
    amp = np.array([t.texture_hu for t in sorted(TISSUES.values(), key=lambda t: t.label)])[labels]
    hu = base + amp * texture(spec, x, y, z_mm)
    return hu.astype(np.float32), labels


def anchor(spec: CaseSpec, name: str) -> dict | None:
    """A named anchor recorded by a builder (e.g. the femoral heads' radius), or None."""
    return next((s for s in spec.shapes if s["kind"] == "anchor" and s["name"] == name), None)
