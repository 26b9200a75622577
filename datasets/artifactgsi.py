"""ArtifactGSI (Han et al., "Reducing CT Metal Artifacts by Learning Latent Space Alignment with Gemstone Spectral
Imaging Data") on the suite's batch convention (``marbench.datasets.batch``), with the paper's slice calibration.

The dataset (paper Sec. 4): patients with metal implants have an ordinary CT sequence ``S_n`` and a GSI (gemstone
spectral imaging, virtual monoenergetic) sequence ``S_g`` captured simultaneously on a GE Discovery CT 750HD;
patients without implants contribute clean sequences, used to train the GSI decoder (Sec. 3.2). Implant types: hip
prosthesis, fracture internal fixation, spinal internal fixation; segmentation labels of the metal implant and the
left/right pelvis and femur (Sec. 5.3, Table 2). Split: 80 % / 20 % of the patients (Sec. 5.1). Calibration
(Sec. 3.1): Eq. 1 matches each ordinary slice to its GSI slice, Eq. 2 ("AffinityTransform") maps the ordinary slice
onto the GSI one pixel-wise.

Layout. The release cannot be reached from here; this reader serves the following layout, which a user converts the
release into (one folder per patient; the volumes are NIfTI, HU, voxel arrays ``(X, Y, Z)`` as nibabel gives them,
slices along the last axis; ``.nii`` is accepted wherever ``.nii.gz`` is named)::

    <root>/
      <patient_id>/
        meta.json          {"implant": "hip_prosthesis" | "fracture_internal_fixation" | "spinal_internal_fixation"
                                       | "none",
                            "region": "<body region, e.g. hip joint>" (optional)}
        ordinary.nii.gz    ordinary CT volume, HU, shape (X, Y, Z) (slices along the last axis)
        gsi.nii.gz         GSI (virtual monoenergetic) volume on the same grid, HU -- required for patients
                           with implants
        clean.nii.gz       only for patients without implants (implant "none"): the metal-free sequence
                           (instead of ordinary/gsi)
        labels.nii.gz      optional int label volume on the same grid: 0 background, 1 metal implant,
                           2 left pelvis, 3 right pelvis, 4 left femur, 5 right femur
      split.txt            optional: lines "<train|val|test> <patient_id>" ("#" starts a comment);
                           absent -> a seeded 80/20 split by patient (``split_patients``)

Every folder under ``<root>`` not starting with ``.`` is a patient. The reader takes ``ordinary[..., z]`` and
``gsi[..., z]`` as the same position: run ``calibrate_volume`` (Eq. 1-2) while converting if the release's pairs are
not yet aligned.

Each item is a dict (a batch adds the leading ``B``):

* ``ma_image``: ``(1, N, N)`` float32 HU, the ordinary slice ``z``; ``gt_image``: the GSI slice ``z``;
* ``metal_mask``: ``(1, N, N)`` bool, ``ma_image > METAL_THRESHOLD_HU`` (Eq. 8);
* ``labels``: ``(1, N, N)`` int64 label per pixel (``LABEL_NAMES``), ``UNLABELLED`` (-1) everywhere for a patient
  without ``labels.nii.gz``;
* ``ma_stack`` / ``gt_stack``: ``(k, N, N)`` float32 HU, the ``k`` adjacent ordinary / GSI slices centred on ``z``
  (the encoder input ``V[i]`` of Sec. 3.2);
* simulated sinograms (only with a ``geometry``, the paper's protocol for its sinogram-domain comparisons, Sec. 5.1:
  "sinograms are simulated" from the images): ``ma_sinogram`` ``(1, V, C)`` the forward projection of the ordinary
  slice's attenuation (HU -> mm^-1 with the geometry's ``mu_water_per_mm``), ``metal_trace`` ``(1, V, C)`` bool
  (``fp(metal_mask) > 0``), ``li_sinogram`` ``(1, V, C)`` and ``li_image`` ``(1, N, N)`` HU (LI, Kalender et al.
  1987), and ``geometry`` (the geometry's key); a record of a sinogram-domain method on this dataset says so
  through its data configuration (``geometry``). These sinograms are monochromatic and noise-free projections of
  an image that already holds the scan's artifacts, not the scanner's raw data;
* ``implant`` (str, one of ``IMPLANT_TYPES``), ``implant_index`` (int64 index into ``IMPLANT_TYPES``, the implant
  prior of Sec. 3.3), ``region`` (str, ``""`` when meta.json has none), ``category`` (the implant type),
  ``anatomy`` (``"body"``), ``slice_id`` (``"<patient_id>/<z>"``), ``fov_mm`` (float, ``N`` x the header's pixel
  spacing along ``X``).

Departures and readings:

* Orientation: no reorientation by the affine; image row = voxel axis ``Y``, image column = voxel axis ``X``
  (``image[r, c] = volume[c, r, z]``), the suite's ``(row, column)`` convention applied to nibabel's ``(X, Y, Z)``.
* ``ma_stack`` at the volume ends replicates the edge slice (slice ``z + o`` is clipped into ``[0, Z - 1]``).
* Metal threshold: Eq. 8 thresholds HU but the paper gives no value; ``METAL_THRESHOLD_HU`` = 2500 HU, above dense
  cortical bone (< ~2000 HU) and below the 3071 HU ceiling of scanners with a 12-bit HU range.
* Clean patients (``clean=True``): the one metal-free sequence is both ``ma_image`` and ``gt_image`` (there is no
  artifact, so the scan is its own reference); only these are served, never mixed with implant patients.
* Eq. 1 as written (``sum(S_n[i] * S_g[j])``) is offered as ``similarity="product"``, but the default is the
  normalised cross-correlation (see ``match_slices``).
* Eq. 2 is read as a per-slice 2-D translation (phase correlation) followed by an intensity map ``a * x + b`` (robust
  least squares on non-metal pixels); a spatial scale (zoom) difference is not estimated -- the layout requires both
  volumes on the same grid, resample with the headers' pixel spacing first.
* ``split.txt`` may also name a ``val`` part; patients it does not list are served by no part.
* Reading is lazy: a slice range is read through nibabel's ``dataobj`` proxy, never the whole volume. ``.nii.gz`` is
  decompressed from its start for each read unless ``indexed_gzip`` is installed; store ``.nii`` for fast training.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import lightning as L
import nibabel as nib
import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset

from marbench.physics import Projector, geometry_key, hu_to_mu, li_correction, metal_trace, mu_to_hu, preset

from .batch import seeded_loader

__all__ = ["IMPLANT_TYPES", "LABEL_NAMES", "METAL_THRESHOLD_HU", "UNLABELLED", "ALL_KEYS", "METADATA_KEYS",
           "SIMULATED_KEYS", "SPLIT_FILE", "Patient", "scan_patients", "read_split_file", "split_patients",
           "ArtifactGSIDataset", "ArtifactGSIDataModule", "collate", "match_slices", "calibrate", "calibrate_volume"]

IMPLANT_TYPES = ("none", "hip_prosthesis", "fracture_internal_fixation", "spinal_internal_fixation")
LABEL_NAMES = ("background", "metal_implant", "left_pelvis", "right_pelvis", "left_femur", "right_femur")
METAL_THRESHOLD_HU = 2500.0
UNLABELLED = -1
METADATA_KEYS = ("implant", "implant_index", "region")  # served with every item, beside batch.METADATA_KEYS
SIMULATED_KEYS = ("ma_sinogram", "metal_trace", "li_sinogram", "li_image")
ALL_KEYS = ("ma_image", "gt_image", "metal_mask", "labels", "ma_stack", "gt_stack") + SIMULATED_KEYS
SPLIT_FILE = "split.txt"
SPLIT_NAMES = ("train", "val", "test")
_DEFAULT_KEYS = ("ma_image", "gt_image", "metal_mask", "ma_stack")


def _volume_file(folder: Path, stem: str) -> Path | None:
    for suffix in (".nii.gz", ".nii"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


@dataclass
class Patient:
    """One patient folder, from headers only.

    ``paths`` maps ``ordinary``/``gsi`` (implant patients) or ``clean`` (implant ``none``), and ``labels`` when
    present, to files; ``shape`` is the voxel shape ``(X, Y, Z)``, ``n_slices = Z``; ``pixel_mm`` the header's
    spacing along ``X``.
    """

    id: str
    implant: str
    paths: dict[str, Path]
    n_slices: int
    shape: tuple[int, int, int]
    region: str = ""
    pixel_mm: float = 1.0

    @property
    def clean(self) -> bool:
        return self.implant == "none"

    @property
    def has_labels(self) -> bool:
        return "labels" in self.paths


def _read_meta(path: Path) -> tuple[str, str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: patient folder has no meta.json (expected {path})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or "implant" not in meta:
        raise ValueError(f"{path}: expected an object with key 'implant', found {meta!r}")
    implant = meta["implant"]
    if implant not in IMPLANT_TYPES:
        raise ValueError(f"{path}: unknown implant type {implant!r}; expected one of {IMPLANT_TYPES}")
    region = meta.get("region") or ""
    return implant, str(region)


def _header_shape(path: Path) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in nib.load(path).shape)
    except Exception as e:  # nibabel raises several types for unreadable files; name the file whatever it was
        raise ValueError(f"{path}: cannot read as NIfTI ({type(e).__name__}: {e})") from None


def _scan_patient(folder: Path) -> Patient:
    implant, region = _read_meta(folder / "meta.json")
    paths: dict[str, Path] = {}
    roles = ("clean",) if implant == "none" else ("ordinary", "gsi")
    for role in roles:
        path = _volume_file(folder, role)
        if path is None:
            raise FileNotFoundError(f"{folder}: implant {implant!r} requires {role}.nii.gz, not found "
                                    f"(expected {folder / f'{role}.nii.gz'})")
        paths[role] = path
    stray = _volume_file(folder, "clean") if implant != "none" else None
    if stray is not None:
        raise ValueError(f"{stray}: clean.nii.gz is only for implant 'none', but {folder / 'meta.json'} says "
                         f"{implant!r}")
    labels = _volume_file(folder, "labels")
    if labels is not None:
        paths["labels"] = labels
    shapes = {role: _header_shape(path) for role, path in paths.items()}
    first = roles[0]
    if len(shapes[first]) != 3:
        raise ValueError(f"{paths[first]}: expected a 3-D volume (X, Y, Z), found shape {shapes[first]}")
    for role, shape in shapes.items():
        if shape != shapes[first]:
            raise ValueError(f"shape mismatch: {paths[first]} has {shapes[first]}, {paths[role]} has {shape}")
    zooms = nib.load(paths[first]).header.get_zooms()
    return Patient(id=folder.name, implant=implant, paths=paths, n_slices=shapes[first][2],
                   shape=shapes[first], region=region, pixel_mm=float(zooms[0]))


def scan_patients(root: str | os.PathLike) -> list[Patient]:
    """Index the patient folders of ``root`` (layout in the module docstring), sorted by id, reading headers only.

    Raises:
        FileNotFoundError: ``root`` missing or holding no patient folder; a folder without meta.json; a patient
            with implants without ``gsi.nii.gz``/``ordinary.nii.gz``, or one without implants without
            ``clean.nii.gz`` (the message names the folder and the expected file).
        ValueError: meta.json not JSON or naming an unknown implant type (file, value, known types); volumes of
            different shapes (both files and shapes); a volume not 3-D; ``clean.nii.gz`` beside an implant.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: ArtifactGSI root not found")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise FileNotFoundError(f"{root}: no patient folders found (expected <root>/<patient_id>/meta.json)")
    return [_scan_patient(f) for f in folders]


