"""A benchmark simulated on the user's own clean CT: metal inserted into real metal-free slices, then the same
polychromatic chain and release layout as the procedural benchmark (``marbench.datasets.synthetic.generator``).

This is the protocol of CNNMAR (Zhang & Yu, "Convolutional Neural Network Based Metal Artifact Reduction in X-ray
Computed Tomography", IEEE TMI 37(6), 2018), which SynDeepLesion and the AAPM CT-MAR challenge follow: clean
patient images, simulated metal, a polychromatic forward model. Steps and choices:

1. **Reading** (``read_clean_images``). ``PATH`` is a file or a folder searched recursively, in sorted order:

   * DICOM (``*.dcm`` or any file with the ``DICM`` preamble), one or more series, read with ``pydicom``;
     HU = stored value x ``RescaleSlope`` + ``RescaleIntercept`` (1 and 0 when absent). Each file must hold one 2D
     frame with ``PixelSpacing`` (row, column mm) and an axial ``ImageOrientationPatient`` (row direction within
     ``AXIAL_TOLERANCE_DEG`` of +x, column direction of +y, i.e. about ``[1, 0, 0, 0, 1, 0]``); a series is
     the group of its ``SeriesInstanceUID``, slices ordered by ``ImagePositionPatient`` z.
   * NIfTI (``*.nii``, ``*.nii.gz``) volumes, read with ``nibabel`` (``scl_slope``/``scl_inter`` applied): a 3D
     volume whose third axis is the patient's z (in-plane axes within ``AXIAL_TOLERANCE_DEG`` of x and y);
     reoriented to RAS+ and each axial slice turned to the display convention (patient's left on the image right,
     anterior up, as DICOM and ``marbench.physics``), one case per slice, spacing from the voxel zooms.
   * AAPM-style raw slices (``*_<W>x<H>x1.raw``, headerless float32 HU in the release convention), taken at the
     AAPM body FOV (400 mm over ``W`` pixels: 0.78125 mm at 512) unless ``pixel_mm`` says otherwise.

   Values below -1000 HU (the padding outside a scanner's reconstruction circle, e.g. -2048 or -3024) become
   -1000 HU (air); other files in a folder are ignored and counted in the manifest.
2. **Resampling** (``resample_to_geometry``) to the preset's pixel size (``fov_mm / image_size``) by bilinear
   interpolation (``scipy.ndimage.affine_transform``, order 1), after a Gaussian anti-aliasing filter when the
   output pixel is larger (sigma = (ratio - 1) / 2 input pixels per axis, the rule of ``skimage``'s
   ``rescale(anti_aliasing=True)``). The body (pixels above ``BODY_THRESHOLD_HU`` = -500 HU, halfway between air
   and water; a patient table counts as body) is centred: the centre of its bounding box goes to the FOV centre,
   the rest is air (-1000 HU). The body must lie inside the FOV's inscribed circle (radius ``fov_mm / 2``, what
   the scanner reconstructs); otherwise ``ValueError`` names the file and the sizes, unless ``crop_to_fov``, which
   sets the pixels outside that circle to air and records how many body pixels it removed. Never a silent crop.
3. **Tissues** (``tissue_fractions``, ``tissue_labels``). Water- and bone-equivalent fractions follow CNNMAR's
   soft threshold: the bone fraction rises linearly from 0 at ``water_threshold_hu`` (100 HU) to 1 at
   ``bone_threshold_hu`` (1500 HU), the rest is water-equivalent; these are ``SimulationConfig``'s thresholds,
   applied inside ``marbench.physics.simulate_scan``, so the clean and procedural benchmarks share one chain.
   100 HU sits above unenhanced soft tissue (muscle 40-50, liver 55-65 HU) and below trabecular bone; 1500 HU
   is dense cortical bone, so cancellous bone is a water/bone mixture, as in CNNMAR. Tissue labels (for the
   segmentation protocol; ids of ``tissues.TISSUES``) are four classes: air (< -500 HU, lung included, id 0),
   fat ([-500, -30) HU, id 2; -30 HU is the upper end of the usual adipose window [-190, -30]), soft tissue
   ([-30, 150) HU, id 3 ``muscle``), bone (>= 150 HU, id 6 ``cortical_bone``; 150 HU is a common lower
   threshold of trabecular bone segmentation, above contrast-free soft tissue).
4. **Metal** (``clean_implants``). Without categories, 1-3 AAPM fractal shapes of 3-20 mm in one AAPM material,
   centred on body pixels (fat, soft tissue or bone). A categories CSV (``file_or_slice,category``) assigns a
   category of ``anatomy.CATEGORIES`` (the category's typical implant placed on structures found in the labels:
   hip prostheses on the largest bone of each side, pedicle screws on the largest midline bone, fillings on the
   teeth (> 1500 HU), clips in soft tissue, a plate on a bone) or ``body`` / ``head`` (fractal shapes); the
   anatomy (``body``/``head``) picks the preset's geometry. A slice the CSV does not name is ``body``.
5. **Simulation and writing**: ``generator.simulate_jobs`` (the polychromatic chain, per-slice noise seeds),
   the release layout, ``split.txt`` split by source (a DICOM series, a NIfTI volume or a raw file, never by
   slice, so one patient's slices never fall in two parts; ``test`` gets at least one source), metal sweeps
   (``sweeps/quantity``, ``sweeps/size``) on up to ``sweep_slices`` body slices (no ``stacks/``), and
   ``manifest.json`` with the fingerprint whose ``inputs`` part is the sha256 of every input file,
   the categories CSV, ``pixel_mm`` and ``crop_to_fov``.
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from marbench.files import atomic_write, sha256_file
from marbench.physics import Geometry, SimulationConfig, preset
from marbench.physics import metal_masks as mm

from ..aapm_format import AAPMCase, read_raw
from .anatomy import ANATOMY_OF, CATEGORIES
from .generator import (
    GENERATOR_VERSION,
    PRESETS,
    Drawn,
    Job,
    _library_versions,
    _rng,
    fingerprint_of,
    fingerprint_parts,
    prepare_folder,
    simulate_jobs,
    sweep_objects,
    write_manifest,
    write_sweep_indexes,
)
from .implants import AAPM_METALS, MetalObject, fractal_objects
from .tissues import TISSUES, label_names

__all__ = ["AXIAL_TOLERANCE_DEG", "BODY_THRESHOLD_HU", "AAPM_BODY_FOV_MM", "CleanImage", "read_clean_images",
           "read_categories", "resample_to_geometry", "tissue_fractions", "tissue_labels", "clean_implants",
           "generate_from_clean_images", "LABEL_THRESHOLDS_HU"]

AXIAL_TOLERANCE_DEG = 5.0
AIR_HU = -1000.0
BODY_THRESHOLD_HU = -500.0
AAPM_BODY_FOV_MM = 400.0
# lower HU bound of each class (air below the first); ids of tissues.TISSUES
LABEL_THRESHOLDS_HU = (("fat", -500.0), ("muscle", -30.0), ("cortical_bone", 150.0))
_DENSE_TEETH_HU = 1500.0
_RAW = re.compile(r"_(\d+)x(\d+)x1\.raw$")
ANATOMY_CATEGORIES = {"body": "body", "head": "head"}  # fractal shapes at that anatomy's FOV


@dataclass
class CleanImage:
    """One clean axial slice as read: ``hu`` ``(rows, cols)`` float32 HU (display convention: patient's left on
    the right, anterior up), ``spacing_mm`` ``(row, column)``, its ``source`` (path relative to the input root),
    ``index`` (slice of a volume, 0 otherwise) and ``group`` (series / volume / file: the split unit)."""

    source: str
    index: int
    group: str
    hu: np.ndarray
    spacing_mm: tuple[float, float]
    kind: str  # dicom | nifti | raw
    z_mm: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.source}:{self.index}"


def _angle_deg(u, v) -> float:
    u, v = np.asarray(u, float), np.asarray(v, float)
    n = np.linalg.norm(u) * np.linalg.norm(v)
    return float(np.degrees(np.arccos(np.clip(abs(u @ v) / n, -1, 1)))) if n > 0 else 90.0


def _spacing(values, name: str, what: str) -> tuple[float, float]:
    try:
        row, col = (float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {what}: expected two spacings in mm, found {values!r}") from None
    if not (math.isfinite(row) and math.isfinite(col) and row > 0 and col > 0):
        raise ValueError(f"{name}: {what}: expected positive finite spacings in mm, found {[row, col]}")
    return row, col


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _read_dicom(path: Path, name: str) -> CleanImage:
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=path.suffix.lower() == ".dcm")
    except Exception as e:  # pydicom raises several types for a broken file
        raise ValueError(f"{name}: expected a DICOM file, found one pydicom cannot read ({e})") from None
    if "PixelData" not in ds:
        raise ValueError(f"{name}: no pixel data (expected a CT image with PixelData, found SOP class "
                         f"{ds.get('SOPClassUID', 'unknown')})")
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        raise ValueError(f"{name}: missing ImageOrientationPatient (expected an axial slice, "
                         f"[1, 0, 0, 0, 1, 0]), found {iop!r}")
    iop = [float(v) for v in iop]
    if _angle_deg(iop[:3], (1, 0, 0)) > AXIAL_TOLERANCE_DEG or _angle_deg(iop[3:], (0, 1, 0)) > AXIAL_TOLERANCE_DEG \
            or iop[0] < 0 or iop[4] < 0:
        raise ValueError(f"{name}: not an axial slice: ImageOrientationPatient {iop} (expected about "
                         f"[1, 0, 0, 0, 1, 0], within {AXIAL_TOLERANCE_DEG} degrees)")
    if ds.get("PixelSpacing") is None:
        raise ValueError(f"{name}: missing PixelSpacing (expected the row and column spacing in mm)")
    spacing = _spacing(ds.PixelSpacing, name, "PixelSpacing")
    try:
        pixels = ds.pixel_array
    except Exception as e:
        raise ValueError(f"{name}: cannot decode the pixel data ({e})") from None
    if pixels.ndim != 2:
        raise ValueError(f"{name}: expected one 2D frame, found pixel data of shape {pixels.shape}")
    slope = float(ds.get("RescaleSlope", 1.0))
    intercept = float(ds.get("RescaleIntercept", 0.0))
    hu = pixels.astype(np.float64) * slope + intercept
    ipp = ds.get("ImagePositionPatient")
    z = float(ipp[2]) if ipp is not None and len(ipp) == 3 else float(ds.get("InstanceNumber", 0) or 0)
    group = str(ds.get("SeriesInstanceUID", "") or name)
    return CleanImage(name, 0, group, hu.astype(np.float32), spacing, "dicom", z)


def _read_nifti(path: Path, name: str) -> list[CleanImage]:
    import nibabel as nib

    try:
        img = nib.load(path)
    except Exception as e:
        raise ValueError(f"{name}: expected a NIfTI volume, found one nibabel cannot read ({e})") from None
    shape = tuple(img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise ValueError(f"{name}: expected a 3D volume (x, y, z: each axial slice a case), found shape "
                         f"{tuple(img.shape)}")
    with nib.openers.ImageOpener(path) as f:  # the header as stored: nibabel's loader replaces a 0 pixdim by 1
        stored = type(img.header).from_fileobj(f, check=False)
    zooms = tuple(float(z) for z in stored["pixdim"][1:4])
    if not all(math.isfinite(z) and z > 0 for z in zooms):
        raise ValueError(f"{name}: missing voxel spacing (expected positive pixdim in mm), found {list(zooms)}")
    affine = img.affine
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    if _angle_deg(directions[:, 2], (0, 0, 1)) > AXIAL_TOLERANCE_DEG or \
            min(_angle_deg(directions[:, 0], (1, 0, 0)), _angle_deg(directions[:, 0], (0, 1, 0))) \
            > AXIAL_TOLERANCE_DEG:
        raise ValueError(f"{name}: not axial slices: the voxel axes point along {np.round(directions.T, 3).tolist()} "
                         f"(expected the third along z and the first two along x and y, within "
                         f"{AXIAL_TOLERANCE_DEG} degrees)")
    if len(img.shape) > 3:
        img = img.slicer[(slice(None),) * 3 + (0,) * (len(img.shape) - 3)]
    canon = nib.as_closest_canonical(img)  # RAS+: axis 0 to the patient's right, 1 anterior, 2 superior
    data = np.asarray(canon.get_fdata(dtype=np.float32))
    cz = tuple(float(z) for z in canon.header.get_zooms()[:3])
    spacing = (cz[1], cz[0])
    out = []
    for k in range(data.shape[2]):
        hu = np.ascontiguousarray(data[::-1, ::-1, k].T)  # rows anterior -> posterior, columns right -> left
        z = float((canon.affine @ np.array([0, 0, k, 1.0]))[2])
        out.append(CleanImage(name, k, name, hu, spacing, "nifti", z))
    return out


def _read_raw_slice(path: Path, name: str, pixel_mm: float | None) -> CleanImage:
    m = _RAW.search(path.name)
    width, height = int(m.group(1)), int(m.group(2))
    hu = read_raw(path, (height, width))
    p = float(pixel_mm) if pixel_mm is not None else AAPM_BODY_FOV_MM / width
    return CleanImage(name, 0, name, hu, (p, p), "raw")


def read_clean_images(path: str | Path, pixel_mm: float | None = None) -> tuple[list[CleanImage], dict]:
    """Read every clean slice under ``path`` (a file or a folder, searched recursively in sorted order).

    Args:
        path: DICOM files, NIfTI volumes or AAPM-style raw slices (see the module docstring).
        pixel_mm: pixel size of raw slices (default: the AAPM body FOV, 400 mm over the width).
    Returns:
        ``(images, inputs)``: slices sorted by source, series position and slice; ``inputs`` maps each input
        file (relative path) to its sha256 and counts the ignored files under ``"ignored"``.
    Raises:
        FileNotFoundError: ``path`` does not exist or holds no readable image file.
        ValueError: a file without pixel data or spacing, not axial, of the wrong dimension (names the file,
            the expected and the found).
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root}: clean image path not found (expected DICOM, NIfTI or *_WxHx1.raw files)")
    candidates = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
    base = root.parent if root.is_file() else root
    images: list[CleanImage] = []
    files: dict[str, str] = {}
    ignored = 0
    for f in candidates:
        name = f.relative_to(base).as_posix()
        lower = f.name.lower()
        if lower.endswith((".nii", ".nii.gz")):
            images += _read_nifti(f, name)
        elif _RAW.search(f.name):
            images.append(_read_raw_slice(f, name, pixel_mm))
        elif _is_dicom(f):
            images.append(_read_dicom(f, name))
        elif root.is_file():
            raise ValueError(f"{name}: expected a DICOM, NIfTI (.nii, .nii.gz) or AAPM raw (*_WxHx1.raw) file")
        else:
            ignored += 1
            continue
        files[name] = sha256_file(f)
    if not images:
        raise FileNotFoundError(f"{root}: no DICOM, NIfTI or *_WxHx1.raw image found ({ignored} other files)")
    images.sort(key=lambda im: (im.group if im.kind == "dicom" else im.source, im.z_mm if im.kind == "dicom"
                                else 0.0, im.source, im.index))
    return images, {"files": files, "ignored": ignored}


