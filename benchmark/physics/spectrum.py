"""X-ray spectrum (spekpy) and material attenuation (xraydb) for the polychromatic simulation.

The tube spectrum is spekpy's tungsten model (Poludniowski et al., Phys. Med. Biol. 2021) at 120 kVp with a
7 degree target angle (AAPM CT-MAR: ``cfg.scanner.targetAngle = 7.0``) and added aluminium filtration.
Mass attenuation coefficients (total, with coherent scattering) are xraydb's (Elam, Ravel & Sieber tables).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

__all__ = ["MATERIALS", "Material", "Spectrum", "effective_energy_kev", "tube_spectrum"]


@dataclass(frozen=True)
class Material:
    """A material by mass fractions of elements and a density in g/cm^3."""

    name: str
    mass_fractions: tuple[tuple[str, float], ...]
    density_g_cm3: float

    def mass_attenuation_cm2_g(self, energy_kev: np.ndarray) -> np.ndarray:
        """Mass attenuation coefficient ``mu/rho`` in cm^2/g at each energy (keV), float64."""
        return _mass_attenuation(self.mass_fractions, tuple(np.asarray(energy_kev, dtype=float).tolist()))

    def mu_per_mm(self, energy_kev: np.ndarray) -> np.ndarray:
        """Linear attenuation in mm^-1 at the material's nominal density."""
        return self.mass_attenuation_cm2_g(energy_kev) * self.density_g_cm3 / 10.0


@functools.cache
def _mass_attenuation(fractions: tuple[tuple[str, float], ...], energies: tuple[float, ...]) -> np.ndarray:
    import xraydb

    e_ev = np.asarray(energies) * 1000.0
    total = sum(w for _, w in fractions)
    return sum((w / total) * xraydb.mu_elam(el, e_ev) for el, w in fractions)


MATERIALS: dict[str, Material] = {m.name: m for m in (
    Material("water", (("H", 0.111894), ("O", 0.888106)), 1.0),
    # ICRU Report 44 cortical bone
    Material("cortical_bone", (("H", 0.034), ("C", 0.155), ("N", 0.042), ("O", 0.435), ("Na", 0.001),
                               ("Mg", 0.002), ("P", 0.103), ("S", 0.003), ("Ca", 0.225)), 1.92),
    Material("titanium", (("Ti", 1.0),), 4.506),
    # AISI 316L
    Material("stainless_steel", (("Fe", 0.655), ("Cr", 0.17), ("Ni", 0.12), ("Mo", 0.025), ("Mn", 0.02),
                                 ("Si", 0.01)), 8.0),
    # ASTM F75 cast Co-Cr-Mo
    Material("cobalt_chrome", (("Co", 0.645), ("Cr", 0.285), ("Mo", 0.06), ("Ni", 0.005), ("Fe", 0.005)), 8.3),
    Material("copper", (("Cu", 1.0),), 8.96),
    # high-copper dental amalgam
    Material("amalgam", (("Hg", 0.50), ("Ag", 0.35), ("Sn", 0.13), ("Cu", 0.02)), 11.6),
)}


@dataclass(frozen=True)
class Spectrum:
    """Discrete tube spectrum: bin centres ``energies_kev`` (E,) and photon fractions ``weights`` (E,), sum 1."""

    energies_kev: np.ndarray
    weights: np.ndarray

    @property
    def energy_weights(self) -> np.ndarray:
        """Energy-integrating detector weights ``E s(E) / sum E s(E)`` (E,)."""
        w = self.energies_kev * self.weights
        return w / w.sum()

    @property
    def mean_energy_kev(self) -> float:
        return float((self.energies_kev * self.weights).sum())


@functools.lru_cache(maxsize=8)
def tube_spectrum(kvp: float = 120.0, target_angle_deg: float = 7.0, aluminium_mm: float = 3.0,
                  bin_kev: float = 2.0) -> Spectrum:
    """spekpy spectrum rebinned to ``bin_kev`` keV; bins below 15 keV (fully absorbed by any patient) dropped.

    Raises:
        ValueError: a non-positive kVp or bin width.
    """
    import spekpy

    if kvp <= 0 or bin_kev <= 0:
        raise ValueError(f"tube_spectrum: kvp and bin_kev must be positive, found {kvp}, {bin_kev}")
    spek = spekpy.Spek(kvp=kvp, th=target_angle_deg, dk=0.5)
    spek.filter("Al", aluminium_mm)
    k, phi = spek.get_spectrum()
    edges = np.arange(15.0, kvp + bin_kev, bin_kev)
    counts, _ = np.histogram(k, bins=edges, weights=phi)
    centres = 0.5 * (edges[:-1] + edges[1:])
    keep = counts > 0
    return Spectrum(centres[keep], counts[keep] / counts[keep].sum())


def effective_energy_kev(mu_water_per_mm: float) -> float:
    """Energy (keV) at which water attenuates ``mu_water_per_mm``: the monochromatic energy the HU scale of a
    dataset's ``mu_water`` convention corresponds to (0.02 mm^-1 -> about 65 keV)."""
    energies = np.arange(20.0, 150.0, 0.05)
    mu = MATERIALS["water"].mu_per_mm(energies)
    return float(np.interp(-mu_water_per_mm, -mu, energies))
