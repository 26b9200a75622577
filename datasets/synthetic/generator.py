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
same bytes (whatever the thread count: each slice's noise has its own generator).

Provenance: a folder says which code and settings made it. Its ``fingerprint`` is the sha256 of a
canonical JSON (sorted keys, no spaces) of the parts that change its bytes: ``generator_version``, the ``preset``
dataclass (with its ``SimulationConfig``), the ``geometries`` (``to_dict`` of each anatomy's scanner, so a change of
orientation or FBP kernel in ``marbench.physics`` changes it), the ``seed``, ``code`` (sha256 over the source of
``marbench.physics``, ``marbench.datasets.synthetic``, ``marbench.datasets.aapm_format`` and ``marbench.files``,
file by file in sorted order) and ``libraries`` (the versions of torch, numpy, scipy, xraydb, spekpy, whose
random streams and numerics reach the bytes); a benchmark simulated on clean CT images adds ``inputs``
(``marbench.datasets.synthetic.clean_ct``). The fingerprint and each part's digest are written to
``.generation.json`` before the first case and to ``manifest.json`` at the end. ``generate`` resumes only into a
folder of the same fingerprint; any other is refused with the parts that differ, unless ``force=True``
(``marbench simulate --force``) deletes its generated content and rebuilds it, so stale data never feeds a record.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from marbench.files import atomic_write, atomic_write_json, library_versions, sha256_file, source_digest
from marbench.physics import Projector, SimulationConfig, preset, simulate_scan
from marbench.physics.metal_masks import fractal_shape
from marbench.physics.spectrum import MATERIALS, effective_energy_kev

from ..aapm_format import AAPMCase, case_files, write_raw
from .anatomy import ANATOMY_OF, CATEGORIES, render, sample_case
from .implants import MetalObject, fractal_objects, host_centres, sample_implants
from .tissues import label_names

__all__ = ["GENERATOR_VERSION", "SyntheticPreset", "PRESETS", "generate", "plan_jobs", "split_text",
           "code_digest", "fingerprint_parts", "fingerprint_of", "expected_fingerprint", "folder_fingerprint"]

GENERATOR_VERSION = "1.2"  # 1.2: fingerprint in the stamp and manifest; gecatsim orientation, `standard` FBP


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
    # smoke: 3 sweep base slices (27 sweep levels), not 4, for `make bench`'s one-hour CPU budget (issue #16):
    # every row scored under perceptual-indicators runs the method and an LPIPS pass on each level
    "smoke": SyntheticPreset("smoke", {"body": "aapm_body_256", "head": "aapm_head_256"}, cases_per_category=20,
                             sweep_slices=3, stacks=4, simulation=SimulationConfig(photons_per_ray=8e5)),
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
    return hu, labels, sweep_objects(job, p, geometry, labels, rng)


def sweep_objects(job: Job, p: SyntheticPreset, geometry, labels: np.ndarray,
                  rng: np.random.Generator) -> list[MetalObject]:
    """The metal of one sweep level (``job.kind`` ``quantity`` or ``size``) on a base slice's tissue ``labels``;
    ``rng`` is the base slice's, so every level reuses the same shapes, centres and orientations."""
    count = p.sweep_max_objects if job.kind == "quantity" else 1
    shapes = [fractal_shape(rng) for _ in range(count)]
    centres = host_centres(geometry, labels, rng, count)
    if job.kind == "quantity":
        return fractal_objects(geometry, labels, rng, job.level, p.sweep_diameter_mm, p.sweep_material,
                               shapes[: job.level], centres[: job.level])
    return fractal_objects(geometry, labels, rng, 1, p.sweep_sizes_mm[job.level], p.sweep_material, shapes, centres)


def _noise_seed(seed: int, job: Job) -> int:
    """Independent noise per slice, except along a sweep: every level of one base slice shares its noise, so
    the levels differ only by the metal (what PI_q / PI_s measure)."""
    key = (2, job.number) if job.kind in ("main", "stack") else (4, job.kind == "size", job.base)
    return int(_rng(seed, *key).integers(2**62))


def _metal_hu(material: str, mu_water: float) -> float:
    e = np.array([effective_energy_kev(mu_water)])
    return float((MATERIALS[material].mu_per_mm(e)[0] / mu_water - 1) * 1000)


def _write_case(root: Path, job: Job, geometry, scan, i: int, labels: np.ndarray, objects: list[MetalObject],
                seed: int, noise_seed: int, starved: int, extra: dict | None = None) -> None:
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
            "objects": [o.info(geometry) for o in objects], **(extra or {})}
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


