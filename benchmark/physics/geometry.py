"""Scanner geometries: 2D fan-beam (equi-angular curved or flat detector) and parallel-beam.

Coordinate conventions, shared by every projector backend and by the reconstruction:

* Image: a square ``image_size x image_size`` pixel grid of side ``fov_mm`` centred on the isocentre, stored
  and displayed as the AAPM CT-MAR release stores it (row 0 at the top). Pixel ``(i, j)`` (row, column) has its
  centre at ``x = (j - (N-1)/2) * pixel_size_mm`` (right) and ``y = ((N-1)/2 - i) * pixel_size_mm`` (up).
* Gantry: view ``v`` has gantry angle ``beta_v = view_start_rad + v * view_span_rad / n_views``, measured from
  the top in the direction of rotation. ``rotation_direction`` says which way that is in the displayed image:
  the display angle is ``psi = rotation_direction * beta`` (counterclockwise, from the top) and the source sits
  at ``sid_mm * (-sin psi, cos psi)``. ``+1``: the source turns counterclockwise in the displayed image (top,
  then left); ``-1``: clockwise.
* Channels: channel ``k`` has fan angle ``gamma_k = (k - (C-1)/2 + channel_offset) * dalpha`` (curved
  detector, ``dalpha = 2 atan2(pitch/2, sdd)``) or ``atan2((k - (C-1)/2 + channel_offset) * pitch, sdd)``
  (flat detector at ``sdd_mm`` from the source); its ray leaves the source along
  ``(sin phi, -cos phi)`` with ``phi = psi + channel_direction * gamma_k``. So with the source at the top
  (``psi = 0``) the channel index grows towards ``+x`` (the displayed image's right) for
  ``channel_direction = +1`` and towards ``-x`` for ``-1``, whatever the rotation direction.
* Parallel beam: the same with the source at infinity: view ``v`` has rays along ``(sin psi, -cos psi)``, and
  channel ``k`` is offset by ``s_k = (k - (C-1)/2 + channel_offset) * pitch`` along
  ``channel_direction * (cos psi, sin psi)``.

The defaults (``rotation_direction = channel_direction = +1``, ``view_start_rad = 0``) are the conventions of
the AAPM CT-MAR release, i.e. of gecatsim (xcist/main; xcist/example ``AAPM_datachallenge/proj_and_recon``):

* ``AAPMRecon.py``: ``rotationDirection = 1`` ("clockwise seen from the table foot end" in gecatsim's words),
  ``startAngle = 0`` ("0 is with the X-ray source at the top"), ``Detector_ThirdgenCurved`` with
  ``detectorColOffset = -1.25``, ``reconType = 'fdk_equiAngle'``, ``kernelType = 'standard'``.
* ``Detector_ThirdgenCurved``: module ``m`` at ``alpha_m = (m - (n-1)/2) dalpha + atan(colOffset * colSize /
  sdd)``, at ``(sdd sin alpha, sid - sdd cos alpha)`` with the source at ``(0, sid)``: the channel index grows
  towards ``+x``. ``Gantry_Helical.helical_transform``: both turn by ``+rotationDirection * 2 pi t / T``
  (counterclockwise in gecatsim's ``(x, y)``). ``OneScan``: view ``v`` is centred at ``t = v T / V``.
* ``fdk_equiAngle`` (C ``fbp`` in ``interface_fdk_angle.c``), which made the release's images: source of view
  ``v`` at ``sid (cos t, sin t)``, ``t = (rotdir v + V/2) 2 pi / V`` (``mapConfigVariablesToFDK``: start view
  ``V/2`` for ``startAngle = 0``) in recon coordinates ``(x_r, y_r)`` where the saved image's row index grows
  with ``x_r`` and its column index with ``y_r``; channel ``atan(((p - s) x e) / dis) / dalpha + (C-1)/2 -
  colOffset``. In display coordinates (``x = y_r``, ``y = -x_r``) this is the source at ``(-sin psi, cos psi)``
  with ``psi = 2 pi v / V``: counterclockwise on the release's images, channel index growing to the right at
  view 0. (The release's own sample, ``out.prep`` and ``out_512x512x1.raw``, confirms it: see
  ``tests/physics/test_conventions.py``.) gecatsim's "clockwise seen from the foot end" is thus
  counterclockwise on the images as stored; the two descriptions differ only in the side one looks from.

The ``syndeeplesion`` preset follows ODL's ``FanBeamGeometry`` as InDuDoNet+ builds it (hongwang01/InDuDoNet_plus
``deeplesion/build_gemotry.py``): ODL's image axis 0 is its ``x`` (the stored array's rows), the source starts at
``-src_radius * (0, 1)`` and turns counterclockwise in ODL's ``(x, y)``, angles are the midpoints
``(v + 1/2) 2 pi / 640`` of ``uniform_partition(0, 2 pi, 640)``, and the detector axis starts along ODL's
``+x``. In display coordinates: counterclockwise, source on the left at ``psi = pi/2`` (plus half a view), the
channel index growing in the direction the source moves, i.e. ``channel_direction = -1``.

Sinograms are ``(V, C)``: views x detector channels, as the AAPM release stores them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Literal, Union

import numpy as np

from marbench.registry import Registry

__all__ = [
    "FILTER_NAMES",
    "PRESETS",
    "FanBeamGeometry",
    "Geometry",
    "ParallelBeamGeometry",
    "preset",
]


# FBP kernels (implemented in ``fbp.filter_sinogram``); named here so that a geometry can name its default one.
FILTER_NAMES = ("ram-lak", "shepp-logan", "hann", "soft", "standard", "bone")


def _check_positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{owner}: {name} must be a positive finite number, found {value!r}")


def _check_conventions(owner: str, geometry: "_GeometryBase") -> None:
    for name in ("rotation_direction", "channel_direction"):
        value = getattr(geometry, name)
        if value not in (1, -1) or isinstance(value, bool):
            raise ValueError(f"{owner}: {name} must be 1 or -1, found {value!r}")
    if geometry.default_filter not in FILTER_NAMES:
        raise ValueError(f"{owner}: default_filter must be one of {FILTER_NAMES}, found {geometry.default_filter!r}")


@dataclass(frozen=True)
class _GeometryBase:
    n_views: int
    n_channels: int
    image_size: int
    fov_mm: float
    channel_offset: float = 0.0
    view_start_rad: float = 0.0
    mu_water_per_mm: float = 0.02
    rotation_direction: int = 1
    channel_direction: int = 1
    default_filter: str = "ram-lak"

    @property
    def pixel_size_mm(self) -> float:
        """Side of a square pixel in mm."""
        return self.fov_mm / self.image_size

    @property
    def image_shape(self) -> tuple[int, int]:
        return (self.image_size, self.image_size)

    @property
    def sinogram_shape(self) -> tuple[int, int]:
        """``(n_views, n_channels)``."""
        return (self.n_views, self.n_channels)

    def view_angles(self) -> np.ndarray:
        """Gantry angles ``beta_v`` in radians (from the top, in the direction of rotation), ``(V,)`` float64."""
        return self.view_start_rad + np.arange(self.n_views) * (self.view_span_rad / self.n_views)

    def display_angles(self) -> np.ndarray:
        """Gantry angles ``psi_v = rotation_direction * beta_v`` in radians, counterclockwise from the top in the
        displayed image (x right, y up), ``(V,)`` float64."""
        return self.rotation_direction * self.view_angles()

    def channel_indices_centred(self) -> np.ndarray:
        """``k - (C-1)/2 + channel_offset`` for every channel, shape ``(C,)``, float64."""
        return np.arange(self.n_channels) - (self.n_channels - 1) / 2 + self.channel_offset

    def pixel_centres_mm(self) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` of pixel centres in mm, each ``(N, N)`` float64 (x right, y up)."""
        c = (self.image_size - 1) / 2
        idx = np.arange(self.image_size)
        x = (idx - c) * self.pixel_size_mm
        y = (c - idx) * self.pixel_size_mm
        return np.broadcast_to(x[None, :], self.image_shape), np.broadcast_to(y[:, None], self.image_shape)

    def quarter_turn_rot90(self) -> int:
        """``k`` such that view ``v + V/4`` is view ``v`` of the image turned by ``torch.rot90(image, k, dims=(-2,
        -1))`` (``k = 1``: a quarter turn counterclockwise as displayed): ``-rotation_direction`` when the views
        cover a full turn in a multiple of four, else 0 (no quarter-turn symmetry).

        >>> preset("aapm_body").quarter_turn_rot90()
        -1
        """
        if abs(self.view_span_rad - 2 * math.pi) < 1e-12 and self.n_views % 4 == 0:
            return -self.rotation_direction
        return 0

    def has_quarter_turn_symmetry(self) -> bool:
        """True when view ``v + V/4`` is view ``v`` on the image turned by ``torch.rot90(image,
        quarter_turn_rot90())`` (either rotation sense: ``quarter_turn_rot90() != 0``): the sparse backend's
        ``QuarterTurnOperator`` then stores only V/4 views.

        >>> preset("aapm_body").has_quarter_turn_symmetry()
        True
        """
        return self.quarter_turn_rot90() != 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["kind"] = type(self).__name__
        return d

    @property
    def hash(self) -> str:
        """Stable sha256 (first 16 hex digits) of every field; keys on-disk caches and result manifests."""
        text = json.dumps(self.to_dict(), sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class FanBeamGeometry(_GeometryBase):
    """2D fan-beam CT geometry (see the module docstring for the conventions).

    Attributes:
        sid_mm: source-to-isocentre distance, mm.
        sdd_mm: source-to-detector distance, mm.
        channel_pitch_mm: detector channel pitch at the detector, mm.
        detector: ``"curved"`` (equi-angular, third-generation) or ``"flat"`` (equi-spaced).
        n_views, n_channels: sinogram size ``(V, C)``.
        image_size: reconstruction grid ``N`` (square, ``N x N`` pixels) over ``fov_mm``.
        channel_offset: detector shift in channels (AAPM: -1.25, a quarter-offset detector).
        view_start_rad: gantry angle of view 0 (0: source at the top); views cover ``view_span_rad`` (full
            rotation for FBP).
        mu_water_per_mm: attenuation of water used to convert HU to mm^-1 for this scanner's data.
        rotation_direction: ``+1`` the source turns counterclockwise in the displayed image (gecatsim
            ``rotationDirection = 1``, the AAPM release), ``-1`` clockwise.
        channel_direction: ``+1`` the channel index grows towards ``+x`` when the source is at the top
            (gecatsim), ``-1`` towards ``-x``.
        default_filter: FBP kernel ``Projector.fbp`` uses when given none (one of ``FILTER_NAMES``; AAPM:
            ``"standard"``, the release's ``kernelType``).

    Raises:
        ValueError: a non-positive distance or size, a source inside the field of view, an unknown detector,
            a direction other than +-1, an unknown default filter.
    """

    sid_mm: float = 550.0
    sdd_mm: float = 950.0
    channel_pitch_mm: float = 1.0
    detector: Literal["curved", "flat"] = "curved"
    view_span_rad: float = 2 * math.pi

    def __post_init__(self) -> None:
        _check_positive(
            "FanBeamGeometry", sid_mm=self.sid_mm, sdd_mm=self.sdd_mm, channel_pitch_mm=self.channel_pitch_mm,
            fov_mm=self.fov_mm, n_views=self.n_views, n_channels=self.n_channels, image_size=self.image_size,
            view_span_rad=self.view_span_rad, mu_water_per_mm=self.mu_water_per_mm,
        )
        _check_conventions("FanBeamGeometry", self)
        if self.detector not in ("curved", "flat"):
            raise ValueError(f"FanBeamGeometry: detector must be 'curved' or 'flat', found {self.detector!r}")
        if self.sdd_mm <= self.sid_mm:
            raise ValueError(f"FanBeamGeometry: sdd_mm ({self.sdd_mm}) must exceed sid_mm ({self.sid_mm})")
        if self.sid_mm <= self.fov_mm / math.sqrt(2):
            raise ValueError(
                f"FanBeamGeometry: the source (sid_mm={self.sid_mm}) must lie outside the image square "
                f"(half diagonal {self.fov_mm / math.sqrt(2):.1f} mm)"
            )

    @property
    def dalpha_rad(self) -> float:
        """Angular pitch of the curved detector, ``2 atan2(pitch/2, sdd)`` (XCIST)."""
        return 2 * math.atan2(self.channel_pitch_mm / 2, self.sdd_mm)

    def fan_angles(self) -> np.ndarray:
        """Fan angle ``gamma_k`` of each channel's centre in radians, shape ``(C,)``, float64."""
        k = self.channel_indices_centred()
        if self.detector == "curved":
            return k * self.dalpha_rad
        return np.arctan2(k * self.channel_pitch_mm, self.sdd_mm)

    def source_positions(self) -> np.ndarray:
        """Source position of each view, ``sid_mm * (-sin psi, cos psi)``, ``(V, 2)`` float64 in mm."""
        psi = self.display_angles()
        return self.sid_mm * np.stack([-np.sin(psi), np.cos(psi)], axis=-1)

    def rays(self) -> tuple[np.ndarray, np.ndarray]:
        """Source positions ``(V, 1, 2)`` and unit ray directions ``(V, C, 2)`` in mm, float64.

        >>> src, direction = preset("aapm_body").rays()
        >>> src[0, 0].round(6).tolist(), bool(direction[0, -1, 0] > 0)  # source at the top; last channel: right
        ([-0.0, 550.0], True)
        """
        src = self.source_positions()[:, None, :]
        phi = self.display_angles()[:, None] + self.channel_direction * self.fan_angles()[None, :]
        direction = np.stack([np.sin(phi), -np.cos(phi)], axis=-1)
        return src, direction


@dataclass(frozen=True)
class ParallelBeamGeometry(_GeometryBase):
    """2D parallel-beam geometry; ``channel_pitch_mm`` is the ray spacing in mm, views cover ``view_span_rad``;
    the other fields as ``FanBeamGeometry`` (rays along the fan's central ray, channels on the side a positive fan
    angle points to).

    Raises:
        ValueError: a non-positive size or pitch, a direction other than +-1, an unknown default filter.
    """

    channel_pitch_mm: float = 1.0
    view_span_rad: float = math.pi

    def __post_init__(self) -> None:
        _check_positive(
            "ParallelBeamGeometry", channel_pitch_mm=self.channel_pitch_mm, fov_mm=self.fov_mm,
            n_views=self.n_views, n_channels=self.n_channels, image_size=self.image_size,
            view_span_rad=self.view_span_rad, mu_water_per_mm=self.mu_water_per_mm,
        )
        _check_conventions("ParallelBeamGeometry", self)

    def rays(self) -> tuple[np.ndarray, np.ndarray]:
        """Ray start points ``(V, C, 2)`` (outside the image) and unit directions ``(V, 1, 2)``, mm, float64."""
        psi = self.display_angles()[:, None]
        direction = np.stack([np.sin(psi), -np.cos(psi)], axis=-1)
        lateral = self.channel_direction * np.stack([np.cos(psi), np.sin(psi)], axis=-1)
        s = (self.channel_indices_centred() * self.channel_pitch_mm)[None, :, None]
        start = s * lateral - self.fov_mm * direction
        return start, direction


Geometry = Union[FanBeamGeometry, ParallelBeamGeometry]

# AAPM CT-MAR: gecatsim's conventions (see the module docstring) and its recon kernel.
_AAPM = dict(sid_mm=550.0, sdd_mm=950.0, channel_offset=-1.25, detector="curved", mu_water_per_mm=0.02,
             rotation_direction=1, channel_direction=1, view_start_rad=0.0, default_filter="standard")
# SynDeepLesion (hongwang01/InDuDoNet_plus deeplesion/build_gemotry.py): ODL units taken as cm, here in mm.
_SDL_RESO_MM = 512 / 416 * 0.03 * 10
_SDL_RADIUS_MM = 1075 * _SDL_RESO_MM
_SDL_DET_WIDTH_MM = 2 * math.sqrt(2) * 416 * _SDL_RESO_MM
_SDL_VIEWS = 640
# ODL: counterclockwise, source on the left (ODL -y, the stored array's column 0 side) at the first angle, which is
# the midpoint (0 + 1/2) 2 pi / 640 of uniform_partition(0, 2 pi, 640); detector axis along ODL +x (down).
_SDL_CONVENTIONS = dict(rotation_direction=1, channel_direction=-1,
                        view_start_rad=math.pi / 2 + math.pi / _SDL_VIEWS)

_PRESET_TABLE: dict[str, Geometry] = {
    # AAPM CT-MAR (xcist/example AAPM_datachallenge: AAPMRecon.py, AAPM_MAR_scanner.cfg)
    "aapm_body": FanBeamGeometry(n_views=1000, n_channels=900, image_size=512, fov_mm=400.0,
                                 channel_pitch_mm=1.0, **_AAPM),
    "aapm_head": FanBeamGeometry(n_views=1000, n_channels=900, image_size=512, fov_mm=220.16,
                                 channel_pitch_mm=1.0, **_AAPM),
    # Reduced CPU presets: same source, detector arc and FOV, half (or quarter) the sampling in every
    # dimension; the quarter offset keeps its physical angle (-1.25 original channels).
    "aapm_body_256": FanBeamGeometry(n_views=500, n_channels=450, image_size=256, fov_mm=400.0,
                                     channel_pitch_mm=2.0, **{**_AAPM, "channel_offset": -0.625}),
    "aapm_head_256": FanBeamGeometry(n_views=500, n_channels=450, image_size=256, fov_mm=220.16,
                                     channel_pitch_mm=2.0, **{**_AAPM, "channel_offset": -0.625}),
    "aapm_body_128": FanBeamGeometry(n_views=248, n_channels=225, image_size=128, fov_mm=400.0,
                                     channel_pitch_mm=4.0, **{**_AAPM, "channel_offset": -0.3125}),
    "aapm_head_128": FanBeamGeometry(n_views=248, n_channels=225, image_size=128, fov_mm=220.16,
                                     channel_pitch_mm=4.0, **{**_AAPM, "channel_offset": -0.3125}),
    # SynDeepLesion: ODL FanBeamGeometry, flat detector, 641 bins over 2*sqrt(2)*416*reso at 2x magnification
    "syndeeplesion": FanBeamGeometry(n_views=_SDL_VIEWS, n_channels=641, image_size=416,
                                     fov_mm=416 * _SDL_RESO_MM, sid_mm=_SDL_RADIUS_MM, sdd_mm=2 * _SDL_RADIUS_MM,
                                     channel_pitch_mm=_SDL_DET_WIDTH_MM / 641, detector="flat",
                                     mu_water_per_mm=0.0192, **_SDL_CONVENTIONS),
}


# One registry type for every named thing of the suite (marbench.registry); a user registers a scanner with
# ``PRESETS.register("my_scanner", FanBeamGeometry(...))`` and names it in a dataset's manifest.
PRESETS: Registry[Geometry] = Registry("geometry preset", base=_GeometryBase)
for _name, _geometry in _PRESET_TABLE.items():
    PRESETS.register(_name, _geometry)


def preset(name: str) -> Geometry:
    """Return the named geometry preset.

    Raises:
        KeyError: unknown name; the message lists the known presets.

    >>> preset("aapm_body").sinogram_shape
    (1000, 900)
    """
    return PRESETS.get(name)
