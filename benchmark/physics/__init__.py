"""CT physics core (``marbench.physics``): geometry, projectors, FBP, polychromatic simulation, LI and NMAR."""
from .geometry import PRESETS, FanBeamGeometry, Geometry, ParallelBeamGeometry, preset
from .inpainting import li_correction, linear_interpolation, metal_trace, nmar_correction, nmar_prior
from .projector import BACKENDS, Projector
from .simulation import SimulatedScan, SimulationConfig, simulate_scan
from .units import hu_to_mu, mu_to_hu

__all__ = [
    "BACKENDS",
    "PRESETS",
    "FanBeamGeometry",
    "Geometry",
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