def write_sweep_indexes(out: Path, p: SyntheticPreset, jobs: list[Job], stacks: bool = True) -> None:
    """The sweep (and stack) tables and the per-root manifests that make ``sweeps/*`` (``stacks``) AAPM roots."""
    tables = {
        "sweeps/quantity/sweep.csv": (["case_id", "category", "base_slice", "n_objects", "diameter_mm"],
                                      [[j.case.case_id, j.category, j.base, j.level, p.sweep_diameter_mm]
                                       for j in jobs if j.kind == "quantity"]),
        "sweeps/size/sweep.csv": (["case_id", "category", "base_slice", "n_objects", "diameter_mm"],
                                  [[j.case.case_id, j.category, j.base, 1, p.sweep_sizes_mm[j.level]]
                                   for j in jobs if j.kind == "size"]),
    }
    if stacks:
        tables["stacks/stacks.csv"] = (["case_id", "category", "stack", "position", "z_mm"],
                                       [[j.case.case_id, j.category, j.base, j.level,
                                         (j.level - (p.stack_depth - 1) / 2) * p.slice_spacing_mm]
                                        for j in jobs if j.kind == "stack"])
    for rel, (header, rows) in tables.items():
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([header, *rows])
        atomic_write(out / rel, buf.getvalue())
    for root in ("sweeps/quantity", "sweeps/size", "stacks") if stacks else ("sweeps/quantity", "sweeps/size"):
        back = "../" * (root.count("/") + 1)  # each is an AAPM-layout root of its own
        atomic_write_json(out / root / "manifest.json",
                          {"geometry_presets": p.geometry_presets, "generated_by": back + "manifest.json"})


# ----------------------------------------------------------------------------------------------- provenance

_STAMP = ".generation.json"
_CODE_PACKAGES = ("marbench.physics", "marbench.datasets.synthetic")  # every .py file of these
_CODE_MODULES = ("marbench.datasets.aapm_format", "marbench.files")  # and these modules
_LIBRARIES = ("torch", "numpy", "scipy", "xraydb", "spekpy")


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=repr)


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def code_digest() -> dict[str, str]:
    """sha256 of each source file of the code that produces a benchmark's bytes, keyed by its module path
    (``marbench/physics/geometry.py``, ...), sorted: the ``.py`` files of ``marbench.physics`` and
    ``marbench.datasets.synthetic``, ``marbench/datasets/aapm_format.py`` and ``marbench/files.py``, read from the
    installed package paths."""
    return source_digest(_CODE_PACKAGES, _CODE_MODULES)


def _library_versions(names=_LIBRARIES) -> dict[str, str]:
    return library_versions(names, missing="absent")


def fingerprint_parts(preset_name: str, seed: int) -> dict:
    """The parts of a benchmark's fingerprint that do not depend on input images (see the module docstring).

    Returns:
        ``{"generator_version", "preset", "geometries", "seed", "code", "libraries"}``, JSON-serialisable.
    Raises:
        ValueError: unknown preset.
    """
    if preset_name not in PRESETS:
        raise ValueError(f"unknown synthetic preset {preset_name!r}; expected one of {sorted(PRESETS)}")
    p = PRESETS[preset_name]
    return {
        "generator_version": GENERATOR_VERSION,
        "preset": asdict(p),
        "geometries": {a: preset(n).to_dict() for a, n in sorted(p.geometry_presets.items())},
        "seed": seed,
        "code": code_digest(),
        "libraries": _library_versions(),
    }


def fingerprint_of(parts: dict) -> dict:
    """``{"sha256": digest of the canonical JSON of all parts, "parts": {name: digest of that part}}``."""
    return {"sha256": _sha256_text(_canonical(parts)),
            "parts": {name: _sha256_text(_canonical(value)) for name, value in sorted(parts.items())}}


def expected_fingerprint(preset_name: str, seed: int = 0) -> dict:
    """The fingerprint a synthetic benchmark of ``preset_name`` and ``seed`` made by this code would carry
    (computed without generating anything): compare it with ``folder_fingerprint(root)`` or with a record's
    data manifest.

    Returns:
        ``{"sha256": str (64 hex), "parts": {part: sha256}}``.
    Raises:
        ValueError: unknown preset.
    """
    return fingerprint_of(fingerprint_parts(preset_name, seed))


