"""The embedded synthetic AAPM-like benchmark: procedural phantoms simulated with ``marbench.physics`` and
written in the AAPM CT-MAR release layout (``marbench.datasets.aapm_format``), so one reader serves both.

Output under ``out``::

    manifest.json                 generator version, preset, seed, geometries, simulation, sha256 of every file
    split.txt                     train/val/test by case, with the category (``marbench.datasets.splits``)
    body1/ head1/                 the main cases (Target/, Baseline/, Mask/, Labels/)
    sweeps/quantity/              each base slice with 1..5 metal objects (DuDoCROP Sec. III.D, PI_q)
    sweeps/size/                  each base slice with one object at 4 sizes (PI_s)
    stacks/                       stacks of adjacent slices of one phantom and implant (volume-input methods)

Every case is written file by file to a temporary name and renamed; its ``metalinfo`` JSON comes last and marks
the case complete, so an interrupted run resumes at the first incomplete batch and the same seed gives the
same bytes.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from marbench.files import atomic_write, atomic_write_json, sha256_file
from marbench.physics import Projector, SimulationConfig, preset, simulate_scan
from marbench.physics.metal_masks import fractal_shape
from marbench.physics.spectrum import MATERIALS, effective_energy_kev

from ..aapm_format import AAPMCase, case_files, write_raw
from .anatomy import ANATOMY_OF, CATEGORIES, render, sample_case
from .implants import MetalObject, fractal_objects, host_centres, sample_implants
from .tissues import label_names

__all__ = ["GENERATOR_VERSION", "SyntheticPreset", "PRESETS", "generate", "plan_jobs", "split_text"]

GENERATOR_VERSION = "1.1"


@dataclass(frozen=True)
class SyntheticPreset:
    """Size and physics of one synthetic benchmark."""

    name: str
    geometry_presets: dict
    cases_per_category: int
    sweep_slices: int
    stacks: int
    stack_depth: int = 3
    slice_spacing_mm: float = 1.0
    sweep_sizes_mm: tuple = (4.0, 8.0, 12.0, 16.0)
    sweep_max_objects: int = 5
    sweep_diameter_mm: float = 8.0
    sweep_material: str = "stainless_steel"
    split_fractions: tuple = (0.7, 0.15, 0.15)
    batch_size: int = 8
    simulation: SimulationConfig = field(default_factory=SimulationConfig)


PRESETS = {
    "tiny": SyntheticPreset("tiny", {"body": "aapm_body_128", "head": "aapm_head_128"}, cases_per_category=2,
                            sweep_slices=1, stacks=1, batch_size=4,
                            simulation=SimulationConfig(photons_per_ray=1.6e6)),
    "smoke": SyntheticPreset("smoke", {"body": "aapm_body_256", "head": "aapm_head_256"}, cases_per_category=20,
                             sweep_slices=4, stacks=4, simulation=SimulationConfig(photons_per_ray=8e5)),
    "aapm": SyntheticPreset("aapm", {"body": "aapm_body", "head": "aapm_head"}, cases_per_category=100,
                            sweep_slices=20, stacks=10, simulation=SimulationConfig(photons_per_ray=2e5)),
}


@dataclass(frozen=True)
class Job:
    """One slice to simulate: where it goes and how its phantom and metal are drawn."""

    number: int  # unique, seeds the slice
    root: str  # "", "sweeps/quantity", "sweeps/size", "stacks"
    case: AAPMCase
    category: str
    kind: str  # main | quantity | size | stack
    base: int = 0  # sweep: base slice id; stack: stack id
    level: int = 0  # sweep: number of objects or size index; stack: position in the stack


def plan_jobs(p: SyntheticPreset) -> list[Job]:
    """Every slice of a preset, in generation order (deterministic)."""
    jobs: list[Job] = []
    counters: dict[tuple[str, str], int] = {}

    def add(root, category, kind, base=0, level=0):
        anatomy = ANATOMY_OF[category]
        key = (root, anatomy)
        counters[key] = counters.get(key, 0) + 1
        jobs.append(Job(len(jobs), root, AAPMCase(f"{anatomy}1", anatomy, counters[key]), category, kind, base, level))

    for anatomy in ("body", "head"):  # one anatomy at a time keeps the simulation batches full
        for _ in range(p.cases_per_category):
            for category in CATEGORIES:
                if ANATOMY_OF[category] == anatomy:
                    add("", category, "main")
    body_categories = [c for c in CATEGORIES if ANATOMY_OF[c] == "body"]
    for s in range(p.sweep_slices):
        category = body_categories[s % len(body_categories)]
        for n in range(1, p.sweep_max_objects + 1):
            add("sweeps/quantity", category, "quantity", s, n)
        for i in range(len(p.sweep_sizes_mm)):
            add("sweeps/size", category, "size", s, i)
    for s in range(p.stacks):
        category = CATEGORIES[s % len(CATEGORIES)]
        for z in range(p.stack_depth):
            add("stacks", category, "stack", s, z)
    return jobs


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def _phantom_and_metal(job: Job, p: SyntheticPreset, seed: int, geometry) -> tuple[np.ndarray, np.ndarray, list]:
    """HU image, labels and metal objects of a job; sweeps and stacks share their phantom across levels."""
    if job.kind == "main":
        rng = _rng(seed, 0, job.number)
        spec = sample_case(job.category, rng)
        hu, labels = render(spec, geometry)
        return hu, labels, sample_implants(spec, geometry, labels, rng)
    if job.kind == "stack":
        rng = _rng(seed, 3, job.base)
        spec = sample_case(job.category, rng)
        centre_z = (p.stack_depth - 1) / 2
        hu, labels = render(spec, geometry, (job.level - centre_z) * p.slice_spacing_mm)
        _, centre_labels = render(spec, geometry, 0.0)  # one implant for the whole stack, placed at its centre
        return hu, labels, sample_implants(spec, geometry, centre_labels, rng)
    rng = _rng(seed, 1, job.base)
    spec = sample_case(job.category, rng)
    hu, labels = render(spec, geometry)
    # every level of a sweep reuses the base slice's shapes, centres and orientations
    count = p.sweep_max_objects if job.kind == "quantity" else 1
    shapes = [fractal_shape(rng) for _ in range(count)]
    centres = host_centres(geometry, labels, rng, count)
    if job.kind == "quantity":
        objects = fractal_objects(geometry, labels, rng, job.level, p.sweep_diameter_mm, p.sweep_material,
                                  shapes[: job.level], centres[: job.level])
    else:
        objects = fractal_objects(geometry, labels, rng, 1, p.sweep_sizes_mm[job.level], p.sweep_material,
                                  shapes, centres)
    return hu, labels, objects


def _noise_seed(seed: int, job: Job) -> int:
    """Independent noise per slice, except along a sweep: every level of one base slice shares its noise, so
    the levels differ only by the metal (what PI_q / PI_s measure)."""
    key = (2, job.number) if job.kind in ("main", "stack") else (4, job.kind == "size", job.base)
    return int(_rng(seed, *key).integers(2**62))


def _metal_hu(material: str, mu_water: float) -> float:
    e = np.array([effective_energy_kev(mu_water)])
    return float((MATERIALS[material].mu_per_mm(e)[0] / mu_water - 1) * 1000)


def _write_case(root: Path, job: Job, geometry, scan, i: int, labels: np.ndarray, objects: list[MetalObject],
                seed: int, noise_seed: int, starved: int) -> None:
    files = case_files(root, job.case, geometry)
    write_raw(files["gt_image"], scan.gt_image[i, 0].numpy())
    write_raw(files["gt_sinogram"], scan.gt_sinogram[i, 0].numpy())
    write_raw(files["ma_image"], scan.ma_image[i, 0].numpy())
    write_raw(files["ma_sinogram"], scan.ma_sinogram[i, 0].numpy())
    metal_only = np.zeros(geometry.image_shape, dtype=np.float32)
    for o in objects:
        metal_only[o.mask] = _metal_hu(o.material, geometry.mu_water_per_mm)
    write_raw(files["metal_only_image"], metal_only)
    write_raw(files["tissue_labels"], labels.astype(np.float32))
    info = {"category": job.category, "anatomy": job.case.anatomy, "kind": job.kind, "base": job.base,
            "level": job.level, "seed": seed, "noise_seed": noise_seed, "photon_starved_readings": starved,
            "metal_hu_image": "Mask/*metalonlymask*: HU of each object's material at the effective energy",
            "objects": [o.info(geometry) for o in objects]}
    atomic_write_json(files["metal_info"], info)  # last: marks the case complete


def _batches(jobs: list[Job], size: int):
    """Consecutive jobs of one root and anatomy, at most ``size`` each (fixed by the plan, not by resumption)."""
    batch: list[Job] = []
    for job in jobs:
        if batch and (len(batch) == size or (job.root, job.case.anatomy) != (batch[0].root, batch[0].case.anatomy)):
            yield batch
            batch = []
        batch.append(job)
    if batch:
        yield batch


def split_text(preset_name: str, seed: int = 0) -> str:
    """The split file of a synthetic benchmark: per category, 70/15/15 % train/val/test at random (seeded)."""
    p = PRESETS[preset_name]
    jobs = plan_jobs(p)
    rng = _rng(seed, 9)
    lines = [f"# synthetic benchmark '{preset_name}', seed {seed}: <split> <case_id> <category>"]
    for category in CATEGORIES:
        cases = [j for j in jobs if j.kind == "main" and j.category == category]
        order = rng.permutation(len(cases))
        n_train = int(round(p.split_fractions[0] * len(cases)))
        n_val = int(round(p.split_fractions[1] * len(cases)))
        for rank, idx in enumerate(order):
            name = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
            lines.append(f"{name} {cases[idx].case.case_id} {category}")
    return "\n".join(lines) + "\n"


def _write_indexes(out: Path, p: SyntheticPreset, jobs: list[Job], seed: int) -> None:
    atomic_write(out / "split.txt", split_text(p.name, seed))
    tables = {
        "sweeps/quantity/sweep.csv": (["case_id", "category", "base_slice", "n_objects", "diameter_mm"],
                                      [[j.case.case_id, j.category, j.base, j.level, p.sweep_diameter_mm]
                                       for j in jobs if j.kind == "quantity"]),
        "sweeps/size/sweep.csv": (["case_id", "category", "base_slice", "n_objects", "diameter_mm"],
                                  [[j.case.case_id, j.category, j.base, 1, p.sweep_sizes_mm[j.level]]
                                   for j in jobs if j.kind == "size"]),
        "stacks/stacks.csv": (["case_id", "category", "stack", "position", "z_mm"],
                              [[j.case.case_id, j.category, j.base, j.level,
                                (j.level - (p.stack_depth - 1) / 2) * p.slice_spacing_mm]
                               for j in jobs if j.kind == "stack"]),
    }
    for rel, (header, rows) in tables.items():
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([header, *rows])
        atomic_write(out / rel, buf.getvalue())
    for root in ("sweeps/quantity", "sweeps/size", "stacks"):  # each is an AAPM-layout root of its own
        back = "../" * (root.count("/") + 1)
        atomic_write_json(out / root / "manifest.json",
                          {"geometry_presets": p.geometry_presets, "generated_by": back + "manifest.json"})


def generate(out: str | Path, preset_name: str = "smoke", seed: int = 0, limit: int | None = None,
             progress: bool = True, projector_backend: str = "sparse") -> dict | None:
    """Generate (or resume) a synthetic benchmark.

    Args:
        out: output folder.
        preset_name: a key of ``PRESETS`` (``tiny``, ``smoke``, ``aapm``).
        seed: master seed; the same seed gives the same bytes.
        limit: stop after simulating this many new cases (an incremental run); ``None`` finishes the preset.
        progress: show a progress bar.
    Returns:
        The manifest (also written to ``out/manifest.json``) when the benchmark is complete, else ``None``.
    Raises:
        ValueError: unknown preset; ``out`` holds a benchmark of another preset, seed or generator version.
    """
    if preset_name not in PRESETS:
        raise ValueError(f"unknown synthetic preset {preset_name!r}; expected one of {sorted(PRESETS)}")
    p = PRESETS[preset_name]
    out = Path(out)
    identity = {"generator_version": GENERATOR_VERSION, "preset": preset_name, "seed": seed}
    stamp = out / ".generation.json"
    if stamp.is_file():
        found = json.loads(stamp.read_text())
        if found != identity:
            raise ValueError(f"{out}: holds a benchmark generated with {found}, expected {identity}; "
                             "use another folder or delete it")
    else:
        atomic_write_json(stamp, identity)
    for stale in out.rglob("*.tmp"):  # temporaries of a run that was killed mid-write
        stale.unlink()
    jobs = plan_jobs(p)
    _write_indexes(out, p, jobs, seed)
    geometries = {a: preset(n) for a, n in p.geometry_presets.items()}
    projectors: dict[str, Projector] = {}
    done = sum(case_files(out / j.root, j.case, geometries[j.case.anatomy])["metal_info"].is_file() for j in jobs)
    bar = tqdm(total=len(jobs), initial=done, desc=f"simulate {preset_name}", unit="slice", disable=not progress)
    simulated = 0
    for batch in _batches(jobs, p.batch_size):
        anatomy = batch[0].case.anatomy
        g = geometries[anatomy]
        if all(case_files(out / j.root, j.case, g)["metal_info"].is_file() for j in batch):
            continue
        if limit is not None and simulated >= limit:
            bar.close()
            return None
        if anatomy not in projectors:
            projectors[anatomy] = Projector(g, backend=projector_backend)
        drawn = [_phantom_and_metal(j, p, seed, g) for j in batch]
        hu = torch.from_numpy(np.stack([d[0] for d in drawn]))[:, None]
        materials = sorted({o.material for d in drawn for o in d[2]})
        masks = {m: torch.from_numpy(np.stack([
            np.any([o.mask for o in d[2] if o.material == m] or [np.zeros(g.image_shape, bool)], axis=0)
            for d in drawn]))[:, None] for m in materials}
        noise_seeds = [_noise_seed(seed, j) for j in batch]
        scan = simulate_scan(projectors[anatomy], hu, masks, p.simulation, seed=noise_seeds)
        for i, (job, (_, labels, objects)) in enumerate(zip(batch, drawn, strict=True)):
            _write_case(out / job.root, job, g, scan, i, labels, objects, seed, noise_seeds[i],
                        int(scan.starved_rays[i]))
        simulated += len(batch)
        bar.update(len(batch))
    bar.close()
    own = {out / "manifest.json", stamp}
    files = sorted(f for f in out.rglob("*") if f.is_file() and f not in own)
    manifest = {
        **identity,
        "generator": "marbench.datasets.synthetic",
        "geometry_presets": p.geometry_presets,
        "geometries": {a: g.to_dict() for a, g in geometries.items()},
        "simulation": asdict(p.simulation),
        "categories": list(CATEGORIES),
        "tissue_labels": label_names(),
        "cases": {name: sum(j.kind == kind for j in jobs) for name, kind in (
            ("main", "main"), ("quantity_sweep", "quantity"), ("size_sweep", "size"), ("stack_slices", "stack"))},
        "files": {str(f.relative_to(out)): sha256_file(f) for f in files},
    }
    atomic_write_json(out / "manifest.json", manifest)
    return manifest
