"""Scanner geometries: 2D fan-beam (equi-angular curved or flat detector) and parallel-beam.

Coordinate conventions, shared by every projector backend and by the reconstruction:

* Image: a square ``image_size x image_size`` pixel grid of side ``fov_mm`` centred on the isocentre.
  Pixel ``(i, j)`` (row, column) has its centre at ``x = (j - (N-1)/2) * pixel_size_mm`` (right) and
  ``y = ((N-1)/2 - i) * pixel_size_mm`` (up), i.e. row 0 is the top of the displayed image.
* Fan beam: view ``v`` has gantry angle ``beta_v = view_start_rad + v * view_span_rad / n_views``. The source
  sits at ``sid_mm * (sin beta, cos beta)``: at the top of the image for ``beta = 0`` and moving clockwise as
  seen in the displayed image, as in the AAPM CT-MAR simulation (XCIST ``startAngle = 0`` "with the X-ray
  source at the top", ``rotationDirection = 1``, clockwise seen from the table foot end).
  Channel ``k`` has fan angle ``gamma_k`` from the central ray, positive in the direction the gantry turns
  (ray direction angle ``phi = beta + gamma``, direction ``(-sin phi, -cos phi)``); for the curved
  detector ``gamma_k = (k - (C-1)/2 + channel_offset) * dalpha`` with ``dalpha = 2 atan2(pitch/2, sdd)``
  (XCIST ``Detector_ThirdgenCurved``, ``detectorColOffset``), for the flat detector the channel centre is
  ``u_k = (k - (C-1)/2 + channel_offset) * pitch`` on a line at distance ``sdd_mm`` from the source.
* Parallel beam: view angle ``theta_v``; rays travel along ``(-sin theta, -cos theta)`` (the fan geometry's
  central ray) and channel ``k`` is offset by ``s_k = (k - (C-1)/2 + channel_offset) * pitch`` along
  ``(-cos theta, sin theta)`` (the side a positive fan angle points to).

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
    "PRESETS",
    "FanBeamGeometry",
    "Geometry",
    "ParallelBeamGeometry",
    "preset",
]


def _check_positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{owner}: {name} must be a positive finite number, found {value!r}")


@dataclass(frozen=True)
class _GeometryBase:
    n_views: int
    n_channels: int
    image_size: int
    fov_mm: float
    channel_offset: float = 0.0
    view_start_rad: float = 0.0
    mu_water_per_mm: float = 0.02

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
        """Gantry angles ``beta_v`` in radians, shape ``(V,)``, float64."""
        return self.view_start_rad + np.arange(self.n_views) * (self.view_span_rad / self.n_views)

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

    def has_quarter_turn_symmetry(self) -> bool:
        """True when view ``v + V/4`` is view ``v`` rotated by 90 degrees (lets the system matrix store V/4 views)."""
        return abs(self.view_span_rad - 2 * math.pi) < 1e-12 and self.n_views % 4 == 0

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
        view_start_rad: angle of view 0; views cover ``view_span_rad`` (full rotation for FBP).
        mu_water_per_mm: attenuation of water used to convert HU to mm^-1 for this scanner's data.

    Raises:
        ValueError: a non-positive distance or size, a source inside the field of view, an unknown detector.
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

    def rays(self) -> tuple[np.ndarray, np.ndarray]:
        """Source positions ``(V, 1, 2)`` and unit ray directions ``(V, C, 2)`` in mm, float64."""
        beta = self.view_angles()[:, None]
        src = self.sid_mm * np.stack([np.sin(beta), np.cos(beta)], axis=-1)
        gamma = self.fan_angles()[None, :]
        phi = beta + gamma
        direction = np.stack([-np.sin(phi), -np.cos(phi)], axis=-1)
        return src, direction


@dataclass(frozen=True)
class ParallelBeamGeometry(_GeometryBase):
    """2D parallel-beam geometry; ``channel_pitch_mm`` is the ray spacing in mm, views cover ``view_span_rad``.

    Raises:
        ValueError: a non-positive size or pitch.
    """

    channel_pitch_mm: float = 1.0
    view_span_rad: float = math.pi

    def __post_init__(self) -> None:
        _check_positive(
            "ParallelBeamGeometry", channel_pitch_mm=self.channel_pitch_mm, fov_mm=self.fov_mm,
            n_views=self.n_views, n_channels=self.n_channels, image_size=self.image_size,
            view_span_rad=self.view_span_rad, mu_water_per_mm=self.mu_water_per_mm,
        )

    def rays(self) -> tuple[np.ndarray, np.ndarray]:
        """Ray start points ``(V, C, 2)`` (outside the image) and unit directions ``(V, 1, 2)``, mm, float64."""
        theta = self.view_angles()[:, None]
        direction = np.stack([-np.sin(theta), -np.cos(theta)], axis=-1)
        lateral = np.stack([-np.cos(theta), np.sin(theta)], axis=-1)
        s = (self.channel_indices_centred() * self.channel_pitch_mm)[None, :, None]
        start = s * lateral - self.fov_mm * direction
        return start, direction


Geometry = Union[FanBeamGeometry, ParallelBeamGeometry]

_AAPM = dict(sid_mm=550.0, sdd_mm=950.0, channel_offset=-1.25, detector="curved", mu_water_per_mm=0.02)
# SynDeepLesion (hongwang01/InDuDoNet_plus deeplesion/build_gemotry.py): ODL units taken as cm, here in mm.
_SDL_RESO_MM = 512 / 416 * 0.03 * 10
_SDL_RADIUS_MM = 1075 * _SDL_RESO_MM
_SDL_DET_WIDTH_MM = 2 * math.sqrt(2) * 416 * _SDL_RESO_MM

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
    "syndeeplesion": FanBeamGeometry(n_views=640, n_channels=641, image_size=416, fov_mm=416 * _SDL_RESO_MM,
                                     sid_mm=_SDL_RADIUS_MM, sdd_mm=2 * _SDL_RADIUS_MM,
                                     channel_pitch_mm=_SDL_DET_WIDTH_MM / 641, detector="flat",
                                     mu_water_per_mm=0.0192),
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