def folder_fingerprint(root: str | Path) -> dict | None:
    """The fingerprint a benchmark folder says it was made with: its ``.generation.json`` (written before the
    first case) or else its ``manifest.json``; ``None`` when neither holds one (no benchmark, or one made before
    fingerprints existed).

    Returns:
        ``{"sha256": str, "parts": {part: sha256}}`` or ``None``.
    Raises:
        ValueError: a stamp or manifest that is not valid JSON (named).
    """
    root = Path(root)
    for name in (_STAMP, "manifest.json"):
        f = root / name
        if f.is_file():
            try:
                found = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}: expected JSON, found a parse error ({e})") from None
            fp = found.get("fingerprint") if isinstance(found, dict) else None
            if isinstance(fp, dict) and "sha256" in fp:
                return {"sha256": fp["sha256"], "parts": dict(fp.get("parts", {}))}
    return None


def _generated_entries(out: Path) -> list[Path]:
    """What a generator writes at the top of ``out`` (and so what ``force`` deletes): the stamp, manifest,
    split file, part folders (``body*``, ``head*``), ``sweeps/`` and ``stacks/``."""
    if not out.is_dir():
        return []
    fixed = {_STAMP, "manifest.json", "split.txt", "sweeps", "stacks"}
    return sorted(e for e in out.iterdir() if e.name in fixed
                  or (e.is_dir() and e.name.rstrip("0123456789") in ("body", "head") and e.name[-1:].isdigit()))


def prepare_folder(out: Path, fingerprint: dict, identity: dict, force: bool = False) -> None:
    """Stamp ``out`` with ``fingerprint`` (and the readable ``identity``), or check that it already carries it.

    Raises:
        ValueError: ``out`` holds generated content of another fingerprint (or of none) and ``force`` is False;
            the message names the folder, the found and expected fingerprints and the parts that differ.
    """
    out = Path(out)
    stamp = out / _STAMP
    entries = _generated_entries(out)
    found = folder_fingerprint(out) if entries else None
    if entries and force:  # rebuild from nothing, whatever the folder holds
        for e in entries:
            shutil.rmtree(e) if e.is_dir() else e.unlink()
    elif entries and (found is None or found["sha256"] != fingerprint["sha256"]):
        if found is None:
            what = "no fingerprint (made before fingerprints, or not by this generator)"
            differ = "unknown"
        else:
            what = f"fingerprint {found['sha256'][:16]}"
            names = sorted(set(found["parts"]) | set(fingerprint["parts"]))
            differ = ", ".join(n for n in names if found["parts"].get(n) != fingerprint["parts"].get(n))
        old = {}
        if stamp.is_file():
            old = {k: v for k, v in json.loads(stamp.read_text()).items() if k != "fingerprint"}
        raise ValueError(
            f"{out}: holds a benchmark generated with other code or settings ({what}, made as {old or '?'}); "
            f"expected fingerprint {fingerprint['sha256'][:16]} for {identity}; parts that differ: {differ}. "
            "Stale data must not feed a record: use `marbench simulate --force` (generate(..., force=True)) "
            "to delete its generated content and rebuild it, or another folder")
    if not stamp.is_file():
        atomic_write_json(stamp, {**identity, "fingerprint": fingerprint})
    for stale in out.rglob("*.tmp"):  # temporaries of a run that was killed mid-write
        stale.unlink()


# ----------------------------------------------------------------------------------------------- simulation

Drawn = tuple[np.ndarray, np.ndarray, list]  # HU image (N, N), tissue labels (N, N), metal objects