def read_categories(path: str | Path, images: list[CleanImage]) -> dict[str, str]:
    """Category per slice key (``source:index``) from a CSV of ``file_or_slice,category`` rows (a header row
    ``file_or_slice,category`` is allowed): ``file_or_slice`` is a file's relative path or name (all its slices)
    or ``<file>:<slice>``; ``category`` one of ``anatomy.CATEGORIES`` or ``body`` / ``head``.

    Raises:
        FileNotFoundError: no such CSV.
        ValueError: a row naming no input slice, an unknown category, a malformed row (file and line named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: categories CSV not found (expected rows file_or_slice,category)")
    allowed = set(CATEGORIES) | set(ANATOMY_CATEGORIES)
    out: dict[str, str] = {}
    with open(path, newline="") as f:
        for number, row in enumerate(csv.reader(f), 1):
            row = [c.strip() for c in row]
            if not row or not any(row) or row[0].startswith("#"):
                continue
            if number == 1 and row == ["file_or_slice", "category"]:
                continue
            if len(row) != 2:
                raise ValueError(f"{path}:{number}: expected 'file_or_slice,category', found {row}")
            key, category = row
            if category not in allowed:
                raise ValueError(f"{path}:{number}: unknown category {category!r}; expected one of {sorted(allowed)}")
            matched = [im for im in images if key in (im.source, Path(im.source).name, im.key,
                                                      f"{Path(im.source).name}:{im.index}")]
            if not matched:
                raise ValueError(f"{path}:{number}: {key!r} names no input slice (expected a file of the input, "
                                 f"e.g. {images[0].source!r}, or <file>:<slice>, e.g. {images[0].key!r})")
            for im in matched:
                out[im.key] = category
    return out


def resample_to_geometry(hu: np.ndarray, spacing_mm: tuple[float, float], geometry: Geometry, name: str,
                         crop_to_fov: bool = False) -> tuple[np.ndarray, dict]:
    """Resample a clean slice onto ``geometry``'s image grid, its body centred (see the module docstring).

    Args:
        hu: ``(rows, cols)`` HU, display convention.
        spacing_mm: ``(row, column)`` spacing of ``hu`` in mm.
        geometry: target scanner; its pixel size is ``fov_mm / image_size``.
        name: the source, for messages.
        crop_to_fov: crop a body that reaches outside the FOV circle instead of refusing it.
    Returns:
        ``(image, info)``: ``(N, N)`` float32 HU and a JSON-friendly record (spacings, body size and reach,
        cropped body pixels, interpolation).
    Raises:
        ValueError: no body (no pixel above -500 HU); a body outside the FOV circle without ``crop_to_fov``
            (names the file, the body's size and reach, the FOV).
    """
    src = np.maximum(np.asarray(hu, dtype=np.float64), AIR_HU)
    body = src > BODY_THRESHOLD_HU
    if not body.any():
        raise ValueError(f"{name}: no body found (expected pixels above {BODY_THRESHOLD_HU:g} HU, found HU in "
                         f"[{float(src.min()):.0f}, {float(src.max()):.0f}])")
    rows, cols = np.nonzero(body)
    r0, c0 = (rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2
    sr, sc = spacing_mm
    reach = float(np.hypot((rows - r0) * sr, (cols - c0) * sc).max() + 0.5 * math.hypot(sr, sc))
    size_mm = ((cols.max() - cols.min() + 1) * sc, (rows.max() - rows.min() + 1) * sr)
    radius = geometry.fov_mm / 2
    if reach > radius and not crop_to_fov:
        raise ValueError(
            f"{name}: the body ({size_mm[0]:.1f} x {size_mm[1]:.1f} mm, reaching {reach:.1f} mm from its centre) "
            f"does not fit the FOV ({geometry.fov_mm:.2f} mm, a circle of radius {radius:.2f} mm); use "
            "--crop-to-fov (crop_to_fov=True) to crop it to the FOV, which the manifest records")
    p = geometry.pixel_size_mm
    ratio = np.array([p / sr, p / sc])
    sigma = np.maximum(0.0, (ratio - 1) / 2)
    if sigma.any():
        src = ndimage.gaussian_filter(src, sigma, mode="nearest")
    src = np.pad(src, 1, constant_values=AIR_HU)  # air around the slice, so the edges interpolate into air
    n = geometry.image_size
    c = (n - 1) / 2
    image = ndimage.affine_transform(src, np.diag(ratio), offset=(r0 + 1 - c * ratio[0], c0 + 1 - c * ratio[1]),
                                     output_shape=(n, n), order=1, mode="nearest")
    x, y = geometry.pixel_centres_mm()
    outside = np.hypot(x, y) > radius
    cropped = int((image[outside] > BODY_THRESHOLD_HU).sum())
    image[outside] = AIR_HU
    info = {"source_spacing_mm": [round(sr, 6), round(sc, 6)], "pixel_mm": p, "body_size_mm": [
        round(float(size_mm[0]), 3), round(float(size_mm[1]), 3)], "body_reach_mm": round(reach, 3),
        "cropped_body_pixels": cropped,
        "interpolation": "bilinear (scipy.ndimage.affine_transform order 1), Gaussian anti-aliasing "
                         f"sigma {np.round(sigma, 4).tolist()} input px"}
    return image.astype(np.float32), info


def tissue_fractions(hu: np.ndarray, config: SimulationConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Water- and bone-equivalent fractions of each pixel (CNNMAR's soft threshold, ``config``'s
    ``water_threshold_hu`` and ``bone_threshold_hu``); ``simulate_scan`` applies the same split.

    Returns:
        ``(water, bone)``, each shaped like ``hu``, in [0, 1], summing to 1.
    """
    config = config or SimulationConfig()
    bone = np.clip((np.asarray(hu, float) - config.water_threshold_hu)
                   / (config.bone_threshold_hu - config.water_threshold_hu), 0.0, 1.0)
    return 1.0 - bone, bone


def tissue_labels(hu: np.ndarray) -> np.ndarray:
    """Four-class tissue labels of a clean HU image (ids of ``tissues.TISSUES``: air 0, fat 2, soft tissue 3,
    bone 6; thresholds ``LABEL_THRESHOLDS_HU``).

    Returns:
        uint8 array shaped like ``hu``.
    """
    labels = np.full(np.shape(hu), TISSUES["air"].label, dtype=np.uint8)
    for tissue, lower in LABEL_THRESHOLDS_HU:
        labels[np.asarray(hu) >= lower] = TISSUES[tissue].label
    return labels


def _components(mask: np.ndarray, geometry: Geometry) -> list[tuple[float, float, float]]:
    """``(x_mm, y_mm, area_mm2)`` of each 8-connected component of ``mask``, largest first."""
    lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return []
    c = (geometry.image_size - 1) / 2
    p = geometry.pixel_size_mm
    idx = np.arange(1, n + 1)
    centres = ndimage.center_of_mass(mask, lab, idx)
    areas = ndimage.sum(mask, lab, idx) * p * p
    comps = [((col - c) * p, (c - row) * p, float(a)) for (row, col), a in zip(centres, areas, strict=True)]
    return sorted(comps, key=lambda t: -t[2])


def clean_implants(category: str, geometry: Geometry, hu: np.ndarray, labels: np.ndarray,
                   rng: np.random.Generator, name: str) -> list[MetalObject]:
    """Metal objects for one resampled clean slice (see the module docstring, step 4).

    Args:
        category: a key of ``anatomy.CATEGORIES`` or ``body`` / ``head`` (fractal shapes).
        hu, labels: ``(N, N)`` resampled HU and ``tissue_labels`` on ``geometry``'s grid.
    Raises:
        ValueError: the structure the category's implant needs is not in the slice (names the file).
    """
    if category in ANATOMY_CATEGORIES:
        count = int(rng.integers(1, 4))
        return fractal_objects(geometry, labels, rng, count, rng.uniform(3.0, 20.0, count),
                               str(rng.choice(AAPM_METALS)))
    bone = labels == TISSUES["cortical_bone"].label
    bones = _components(bone, geometry)
    if category == "bilateral_hip":
        left = [b for b in bones if b[0] < 0]
        right = [b for b in bones if b[0] > 0]
        if not left or not right:
            raise ValueError(f"{name}: category bilateral_hip needs bone on both sides of the midline (femoral "
                             f"heads), found {len(left)} left and {len(right)} right bone components")
        material = str(rng.choice(["cobalt_chrome", "titanium"]))
        centres = [left[0][:2], right[0][:2]]
        return [MetalObject("hip_prosthesis", material, mm.hip_prostheses(geometry, rng, centres))]
    if category == "lumbar_spine":
        mid = [b for b in bones if abs(b[0]) < 40.0]
        if not mid:
            raise ValueError(f"{name}: category lumbar_spine needs a vertebra (bone within 40 mm of the "
                             "midline), found none")
        return [MetalObject("pedicle_screws", "titanium", mm.pedicle_screws(geometry, rng, mid[0][:2]))]
    if category == "dental":
        rows, cols = np.nonzero(hu > _DENSE_TEETH_HU)
        if rows.size == 0:
            raise ValueError(f"{name}: category dental needs teeth (pixels above {_DENSE_TEETH_HU:g} HU), found none")
        c, p = (geometry.image_size - 1) / 2, geometry.pixel_size_mm
        x, y = (cols - c) * p, (c - rows) * p
        radius = max(5.0, float(x.max() - x.min()) / 2)
        centre = (float(x.mean()), float(y.max()) - radius)
        return [MetalObject("dental_fillings", "amalgam",
                            mm.dental_fillings(geometry, rng, centre, arch_radius_mm=radius))]
    if category in ("head", "upper_abdomen", "mid_abdomen"):
        soft = _components(labels == TISSUES["muscle"].label, geometry)
        if not soft:
            raise ValueError(f"{name}: category {category} needs soft tissue (-30 to 150 HU), found none")
        x, y, area = soft[0]
        material = str(rng.choice(["titanium", "stainless_steel"]))
        return [MetalObject("surgical_clips", material,
                            mm.surgical_clips(geometry, rng, (x, y), spread_mm=0.4 * math.sqrt(area / math.pi)))]
    if category in ("neck", "knee", "pelvis", "thorax"):
        big = [b for b in bones if math.sqrt(b[2] / math.pi) > 4.0]
        if not big:
            raise ValueError(f"{name}: category {category} needs a bone of radius > 4 mm for a plate, found none")
        x, y, area = big[int(rng.integers(len(big)))]
        material = str(rng.choice(["titanium", "stainless_steel"]))
        return [MetalObject("fixation_plate", material,
                            mm.fixation_plate(geometry, rng, (x, y), math.sqrt(area / math.pi)))]
    raise ValueError(f"{name}: unknown category {category!r}; expected one of "
                     f"{sorted(set(CATEGORIES) | set(ANATOMY_CATEGORIES))}")


def _split_text(groups: list[str], jobs: list[Job], group_of: dict[int, str], preset_name: str, seed: int,
                fractions: tuple) -> str:
    order = [groups[i] for i in _rng(seed, 9).permutation(len(groups))]
    n = len(order)
    n_test = max(1, int(round(fractions[2] * n)))
    n_val = int(round(fractions[1] * n)) if n >= 3 else 0
    part = {g: "test" if r < n_test else "val" if r < n_test + n_val else "train" for r, g in enumerate(order)}
    lines = [f"# benchmark simulated on clean CT images, preset '{preset_name}', seed {seed}, split by source: "
             "<split> <case_id> <category>"]
    lines += [f"{part[group_of[j.base]]} {j.case.case_id} {j.category}" for j in jobs if j.kind == "main"]
    return "\n".join(lines) + "\n"


def generate_from_clean_images(out: str | Path, clean_images: str | Path, preset_name: str = "smoke", seed: int = 0,
                               categories: str | Path | None = None, pixel_mm: float | None = None,
                               crop_to_fov: bool = False, limit: int | None = None, progress: bool = True,
                               projector_backend: str = "sparse", force: bool = False) -> dict | None:
    """Simulate a benchmark on clean CT slices (module docstring) in the release layout under ``out``.

    Args:
        out: output folder (``body1/``, ``head1/``, ``sweeps/``, ``split.txt``, ``manifest.json``).
        clean_images: a folder or file of DICOM, NIfTI or AAPM raw slices.
        preset_name: ``tiny``, ``smoke`` or ``aapm`` (geometry per anatomy, simulation, sweeps, batch size).
        seed: master seed (implants, noise, split); the same inputs and seed give the same bytes.
        categories: optional CSV ``file_or_slice,category``.
        pixel_mm: pixel size of raw slices (default 400 mm / width).
        crop_to_fov: crop bodies that leave the FOV circle (recorded per case and in the manifest).
        limit: stop after this many new slices (``None``: finish).
        force: rebuild a folder made by other code, settings or inputs.
    Returns:
        The manifest when complete, else ``None``.
    Raises:
        FileNotFoundError, ValueError: see ``read_clean_images``, ``read_categories``, ``resample_to_geometry``,
            ``clean_implants``; a folder of another fingerprint without ``force`` (``generator.prepare_folder``).
    """
    parts = fingerprint_parts(preset_name, seed)  # raises on an unknown preset
    p = PRESETS[preset_name]
    images, inputs = read_clean_images(clean_images, pixel_mm)
    chosen = read_categories(categories, images) if categories is not None else {}
    geometries = {a: preset(n) for a, n in p.geometry_presets.items()}
    slices: list[tuple[CleanImage, str, np.ndarray, np.ndarray, dict]] = []
    for im in images:  # everything is read and checked before the folder is touched
        category = chosen.get(im.key, "body")
        anatomy = ANATOMY_CATEGORIES.get(category) or ANATOMY_OF[category]
        name = im.source if im.kind != "nifti" else f"{im.source} slice {im.index}"
        hu, info = resample_to_geometry(im.hu, im.spacing_mm, geometries[anatomy], name, crop_to_fov)
        slices.append((im, category, hu, tissue_labels(hu), info))
    parts["inputs"] = {"files": inputs["files"], "categories_csv": sha256_file(categories) if categories else None,
                       "pixel_mm": pixel_mm, "crop_to_fov": crop_to_fov,
                       "readers": _library_versions(("pydicom", "nibabel"))}
    out = Path(out)
    identity = {"generator_version": GENERATOR_VERSION, "preset": preset_name, "seed": seed,
                "clean_images": str(clean_images)}
    fingerprint = fingerprint_of(parts)
    prepare_folder(out, fingerprint, identity, force)

    jobs: list[Job] = []
    counters: dict[tuple[str, str], int] = {}

    def add(root, category, kind, anatomy, base, level=0):
        counters[(root, anatomy)] = counters.get((root, anatomy), 0) + 1
        jobs.append(Job(len(jobs), root, AAPMCase(f"{anatomy}1", anatomy, counters[(root, anatomy)]), category,
                        kind, base, level))

    anatomy_of = [ANATOMY_CATEGORIES.get(s[1]) or ANATOMY_OF[s[1]] for s in slices]
    for anatomy in ("body", "head"):
        for i, s in enumerate(slices):
            if anatomy_of[i] == anatomy:
                add("", s[1], "main", anatomy, i)
    body = [i for i, a in enumerate(anatomy_of) if a == "body"]
    sweep_base = [body[int(k)] for k in np.unique(np.linspace(0, len(body) - 1, min(p.sweep_slices, len(body)))
                                                  .round().astype(int))] if body else []
    for s, i in enumerate(sweep_base):
        for n in range(1, p.sweep_max_objects + 1):
            add("sweeps/quantity", slices[i][1], "quantity", "body", s, n)
        for k in range(len(p.sweep_sizes_mm)):
            add("sweeps/size", slices[i][1], "size", "body", s, k)

    def source(job: Job) -> int:
        return job.base if job.kind == "main" else sweep_base[job.base]

    def draw(job: Job, geometry) -> Drawn:
        im, category, hu, labels, _ = slices[source(job)]
        name = im.source if im.kind != "nifti" else f"{im.source} slice {im.index}"
        if job.kind == "main":
            return hu, labels, clean_implants(category, geometry, hu, labels, _rng(seed, 0, job.number), name)
        return hu, labels, sweep_objects(job, p, geometry, labels, _rng(seed, 1, job.base))

    def case_info(job: Job) -> dict:
        im, _, _, _, info = slices[source(job)]
        return {"source": im.source, "source_slice": im.index, "source_group": im.group, "resampling": info}

    groups = sorted({im.group for im, *_ in slices})
    group_of = {i: s[0].group for i, s in enumerate(slices)}
    atomic_write(out / "split.txt", _split_text(groups, jobs, group_of, preset_name, seed, p.split_fractions))
    write_sweep_indexes(out, p, jobs, stacks=False)
    if not simulate_jobs(out, jobs, p, seed, draw, limit, progress, f"simulate {preset_name} on clean CT",
                         projector_backend, case_info):
        return None
    cropped = {s[0].key: s[4]["cropped_body_pixels"] for s in slices if s[4]["cropped_body_pixels"]}
    return write_manifest(out, identity, fingerprint, parts, p, {
        "generator": "marbench.datasets.synthetic.clean_ct",
        "clean_images": {"path": str(clean_images), "slices": len(slices), "sources": len(groups),
                         "files": inputs["files"], "ignored_files": inputs["ignored"],
                         "categories_csv": str(categories) if categories else None,
                         "raw_pixel_mm": pixel_mm if pixel_mm is not None else f"{AAPM_BODY_FOV_MM:g} mm / width",
                         "crop_to_fov": crop_to_fov, "cropped_body_pixels": cropped,
                         "interpolation": "bilinear (order 1) after Gaussian anti-aliasing, body centred",
                         "tissue_model": {"water_threshold_hu": p.simulation.water_threshold_hu,
                                          "bone_threshold_hu": p.simulation.bone_threshold_hu,
                                          "label_thresholds_hu": dict(LABEL_THRESHOLDS_HU)}},
        "categories": sorted({s[1] for s in slices}),
        "tissue_labels": label_names(),
        "cases": {name: sum(j.kind == kind for j in jobs) for name, kind in (
            ("main", "main"), ("quantity_sweep", "quantity"), ("size_sweep", "size"))},
    })
