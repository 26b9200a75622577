"""CT physics core (``marbench.physics``): geometry, projectors, FBP, polychromatic simulation, LI and NMAR."""
from .ctphysics import CTPhysics, geometry_from_key, geometry_key
from .geometry import PRESETS, FanBeamGeometry, Geometry, ParallelBeamGeometry, preset
from .inpainting import li_correction, linear_interpolation, metal_trace, nmar_correction, nmar_prior
from .projector import BACKENDS, Projector
from .simulation import SimulatedScan, SimulationConfig, simulate_scan
from .units import hu_to_mu, mu_to_hu

__all__ = [
    "BACKENDS",
    "CTPhysics",
    "PRESETS",
    "FanBeamGeometry",
    "Geometry",
    "geometry_from_key",
    "geometry_key",
    "ParallelBeamGeometry",
    "Projector",
    "SimulatedScan",
    "SimulationConfig",
    "hu_to_mu",
    "li_correction",
    "linear_interpolation",
    "metal_trace",
    "mu_to_hu",
    "nmar_correction",
    "nmar_prior",
    "preset",
    "simulate_scan",
]