def simulate_jobs(out: Path, jobs: list[Job], p: SyntheticPreset, seed: int, draw: Callable[[Job, object], Drawn],
                  limit: int | None = None, progress: bool = True, desc: str = "simulate",
                  projector_backend: str = "sparse", case_info: Callable[[Job], dict] | None = None) -> bool:
    """Simulate and write every job not yet complete on disk, batch by batch (``p.batch_size``, fixed by the plan).

    Args:
        out: benchmark root; each job writes under ``out / job.root``.
        jobs: the plan, in generation order.
        p: the preset (geometry per anatomy, simulation settings, batch size).
        seed: master seed (per-slice noise: ``_noise_seed``).
        draw: ``draw(job, geometry) -> (hu (N, N) float32 HU, labels (N, N) uint8, [MetalObject])``.
        limit: stop before the next batch once this many new slices were simulated.
        case_info: extra entries for a case's ``metalinfo`` JSON.
    Returns:
        True when every job is complete.
    """
    geometries = {a: preset(n) for a, n in p.geometry_presets.items()}
    projectors: dict[str, Projector] = {}
    done = sum(case_files(out / j.root, j.case, geometries[j.case.anatomy])["metal_info"].is_file() for j in jobs)
    bar = tqdm(total=len(jobs), initial=done, desc=desc, unit="slice", disable=not progress)
    simulated = 0
    for batch in _batches(jobs, p.batch_size):
        anatomy = batch[0].case.anatomy
        g = geometries[anatomy]
        if all(case_files(out / j.root, j.case, g)["metal_info"].is_file() for j in batch):
            continue
        if limit is not None and simulated >= limit:
            bar.close()
            return False
        if anatomy not in projectors:
            projectors[anatomy] = Projector(g, backend=projector_backend)
        drawn = [draw(j, g) for j in batch]
        hu = torch.from_numpy(np.stack([d[0] for d in drawn]))[:, None]
        materials = sorted({o.material for d in drawn for o in d[2]})
        masks = {m: torch.from_numpy(np.stack([
            np.any([o.mask for o in d[2] if o.material == m] or [np.zeros(g.image_shape, bool)], axis=0)
            for d in drawn]))[:, None] for m in materials}
        noise_seeds = [_noise_seed(seed, j) for j in batch]
        scan = simulate_scan(projectors[anatomy], hu, masks, p.simulation, seed=noise_seeds)
        for i, (job, (_, labels, objects)) in enumerate(zip(batch, drawn, strict=True)):
            _write_case(out / job.root, job, g, scan, i, labels, objects, seed, noise_seeds[i],
                        int(scan.starved_rays[i]), case_info(job) if case_info else None)
        simulated += len(batch)
        bar.update(len(batch))
    bar.close()
    return True


def write_manifest(out: Path, identity: dict, fingerprint: dict, parts: dict, p: SyntheticPreset,
                   extra: dict) -> dict:
    """Write ``out/manifest.json``: identity, fingerprint (with its parts and the code files' digests), geometry
    and simulation settings, ``extra`` and the sha256 of every file under ``out``; returns it."""
    own = {out / "manifest.json", out / _STAMP}
    files = sorted(f for f in out.rglob("*") if f.is_file() and f not in own)
    manifest = {
        **identity,
        "fingerprint": {**fingerprint, "code_files": parts["code"], "libraries": parts["libraries"]},
        "geometry_presets": p.geometry_presets,
        "geometries": parts["geometries"],
        "simulation": asdict(p.simulation),
        **extra,
        "files": {str(f.relative_to(out)): sha256_file(f) for f in files},
    }
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def generate(out: str | Path, preset_name: str = "smoke", seed: int = 0, limit: int | None = None,
             progress: bool = True, projector_backend: str = "sparse", force: bool = False) -> dict | None:
    """Generate (or resume) a synthetic benchmark.

    Args:
        out: output folder.
        preset_name: a key of ``PRESETS`` (``tiny``, ``smoke``, ``aapm``).
        seed: master seed; the same seed gives the same bytes.
        limit: stop after simulating this many new cases (an incremental run); ``None`` finishes the preset.
        progress: show a progress bar.
        force: when ``out`` holds a benchmark of another fingerprint, delete its generated content and rebuild.
    Returns:
        The manifest (also written to ``out/manifest.json``) when the benchmark is complete, else ``None``.
    Raises:
        ValueError: unknown preset; ``out`` holds a benchmark made by other code or settings (another
            fingerprint: generator version, preset, geometry, seed, code or library versions) and ``force`` is
            False.
    """
    parts = fingerprint_parts(preset_name, seed)  # raises on an unknown preset
    p = PRESETS[preset_name]
    out = Path(out)
    identity = {"generator_version": GENERATOR_VERSION, "preset": preset_name, "seed": seed}
    fingerprint = fingerprint_of(parts)
    prepare_folder(out, fingerprint, identity, force)
    jobs = plan_jobs(p)
    atomic_write(out / "split.txt", split_text(p.name, seed))
    write_sweep_indexes(out, p, jobs)

    def draw(job: Job, geometry) -> Drawn:
        return _phantom_and_metal(job, p, seed, geometry)

    if not simulate_jobs(out, jobs, p, seed, draw, limit, progress, f"simulate {preset_name}", projector_backend):
        return None
    return write_manifest(out, identity, fingerprint, parts, p, {
        "generator": "marbench.datasets.synthetic",
        "categories": list(CATEGORIES),
        "tissue_labels": label_names(),
        "cases": {name: sum(j.kind == kind for j in jobs) for name, kind in (
            ("main", "main"), ("quantity_sweep", "quantity"), ("size_sweep", "size"), ("stack_slices", "stack"))},
    })