def read_split_file(path: str | os.PathLike, patient_ids: Iterable[str]) -> dict[str, list[str]]:
    """Parts of a split file (lines ``<train|val|test> <patient_id>``, ``#`` comments), ids in file order.

    Raises:
        FileNotFoundError: missing file.
        ValueError: a malformed line, an unknown part name, an id not among ``patient_ids`` or listed twice
            (file and line number).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split file not found")
    known = set(patient_ids)
    parts: dict[str, list[str]] = {}
    seen: dict[str, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        fields = text.split()
        if len(fields) != 2 or fields[0] not in SPLIT_NAMES:
            raise ValueError(f"{path}:{number}: expected '<train|val|test> <patient_id>', found {text!r}")
        name, pid = fields
        if pid not in known:
            raise ValueError(f"{path}:{number}: unknown patient {pid!r} (no such folder beside the split file)")
        if pid in seen:
            raise ValueError(f"{path}:{number}: patient {pid!r} already listed on line {seen[pid]}")
        seen[pid] = number
        parts.setdefault(name, []).append(pid)
    return parts


def split_patients(patients: Sequence[Patient], test_fraction: float = 0.2, seed: int = 0,
                   split_file: str | os.PathLike | None = None) -> dict[str, list[Patient]]:
    """Split patients into parts (Sec. 5.1: 80 % train, 20 % test, by patient).

    With ``split_file`` the parts are read from it (``read_split_file``). Otherwise ``round(test_fraction * n)``
    patients, at least one and at most ``n - 1`` when ``n >= 2``, drawn with ``numpy.random.default_rng(seed)``
    from the id-sorted list, form ``test``, the rest ``train``; the draw depends only on the ids and the seed.
    Returns ``{"train": [...], "test": [...]}`` (and ``val`` if the file has one), each sorted by id.

    Raises:
        ValueError: ``test_fraction`` outside ``[0, 1]``; split file errors (see ``read_split_file``).
    """
    by_id = {p.id: p for p in patients}
    if split_file is not None:
        parts = read_split_file(split_file, by_id)
        return {name: sorted((by_id[i] for i in ids), key=lambda p: p.id) for name, ids in parts.items()}
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1], found {test_fraction}")
    ids = sorted(by_id)
    n = len(ids)
    n_test = int(np.floor(test_fraction * n + 0.5))
    if n >= 2 and 0.0 < test_fraction < 1.0:
        n_test = min(max(n_test, 1), n - 1)  # a tiny set still gets both parts
    test = {ids[i] for i in np.random.default_rng(seed).permutation(n)[:n_test]}
    return {"train": [by_id[i] for i in ids if i not in test], "test": [by_id[i] for i in ids if i in test]}


def _to_image(block: np.ndarray) -> np.ndarray:
    """``(X, Y, ...)`` voxel block -> ``(..., Y, X)`` images (row = Y, column = X)."""
    return np.ascontiguousarray(np.moveaxis(block, (0, 1), (-1, -2)))


class ArtifactGSIDataset(Dataset):
    """One item per slice of the patients of a split (see the module docstring for the item).

    Args:
        root: dataset root (layout in the module docstring).
        split: part of the split to serve (``train``, ``test``, or ``val`` if ``split.txt`` defines it).
        k: slices in ``ma_stack``/``gt_stack``, odd.
        patients: serve exactly these patients instead of scanning ``root`` and splitting.
        clean: serve the clean patients (implant ``none``) instead of the implant patients.
        keys: tensor keys to load (metadata keys are always present); default ``ma_image``, ``gt_image``,
            ``metal_mask``, ``ma_stack``, plus ``labels`` when any served patient has a label volume.
        split_seed, test_fraction: the seeded split when ``root`` has no ``split.txt``.
        threshold_hu: metal threshold of ``metal_mask``.
        geometry: a scanner preset of ``marbench.physics`` (e.g. ``aapm_body_128``) whose image grid is the
            volumes' slice grid: enables the simulated-sinogram keys (``SIMULATED_KEYS``).

    Raises:
        ValueError: ``k`` not a positive odd number; unknown key or split part; a simulated-sinogram key without a
            ``geometry``; ``scan_patients`` / ``split_patients`` errors; at item access, a non-finite slice, a label
            outside ``LABEL_NAMES`` or a slice grid that is not the geometry's.
        FileNotFoundError: see ``scan_patients``.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", k: int = 1,
                 patients: Sequence[Patient] | None = None, clean: bool = False, keys: Iterable[str] | None = None,
                 split_seed: int = 0, test_fraction: float = 0.2, threshold_hu: float = METAL_THRESHOLD_HU,
                 geometry: str | None = None):
        if not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"k must be a positive odd number of slices, found {k!r}")
        self.root, self.k, self.clean, self.threshold_hu = Path(root), k, clean, threshold_hu
        if patients is None:
            split_file = self.root / SPLIT_FILE
            parts = split_patients(scan_patients(self.root), test_fraction, split_seed,
                                   split_file if split_file.is_file() else None)
            if split not in parts:
                raise ValueError(f"{self.root}: the split has no part {split!r}; it has {sorted(parts)}")
            patients = parts[split]
        self.patients = [p for p in patients if p.clean == clean]
        if keys is None:
            keys = _DEFAULT_KEYS + (("labels",) if any(p.has_labels for p in self.patients) else ())
        self.keys = tuple(keys)
        unknown = sorted(set(self.keys) - set(ALL_KEYS))
        if unknown:
            raise ValueError(f"unknown batch keys {unknown}; expected a subset of {ALL_KEYS}")
        simulated = [k for k in self.keys if k in SIMULATED_KEYS]
        if simulated and geometry is None:
            raise ValueError(f"{self.root}: keys {simulated} are simulated from the ordinary slices by forward "
                             "projection; give a geometry (a preset of marbench.physics whose image grid is the "
                             "volumes' slice grid, e.g. aapm_body_128)")
        self.geometry = preset(geometry) if geometry is not None else None
        self._projector: Projector | None = None
        self.index = [(p, z) for p in self.patients for z in range(p.n_slices)]
        self._images: dict[Path, nib.Nifti1Image] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:
        # each DataLoader worker opens its own file handles
        state = dict(self.__dict__)
        state["_images"] = {}
        state["_projector"] = None
        return state

    def _image(self, path: Path) -> nib.Nifti1Image:
        if path not in self._images:
            self._images[path] = nib.load(path)
        return self._images[path]

    def _read(self, path: Path, z0: int, z1: int) -> np.ndarray:
        """Slices ``z0 .. z1 - 1`` of a volume as ``(z1 - z0, Y, X)`` float32 through the proxy."""
        block = np.asarray(self._image(path).dataobj[:, :, z0:z1], dtype=np.float32)
        if not np.isfinite(block).all():
            raise ValueError(f"{path}: slices {z0}..{z1 - 1}: expected finite values, found NaN/Inf")
        return _to_image(block)

    def _slices(self, path: Path, z: int, n_slices: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(slice z (Y, X), stack (k, Y, X))``; the stack replicates the edge slice past the volume ends."""
        wanted = np.clip(np.arange(z - k // 2, z + k // 2 + 1), 0, n_slices - 1)
        z0, z1 = int(wanted.min()), int(wanted.max()) + 1
        block = self._read(path, z0, z1)
        return block[z - z0], block[wanted - z0]

    def __getitem__(self, i: int) -> dict:
        patient, z = self.index[i]
        need = set(self.keys)
        ma_path = patient.paths["clean" if patient.clean else "ordinary"]
        gt_path = patient.paths["clean" if patient.clean else "gsi"]
        item: dict = {"slice_id": f"{patient.id}/{z}", "category": patient.implant, "anatomy": "body",
                      "implant": patient.implant,
                      "implant_index": torch.tensor(IMPLANT_TYPES.index(patient.implant), dtype=torch.int64),
                      "region": patient.region, "fov_mm": patient.shape[0] * patient.pixel_mm}
        if self.geometry is not None:
            item["geometry"] = geometry_key(self.geometry)
        if need & {"ma_image", "metal_mask", "ma_stack", *SIMULATED_KEYS}:
            ma, ma_stack = self._slices(ma_path, z, patient.n_slices, self.k if "ma_stack" in need else 1)
            if "ma_image" in need:
                item["ma_image"] = torch.from_numpy(ma.copy())[None]
            if "metal_mask" in need:
                item["metal_mask"] = torch.from_numpy(ma > self.threshold_hu)[None]
            if "ma_stack" in need:
                item["ma_stack"] = torch.from_numpy(np.ascontiguousarray(ma_stack))
            if need & set(SIMULATED_KEYS):
                item.update({k: v for k, v in self._simulated(ma_path, z, ma).items() if k in need})
        if need & {"gt_image", "gt_stack"}:
            gt, gt_stack = self._slices(gt_path, z, patient.n_slices, self.k if "gt_stack" in need else 1)
            if "gt_image" in need:
                item["gt_image"] = torch.from_numpy(gt.copy())[None]
            if "gt_stack" in need:
                item["gt_stack"] = torch.from_numpy(np.ascontiguousarray(gt_stack))
        if "labels" in need:
            item["labels"] = self._labels(patient, z)
        return item

    def _simulated(self, path: Path, z: int, ma: np.ndarray) -> dict[str, torch.Tensor]:
        """The simulated sinogram keys of one ordinary slice ``ma`` ``(N, N)`` HU (see the module docstring)."""
        g = self.geometry
        if tuple(ma.shape) != tuple(g.image_shape):
            raise ValueError(f"{path}: slice {z}: expected the geometry's image grid {tuple(g.image_shape)}, found "
                             f"{tuple(ma.shape)}")
        if self._projector is None:
            self._projector = Projector(g)
        image = torch.from_numpy(ma.copy())[None, None]
        mask = image > self.threshold_hu
        sinogram = self._projector.fp(hu_to_mu(image, g.mu_water_per_mm))
        trace = metal_trace(self._projector, mask)
        li_sinogram, li_mu = li_correction(self._projector, sinogram, trace)
        return {"ma_sinogram": sinogram[0], "metal_trace": trace[0], "li_sinogram": li_sinogram[0],
                "li_image": mu_to_hu(li_mu, g.mu_water_per_mm)[0]}

    def _labels(self, patient: Patient, z: int) -> torch.Tensor:
        if not patient.has_labels:
            return torch.full((1, patient.shape[1], patient.shape[0]), UNLABELLED, dtype=torch.int64)
        raw = self._read(patient.paths["labels"], z, z + 1)[0]
        labels = np.rint(raw).astype(np.int64)
        bad = (labels < 0) | (labels >= len(LABEL_NAMES)) | (np.abs(raw - labels) > 1e-3)
        if bad.any():
            raise ValueError(f"{patient.paths['labels']}: slice {z}: expected integer labels 0..{len(LABEL_NAMES) - 1}"
                             f" ({', '.join(LABEL_NAMES)}), found {float(raw[bad][0])}")
        return torch.from_numpy(labels)[None]


def collate(items: Sequence[dict]) -> dict:
    """Items -> a batch: tensors stacked on a new first axis, strings into lists, numbers into a tensor.

    Raises:
        ValueError: items with different keys, or tensors of one key with different shapes (the message names the
            slice ids).
    """
    ids = [it.get("slice_id") for it in items]
    keys = list(items[0])
    for it in items[1:]:
        if set(it) != set(keys):
            raise ValueError(f"cannot batch slices {ids}: keys differ ({sorted(keys)} vs {sorted(it)})")
    batch: dict = {}
    for key in keys:
        values = [it[key] for it in items]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(f"cannot batch {key!r} of slices {ids}: shapes {[tuple(v.shape) for v in values]}")
            batch[key] = torch.stack(values)
        elif isinstance(values[0], str):
            batch[key] = list(values)
        else:
            batch[key] = torch.tensor(values)
    return batch


class ArtifactGSIDataModule(L.LightningDataModule):
    """Train/test (and ``val`` if ``split.txt`` names one) loaders of an ArtifactGSI root, split by patient.

    Args:
        root: dataset root (layout in the module docstring).
        k: slices per ``ma_stack``/``gt_stack`` (odd).
        batch_size, num_workers: DataLoader settings; the training order is shuffled with the run's seed
            (``PL_GLOBAL_SEED``, as the AAPM datamodule does).
        split_seed, test_fraction: the seeded patient split when there is no split file.
        keys: tensor keys to load (``ArtifactGSIDataset``'s default when ``None``).
        geometry: scanner preset for the simulated-sinogram keys (``ArtifactGSIDataset``).
        split: a split file in the ``split.txt`` format (default: ``<root>/split.txt`` when present).

    Raises:
        ValueError, FileNotFoundError: at ``setup``, see ``scan_patients`` and ``split_patients``.
    """

    def __init__(self, root: str | os.PathLike, k: int = 1, batch_size: int = 4, num_workers: int = 0,
                 split_seed: int = 0, keys: Sequence[str] | None = None, test_fraction: float = 0.2,
                 geometry: str | None = None, split: str | os.PathLike | None = None):
        super().__init__()
        self.root, self.k, self.batch_size, self.num_workers = Path(root), k, batch_size, num_workers
        self.split_seed, self.test_fraction, self.geometry = split_seed, test_fraction, geometry
        self.split = Path(split) if split is not None else None
        self.keys = tuple(keys) if keys is not None else None
        self.parts: dict[str, list[Patient]] = {}
        self.datasets: dict[str, ArtifactGSIDataset] = {}

    @property
    def split_path(self) -> Path | None:
        """The split file in use: ``split``, else ``<root>/split.txt`` when present, else None (seeded split)."""
        if self.split is not None:
            return self.split
        return self.root / SPLIT_FILE if (self.root / SPLIT_FILE).is_file() else None

    def setup(self, stage: str | None = None) -> None:
        if self.split is not None and not self.split.is_file():
            raise FileNotFoundError(f"{self.split}: split file not found (expected lines '<train|val|test> "
                                    "<patient_id>')")
        self.parts = split_patients(scan_patients(self.root), self.test_fraction, self.split_seed, self.split_path)
        self.datasets = {name: self.dataset(name) for name in self.parts}

    @property
    def split_sha256(self) -> str:
        """sha256 of the patient split (each part's sorted patient ids), whether from ``split.txt`` or seeded: what
        the records and the cached segmenter and pre-trainings are keyed by.

        Raises:
            ValueError: ``setup`` has not run.
        """
        if not self.parts:
            raise ValueError("call setup() before split_sha256")
        parts = {name: sorted(p.id for p in patients) for name, patients in sorted(self.parts.items())}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def dataset(self, part: str, keys: Sequence[str] | None = None, clean: bool = False) -> ArtifactGSIDataset:
        """The slices of one part with other keys than the datamodule's, or (``clean=True``) its clean patients'
        slices (the decoder's clean data of Sec. 3.2).

        Raises:
            ValueError: ``setup`` has not run, or the split has no such part.
        """
        if not self.parts:
            raise ValueError("call setup() before dataset()")
        if part not in self.parts:
            raise ValueError(f"{self.root}: the split has no part {part!r}; it has {sorted(self.parts)}")
        return ArtifactGSIDataset(self.root, part, self.k, patients=self.parts[part], clean=clean,
                                  keys=keys if keys is not None else self.keys, geometry=self.geometry)

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        if name not in self.datasets:
            raise ValueError(f"{self.root}: the split has no part {name!r}; it has {sorted(self.datasets)}")
        return seeded_loader(self.datasets[name], self.batch_size, shuffle, self.num_workers, collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader | list:
        # a split without a val part (the paper's 80/20) validates nothing; Lightning skips an empty list
        return self._loader("val", False) if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", False)


# --- calibration (Sec. 3.1, Eq. 1-2) -------------------------------------------------------------------------------


def _slice_rows(volume: np.ndarray, axis: int) -> np.ndarray:
    v = np.asarray(volume)
    if v.ndim != 3:
        raise ValueError(f"expected a 3-D volume, found shape {v.shape}")
    v = np.moveaxis(v, axis, 0)
    return v.reshape(v.shape[0], -1).astype(np.float64)


def match_slices(ordinary: np.ndarray, gsi: np.ndarray, similarity: str = "ncc", axis: int = -1) -> np.ndarray:
    """Eq. 1: for each ordinary slice ``i`` the GSI slice ``j`` of greatest similarity.

    ``similarity="product"`` is Eq. 1 as written, ``sum(S_n[i] * S_g[j])``. That raw product grows with the
    brightness of ``S_g[j]`` (and with the area of body, bone and metal in it), so a bright slice can outscore the
    true partner; ``"ncc"`` (the default) is the normalised cross-correlation -- both slices made zero-mean and
    unit-norm before the product -- which is invariant to the intensity map ``a * x + b`` that differs between the
    ordinary and the GSI reconstruction, and is maximal (1) for the true partner.

    Args:
        ordinary, gsi: volumes, HU, slices along ``axis`` (nibabel's ``(X, Y, Z)``: the default ``-1``); the
            in-slice shapes must agree.

    Returns:
        ``(n_ordinary,)`` int64 GSI slice index per ordinary slice.

    Raises:
        ValueError: unknown ``similarity``; not 3-D; in-slice shapes differ.
    """
    if similarity not in ("ncc", "product"):
        raise ValueError(f"unknown similarity {similarity!r}; expected 'ncc' or 'product'")
    a, b = _slice_rows(ordinary, axis), _slice_rows(gsi, axis)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"slice shapes differ: ordinary {np.moveaxis(np.asarray(ordinary), axis, 0).shape[1:]}, "
                         f"gsi {np.moveaxis(np.asarray(gsi), axis, 0).shape[1:]}")
    if similarity == "ncc":
        a, b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
        # a constant slice (all air) has no correlation with anything: it scores 0, not NaN
        a /= np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b /= np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.argmax(a @ b.T, axis=1).astype(np.int64)


def _shift_with_support(image: np.ndarray, shift: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``image`` translated by ``shift`` pixels and the mask of pixels whose source lay inside the image."""
    if not np.any(shift):
        return image.copy(), np.ones(image.shape, bool)
    moved = ndimage.shift(image, shift, order=1, mode="nearest")
    support = ndimage.shift(np.ones(image.shape), shift, order=1, mode="constant", cval=0.0) > 1 - 1e-6
    return moved, support


def calibrate(ordinary_slice: np.ndarray, gsi_slice: np.ndarray, threshold_hu: float = METAL_THRESHOLD_HU,
              translation: bool = True, upsample: int = 10) -> tuple[np.ndarray, dict]:
    """Eq. 2 ("AffinityTransform"): map an ordinary slice onto its GSI partner pixel-wise.

    Estimates, in this order:

    1. a 2-D translation by phase correlation (``skimage.registration.phase_cross_correlation``, ``1/upsample``
       pixel precision) of the two slices clipped at ``threshold_hu``, so that metal and its streaks, which differ
       between the two reconstructions, do not dominate the peak; skipped with ``translation=False``;
    2. the intensity map ``gsi ~ a * ordinary + b`` by least squares on the pixels below ``threshold_hu`` in both
       slices (inside the translated image's support), refitted twice without the pixels whose residual exceeds
       3 x 1.4826 x their median absolute residual, so that artifact streaks present in only one slice do not bias
       the fit.

    Args:
        ordinary_slice, gsi_slice: 2-D slices of one shape, HU.

    Returns:
        ``(corrected, params)``: ``corrected = a * shift(ordinary) + b`` (float32, the slice's shape, HU; pixels
        shifted in from outside replicate the edge) and ``params = {"scale": a, "offset": b (HU), "shift": (d0, d1)
        (pixels along the slice's two axes, applied to the ordinary slice), "n_pixels": pixels in the final fit}``.

    Raises:
        ValueError: shapes differ or are not 2-D; fewer than 2 distinct non-metal values to fit.
    """
    from skimage.registration import phase_cross_correlation

    x, y = np.asarray(ordinary_slice, np.float64), np.asarray(gsi_slice, np.float64)
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"expected two 2-D slices of one shape, found {x.shape} and {y.shape}")
    shift = (0.0, 0.0)
    if translation:
        found = phase_cross_correlation(np.minimum(y, threshold_hu), np.minimum(x, threshold_hu),
                                        upsample_factor=upsample, normalization="phase")[0]
        shift = tuple(float(s) for s in found)
    moved, support = _shift_with_support(x, shift)
    use = support & (moved < threshold_hu) & (y < threshold_hu)
    for trim in (True, True, False):
        xs, ys = moved[use], y[use]
        if xs.size < 2 or np.ptp(xs) == 0:
            raise ValueError(f"cannot fit the intensity map: {xs.size} non-metal pixel(s) with "
                             f"{np.unique(xs).size} distinct value(s)")
        a, b = np.polyfit(xs, ys, 1)
        if not trim:
            break
        residual = np.abs(y - (a * moved + b))
        mad = np.median(residual[use])
        keep = use & (residual <= 3 * 1.4826 * mad)
        # final: an exact fit (residuals below a micro-HU), nothing left to trim, or too little left to fit
        if mad < 1e-6 or keep.sum() == use.sum() or keep.sum() < 2 or np.ptp(moved[keep]) == 0:
            break
        use = keep
    corrected = (a * moved + b).astype(np.float32)
    return corrected, {"scale": float(a), "offset": float(b), "shift": shift, "n_pixels": int(use.sum())}


def calibrate_volume(ordinary: np.ndarray, gsi: np.ndarray, similarity: str = "ncc",
                     threshold_hu: float = METAL_THRESHOLD_HU, translation: bool = True,
                     ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Eq. 1 then Eq. 2 for every ordinary slice: match its GSI slice, then correct it onto that slice.

    Args:
        ordinary, gsi: volumes ``(X, Y, Z_n)`` and ``(X, Y, Z_g)``, HU, slices along the last axis.

    Returns:
        ``(corrected, matches, params)``: ``corrected`` ``(X, Y, Z_n)`` float32 HU, slice ``i`` aligned with
        ``gsi[..., matches[i]]``; ``matches`` ``(Z_n,)`` int64 (``match_slices``); ``params`` one ``calibrate``
        dict per slice (``shift`` along ``X``, ``Y``).

    Raises:
        ValueError: see ``match_slices`` and ``calibrate``.
    """
    matches = match_slices(ordinary, gsi, similarity)
    ordinary, gsi = np.asarray(ordinary), np.asarray(gsi)
    corrected = np.empty(ordinary.shape, np.float32)
    params = []
    for i, j in enumerate(matches):
        corrected[..., i], p = calibrate(ordinary[..., i], gsi[..., j], threshold_hu, translation)
        params.append(p)
    return corrected, matches, params
