"""Polychromatic, energy-integrating simulation of metal-affected and metal-free CT scans.

The chain, applied alike to the metal-free target (no metal) and the metal-affected scan:

1. HU image -> attenuation ``mu_ref`` at the dataset's reference (``mu_water`` convention, e.g. 0.02 mm^-1),
   split into water- and bone-equivalent parts by a soft HU threshold (the CNNMAR / SynDeepLesion protocol:
   Zhang & Yu, IEEE TMI 2018, bone fraction rising linearly from ``water_threshold_hu`` to
   ``bone_threshold_hu``), each converted to a density with the material's ``mu/rho`` at the reference energy.
2. Metal inserted from masks: the tissue under the metal is replaced by the metal at its nominal density.
3. Density line integrals by the projector (g/cm^3 * mm), energy-resolved line integrals from xraydb
   ``mu/rho``, the energy-integrating expected signal ``sum_E E s(E) exp(-p_E)`` over the spekpy spectrum.
4. Noise, the same random stream for both scans (without metal they are identical): Poisson photon counts
   (incident ``photons_per_ray``) times the mean detected energy, plus Gaussian electronic noise (std in
   photon equivalents; AAPM: "on the order of 2.5 X-rays"). Photon starvation is explicit: readings
   below ``starvation_floor_photons`` are set to that floor and counted, never log(0).
5. ``-log(I / I_air)``, then the water beam-hardening correction: a polynomial of order 5 fitted on water path
   lengths 0-300 mm that maps the polychromatic water line integral to ``mu_water * L`` (AAPM release:
   ``BHC_poly_order = 5``, ``BHC_max_length_mm = 300``, ``EffectiveMu = 0.2`` /cm).
6. FBP (with ``SimulationConfig.filter_name``, by default the geometry's ``default_filter``: XCIST's ``standard``
   kernel for the AAPM presets, as the release) and conversion back to HU.

Departures from the AAPM/XCIST simulation: no bowtie, scatter, detector crosstalk, focal-spot or view
blurring; the detector's Swank factor is ignored (Poisson statistics on photon counts).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .fbp import resolve_filter
from .projector import Projector
from .spectrum import MATERIALS, Spectrum, effective_energy_kev, tube_spectrum
from .units import hu_to_mu, mu_to_hu
from .validation import check_image, check_mask

__all__ = ["SimulatedScan", "SimulationConfig", "apply_polynomial", "simulate_scan", "water_bhc_coefficients"]


@dataclass(frozen=True)
class SimulationConfig:
    """Parameters of the polychromatic chain (defaults: AAPM CT-MAR-like 120 kVp body scan)."""

    kvp: float = 120.0
    target_angle_deg: float = 7.0
    aluminium_mm: float = 3.0
    bin_kev: float = 8.0  # ~13 energies; the AAPM simulation sampled its spectrum at 12
    photons_per_ray: float = 2.0e5
    electronic_noise_photons: float = 2.5
    starvation_floor_photons: float = 1.0
    water_threshold_hu: float = 100.0
    bone_threshold_hu: float = 1500.0
    bhc_order: int = 5
    bhc_max_length_mm: float = 300.0
    noise: bool = True
    filter_name: str | None = None  # FBP kernel; None: the geometry's default_filter (AAPM presets: "standard")

    def spectrum(self) -> Spectrum:
        return tube_spectrum(self.kvp, self.target_angle_deg, self.aluminium_mm, self.bin_kev)


@dataclass
class SimulatedScan:
    """Output of ``simulate_scan``; images ``(B, 1, N, N)`` in HU, sinograms ``(B, 1, V, C)`` post-log, BHC'd."""

    gt_sinogram: torch.Tensor
    ma_sinogram: torch.Tensor
    gt_image: torch.Tensor
    ma_image: torch.Tensor
    metal_mask: torch.Tensor
    metal_trace: torch.Tensor
    starved_rays: torch.Tensor  # (B,) number of photon-starved readings in the metal scan


