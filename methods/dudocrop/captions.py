"""Text descriptions (captions) for DuDoCLIP's contrastive training (Zhang et al., "Dual-Domain CLIP-Assisted
Residual Optimization Perception Model for Metal Artifact Reduction", Sec. III.B.1 "Prompt Engineering", Fig. 5,
Algorithm 1 step DAPG 2).

The paper pairs every metal-affected image ``X_ma`` and sinogram ``Y_ma`` with two texts: ``T1``, a content
description of the clean image (organ type, location, colour, ...), and ``T2``, a structured QSPD tuple
(**Q**\\ uantity, **S**\\ ize, **P**\\ osition of the metal implants, **D**\\ escription of the artifacts) of the
residual ``X_r = X_ma - X_ref`` (``Y_r = Y_ma - Y_ref`` in the sinogram domain). Both are written by LLaVA-v1.5-13b
under "Qualifier + Instruction" prompts (Fig. 5, P1-P4 -> A1-A4); Q, S and P "can be easily extracted from the mask
image". Sec. IV.D / Table II compare against captions made without prompt engineering.

Departures (LLaVA cannot run inside the suite; every caption here is a deterministic function of the slice):

* **Templates instead of LLaVA.** Q, S, P come from the metal mask: connected components with 8-connectivity
  (``scipy.ndimage.label`` with a 3 x 3 structure: diagonal neighbours belong to one implant), their number, areas
  in mm^2 (pixel count x ``pixel_mm**2``, ``pixel_mm = fov_mm / N``; rounded to whole mm^2 in the text, at least
  1), listed largest first, each with a size word (``small`` < ``SMALL_MM2`` = 20 mm^2 <= ``medium`` <
  ``MEDIUM_MM2`` = 100 mm^2 <= ``large``) and a position relative to the body's centre. D is a template chosen by
  the number of implants and the severity (the size word of the *total* metal area): e.g. "bright streaks radiating
  from the metal and dark bands between the implants" for several implants, "mild streaks around a small implant"
  for one small implant; in the sinogram domain it describes the metal trace ("2 metal traces; ...; bright
  sinusoidal traces across the views"), with its largest width in detector channels when the metal trace is given.
* **Position convention.** Radiological display, as ``marbench.physics.geometry`` and the AAPM CT-MAR release:
  image column 0 is the patient's *right*, row 0 is *anterior*. An implant is ``right``/``left`` and
  ``anterior``/``posterior`` when its centroid lies more than ``CENTRAL_FRACTION`` (0.2) of the body's half extent
  (half its bounding box) from the body's centroid along that axis; within it on both axes it is ``central``. The
  body is the tissue labels != 0 (air is label 0), or image pixels above ``BODY_HU`` (-500 HU), holes filled (the
  lungs, bowel gas), largest connected region (the table and other objects dropped); without a body mask the whole
  image is the body.
* **Content (T1)** is the anatomical region (the category when it is one of the phantom categories of
  ``marbench.datasets.synthetic.anatomy``, e.g. ``pelvis``, else the anatomy ``body``/``head``) and the tissues of
  the tissue labels covering at least ``TISSUE_MIN_FRACTION`` (1 %) of the body, largest first, each with its usual
  grey level in a CT display (``TISSUE_COLOURS``: air black, lung and fat dark grey, soft tissue grey, bone white).
  Slices without tissue labels (AAPM CT-MAR) are classified by HU (``HU_CLASSES``: lung or gas / fat / soft tissue /
  bone; metal pixels excluded). The sinogram content names the sinogram shape and the tissues the rays pass
  through, without grey levels: "a CT sinogram of a slice of the pelvis (V views x C detector channels) through
  muscle, fat, ...".
* **Without prompt engineering** (``mode="direct"``; the paper's "w/o prompt engineering"): what a VLM says when
  asked only to describe ``X_ma``/``Y_ma``, no qualifier, no structure, no residual: ``T1`` = "a CT image of the
  <anatomy> with metal artifacts" (sinogram "a CT sinogram of the <anatomy> with a metal trace"), ``T2`` =
  "metal artifacts" ("metal trace").
* **Caption files.** Captions made offline (e.g. by LLaVA with the paper's prompts) replace the templates through
  ``CaptionFile`` (format in its docstring).

Every template caption stays within CLIP's 77-token context (checked with open_clip's tokenizer down to five
implants of 4-digit mm^2 areas): at most ``MAX_LISTED`` = 5 implants are listed, with more the 4 largest and
"+k more"; caption files are taken as written (CLIP's tokenizer truncates longer texts).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from marbench.datasets.synthetic.anatomy import ANATOMY_OF
from marbench.datasets.synthetic.tissues import LABELS

__all__ = ["PROMPT_MODES", "DOMAINS", "SMALL_MM2", "MEDIUM_MM2", "CENTRAL_FRACTION", "BODY_HU",
           "TISSUE_MIN_FRACTION", "TISSUE_COLOURS", "HU_CLASSES", "MAX_LISTED", "MetalComponent", "body_region",
           "metal_components", "qspd_tuple", "metal_caption", "content_caption", "direct_captions", "CaptionFile",
           "batch_captions"]

PROMPT_MODES = ("qspd", "direct")
DOMAINS = ("image", "sinogram")

SMALL_MM2 = 20.0  # an implant (or total metal) below this area is "small"
MEDIUM_MM2 = 100.0  # below this "medium", from it on "large"
CENTRAL_FRACTION = 0.2  # of the body's half extent: the band around the body's centre called central
BODY_HU = -500.0  # body pixels are above this HU (air and the outside of the patient below)
TISSUE_MIN_FRACTION = 0.01  # of the body's pixels: a tissue below this is left out of the content caption
MAX_LISTED = 5  # implants listed one by one in T2; more would overflow CLIP's 77 tokens

# The grey level a reader sees in the usual CT displays (soft-tissue or brain window, lung window for the lung):
# what a VLM reports as the "colour" of each tissue label.
TISSUE_COLOURS: dict[str, str] = {
    "air": "black", "lung": "dark grey", "fat": "dark grey", "muscle": "grey", "organ": "grey",
    "cancellous_bone": "white", "cortical_bone": "white", "brain": "grey", "csf": "dark grey",
}
_TISSUE_WORDS = {"organ": "organs", "csf": "CSF", "cancellous_bone": "cancellous bone",
                 "cortical_bone": "cortical bone"}
# Without tissue labels: (name, colour, upper HU bound) classes of a body pixel, the bounds roughly midway between
# the typical values of marbench.datasets.synthetic.tissues (lung -850, fat -100, soft tissue 8-55, bone >= 280).
HU_CLASSES: tuple[tuple[str, str, float], ...] = (
    ("lung or gas", "dark grey", -400.0),
    ("fat", "dark grey", -30.0),
    ("soft tissue", "grey", 150.0),
    ("bone", "white", math.inf),
)
_REGIONS = {"upper_abdomen": "upper abdomen", "mid_abdomen": "mid abdomen", "bilateral_hip": "hips",
            "lumbar_spine": "lumbar spine", "dental": "jaw and teeth"}


@dataclass(frozen=True)
class MetalComponent:
    """One metal implant (a connected component of the metal mask).

    ``area_mm2``: area in mm^2; ``centroid_rc``: (row, column) of its centroid in pixels; ``position``: e.g.
    ``"right anterior"``, ``"left"``, ``"central"`` (patient's side, see the module docstring); ``size``:
    ``"small"``, ``"medium"`` or ``"large"``.
    """

    area_mm2: float
    centroid_rc: tuple[float, float]
    position: str
    size: str


# -- validation -------------------------------------------------------------------------------------------------------
def _to_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise ValueError(f"{name}: expected a torch.Tensor or numpy array, found {type(x).__name__}")


def _plane(x, name: str, what: str = "(H, W) or (1, H, W)") -> np.ndarray:
    a = _to_numpy(x, name)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a {what} array, found shape {tuple(a.shape)}")
    return a


def _bool_plane(x, name: str, what: str = "(H, W) or (1, H, W)") -> np.ndarray:
    a = _plane(x, name, what)
    if a.dtype != np.bool_:
        raise ValueError(f"{name}: expected a bool {what} mask, found dtype {a.dtype} (threshold it, e.g. `> 0`)")
    return a


def _check_pixel(pixel_mm: float) -> float:
    p = float(pixel_mm)
    if not (math.isfinite(p) and p > 0):
        raise ValueError(f"pixel_mm: expected a positive finite pixel size in mm, found {pixel_mm!r}")
    return p


def _check_domain(domain: str) -> str:
    if domain not in DOMAINS:
        raise ValueError(f"domain: expected one of {DOMAINS}, found {domain!r}")
    return domain


def _check_word(name: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}: expected a non-empty string, found {value!r}")
    return value.strip()


# -- Q, S, P ----------------------------------------------------------------------------------------------------------
def body_region(image_hu=None, tissue_labels=None) -> np.ndarray:
    """The patient's body of one slice: bool ``(H, W)`` numpy.

    Args:
        image_hu: ``(H, W)`` or ``(1, H, W)`` image in HU (clean or metal-affected): pixels above ``BODY_HU``.
        tissue_labels: ``(H, W)`` or ``(1, H, W)`` integer tissue labels: labels != 0 (air is 0); used when given.
    Returns:
        The mask with holes filled (lungs, bowel gas inside the outline count as body) and only its largest
        8-connected region kept (the scanner table and other detached objects are no body).
    Raises:
        ValueError: neither given, a non-2D array, non-integer labels.
    """
    if tissue_labels is not None:
        labels = _plane(tissue_labels, "tissue_labels")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"tissue_labels: expected an integer array, found dtype {labels.dtype}")
        body = labels != 0
    elif image_hu is not None:
        body = _plane(image_hu, "image_hu").astype(np.float64) > BODY_HU
    else:
        raise ValueError("body_region: expected image_hu or tissue_labels")
    body = ndimage.binary_fill_holes(body)
    regions, n = ndimage.label(body, structure=np.ones((3, 3), bool))
    if n > 1:
        sizes = np.bincount(regions.ravel())[1:]
        body = regions == 1 + int(np.argmax(sizes))
    return body


def _size_word(area_mm2: float) -> str:
    return "small" if area_mm2 < SMALL_MM2 else "medium" if area_mm2 < MEDIUM_MM2 else "large"


def _frame(shape: tuple[int, int], body: np.ndarray | None) -> tuple[float, float, float, float]:
    """(row centre, column centre, row half extent, column half extent) of the body, in pixels."""
    if body is None or not body.any():
        return (shape[0] - 1) / 2, (shape[1] - 1) / 2, shape[0] / 2, shape[1] / 2
    rows, cols = np.nonzero(body)
    return (float(rows.mean()), float(cols.mean()), (rows.max() - rows.min() + 1) / 2,
            (cols.max() - cols.min() + 1) / 2)


def metal_components(metal_mask, pixel_mm: float, body_mask=None) -> list[MetalComponent]:
    """The metal implants of one slice, largest first (ties: by centroid row, then column).

    Args:
        metal_mask: bool ``(H, W)`` or ``(1, H, W)`` tensor or array, metal pixels.
        pixel_mm: pixel size in mm (``fov_mm / N``).
        body_mask: optional bool mask of the same grid, the patient's body (``body_region``); ``None``: the image.
    Returns:
        One ``MetalComponent`` per 8-connected component: area in mm^2, centroid (row, column) in pixels, position
        (column 0 = patient's right, row 0 = anterior), size word.
    Raises:
        ValueError: a mask that is not bool 2D (or ``(1, H, W)``), a body mask on another grid, ``pixel_mm <= 0``.
    """
    mask = _bool_plane(metal_mask, "metal_mask")
    pixel = _check_pixel(pixel_mm)
    body = None
    if body_mask is not None:
        body = _bool_plane(body_mask, "body_mask")
        if body.shape != mask.shape:
            raise ValueError(f"body_mask: expected the metal mask's grid {mask.shape}, found {body.shape}")
    rc, cc, rh, ch = _frame(mask.shape, body)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    counts = ndimage.sum_labels(np.ones(mask.shape), labels, index)
    centroids = ndimage.center_of_mass(mask, labels, index)
    out = []
    for count, (r, c) in zip(counts, centroids, strict=True):
        area = float(count) * pixel**2
        side = "right" if c < cc - CENTRAL_FRACTION * ch else "left" if c > cc + CENTRAL_FRACTION * ch else ""
        depth = "anterior" if r < rc - CENTRAL_FRACTION * rh else "posterior" if r > rc + CENTRAL_FRACTION * rh else ""
        position = " ".join(w for w in (side, depth) if w) or "central"
        out.append(MetalComponent(area, (float(r), float(c)), position, _size_word(area)))
    return sorted(out, key=lambda m: (-m.area_mm2, m.centroid_rc))


def _area_text(area_mm2: float) -> str:
    # whole mm^2: decimals cost CLIP tokens and a VLM reading the image could not measure them anyway
    return str(max(1, int(math.floor(area_mm2 + 0.5))))


def _listed(items: list[str]) -> list[str]:
    if len(items) <= MAX_LISTED:
        return items
    return items[:MAX_LISTED - 1] + [f"+{len(items) - MAX_LISTED + 1} more"]


def _grouped_sizes(components: list[MetalComponent]) -> list[str]:
    # sorted by area, the size words form runs: naming each run once saves CLIP tokens ("large 314, 120, medium 50")
    out, last = [], None
    for m in components:
        out.append(_area_text(m.area_mm2) if m.size == last else f"{m.size} {_area_text(m.area_mm2)}")
        last = m.size
    return out


def _description(components: list[MetalComponent], domain: str, metal_trace: np.ndarray | None) -> str:
    n = len(components)
    if domain == "image":
        if n == 0:
            return "no metal implant and no metal artifacts"
        severity = _size_word(sum(m.area_mm2 for m in components))
        if n == 1:
            return {"small": "mild streaks around a small implant",
                    "medium": "bright and dark streaks around the implant",
                    "large": "severe bright streaks and dark shadows radiating from a large implant"}[severity]
        return {"small": "mild streaks and thin dark bands between the small implants",
                "medium": "bright streaks radiating from the metal and dark bands between the implants",
                "large": "severe bright streaks radiating from the metal and wide dark bands between the implants",
                }[severity]
    if n == 0:
        return "no metal trace"
    severity = _size_word(sum(m.area_mm2 for m in components))
    width = {"small": "thin ", "medium": "", "large": "broad "}[severity]
    # "metal" is left to the quantity field ("2 metal traces"): the 5-implant worst case needs the token
    text = (f"a {width}bright sinusoidal trace across the views" if n == 1 else
            f"{width}bright sinusoidal traces across the views")
    if metal_trace is not None and metal_trace.any():
        # the widest view: where the traces overlap or a long implant lies across the rays
        text += f", up to {int(metal_trace.sum(axis=1).max())} detector channels wide"
    return text


def _qspd(metal_mask, pixel_mm, body_mask, domain, metal_trace) -> tuple[dict, list[str]]:
    """The tuple of ``qspd_tuple`` and the size entries of ``metal_caption`` (size words once per run)."""
    _check_domain(domain)
    trace = None
    if domain == "sinogram" and metal_trace is not None:
        trace = _bool_plane(metal_trace, "metal_trace", "(V, C) or (1, V, C)")
    components = metal_components(metal_mask, pixel_mm, body_mask)
    t = {"quantity": len(components),
         "size": _listed([f"{m.size} {_area_text(m.area_mm2)}" for m in components]),
         "position": _listed([m.position for m in components]),
         "description": _description(components, domain, trace)}
    return t, _listed(_grouped_sizes(components))


def qspd_tuple(metal_mask, pixel_mm: float, body_mask=None, domain: str = "image", metal_trace=None) -> dict:
    """The QSPD tuple of one slice (Sec. III.B.1): quantity, size, position of the implants, artifact description.

    Args:
        metal_mask, pixel_mm, body_mask: as ``metal_components``.
        domain: ``"image"`` (artifacts of ``X_r``) or ``"sinogram"`` (the metal trace of ``Y_r``).
        metal_trace: optional bool ``(V, C)`` or ``(1, V, C)`` metal trace (sinogram domain): adds its largest
            width over the views, in detector channels, to the description; ignored in the image domain.
    Returns:
        ``{"quantity": int, "size": ["large 314", ...], "position": ["right", ...], "description": str}``:
        size entries are the size word and the area in whole mm^2 (at least 1), largest first; position entries
        in the same order; both hold at most ``MAX_LISTED`` entries, the last one ``"+k more"`` when there are
        more implants.
    Raises:
        ValueError: as ``metal_components``; an unknown domain; a metal trace that is not bool 2D.
    """
    return _qspd(metal_mask, pixel_mm, body_mask, domain, metal_trace)[0]


def metal_caption(metal_mask, pixel_mm: float, body_mask=None, domain: str = "image", metal_trace=None) -> str:
    """``T2``: the QSPD tuple of ``qspd_tuple`` as one string, fields separated by ``"; "`` (<= 77 CLIP tokens).

    ``"<Q> metal implants; size mm2: <S>; position: <P>; <D>"`` (sinogram: ``"<Q> metal traces; ..."``); the size
    word is written once per run of equal words (``"large 314, 120, medium 50"``), ``"+k more"`` only after the
    sizes; without metal only Q and D.
    Args and raises: as ``qspd_tuple``.

    >>> import numpy as np
    >>> m = np.zeros((8, 8), bool); m[3:5, 0:2] = True  # 2 x 2 pixels on the patient's right
    >>> metal_caption(m, pixel_mm=1.0)
    '1 metal implant; size mm2: small 4; position: right; mild streaks around a small implant'
    >>> metal_caption(np.zeros((8, 8), bool), pixel_mm=1.0, domain="sinogram")
    '0 metal traces; no metal trace'
    """
    t, sizes = _qspd(metal_mask, pixel_mm, body_mask, domain, metal_trace)
    n = t["quantity"]
    noun = ("metal implant" if domain == "image" else "metal trace") + ("" if n == 1 else "s")
    parts = [f"{n} {noun}"]
    if n:
        # no "quantity:"/"description:" labels and "+k more" once (in the sizes): CLIP's 77 tokens must hold four
        # 4-digit areas and their two-word positions of a slice with many implants
        positions = t["position"][:MAX_LISTED - 1] if n > MAX_LISTED else t["position"]
        parts += [f"size mm2: {', '.join(sizes)}", f"position: {', '.join(positions)}"]
    return "; ".join(parts + [t["description"]])


# -- T1 ---------------------------------------------------------------------------------------------------------------
def _region(anatomy: str, category: str) -> str:
    key = category.strip().lower()
    if key in ANATOMY_OF:
        return _REGIONS.get(key, key.replace("_", " "))
    return anatomy.lower()


def _tissue_list(tissue_labels, image_hu, metal_mask) -> list[tuple[str, str]]:
    """(name, colour) of the tissues covering >= TISSUE_MIN_FRACTION of the body, largest first."""
    if tissue_labels is not None:
        labels = _plane(tissue_labels, "tissue_labels")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"tissue_labels: expected an integer array, found dtype {labels.dtype}")
        unknown = sorted(set(np.unique(labels).tolist()) - set(LABELS))
        if unknown:
            raise ValueError(f"tissue_labels: unknown label ids {unknown}; expected ids of {sorted(LABELS)}")
        counts = np.bincount(labels.ravel(), minlength=max(LABELS) + 1)
        entries = [(LABELS[i].name, int(counts[i])) for i in sorted(LABELS) if i != 0]
        named = [(_TISSUE_WORDS.get(n, n), TISSUE_COLOURS[n], c) for n, c in entries]
    else:
        hu = _plane(image_hu, "image_hu").astype(np.float64)
        body = body_region(image_hu=hu)
        if metal_mask is not None:
            metal = _bool_plane(metal_mask, "metal_mask")
            if metal.shape != hu.shape:
                raise ValueError(f"metal_mask: expected the image's grid {hu.shape}, found {metal.shape}")
            body &= ~metal
        values, lower, named = hu[body], -math.inf, []
        for name, colour, upper in HU_CLASSES:
            named.append((name, colour, int(((values >= lower) & (values < upper)).sum())))
            lower = upper
    total = sum(c for _, _, c in named)
    if total == 0:
        return []
    kept = [(n, col, c) for n, col, c in named if c >= TISSUE_MIN_FRACTION * total]
    kept.sort(key=lambda e: -e[2])  # stable: equal areas keep label order
    return [(n, col) for n, col, _ in kept]


def content_caption(tissue_labels, anatomy: str, category: str, domain: str = "image", sinogram_shape=None, *,
                    image_hu=None, metal_mask=None) -> str:
    """``T1``: the content description of the clean slice (anatomical region, tissues with their grey levels).

    Args:
        tissue_labels: int ``(H, W)`` or ``(1, H, W)`` tissue labels (ids of ``marbench.datasets.synthetic.tissues``,
            0 = air), or ``None``: then ``image_hu`` is classified by ``HU_CLASSES``.
        anatomy: ``"body"`` or ``"head"`` (any non-empty word is accepted).
        category: the slice's category; a phantom category (e.g. ``"pelvis"``) names the region, others (e.g.
            ``"scoring"``, ``"metal_size_2"``) leave the anatomy as the region.
        domain: ``"image"`` or ``"sinogram"``.
        sinogram_shape: ``(V, C)`` (or any shape ending in them), required for the sinogram domain.
        image_hu: ``(H, W)`` image in HU (preferably the clean one), used when ``tissue_labels`` is ``None``.
        metal_mask: optional bool mask of ``image_hu``'s grid: pixels left out of the HU classification.
    Returns:
        e.g. ``"a CT slice of the pelvis showing muscle (grey), fat (dark grey), cancellous bone (white)"``;
        sinogram: ``"a CT sinogram of a slice of the pelvis (640 views x 641 detector channels) through muscle,
        fat, cancellous bone"``.
    Raises:
        ValueError: an unknown domain, empty anatomy/category, labels that are not integer or of unknown ids,
            neither labels nor image, a missing or malformed ``sinogram_shape`` in the sinogram domain.
    """
    _check_domain(domain)
    anatomy, category = _check_word("anatomy", anatomy), _check_word("category", category)
    if tissue_labels is None and image_hu is None:
        raise ValueError("content_caption: expected tissue_labels or image_hu")
    region = _region(anatomy, category)
    tissues = _tissue_list(tissue_labels, image_hu, metal_mask)
    showing = (" showing " + ", ".join(f"{n} ({c})" for n, c in tissues)) if tissues else ""
    if domain == "image":
        return f"a CT slice of the {region}{showing}"
    if sinogram_shape is None or len(tuple(sinogram_shape)) < 2:
        raise ValueError(f"sinogram_shape: expected (V, C) for the sinogram domain, found {sinogram_shape!r}")
    v, c = (int(s) for s in tuple(sinogram_shape)[-2:])
    # a sinogram has no grey level per tissue: the tissues are what the rays pass through
    through = (" through " + ", ".join(n for n, _ in tissues)) if tissues else ""
    return f"a CT sinogram of a slice of the {region} ({v} views x {c} detector channels){through}"


def direct_captions(anatomy: str, domain: str = "image") -> tuple[str, str]:
    """``(T1, T2)`` without prompt engineering (Table II, Fig. 8 "w/o prompt engineering").

    What a VLM answers when simply asked to describe the metal-affected image or sinogram: no qualifier, no QSPD
    structure, no residual image, hence only the anatomy and the presence of metal.

    Returns:
        image: ``("a CT image of the <anatomy> with metal artifacts", "metal artifacts")``;
        sinogram: ``("a CT sinogram of the <anatomy> with a metal trace", "metal trace")``.
    Raises:
        ValueError: an unknown domain, an empty anatomy.
    """
    _check_domain(domain)
    anatomy = _check_word("anatomy", anatomy).lower()
    if domain == "image":
        return f"a CT image of the {anatomy} with metal artifacts", "metal artifacts"
    return f"a CT sinogram of the {anatomy} with a metal trace", "metal trace"


# -- caption files ----------------------------------------------------------------------------------------------------
_TEXT_KEYS = ("content", "metal")


class CaptionFile:
    """Captions made outside the suite (e.g. by LLaVA with the paper's prompts), keyed by slice id.

    Format: one JSON object, slice id (the batch's ``slice_id``, e.g. ``"body1/body12"``) -> entry, an entry being
    either per domain::

        {"body1/body12": {"image":    {"content": "<T1 of X_ma>", "metal": "<T2 of X_r>"},
                          "sinogram": {"content": "<T1 of Y_ma>", "metal": "<T2 of Y_r>"}}}

    (one of the two domains may be left out if it is never asked for), or one pair used for both domains::

        {"body1/body12": {"content": "<T1>", "metal": "<T2>"}}

    Texts are non-empty strings, taken as written; no other keys are allowed (a typo fails at load).

    Raises (on construction):
        FileNotFoundError: no file at ``path``.
        ValueError: not valid JSON, not an object, no slices, an entry that is not of one of the two forms
            (naming the file, the slice and the expected keys).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: caption file not found")
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.path}: not a valid JSON caption file ({e})") from e
        if not isinstance(data, dict) or not data:
            raise ValueError(f"{self.path}: expected a non-empty JSON object slice_id -> captions, "
                             f"found {type(data).__name__ if not isinstance(data, dict) else 'an empty object'}")
        self._entries: dict[str, dict[str, tuple[str, str]]] = {
            str(sid): self._parse(str(sid), entry) for sid, entry in data.items()}

    def _pair(self, slice_id: str, where: str, value) -> tuple[str, str]:
        expected = '{"content": "<text>", "metal": "<text>"}'
        if (not isinstance(value, dict) or set(value) != set(_TEXT_KEYS)
                or not all(isinstance(value[k], str) and value[k].strip() for k in _TEXT_KEYS)):
            raise ValueError(f"{self.path}: slice {slice_id!r}{where}: expected {expected} with non-empty texts, "
                             f"found {value!r:.200}")
        return value["content"].strip(), value["metal"].strip()

    def _parse(self, slice_id: str, entry) -> dict[str, tuple[str, str]]:
        if isinstance(entry, dict) and entry and set(entry) <= set(DOMAINS):
            return {d: self._pair(slice_id, f" [{d!r}]", entry[d]) for d in entry}
        if isinstance(entry, dict) and set(entry) & set(_TEXT_KEYS):
            pair = self._pair(slice_id, "", entry)
            return {d: pair for d in DOMAINS}
        raise ValueError(f"{self.path}: slice {slice_id!r}: expected {{\"content\", \"metal\"}} or "
                         f"{{\"image\": {{\"content\", \"metal\"}}, \"sinogram\": {{\"content\", \"metal\"}}}}, "
                         f"found {entry!r:.200}")

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, slice_id: str) -> bool:
        return slice_id in self._entries

    def captions(self, slice_id: str, domain: str) -> tuple[str, str]:
        """``(T1, T2)`` = (content, metal) of ``slice_id`` in ``domain``.

        Raises:
            ValueError: an unknown domain, a slice id the file lacks (naming the file, the slice and the file's
                number of slices), a domain the slice's entry lacks.
        """
        _check_domain(domain)
        entry = self._entries.get(slice_id)
        if entry is None:
            raise ValueError(f"{self.path}: no captions for slice {slice_id!r} (the file has {len(self)} slices)")
        if domain not in entry:
            raise ValueError(f"{self.path}: slice {slice_id!r} has no {domain!r} captions (found {sorted(entry)})")
        return entry[domain]


# -- batches ----------------------------------------------------------------------------------------------------------
def _batch_list(batch: dict, key: str, b: int) -> list:
    if key not in batch:
        raise ValueError(f"batch: expected key {key!r} (marbench.datasets.batch convention)")
    values = batch[key]
    values = values.tolist() if isinstance(values, (torch.Tensor, np.ndarray)) else list(values)
    if len(values) != b:
        raise ValueError(f"batch[{key!r}]: expected {b} entries (the batch size), found {len(values)}")
    return values


def _batch_tensor(batch: dict, key: str, b: int, required: bool = True):
    if key not in batch:
        if required:
            raise ValueError(f"batch: expected key {key!r} (marbench.datasets.batch convention)")
        return None
    x = batch[key]
    if not isinstance(x, (torch.Tensor, np.ndarray)) or x.ndim != 4 or x.shape[0] != b or x.shape[1] != 1:
        found = tuple(x.shape) if isinstance(x, (torch.Tensor, np.ndarray)) else type(x).__name__
        raise ValueError(f"batch[{key!r}]: expected a ({b}, 1, rows, columns) tensor, found {found}")
    return x


def batch_captions(batch: dict, domain: str, mode: str = "qspd",
                   caption_file: CaptionFile | None = None) -> tuple[list[str], list[str]]:
    """``(T1s, T2s)`` of a batch of the suite's convention (``marbench.datasets.batch``), one pair per slice.

    Args:
        batch: uses ``slice_id`` (caption file), ``anatomy`` (direct), and for ``"qspd"`` ``metal_mask``
            ``(B, 1, N, N)`` bool, ``fov_mm`` ``(B,)`` (pixel size ``fov_mm / N``), ``category``,
            ``tissue_labels`` ``(B, 1, N, N)`` int64 if present (else the content and the body come from
            ``gt_image``, or ``ma_image`` with the metal pixels left out, in HU), and in the sinogram domain the
            shape ``(V, C)`` of ``ma_sinogram`` (or another sinogram key) and ``metal_trace`` if present.
        domain: ``"image"`` or ``"sinogram"``.
        mode: ``"qspd"`` (templates of the module docstring) or ``"direct"`` (without prompt engineering).
        caption_file: if given, its texts for each ``slice_id`` (``mode`` is then not used, but still checked).
    Returns:
        Two lists of ``B`` strings: content captions ``T1`` and metal captions ``T2``.
    Raises:
        ValueError: an unknown mode or domain, a missing or malformed batch key, a slice the caption file lacks.
    """
    _check_domain(domain)
    if mode not in PROMPT_MODES:
        raise ValueError(f"mode: expected one of {PROMPT_MODES}, found {mode!r}")
    if "metal_mask" in batch:
        b = _batch_tensor(batch, "metal_mask", len(batch["metal_mask"])).shape[0]
    else:
        b = len(batch.get("slice_id", batch.get("anatomy", [])))
    if caption_file is not None:
        pairs = [caption_file.captions(str(sid), domain) for sid in _batch_list(batch, "slice_id", b)]
    elif mode == "direct":
        pairs = [direct_captions(a, domain) for a in _batch_list(batch, "anatomy", b)]
    else:
        pairs = _qspd_pairs(batch, domain, b)
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _qspd_pairs(batch: dict, domain: str, b: int) -> list[tuple[str, str]]:
    masks = _batch_tensor(batch, "metal_mask", b)
    fov = _batch_list(batch, "fov_mm", b)
    anatomy, category = _batch_list(batch, "anatomy", b), _batch_list(batch, "category", b)
    labels = _batch_tensor(batch, "tissue_labels", b, required=False)
    image_key = "gt_image" if "gt_image" in batch else "ma_image"
    images = None if labels is not None else _batch_tensor(batch, image_key, b)
    shape, traces = None, None
    if domain == "sinogram":
        key = next((k for k in ("ma_sinogram", "gt_sinogram", "li_sinogram", "metal_trace") if k in batch), None)
        if key is None:
            raise ValueError("batch: expected 'ma_sinogram' (or another sinogram key) for the sinogram shape")
        shape = tuple(_batch_tensor(batch, key, b).shape[-2:])
        traces = _batch_tensor(batch, "metal_trace", b, required=False)
    pairs = []
    for i in range(b):
        mask = _bool_plane(masks[i], "batch['metal_mask']")
        pixel = float(fov[i]) / mask.shape[-1]
        if labels is not None:
            body = body_region(tissue_labels=labels[i])
            t1 = content_caption(labels[i], anatomy[i], category[i], domain, shape)
        else:
            hu = _plane(images[i], f"batch[{image_key!r}]").astype(np.float64)
            if image_key == "ma_image":
                hu = np.where(mask, np.float64(BODY_HU + 1), hu)  # metal counts as body, not as bone
            body = body_region(image_hu=hu)
            t1 = content_caption(None, anatomy[i], category[i], domain, shape, image_hu=hu,
                                 metal_mask=mask if image_key == "ma_image" else None)
        trace = traces[i] if traces is not None else None
        pairs.append((t1, metal_caption(mask, pixel, body, domain, trace)))
    return pairs
