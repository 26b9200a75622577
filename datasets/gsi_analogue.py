"""A simulated analogue of ArtifactGSI (Han et al., "Reducing CT Metal Artifacts by Learning Latent Space Alignment
with Gemstone Spectral Imaging Data"), written in the patient-folder NIfTI layout that
``marbench.datasets.artifactgsi`` reads, so the reader, its datamodule and every method on it run without the
release (which cannot be reached from here).

What is simulated. A patient is a volume of ``slices`` adjacent slices, ``slice_spacing_mm`` apart and centred on
``z = 0``, of one procedural phantom (``marbench.datasets.synthetic.anatomy``) on one scanner geometry, with one
implant for the whole volume: the phantom category's anatomical implant (``implants.sample_implants`` with no
fractal shapes), sampled once on the centre slice's tissue labels and extruded, the same mask on every slice (as
the synthetic generator's stacks). Implant type -> phantom category -> region (``meta.json``):

* ``hip_prosthesis`` -> ``bilateral_hip`` (bilateral prostheses, cobalt-chrome or titanium) -> ``"hip joint"``;
* ``fracture_internal_fixation`` -> ``pelvis`` (a fixation plate with two screws on an iliac wing or the
  sacrum, titanium or stainless steel) -> ``"pelvis"``;
* ``spinal_internal_fixation`` -> ``lumbar_spine`` (two titanium pedicle screws) -> ``"lumbar spine"``;
* ``none`` (clean patients) -> the three categories in turn, no metal.

Each implant volume is scanned by ``marbench.physics.dual_energy.simulate_gsi`` (80/140 kVp fast kVp switching,
projection-domain water/bone decomposition): ``gsi.nii.gz`` is the metal scan's 70 keV virtual monoenergetic image
with the GSI + MARs analogue (``mars_analogue``: NMAR, the metal reinserted), ``ordinary.nii.gz`` the 120 kVp
``simulate_scan`` image of the same object with the same per-slice noise seeds (``DualEnergyConfig.ordinary``).
Clean patients get only the metal-free 120 kVp image (``clean.nii.gz``). ``labels.nii.gz`` is drawn from the
phantom's own structures, not thresholds: 1 metal implant (the union of the metal masks, over everything else),
4/5 left/right femur (bone pixels -- tissue ``cortical_bone``/``cancellous_bone`` -- inside each femoral head's
ellipse of ``bilateral_hip``, at the slice's ``z``), 2/3 left/right pelvis (the other bone pixels inside the
acetabulum ellipses of ``bilateral_hip`` and the iliac-wing ellipses of ``pelvis``), 0 everything else (sacrum
and vertebrae included: Table 2 labels only metal, pelvis and femur). The patient's left is the image right
(``x > 0`` mm), the anatomy module's convention.

Output under ``out``::

    .generation.json                      stamp: identity and fingerprint, written before the first patient
    <patient_id>/                          hip_prosthesis_000, ..., fracture_internal_fixation_000, ...,
                                           spinal_internal_fixation_000, ..., clean_000, ...
      meta.json                            implant, region, category, material, energy_kev, seed, noise_seeds,
                                           starved / clamped / unconverged ray counts per slice, objects
      ordinary.nii.gz  gsi.nii.gz          implant patients: float32 HU volumes (X, Y, Z)
      clean.nii.gz                         clean patients: float32 HU volume (X, Y, Z)
      labels.nii.gz                        uint8 labels 0..5 (X, Y, Z)
    split.txt                              "<train|test> <patient_id>": 80/20 by patient, stratified by implant
                                           type (seeded); clean patients all in train
    manifest.json                          written last: preset, seed, fingerprint, sha256 of every file

Volumes follow the reader's orientation, ``image[r, c] = volume[c, r, z]`` (row = voxel axis Y, column = X), with
the NIfTI affine ``diag(pixel_mm, pixel_mm, slice_spacing_mm, 1)``. nibabel gzips with mtime 0 and no file name,
so the same seed gives the same bytes (``.nii.gz``, the layout's named format).

Resumption and provenance (as ``marbench.datasets.synthetic.generator``): each patient is written into
``.<patient_id>.tmp/`` (a dot folder, which the reader skips) and renamed into place when complete, so an
interrupted run never leaves half a patient and resumes at the first missing one; each slice's noise has its own
seed (``SeedSequence([seed, 2, implant index, patient number, slice])``), each phantom its own generator
(``SeedSequence([seed, 0, implant index, patient number])``), so a resumed run equals an uninterrupted one. The
fingerprint is the sha256 of the canonical JSON of the generator version, the preset (with its
``DualEnergyConfig``), the geometry (``to_dict``), the seed, the source of ``marbench.physics``,
``marbench.datasets.synthetic``, this module and ``marbench.files``, and the versions of the libraries whose
numerics reach the bytes (torch, numpy, scipy, xraydb, spekpy, nibabel). A folder of another fingerprint is
refused unless ``force=True`` deletes what this generator wrote there.

Departures from ArtifactGSI, and why:

* Simulated phantoms of three categories instead of patients scanned on a GE Discovery CT 750HD; anatomy,
  implants and physics are those of the suite's synthetic benchmark (``marbench.datasets.synthetic``,
  ``marbench.physics``), at 128 (``gsi-tiny``, ``gsi-smoke``) or 256 (``gsi``) pixels over a 400 mm field.
* The GSI and ordinary series are one object scanned twice on one grid with common noise seeds, so they are
  aligned by construction: the calibration of Sec. 3.1 (Eq. 1-2, ``calibrate_volume``) is not needed (it would
  find the identity match and a near-identity intensity map, up to the 70 keV vs 120 kVp HU scales).
* The GSI image is the VMI with an NMAR-based metal-artifact reduction (``mars_analogue``), the metal reinserted
  in the image (GE pairs GSI with MARs; the plain VMI is not what the paper's GSI targets look like). Streak
  RMSE over the body outside the metal and a 3-pixel margin, against the metal-free scan of the same kind, per
  slice of ``gsi-smoke`` (median / mean): hip prostheses 47 / 47 HU for the GSI image against 294 / 322 HU at 120 kVp
  (the plain VMI reaches ~1550 HU on 128-pixel phantoms, where rays starved at 80 kVp clamp in the
  decomposition), fixation plates 30 / 30 against 23 / 30 HU, pedicle screws 52 / 51 against 42 / 43 HU. So the
  analogue's GSI images remove the streaks of the large implants (hip prostheses), match the ordinary image
  around plates and, around pedicle screws in the vertebrae, keep NMAR's secondary artifacts and are *worse* than
  the ordinary 120 kVp image -- unlike the paper, where the GSI series is the cleaner target for every implant
  type. Methods trained on this analogue learn that mixture; results on it say nothing about the real GSI
  series.
* Clean patients are the metal-free 120 kVp scans of phantoms without implants (the paper's clean sequences are
  ordinary scans of patients without implants); the same phantom generator serves both, with fewer patients
  than the release.
* Implants are extruded along ``z`` (one mask for every slice); real implants change shape from slice to slice.
* Labels come from the phantom's analytic structures (no annotator); bone hidden under the metal is metal.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from marbench.files import atomic_write, atomic_write_json, library_versions, sha256_file, source_digest
from marbench.physics import Projector, SimulationConfig, mu_to_hu, preset, simulate_scan
from marbench.physics.dual_energy import DualEnergyConfig, GSIScan, simulate_gsi
from marbench.physics.inpainting import nmar_correction
from marbench.physics.spectrum import MATERIALS

from .artifactgsi import IMPLANT_TYPES, LABEL_NAMES, SPLIT_FILE
from .synthetic.anatomy import _inside, anchor, render, sample_case
from .synthetic.generator import fingerprint_of, folder_fingerprint
from .synthetic.implants import MetalObject, sample_implants
from .synthetic.tissues import TISSUES

__all__ = ["GENERATOR_VERSION", "GSIAnaloguePreset", "PRESETS", "CATEGORY_OF", "REGION_OF", "PlannedPatient",
           "plan_patients", "split_text", "anatomy_labels", "simulate_patient", "mars_analogue", "streak_rmse",
           "fingerprint_parts", "expected_fingerprint", "generate_gsi_analogue"]

GENERATOR_VERSION = "1.1"  # 1.1: the MARs analogue is NMAR with the metal reinserted in the image

CATEGORY_OF = {"hip_prosthesis": "bilateral_hip", "fracture_internal_fixation": "pelvis",
               "spinal_internal_fixation": "lumbar_spine"}
REGION_OF = {"bilateral_hip": "hip joint", "pelvis": "pelvis", "lumbar_spine": "lumbar spine"}
_CLEAN_CYCLE = tuple(CATEGORY_OF.values())  # clean patients cycle through the implant categories' anatomy
_LABEL = {name: i for i, name in enumerate(LABEL_NAMES)}
_BONE = (TISSUES["cortical_bone"].label, TISSUES["cancellous_bone"].label)


def _simulation() -> DualEnergyConfig:
    return DualEnergyConfig(photons_per_ray=(4e5, 4e5), energy_kev=70.0,
                            ordinary=SimulationConfig(photons_per_ray=8e5))


@dataclass(frozen=True)
class GSIAnaloguePreset:
    """Size and physics of one ArtifactGSI analogue.

    ``patients`` maps each implant type (``hip_prosthesis``, ``fracture_internal_fixation``,
    ``spinal_internal_fixation``) to its number of patients; ``clean_patients`` patients have no implant.
    ``batch_size`` is how many slices one simulation call takes (memory only: bytes do not depend on it).
    """

    name: str
    geometry_preset: str
    patients: dict
    clean_patients: int
    slices: int
    slice_spacing_mm: float = 2.5
    test_fraction: float = 0.2
    batch_size: int = 8
    simulation: DualEnergyConfig = field(default_factory=_simulation)


PRESETS = {
    "gsi-tiny": GSIAnaloguePreset("gsi-tiny", "aapm_body_128", {t: 1 for t in CATEGORY_OF}, clean_patients=1,
                                  slices=3),
    "gsi-smoke": GSIAnaloguePreset("gsi-smoke", "aapm_body_128", {"hip_prosthesis": 6,
                                                                  "fracture_internal_fixation": 5,
                                                                  "spinal_internal_fixation": 5},
                                   clean_patients=6, slices=8),
    "gsi": GSIAnaloguePreset("gsi", "aapm_body_256", {"hip_prosthesis": 24, "fracture_internal_fixation": 20,
                                                      "spinal_internal_fixation": 20},
                             clean_patients=16, slices=16),
}


@dataclass(frozen=True)
class PlannedPatient:
    """One patient of the plan: its id (folder name), implant type (``"none"`` when clean), phantom category and
    its number among the patients of its implant type (which, with the implant's index in ``IMPLANT_TYPES``,
    seeds it)."""

    id: str
    implant: str
    category: str
    number: int

    @property
    def clean(self) -> bool:
        return self.implant == "none"

    @property
    def implant_index(self) -> int:
        return IMPLANT_TYPES.index(self.implant)


def _preset(name: str) -> GSIAnaloguePreset:
    if name not in PRESETS:
        raise ValueError(f"unknown GSI analogue preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]


def plan_patients(p: GSIAnaloguePreset) -> list[PlannedPatient]:
    """Every patient of a preset in generation order: implant types in ``CATEGORY_OF`` order, then the clean ones
    (``clean_000`` ``bilateral_hip``, ``clean_001`` ``pelvis``, ``clean_002`` ``lumbar_spine``, ...)."""
    plan = [PlannedPatient(f"{implant}_{k:03d}", implant, category, k)
            for implant, category in CATEGORY_OF.items() for k in range(int(p.patients.get(implant, 0)))]
    plan += [PlannedPatient(f"clean_{k:03d}", "none", _CLEAN_CYCLE[k % len(_CLEAN_CYCLE)], k)
             for k in range(p.clean_patients)]
    return plan


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def _noise_seeds(seed: int, patient: PlannedPatient, slices: int) -> list[int]:
    """One noise seed per slice, from the patient's identity (not its place in a run), so resuming changes
    nothing."""
    return [int(_rng(seed, 2, patient.implant_index, patient.number, z).integers(2**62)) for z in range(slices)]


def split_text(p: GSIAnaloguePreset, seed: int = 0) -> str:
    """The ``split.txt`` of a preset: per implant type, ``round(test_fraction * n)`` patients (at least 1 and at
    most ``n - 1`` when ``n >= 2``) drawn at random (``SeedSequence([seed, 9])``) form ``test``, the rest
    ``train``; clean patients are all ``train`` (they only train the GSI decoder, Sec. 3.2). When every stratum is
    too small to give one (``gsi-tiny``: one patient per type), one implant patient drawn at random is ``test``,
    so both parts exist."""
    rng = _rng(seed, 9)
    plan = plan_patients(p)
    test: set[str] = set()
    for implant in CATEGORY_OF:
        ids = [q.id for q in plan if q.implant == implant]
        n = len(ids)
        n_test = int(np.floor(p.test_fraction * n + 0.5))
        if n >= 2 and 0.0 < p.test_fraction < 1.0:
            n_test = min(max(n_test, 1), n - 1)
        test.update(ids[i] for i in rng.permutation(n)[:n_test])
    implants = [q.id for q in plan if not q.clean]
    if not test and len(implants) >= 2 and p.test_fraction > 0:
        test.add(implants[int(rng.integers(len(implants)))])
    lines = [f"# ArtifactGSI analogue '{p.name}', seed {seed}: <split> <patient_id>; clean patients train the "
             "GSI decoder only"]
    lines += [f"{'test' if q.id in test else 'train'} {q.id}" for q in plan]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- labels


def _shape_mask(shape: dict, geometry, z_mm: float) -> np.ndarray:
    """Pixels of one phantom ellipse at ``z_mm``, by the phantom's own membership test (so labels match the
    rendered tissue pixel for pixel)."""
    x, y = geometry.pixel_centres_mm()
    box, inside = _inside(shape, x, y, z_mm)
    mask = np.zeros(geometry.image_shape, dtype=bool)
    mask[box] = inside
    return mask


def _bone_structures(spec) -> tuple[list[dict], list[dict]]:
    """(femoral-head ellipses, pelvic-bone ellipses) of a phantom, read from its shape list: the cortical ellipses
    of the femoral heads (radius ``anchor(spec, "femoral_heads")``) and of the acetabula (that radius + 12 mm, as
    ``anatomy._bilateral_hip`` draws them) in ``bilateral_hip``; the iliac wings (the cortical ellipses off the
    midline; the sacrum is on it) in ``pelvis``; none in other categories."""
    cortical = [s for s in spec.shapes if s["kind"] == "ellipse" and s["tissue"] == "cortical_bone"]
    if spec.category == "bilateral_hip":
        r = anchor(spec, "femoral_heads")["radius"]
        return ([s for s in cortical if abs(s["ax"] - r) < 1e-9],
                [s for s in cortical if abs(s["ax"] - (r + 12)) < 1e-9])
    if spec.category == "pelvis":
        return [], [s for s in cortical if abs(s["cx"]) > 1e-9]
    return [], []


def anatomy_labels(spec, geometry, tissue_labels: np.ndarray, metal: np.ndarray, z_mm: float) -> np.ndarray:
    """ArtifactGSI labels (``artifactgsi.LABEL_NAMES``) of one slice of a phantom.

    Args:
        spec: the phantom (``anatomy.sample_case``).
        geometry: its scanner geometry.
        tissue_labels: ``(N, N)`` uint8 tissue labels of ``render(spec, geometry, z_mm)``.
        metal: ``(N, N)`` bool union of the metal masks (label 1, over everything else).
        z_mm: the slice's table position (the structures drift and scale with ``z``).
    Returns:
        ``(N, N)`` uint8: 0 background, 1 metal implant, 2/3 left/right pelvis, 4/5 left/right femur; left is
        the side of the structure's centre at ``x > 0`` mm (the patient's left, on the image right).
    """
    out = np.zeros(geometry.image_shape, dtype=np.uint8)
    bone = np.isin(tissue_labels, _BONE)
    heads, pelvic = _bone_structures(spec)
    femur = np.zeros_like(bone)
    for s in heads:
        inside = bone & _shape_mask(s, geometry, z_mm)
        out[inside] = _LABEL["left_femur" if s["cx"] > 0 else "right_femur"]
        femur |= inside
    for s in pelvic:
        inside = bone & _shape_mask(s, geometry, z_mm) & ~femur
        out[inside] = _LABEL["left_pelvis" if s["cx"] > 0 else "right_pelvis"]
    out[np.asarray(metal, bool)] = _LABEL["metal_implant"]
    return out


# ----------------------------------------------------------------------------------------------- simulation


def _z_positions(p: GSIAnaloguePreset) -> np.ndarray:
    return (np.arange(p.slices) - (p.slices - 1) / 2) * p.slice_spacing_mm


def simulate_patient(patient: PlannedPatient, p: GSIAnaloguePreset, seed: int = 0,
                     projector: Projector | None = None) -> dict:
    """Draw and simulate one patient of the plan (what ``generate_gsi_analogue`` writes, and the metal-free
    references it does not write).

    Args:
        patient: an entry of ``plan_patients(p)``.
        p: the preset (geometry, slices, simulation).
        seed: master seed.
        projector: a projector on ``preset(p.geometry_preset)`` (built here when None; pass one to reuse its
            system matrix).
    Returns:
        A dict of ``(Z, N, N)`` arrays (image ``[z, r, c]``; HU float32 unless said) and provenance:
        ``hu`` (the phantom), ``tissue_labels`` (uint8), ``labels`` (uint8, ``anatomy_labels``), ``metal_mask``
        (bool, the same on every slice), ``objects`` (``[MetalObject]``), ``spec`` (the ``CaseSpec``), ``z_mm``
        ``(Z,)``, ``noise_seeds`` (one int per slice);
        implant patients also ``ordinary_ma_image`` / ``ordinary_gt_image`` (120 kVp with / without metal),
        ``ma_mono_image`` / ``gt_mono_image`` (70 keV GSI + MARs analogue / metal-free VMI, HU at 70 keV),
        ``starved_rays`` (per slice ``[low kVp, high kVp]``), ``clamped_rays``, ``unconverged_rays``,
        ``ordinary_starved_rays`` (per slice); clean patients ``clean_image`` (the metal-free 120 kVp scan).
    Raises:
        ValueError: a patient not of this preset's categories (see ``simulate_gsi`` for the physics' errors).
    """
    g = preset(p.geometry_preset)
    projector = projector or Projector(g)
    rng = _rng(seed, 0, patient.implant_index, patient.number)
    spec = sample_case(patient.category, rng)
    z_mm = _z_positions(p)
    drawn = [render(spec, g, float(z)) for z in z_mm]
    hu = np.stack([d[0] for d in drawn])
    tissue = np.stack([d[1] for d in drawn])
    objects: list[MetalObject] = []
    if not patient.clean:
        _, centre_labels = render(spec, g, 0.0)  # one implant for the whole volume, placed on its centre slice
        objects = sample_implants(spec, g, centre_labels, rng, fractal_probability=0.0)
    metal = np.any([o.mask for o in objects], axis=0) if objects else np.zeros(g.image_shape, dtype=bool)
    labels = np.stack([anatomy_labels(spec, g, tissue[i], metal, float(z)) for i, z in enumerate(z_mm)])
    seeds = _noise_seeds(seed, patient, p.slices)
    out = {"hu": hu, "tissue_labels": tissue, "labels": labels, "metal_mask": np.broadcast_to(metal, hu.shape),
           "objects": objects, "z_mm": z_mm, "noise_seeds": seeds, "spec": spec}
    materials = sorted({o.material for o in objects})
    keys = ("ordinary_ma_image", "ordinary_gt_image", "ma_mono_image", "gt_mono_image") if objects else (
        "clean_image",)
    parts: dict[str, list] = {k: [] for k in (*keys, "starved_rays", "clamped_rays", "unconverged_rays",
                                              "ordinary_starved_rays")}
    for start in range(0, p.slices, p.batch_size):  # slices in chunks only to bound memory: seeds are per slice
        part = slice(start, min(start + p.batch_size, p.slices))
        x = torch.from_numpy(hu[part])[:, None]
        if not objects:
            scan = simulate_scan(projector, x, {}, p.simulation.ordinary or SimulationConfig(), seeds[part])
            parts["clean_image"].append(scan.gt_image[:, 0].numpy())
            continue
        masks = {m: torch.from_numpy(np.stack([np.any([o.mask for o in objects if o.material == m], axis=0)]
                                              * x.shape[0]))[:, None] for m in materials}
        scan = simulate_gsi(projector, x, masks, p.simulation, seeds[part])
        parts["ordinary_ma_image"].append(scan.ordinary.ma_image[:, 0].numpy())
        parts["ordinary_gt_image"].append(scan.ordinary.gt_image[:, 0].numpy())
        parts["ma_mono_image"].append(mars_analogue(projector, scan, masks, p.simulation.filter_name)[:, 0].numpy())
        parts["gt_mono_image"].append(scan.gt_mono_image[:, 0].numpy())
        parts["starved_rays"] += scan.starved_rays.tolist()
        parts["clamped_rays"] += scan.clamped_rays.tolist()
        parts["unconverged_rays"] += scan.unconverged_rays.tolist()
        parts["ordinary_starved_rays"] += scan.ordinary.starved_rays.tolist()
    for k in keys:
        out[k] = np.concatenate(parts[k]).astype(np.float32)
    if objects:
        out.update({k: [int(v) if not isinstance(v, list) else [int(u) for u in v] for v in parts[k]]
                    for k in ("starved_rays", "clamped_rays", "unconverged_rays", "ordinary_starved_rays")})
    return out


def mars_analogue(projector: Projector, scan: GSIScan, metal_masks: dict[str, torch.Tensor],
                  filter_name: str | None = None) -> torch.Tensor:
    """The GSI + MARs analogue of a metal scan's virtual monoenergetic image: NMAR (Meyer, Raupach, Lell, Schmidt
    & Kachelriess, "Normalized metal artifact reduction (NMAR) in computed tomography", Med. Phys. 37:5482, 2010;
    ``physics.inpainting.nmar_correction``) of the VMI sinogram inside the metal trace, its FBP, and the metal
    pixels set to each metal's attenuation at ``scan.energy_kev``, as MAR pipelines reinsert the metal.

    The metal goes back into the image, not into the completed sinogram: the FBP of the metal's own line
    integrals paints its edges' aliasing streaks over the body (noise-free 128-pixel phantoms, LI in the trace,
    streak RMSE outside the metal: fixation plate 92 HU with the metal in the sinogram against 28 HU without it,
    hip prosthesis 144 against 56 HU), which is why ``DualEnergyConfig.metal_inpainting`` (LI, the metal added to
    the sinogram) is not used here.

    Args:
        projector: the scan's projector.
        scan: ``simulate_gsi``'s output without ``metal_inpainting``.
        metal_masks: the ``(B, 1, N, N)`` bool mask of each metal, as passed to ``simulate_gsi``.
        filter_name: the FBP kernel (``None``: the geometry's default, as ``simulate_gsi``).
    Returns:
        ``(B, 1, N, N)`` HU at ``scan.energy_kev``.
    """
    e = np.array([scan.energy_kev])
    mu_water_e = float(MATERIALS["water"].mu_per_mm(e)[0])
    # NMAR's prior classes use the geometry's water (0.020 mm^-1, 0.0193 at 70 keV): water reads -36 HU, soft
    # tissue either way, and a common scale of the prior cancels between the normalisation and its inverse
    _, mu = nmar_correction(projector, scan.ma_mono_sinogram, scan.metal_trace, filter_name)
    image = mu_to_hu(mu, mu_water_e)
    for name, mask in metal_masks.items():
        image = torch.where(mask, mu_to_hu(float(MATERIALS[name].mu_per_mm(e)[0]), mu_water_e), image)
    return image


def streak_rmse(image: np.ndarray, reference: np.ndarray, metal: np.ndarray, body: np.ndarray,
                margin_px: int = 3) -> float:
    """RMSE (HU) of ``image`` against ``reference`` over the body pixels outside the metal dilated by
    ``margin_px`` pixels (in-plane, per slice): the streak error, without the metal and its blurred edge.

    Args:
        image, reference: ``(N, N)`` or ``(Z, N, N)`` HU of one kind (their HU scales must agree).
        metal, body: bool masks of the same shape.
    Raises:
        ValueError: shapes differ, or no pixel is left to measure.
    """
    from scipy import ndimage

    image, reference = np.asarray(image, np.float64), np.asarray(reference, np.float64)
    metal, body = np.asarray(metal, bool), np.asarray(body, bool)
    if not image.shape == reference.shape == metal.shape == body.shape:
        raise ValueError(f"streak_rmse: shapes differ: image {image.shape}, reference {reference.shape}, "
                         f"metal {metal.shape}, body {body.shape}")
    structure = np.zeros((3,) * metal.ndim, bool)
    centre = (1,) * (metal.ndim - 2)
    structure[centre] = ndimage.generate_binary_structure(2, 1)  # in-plane only: slices are independent
    near = ndimage.binary_dilation(metal, structure, iterations=margin_px) if metal.any() else metal
    use = body & ~near
    if not use.any():
        raise ValueError("streak_rmse: no body pixel outside the dilated metal")
    return float(np.sqrt(np.mean((image[use] - reference[use]) ** 2)))


# ----------------------------------------------------------------------------------------------- writing


def _save_volume(path: Path, stack: np.ndarray, pixel_mm: float, spacing_mm: float, dtype) -> None:
    """``(Z, N, N)`` images ``[z, r, c]`` -> NIfTI voxels ``(X, Y, Z)`` with ``volume[c, r, z] = image[z, r, c]``."""
    volume = np.ascontiguousarray(np.transpose(np.asarray(stack), (2, 1, 0)).astype(dtype))
    nib.save(nib.Nifti1Image(volume, np.diag([pixel_mm, pixel_mm, spacing_mm, 1.0])), str(path))


def _write_patient(out: Path, patient: PlannedPatient, p: GSIAnaloguePreset, seed: int, sim: dict) -> None:
    """Write one patient into ``.<id>.tmp/`` and rename it to ``<id>/`` when every file is there."""
    g = preset(p.geometry_preset)
    tmp = out / f".{patient.id}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    args = (g.pixel_size_mm, p.slice_spacing_mm)
    if patient.clean:
        _save_volume(tmp / "clean.nii.gz", sim["clean_image"], *args, np.float32)
    else:
        _save_volume(tmp / "ordinary.nii.gz", sim["ordinary_ma_image"], *args, np.float32)
        _save_volume(tmp / "gsi.nii.gz", sim["ma_mono_image"], *args, np.float32)
    _save_volume(tmp / "labels.nii.gz", sim["labels"], *args, np.uint8)
    objects = sim["objects"]
    meta = {
        "implant": patient.implant,
        "region": REGION_OF[patient.category],
        "category": patient.category,
        "material": "+".join(sorted({o.material for o in objects})) or None,
        "objects": [o.info(g) for o in objects],
        "energy_kev": None if patient.clean else float(p.simulation.energy_kev),
        "kvp": (p.simulation.ordinary or SimulationConfig()).kvp,
        "geometry": p.geometry_preset,
        "slice_spacing_mm": p.slice_spacing_mm,
        "z_mm": [float(z) for z in sim["z_mm"]],
        "seed": seed,
        "noise_seeds": sim["noise_seeds"],
        "generator": "marbench.datasets.gsi_analogue",
    }
    if not patient.clean:
        meta.update({
            "gsi": "70 keV virtual monoenergetic image with the GSI + MARs analogue (mars_analogue)",
            "starved_rays": sim["starved_rays"],  # per slice: [low kVp, high kVp] readings of the metal scan
            "clamped_rays": sim["clamped_rays"],
            "unconverged_rays": sim["unconverged_rays"],
            "ordinary_starved_rays": sim["ordinary_starved_rays"],
        })
    atomic_write_json(tmp / "meta.json", meta)
    tmp.rename(out / patient.id)  # the patient appears whole or not at all


# ----------------------------------------------------------------------------------------------- provenance

_STAMP = ".generation.json"
_CODE_PACKAGES = ("marbench.physics", "marbench.datasets.synthetic")
_CODE_MODULES = ("marbench.datasets.gsi_analogue", "marbench.files")
_LIBRARIES = ("torch", "numpy", "scipy", "xraydb", "spekpy", "nibabel")
_PATIENT_DIR = re.compile(r"^\.?(%s|clean)_\d+(\.tmp)?$" % "|".join(CATEGORY_OF))


def fingerprint_parts(preset_name: str, seed: int) -> dict:
    """The parts of an analogue's fingerprint (module docstring).

    Returns:
        ``{"generator_version", "preset", "geometry", "seed", "code", "libraries"}``, JSON-serialisable.
    Raises:
        ValueError: unknown preset.
    """
    p = _preset(preset_name)
    return {
        "generator_version": GENERATOR_VERSION,
        "preset": asdict(p),
        "geometry": preset(p.geometry_preset).to_dict(),
        "seed": seed,
        "code": source_digest(_CODE_PACKAGES, _CODE_MODULES),
        "libraries": library_versions(_LIBRARIES, missing="absent"),
    }


def expected_fingerprint(preset_name: str, seed: int = 0) -> dict:
    """``{"sha256", "parts"}`` that an analogue of ``preset_name`` and ``seed`` made by this code carries.

    Raises:
        ValueError: unknown preset.
    """
    return fingerprint_of(fingerprint_parts(preset_name, seed))


def _generated_entries(out: Path) -> list[Path]:
    """What this generator writes at the top of ``out`` (and so what ``force`` deletes): the stamp, manifest,
    split file, patient folders named as the plans name them, and their ``.<id>.tmp`` folders."""
    if not out.is_dir():
        return []
    return sorted(e for e in out.iterdir() if e.name in (_STAMP, "manifest.json", SPLIT_FILE)
                  or (e.is_dir() and _PATIENT_DIR.match(e.name)))


def _prepare_folder(out: Path, fingerprint: dict, identity: dict, force: bool) -> None:
    """Stamp ``out`` with ``fingerprint`` or check that it carries it (``force``: delete generated content of
    another fingerprint first); remove temporaries of an interrupted run."""
    foreign = sorted(e.name for e in out.iterdir() if e.is_dir() and not e.name.startswith(".")
                     and not _PATIENT_DIR.match(e.name)) if out.is_dir() else []
    if foreign:  # the reader serves every folder as a patient: never mix the analogue with others
        raise ValueError(f"{out}: holds folders this generator did not write ({', '.join(foreign[:5])}"
                         f"{', ...' if len(foreign) > 5 else ''}); the ArtifactGSI reader would serve them as "
                         "patients beside the analogue's. Use an empty folder")
    entries = _generated_entries(out)
    found = folder_fingerprint(out) if entries else None
    if entries and force:
        for e in entries:
            shutil.rmtree(e) if e.is_dir() else e.unlink()
    elif entries and (found is None or found["sha256"] != fingerprint["sha256"]):
        if found is None:
            what, differ = "no fingerprint", "unknown"
        else:
            what = found["sha256"]
            names = sorted(set(found["parts"]) | set(fingerprint["parts"]))
            differ = ", ".join(n for n in names if found["parts"].get(n) != fingerprint["parts"].get(n))
        raise ValueError(
            f"{out}: holds an ArtifactGSI analogue generated with other code or settings (found fingerprint "
            f"{what}; expected {fingerprint['sha256']} for {identity}; parts that differ: {differ}). Stale data "
            "must not feed a record: use `marbench simulate-gsi --force` (generate_gsi_analogue(..., force=True)) "
            "to delete its generated content and rebuild it, or another folder")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / _STAMP).is_file():
        atomic_write_json(out / _STAMP, {**identity, "fingerprint": fingerprint})
    for stale in out.iterdir():  # patients (and files) a killed run left half-written
        if stale.name.endswith(".tmp"):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()


def generate_gsi_analogue(out: str | Path, preset_name: str = "gsi-smoke", seed: int = 0, limit: int | None = None,
                          progress: bool = True, force: bool = False) -> dict | None:
    """Generate (or resume) an ArtifactGSI analogue in the layout of ``marbench.datasets.artifactgsi``.

    Args:
        out: output folder (created; an existing one must hold nothing but this generator's output).
        preset_name: a key of ``PRESETS`` (``gsi-tiny``, ``gsi-smoke``, ``gsi``).
        seed: master seed; the same seed (and fingerprint) gives the same bytes, interrupted or not.
        limit: stop after simulating this many new patients (returns None); None finishes the preset.
        progress: show a progress bar (one step per patient).
        force: when ``out`` holds an analogue of another fingerprint, delete what this generator wrote and rebuild.
    Returns:
        The manifest (also ``out/manifest.json``: identity, fingerprint with its parts and code files, geometry,
        simulation, patients per implant type, sha256 of every file) when complete, else None.
    Raises:
        ValueError: unknown preset; negative ``limit``; ``out`` holds an analogue of another fingerprint (the
            message names the folder, the found and expected fingerprints and the parts that differ) and
            ``force`` is False; ``out`` holds folders this generator did not write.
    """
    parts = fingerprint_parts(preset_name, seed)  # raises on an unknown preset
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 new patients, found {limit}")
    p = PRESETS[preset_name]
    out = Path(out)
    identity = {"generator_version": GENERATOR_VERSION, "preset": preset_name, "seed": seed,
                "generator": "marbench.datasets.gsi_analogue"}
    fingerprint = fingerprint_of(parts)
    _prepare_folder(out, fingerprint, identity, force)
    plan = plan_patients(p)
    done = sum((out / q.id).is_dir() for q in plan)
    bar = tqdm(total=len(plan), initial=done, desc=f"simulate {preset_name}", unit="patient", disable=not progress)
    projector = None
    simulated = 0
    for q in plan:
        if (out / q.id).is_dir():
            continue
        if limit is not None and simulated >= limit:
            bar.close()
            return None
        projector = projector or Projector(preset(p.geometry_preset))
        _write_patient(out, q, p, seed, simulate_patient(q, p, seed, projector))
        simulated += 1
        bar.update(1)
    bar.close()
    atomic_write(out / SPLIT_FILE, split_text(p, seed))  # after the patients: it names every one of them
    own = {out / "manifest.json", out / _STAMP}
    files = sorted(f for f in out.rglob("*") if f.is_file() and f not in own)
    manifest = {
        **identity,
        "fingerprint": {**fingerprint, "code_files": parts["code"], "libraries": parts["libraries"]},
        "preset_settings": parts["preset"],
        "geometry": parts["geometry"],
        "patients": {t: sum(q.implant == t for q in plan) for t in IMPLANT_TYPES},
        "slices": p.slices * len(plan),
        "files": {str(f.relative_to(out)): sha256_file(f) for f in files},
    }
    atomic_write_json(out / "manifest.json", manifest)
    return manifest