def water_bhc_coefficients(spectrum: Spectrum, mu_water_per_mm: float, order: int = 5,
                           max_length_mm: float = 300.0) -> np.ndarray:
    """Polynomial (highest power first, ``np.polyval`` order) mapping polychromatic water line integrals to
    ``mu_water_per_mm * L`` for water lengths ``L`` in ``[0, max_length_mm]`` (1 mm steps)."""
    length = np.arange(0.0, max_length_mm + 1.0, 1.0)
    mu = MATERIALS["water"].mu_per_mm(spectrum.energies_kev)
    poly = -np.log(np.exp(-np.outer(length, mu)) @ spectrum.energy_weights)
    return np.polyfit(poly, mu_water_per_mm * length, order)


def apply_polynomial(coefficients: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """Horner evaluation of ``np.polyval``-ordered coefficients on a tensor."""
    out = torch.zeros_like(x)
    for c in coefficients:
        out = out * x + float(c)
    return out


def _tissue_densities(hu: torch.Tensor, mu_water: float, cfg: SimulationConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Water- and bone-equivalent densities (g/cm^3), each ``(B, 1, N, N)``."""
    e_ref = np.array([effective_energy_kev(mu_water)])
    mu = hu_to_mu(hu, mu_water).clamp(min=0.0)  # below -1000 HU is noise in the source image, not matter
    bone = ((hu - cfg.water_threshold_hu) / (cfg.bone_threshold_hu - cfg.water_threshold_hu)).clamp(0.0, 1.0)
    water_mu_mass = float(MATERIALS["water"].mass_attenuation_cm2_g(e_ref)[0]) / 10.0
    bone_mu_mass = float(MATERIALS["cortical_bone"].mass_attenuation_cm2_g(e_ref)[0]) / 10.0
    return mu * (1 - bone) / water_mu_mass, mu * bone / bone_mu_mass


def _detect(proj: torch.Tensor, materials: list[str], cfg: SimulationConfig,
            seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-log line integrals ``(B, 1, V, C)`` (before BHC) and the count of starved readings ``(B,)`` from the
    density line integrals ``proj`` ``(M, B, V, C)`` (g/cm^3 * mm) of each material."""
    spec = cfg.spectrum()
    b = proj.shape[1]
    mass = torch.as_tensor(np.stack([MATERIALS[m].mass_attenuation_cm2_g(spec.energies_kev) / 10.0
                                     for m in materials]), dtype=proj.dtype)  # (M, E), mm^-1 per g/cm^3
    energy_line = torch.einsum("mbvc,me->bvce", proj, mass)
    transmission = torch.exp(-energy_line)
    photon_w = torch.as_tensor(spec.weights, dtype=proj.dtype)
    energy_w = torch.as_tensor(spec.energy_weights, dtype=proj.dtype)
    signal = transmission @ energy_w  # energy-integrating, relative to the air scan
    starved = torch.zeros(b, dtype=torch.long)
    if cfg.noise:
        counts_mean = cfg.photons_per_ray * (transmission @ photon_w)
        mean_energy = signal / (transmission @ photon_w).clamp(min=1e-30)  # relative to the air scan's
        counts, electronic = torch.empty_like(counts_mean), torch.empty_like(counts_mean)
        for i, seed in enumerate(seeds):  # one stream per slice: its bytes do not depend on the batch
            gen = torch.Generator().manual_seed(int(seed))
            counts[i] = torch.poisson(counts_mean[i], generator=gen)
            electronic[i] = torch.randn(counts_mean[i].shape, generator=gen, dtype=counts_mean.dtype)
        photons = counts * mean_energy + electronic * cfg.electronic_noise_photons
        floor = cfg.starvation_floor_photons
        starved_mask = photons < floor
        starved = starved_mask.reshape(b, -1).sum(1)
        signal = torch.where(starved_mask, torch.full_like(photons, floor), photons) / cfg.photons_per_ray
    return (-torch.log(signal)).unsqueeze(1), starved


def simulate_scan(projector: Projector, hu_image: torch.Tensor, metal_masks: Mapping[str, torch.Tensor],
                  config: SimulationConfig = SimulationConfig(), seed: int | Sequence[int] = 0) -> SimulatedScan:
    """Simulate the metal-free and the metal-affected scan of HU images with metal objects.

    Args:
        projector: projector on the scanner geometry (its ``mu_water_per_mm`` defines HU).
        hu_image: ``(B, 1, N, N)`` metal-free anatomy in HU.
        metal_masks: material name (a key of ``spectrum.MATERIALS``) -> bool ``(B, 1, N, N)`` mask; may be
            empty (then both scans differ only by noise).
        config: spectrum, noise and correction parameters.
        seed: seeds the noise, one per slice (an int seeds slice ``i`` with ``seed + i``); the same inputs and
            seeds give the same bytes, in any batch.
    Returns:
        ``SimulatedScan`` with HU images, post-log BHC'd sinograms, metal mask and trace.
    Raises:
        ValueError: bad image or mask (shape, dtype, NaN), unknown material.
    """
    g = projector.geometry
    check_image(hu_image, g.image_shape, "hu_image")
    for name, mask in metal_masks.items():
        if name not in MATERIALS:
            raise ValueError(f"metal_masks: unknown material {name!r}; expected one of {sorted(MATERIALS)}")
        check_mask(mask, g.image_shape, f"metal_masks[{name!r}]", "image")
        if mask.shape[0] != hu_image.shape[0]:
            raise ValueError(f"metal_masks[{name!r}]: expected batch {hu_image.shape[0]}, found {mask.shape[0]}")
    hu = hu_image.to(torch.float32)
    metal = torch.zeros_like(hu, dtype=torch.bool)
    for mask in metal_masks.values():
        metal = metal | mask
    water, bone = _tissue_densities(hu, g.mu_water_per_mm, config)
    b = hu.shape[0]
    seeds = [seed + i for i in range(b)] if isinstance(seed, int) else list(seed)
    if len(seeds) != b:
        raise ValueError(f"seed: expected {b} per-slice seeds, found {len(seeds)}")
    shape = (b, *g.sinogram_shape)
    tissue = projector.fp(torch.cat([water, bone])).reshape(2, *shape)
    # the metal scan differs only on the metal's pixels: by linearity fp(tissue outside metal) is
    # fp(tissue) - fp(tissue under metal), and everything under the metal has a small support
    metal_f = metal.to(hu.dtype)
    metal_names = list(metal_masks)
    small = [water * metal_f, bone * metal_f,
             *[metal_masks[m].to(hu.dtype) * MATERIALS[m].density_g_cm3 for m in metal_names]]
    under = projector.fp_small_support(torch.cat(small)).reshape(len(small), *shape)
    ma_proj = torch.cat([(tissue - under[:2]).clamp(min=0.0), under[2:]])  # clamp: float rounding only
    # common random numbers: both scans draw the same noise, so they differ only by what the metal does
    gt_line, _ = _detect(tissue, ["water", "cortical_bone"], config, seeds)
    ma_line, starved = _detect(ma_proj, ["water", "cortical_bone", *metal_names], config, seeds)
    coeffs = water_bhc_coefficients(config.spectrum(), g.mu_water_per_mm, config.bhc_order,
                                    config.bhc_max_length_mm)
    gt_sino, ma_sino = apply_polynomial(coeffs, gt_line), apply_polynomial(coeffs, ma_line)
    # metal trace = fp(metal mask) > 0, read off the metal density projections already made
    trace = (under[2:].sum(0) > 0).unsqueeze(1) if metal_names else torch.zeros_like(gt_sino, dtype=torch.bool)
    kernel = resolve_filter(g, config.filter_name)
    return SimulatedScan(
        gt_sinogram=gt_sino,
        ma_sinogram=ma_sino,
        gt_image=mu_to_hu(projector.fbp(gt_sino, kernel), g.mu_water_per_mm),
        ma_image=mu_to_hu(projector.fbp(ma_sino, kernel), g.mu_water_per_mm),
        metal_mask=metal,
        metal_trace=trace,
        starved_rays=starved,
    )
