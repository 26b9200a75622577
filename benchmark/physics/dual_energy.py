"""Simulated gemstone spectral imaging (GSI): fast kVp-switching dual-energy CT, projection-domain two-material
decomposition and a virtual monoenergetic image.

GSI (GE Discovery CT750 HD, the scanner of Han et al.'s ArtifactGSI data) switches the tube between 80 and
140 kVp from view to view, decomposes the two sinograms into two basis materials and reconstructs a virtual
monoenergetic image (VMI), typically at 65-75 keV. Real GSI data cannot be shared, so this module simulates
the analogue with the suite's polychromatic chain (``simulation.py``):

1. The phantom as ``simulate_scan`` takes it (an HU image, split into water- and bone-equivalent densities by
   the soft HU threshold, plus metal masks at the metal's nominal density) is projected once: density line
   integrals ``a_m`` (g/cm^3 * mm) per material ``m``.
2. Two energy-integrating scans of the same rays, at ``kvp_pair = (80, 140)`` kVp (spekpy spectra
   ``s_k(E)``, same target angle and aluminium as the 120 kVp scan), each through ``simulation._detect``:
   ``p_k = -log( sum_E w_k(E) exp(-sum_m a_m (mu/rho)_m(E)) )``, ``w_k(E) = E s_k(E) / sum_E E s_k(E)``,
   with Poisson photon noise (``photons_per_ray[k]`` incident photons: by default 1e5 at each kVp, the
   120 kVp scan's 2e5 split between the two; the tube current modulation that real GSI uses to balance the
   80 kVp flux is not modelled), Gaussian electronic noise and photon starvation (readings below
   ``starvation_floor_photons`` set to the floor and counted). Each kVp draws its own noise stream; the
   metal-free and the metal scan at one kVp share theirs (common random numbers, as ``simulate_scan``).
3. Projection-domain basis-material decomposition (Alvarez & Macovski, Phys. Med. Biol. 21:733, 1976;
   basis materials instead of photoelectric/Compton functions: Lehmann et al., Med. Phys. 8:659, 1981):
   per ray, find the basis line integrals ``A = (A_1, A_2)`` (g/cm^3 * mm; default basis water and ICRU-44
   cortical bone, the two tissue materials of the simulation, so the metal-free decomposition is exact up
   to noise) with ``f_k(A) = -log( sum_E w_k(E) exp(-A_1 b_1(E) - A_2 b_2(E)) ) = p_k`` for both kVps,
   ``b_j = (mu/rho)_j / 10`` (mm^-1 per g/cm^3). The spectra are known exactly (a calibrated system), so
   the equations are solved directly by Newton's method with the analytic Jacobian
   ``df_k/dA_j = sum_E w_k b_j T_k / sum_E w_k T_k`` (the transmission-weighted mean of ``b_j``), starting
   from the solution of the linearised system at each spectrum's mean ``b_j``, in float64 (exponents shifted
   per ray so that no iterate overflows); a ray stops iterating once its residual is below ``1e-3 tolerance``.
4. Metal rays: metal is no combination of water and bone, and where photons starve both ``p_k`` sit at
   ``-log(floor / photons_per_ray[k])`` and the system has no physical solution (the pair of log-attenuations
   is inconsistent). Newton then diverges; each iterate is clamped to the box
   ``|A_j| <= basis_clamp_mm * rho_j`` (the basis material's nominal density times a length longer than any
   body), and the rays that end on the box (``clamped_rays``) or with a residual ``max_k |f_k - p_k|`` above
   ``tolerance`` (``unconverged_rays``) are counted and returned, never hidden. Their errors stay in the
   image, as real GSI images keep streaks from starved metal rays.
5. Virtual monoenergetic sinogram ``p_E = A_1 b_1(E) + A_2 b_2(E)`` at ``energy_kev`` (default 70 keV,
   GE's default VMI and within the 65-75 keV range radiologists use), FBP with the suite's FBP and the
   geometry's kernel, HU with ``mu_water(E)`` from xraydb: ``HU = 1000 (mu - mu_water(E)) / mu_water(E)``.
   Beam hardening leaves (``p_E`` is linear in the object); noise and starvation stay.

6. Optional (``metal_inpainting``), an analogue of GE's GSI + MARs: inside the metal trace the VMI sinogram is
   replaced by per-view linear interpolation (Kalender et al., Radiology 164:576, 1987;
   ``inpainting.linear_interpolation``) and the metal's own VMI line integral ``a_metal (mu/rho)_metal(E)`` is
   added back. The known metal mask stands in for MARs' metal segmentation; LI's secondary artifacts stay.

Optionally the ordinary 120 kVp scan of the same object, through ``simulate_scan`` itself, for comparison
(it is the scan the ArtifactGSI pairs with the GSI series).

Departures from GE's GSI: simultaneous (not alternating-view) low and high kVp readings on every view, no
kVp rise/fall time or spectral blur between views, no image-domain noise reduction (GE's ASiR) of the basis
images, no dedicated metal-artifact reduction (GE's MARs) unless ``metal_inpainting`` asks for the LI analogue.
Consequence to expect: behind dense metal the 80 kVp scan starves long before the 140 kVp (or a 120 kVp) scan,
and the decomposition amplifies that error; without noise the VMI removes most metal beam hardening, with
noise at the default photon counts the plain VMI's metal streaks exceed the 120 kVp image's (the reason GE
pairs GSI with MARs; here ``metal_inpainting``).

The HU scale of the input image keeps the dataset's ``mu_water`` convention (``projector.geometry``);
the output VMI's HU scale is that of ``energy_kev``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .fbp import resolve_filter
from .inpainting import linear_interpolation
from .projector import Projector
from .simulation import SimulatedScan, SimulationConfig, _detect, _tissue_densities, simulate_scan
from .spectrum import MATERIALS, Spectrum
from .units import mu_to_hu
from .validation import check_image, check_mask

__all__ = ["DualEnergyConfig", "GSIScan", "decompose_two_materials", "simulate_gsi"]


@dataclass(frozen=True)
class DualEnergyConfig:
    """Parameters of the simulated GSI acquisition and decomposition (defaults: GE fast kVp switching 80/140).

    ``ordinary`` is the 120 kVp comparison scan (``simulate_scan``) and also supplies the soft HU thresholds of
    the water/bone split (``SimulationConfig()``'s when None); its noise switch is its own. Tube settings
    (target angle, aluminium, energy bins) are shared by both kVps.

    Raises:
        ValueError: ``kvp_pair`` not two distinct positive values, ``photons_per_ray`` not two positive values,
            unknown or identical basis materials, fewer than one Newton iteration, non-positive clamp or energy.
    """

    kvp_pair: tuple[float, float] = (80.0, 140.0)
    photons_per_ray: tuple[float, float] = (1.0e5, 1.0e5)  # incident photons per ray at each kVp
    energy_kev: float = 70.0  # virtual monoenergetic energy
    basis: tuple[str, str] = ("water", "cortical_bone")
    newton_iterations: int = 12
    tolerance: float = 1e-4  # log-attenuation residual above which a ray counts as unconverged
    basis_clamp_mm: float = 1000.0  # |A_j| <= basis_clamp_mm * rho_j (g/cm^3 * mm)
    target_angle_deg: float = 7.0
    aluminium_mm: float = 3.0
    bin_kev: float = 8.0  # as SimulationConfig (AAPM: 12 energies at 120 kVp)
    electronic_noise_photons: float = 2.5
    starvation_floor_photons: float = 1.0
    noise: bool = True
    filter_name: str | None = None  # FBP kernel; None: the geometry's default_filter
    metal_inpainting: bool = False  # GSI + MARs analogue (module docstring, step 6); off: the plain VMI
    ordinary: SimulationConfig | None = field(default_factory=SimulationConfig)  # 120 kVp scan; None: skip

    def __post_init__(self):
        kvp = tuple(self.kvp_pair)
        if len(kvp) != 2 or kvp[0] == kvp[1] or min(kvp) <= 0:
            raise ValueError(f"DualEnergyConfig.kvp_pair: expected two distinct positive kVp values, found {kvp}")
        photons = tuple(self.photons_per_ray)
        if len(photons) != 2 or min(photons) <= 0:
            raise ValueError(
                f"DualEnergyConfig.photons_per_ray: expected two positive photon counts, found {photons}")
        basis = tuple(self.basis)
        if len(basis) != 2 or basis[0] == basis[1] or any(m not in MATERIALS for m in basis):
            raise ValueError(f"DualEnergyConfig.basis: expected two distinct materials of {sorted(MATERIALS)}, "
                             f"found {basis}")
        if self.newton_iterations < 1:
            raise ValueError(f"DualEnergyConfig.newton_iterations: expected >= 1, found {self.newton_iterations}")
        if self.basis_clamp_mm <= 0 or self.energy_kev <= 0:
            raise ValueError(f"DualEnergyConfig: expected positive basis_clamp_mm and energy_kev, found "
                             f"{self.basis_clamp_mm}, {self.energy_kev}")

    def scan_configs(self) -> tuple[SimulationConfig, SimulationConfig]:
        """The low- and the high-kVp scan as ``SimulationConfig`` (spectrum and noise of ``_detect``)."""
        order = np.argsort(self.kvp_pair)
        return tuple(SimulationConfig(kvp=float(self.kvp_pair[i]), target_angle_deg=self.target_angle_deg,
                                      aluminium_mm=self.aluminium_mm, bin_kev=self.bin_kev,
                                      photons_per_ray=float(self.photons_per_ray[i]),
                                      electronic_noise_photons=self.electronic_noise_photons,
                                      starvation_floor_photons=self.starvation_floor_photons, noise=self.noise,
                                      filter_name=self.filter_name) for i in order)

    def energy_range_kev(self) -> tuple[float, float]:
        """Energies (keV) a VMI may be synthesised at: from the lowest spectral bin to the high kVp."""
        low, high = self.scan_configs()
        return float(min(low.spectrum().energies_kev.min(), high.spectrum().energies_kev.min())), high.kvp


@dataclass
class GSIScan:
    """Output of ``simulate_gsi``. Images ``(B, 1, N, N)`` in HU at ``energy_kev``, sinograms ``(B, 1, V, C)``."""

    gt_mono_image: torch.Tensor  # metal-free VMI (same noise draw as the metal scan)
    ma_mono_image: torch.Tensor  # VMI of the metal scan
    gt_mono_sinogram: torch.Tensor  # p_E, mm^-1 * mm
    ma_mono_sinogram: torch.Tensor
    gt_basis_sinograms: torch.Tensor  # (B, 2, V, C) A_j of the metal-free scan, g/cm^3 * mm
    ma_basis_sinograms: torch.Tensor  # (B, 2, V, C) A_j of the metal scan
    metal_mask: torch.Tensor
    metal_trace: torch.Tensor
    starved_rays: torch.Tensor  # (B, 2) starved readings of the metal scan at the low and the high kVp
    clamped_rays: torch.Tensor  # (B,) metal-scan rays whose decomposition ended on the clamp box
    unconverged_rays: torch.Tensor  # (B,) metal-scan rays with residual above tolerance
    energy_kev: float
    ordinary: SimulatedScan | None  # the 120 kVp scan through ``simulate_scan``, or None


def _basis_per_mm(spectrum_kev: np.ndarray, basis: Sequence[str]) -> np.ndarray:
    """``(2, E)`` mass attenuation of the basis in mm^-1 per g/cm^3."""
    return np.stack([MATERIALS[m].mass_attenuation_cm2_g(spectrum_kev) / 10.0 for m in basis])


def decompose_two_materials(line_low: torch.Tensor, line_high: torch.Tensor, spectra: tuple[Spectrum, Spectrum],
                            basis: tuple[str, str] = ("water", "cortical_bone"), iterations: int = 12,
                            clamp_mm: float = 1000.0,
                            tolerance: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-ray basis line integrals from two energy-integrating log-attenuations (Newton, see module docstring).

    Args:
        line_low, line_high: ``(B, 1, V, C)`` post-log line integrals (no beam-hardening correction) measured
            with ``spectra[0]`` and ``spectra[1]``.
        spectra: the low- and the high-kVp spectrum (energy-integrating weights ``Spectrum.energy_weights``).
        basis: two material names of ``spectrum.MATERIALS``.
        iterations: Newton iterations.
        clamp_mm: iterates are clamped to ``|A_j| <= clamp_mm * rho_j``.
        tolerance: residual (log-attenuation) above which a ray counts as unconverged.
    Returns:
        ``A`` ``(B, 2, V, C)`` float64 in g/cm^3 * mm; bool ``(B, 1, V, C)`` masks of clamped and of unconverged
        rays.
    Raises:
        ValueError: the two sinograms differ in shape, or are not ``(B, 1, V, C)``.
    """
    if line_low.shape != line_high.shape or line_low.ndim != 4 or line_low.shape[1] != 1:
        raise ValueError(f"decompose_two_materials: expected two sinograms of one shape (B, 1, V, C), found "
                         f"{tuple(line_low.shape)} and {tuple(line_high.shape)}")
    p = torch.stack([line_low[:, 0], line_high[:, 0]], -1).to(torch.float64)  # (B, V, C, 2)
    b_k = [torch.as_tensor(_basis_per_mm(s.energies_kev, basis)) for s in spectra]  # (2, E_k)
    w_k = [torch.as_tensor(s.energy_weights) for s in spectra]
    # start: the linearised system at each spectrum's mean basis attenuation
    m0 = torch.stack([bk @ w for bk, w in zip(b_k, w_k, strict=True)])  # (k, j)
    a = p @ torch.linalg.inv(m0).T
    limit = torch.tensor([clamp_mm * MATERIALS[m].density_g_cm3 for m in basis], dtype=torch.float64)

    def model(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f, jac = [], []
        for bk, w in zip(b_k, w_k, strict=True):
            x = a @ bk  # (..., E) energy-resolved line integrals
            shift = x.amin(-1, keepdim=True)  # exp(-(x - shift)) <= 1: no overflow for negative iterates
            wt = torch.exp(shift - x) * w
            norm = wt.sum(-1, keepdim=True)
            f.append((shift - torch.log(norm))[..., 0])
            jac.append((wt @ bk.T) / norm)  # (..., 2): transmission-weighted mean of b_j
        return torch.stack(f, -1), torch.stack(jac, -2)  # (..., 2), (..., k, j)

    shape = a.shape
    a = torch.maximum(torch.minimum(a, limit), -limit).reshape(-1, 2)
    p_flat = p.reshape(-1, 2)
    active = torch.arange(a.shape[0])  # rays still iterating; a converged ray leaves the loop unchanged
    for _ in range(iterations):
        f, jac = model(a[active])
        r = f - p_flat[active]
        moving = r.abs().amax(-1) >= 1e-3 * tolerance
        active, r, jac = active[moving], r[moving], jac[moving]
        if active.numel() == 0:
            break
        det = jac[:, 0, 0] * jac[:, 1, 1] - jac[:, 0, 1] * jac[:, 1, 0]
        det = torch.where(det.abs() < 1e-30, torch.full_like(det, 1e-30), det)
        step = torch.stack([jac[:, 1, 1] * r[:, 0] - jac[:, 0, 1] * r[:, 1],
                            jac[:, 0, 0] * r[:, 1] - jac[:, 1, 0] * r[:, 0]], -1) / det.unsqueeze(-1)
        a[active] = torch.maximum(torch.minimum(a[active] - step, limit), -limit)
    a = a.reshape(shape)
    f, _ = model(a)
    clamped = (a.abs() >= limit).any(-1)
    unconverged = (f - p).abs().amax(-1) > tolerance
    return a.permute(0, 3, 1, 2).contiguous(), clamped.unsqueeze(1), unconverged.unsqueeze(1)


def _slice_seeds(seeds: Sequence[int], kvp: float) -> list[int]:
    """One noise stream per slice and kVp, independent of the batch (SeedSequence of the slice seed and kVp)."""
    return [int(np.random.SeedSequence([int(s), int(round(kvp * 1000))]).generate_state(1, np.uint64)[0] >> 1)
            for s in seeds]


def simulate_gsi(projector: Projector, hu_image: torch.Tensor, metal_masks: Mapping[str, torch.Tensor],
                 config: DualEnergyConfig = DualEnergyConfig(), seed: int | Sequence[int] = 0) -> GSIScan:
    """Simulate a GSI (fast kVp switching) acquisition and its virtual monoenergetic image, with and without metal.

    Args:
        projector: projector on the scanner geometry (its ``mu_water_per_mm`` defines the input HU).
        hu_image: ``(B, 1, N, N)`` metal-free anatomy in HU (as ``simulate_scan``).
        metal_masks: material name (a key of ``spectrum.MATERIALS``) -> bool ``(B, 1, N, N)`` mask; may be empty.
        config: kVp pair, photons, VMI energy, basis and decomposition parameters, optional 120 kVp scan.
        seed: one per slice (an int seeds slice ``i`` with ``seed + i``); each kVp derives its own stream from it;
            the ordinary scan uses ``seed`` as ``simulate_scan`` does. Same inputs and seeds, same bytes.
    Returns:
        ``GSIScan``: metal-free and metal VMIs in HU at ``config.energy_kev``, VMI and basis sinograms, metal
        mask and trace, starved / clamped / unconverged ray counts, and ``ordinary`` (the 120 kVp
        ``SimulatedScan``) when ``config.ordinary`` is set.
    Raises:
        ValueError: bad image or mask (shape, batch, dtype, NaN), unknown material, ``energy_kev`` outside
            ``config.energy_range_kev()``, a seed list of the wrong length.
    """
    g = projector.geometry
    check_image(hu_image, g.image_shape, "hu_image")
    for name, mask in metal_masks.items():
        if name not in MATERIALS:
            raise ValueError(f"metal_masks: unknown material {name!r}; expected one of {sorted(MATERIALS)}")
        check_mask(mask, g.image_shape, f"metal_masks[{name!r}]", "image")
        if mask.shape[0] != hu_image.shape[0]:
            raise ValueError(f"metal_masks[{name!r}]: expected batch {hu_image.shape[0]}, found {mask.shape[0]}")
    lo_e, hi_e = config.energy_range_kev()
    if not lo_e <= config.energy_kev <= hi_e:
        raise ValueError(f"DualEnergyConfig.energy_kev: expected within the spectra's range [{lo_e:g}, {hi_e:g}] "
                         f"keV, found {config.energy_kev:g}")
    b = hu_image.shape[0]
    seeds = [seed + i for i in range(b)] if isinstance(seed, int) else list(seed)
    if len(seeds) != b:
        raise ValueError(f"seed: expected {b} per-slice seeds, found {len(seeds)}")

    # density line integrals, as in simulate_scan (fp of the tissue minus fp of the tissue under the metal)
    hu = hu_image.to(torch.float32)
    metal = torch.zeros_like(hu, dtype=torch.bool)
    for mask in metal_masks.values():
        metal = metal | mask
    tissue_cfg = config.ordinary or SimulationConfig()  # only its HU thresholds are used here
    water, bone = _tissue_densities(hu, g.mu_water_per_mm, tissue_cfg)
    shape = (b, *g.sinogram_shape)
    tissue = projector.fp(torch.cat([water, bone])).reshape(2, *shape)
    metal_f = metal.to(hu.dtype)
    metal_names = list(metal_masks)
    small = [water * metal_f, bone * metal_f,
             *[metal_masks[m].to(hu.dtype) * MATERIALS[m].density_g_cm3 for m in metal_names]]
    under = projector.fp_small_support(torch.cat(small)).reshape(len(small), *shape)
    ma_proj = torch.cat([(tissue - under[:2]).clamp(min=0.0), under[2:]])
    trace = (under[2:].sum(0) > 0).unsqueeze(1) if metal_names else torch.zeros((b, 1, *g.sinogram_shape),
                                                                                  dtype=torch.bool)

    scans = config.scan_configs()
    spectra = tuple(c.spectrum() for c in scans)
    gt_lines, ma_lines, starved = [], [], []
    for c in scans:
        kseeds = _slice_seeds(seeds, c.kvp)
        gt_lines.append(_detect(tissue, ["water", "cortical_bone"], c, kseeds)[0])
        line, n_starved = _detect(ma_proj, ["water", "cortical_bone", *metal_names], c, kseeds)
        ma_lines.append(line)
        starved.append(n_starved)
    e = np.array([config.energy_kev])
    mono_b = torch.as_tensor(_basis_per_mm(e, config.basis)[:, 0])  # (2,)
    mu_water_e = float(MATERIALS["water"].mu_per_mm(e)[0])
    kernel = resolve_filter(g, config.filter_name)
    out = {}
    for key, lines in (("gt", gt_lines), ("ma", ma_lines)):
        a, clamped, unconverged = decompose_two_materials(*lines, spectra, config.basis, config.newton_iterations,
                                                          config.basis_clamp_mm, config.tolerance)
        sino = torch.einsum("bjvc,j->bvc", a, mono_b).unsqueeze(1).to(hu.dtype)
        if key == "ma" and config.metal_inpainting and metal_names:
            metal_line = sum(under[2 + i] * float(MATERIALS[m].mass_attenuation_cm2_g(e)[0]) / 10.0
                             for i, m in enumerate(metal_names)).unsqueeze(1)
            sino = linear_interpolation(sino, trace) + metal_line
        out[key] = (a, sino, mu_to_hu(projector.fbp(sino, kernel), mu_water_e), clamped, unconverged)
    ordinary = None
    if config.ordinary is not None:
        ordinary = simulate_scan(projector, hu_image, metal_masks, config.ordinary, seeds)
    a, _, _, clamped, unconverged = out["ma"]
    return GSIScan(
        gt_mono_image=out["gt"][2],
        ma_mono_image=out["ma"][2],
        gt_mono_sinogram=out["gt"][1],
        ma_mono_sinogram=out["ma"][1],
        gt_basis_sinograms=out["gt"][0].to(hu.dtype),
        ma_basis_sinograms=a.to(hu.dtype),
        metal_mask=metal,
        metal_trace=trace,
        starved_rays=torch.stack(starved, 1),
        clamped_rays=clamped.reshape(b, -1).sum(1),
        unconverged_rays=unconverged.reshape(b, -1).sum(1),
        energy_kev=float(config.energy_kev),
        ordinary=ordinary,
    )

