"""ASTRA Toolbox (van Aarle et al., Opt. Express 2016) as an independent reference projector.

Used only by tests and ``make perf``: ASTRA's CPU ``line_fanflat`` (flat-detector fan beam) and ``line``
(parallel beam) projectors, set up with explicit ``fanflat_vec`` / ``parallel_vec`` vectors built from the
suite's own ray geometry so both codes integrate along the same rays. Curved detectors have no ASTRA CPU
projector and are refused.
"""
from __future__ import annotations

import numpy as np

from .geometry import FanBeamGeometry, Geometry

__all__ = ["AstraProjector"]


class AstraProjector:
    """``fp``/``bp`` of single ``(N, N)`` / ``(V, C)`` float32 numpy arrays with ASTRA's CPU projectors.

    Raises:
        ImportError: ``astra-toolbox`` is not installed (``pip install marbench[reference]``).
        ValueError: a curved-detector fan-beam geometry.
    """

    def __init__(self, geometry: Geometry):
        import astra

        if isinstance(geometry, FanBeamGeometry) and geometry.detector != "flat":
            raise ValueError("ASTRA's CPU fan-beam projector needs a flat detector; found detector='curved'")
        self.astra = astra
        self.geometry = g = geometry
        half = g.fov_mm / 2
        # ASTRA's volume row 0 is at max y, as the suite's (checked by tests against our projector)
        self.vol_geom = astra.create_vol_geom(g.image_size, g.image_size, -half, half, -half, half)
        # the suite's conventions (geometry module docstring, as ``Geometry.rays``): display angle psi, source at
        # sid (-sin psi, cos psi), central ray along (sin psi, -cos psi), channel k at (k - (C-1)/2 + offset) pitch
        # along channel_direction (cos psi, sin psi)
        psi = g.display_angles()
        lateral_step = g.channel_direction * np.stack([np.cos(psi), np.sin(psi)], axis=1) * g.channel_pitch_mm
        if isinstance(g, FanBeamGeometry):
            src = g.source_positions()
            centre = src * (1 - g.sdd_mm / g.sid_mm) + g.channel_offset * lateral_step
            vectors = np.concatenate([src, centre, lateral_step], axis=1)
            self.proj_geom = astra.create_proj_geom("fanflat_vec", g.n_channels, vectors)
            kind = "line_fanflat"
        else:
            ray = np.stack([np.sin(psi), -np.cos(psi)], axis=1)
            centre = g.channel_offset * lateral_step
            vectors = np.concatenate([ray, centre, lateral_step], axis=1)
            self.proj_geom = astra.create_proj_geom("parallel_vec", g.n_channels, vectors)
            kind = "line"
        self.projector_id = astra.create_projector(kind, self.proj_geom, self.vol_geom)

    def fp(self, image: np.ndarray) -> np.ndarray:
        """Line integrals ``(V, C)`` of an attenuation image ``(N, N)`` in mm^-1."""
        sino_id, sino = self.astra.create_sino(np.ascontiguousarray(image, dtype=np.float32), self.projector_id)
        self.astra.data2d.delete(sino_id)
        return sino

    def bp(self, sinogram: np.ndarray) -> np.ndarray:
        """ASTRA's backprojection ``(N, N)`` of a ``(V, C)`` sinogram."""
        bp_id, image = self.astra.create_backprojection(np.ascontiguousarray(sinogram, dtype=np.float32),
                                                        self.projector_id)
        self.astra.data2d.delete(bp_id)
        return image

    def __del__(self):
        try:
            self.astra.projector.delete(self.projector_id)
        except Exception:
            pass
