"""The editor's input representation and its three conditioning modes (Emirdagi et al., "Leveraging Image Editing
Foundation Models for Data-Efficient CT Metal Artifact Reduction", Sec. 2.3 and 2.5).

Representation (Sec. 2.5): a slice is windowed to ``WINDOW_HU`` = [-500, 1300] HU, mapped linearly to 8 bit and the
grey value replicated to three channels: ``(B, 1, H, W)`` HU -> ``(B, 3, H, W)`` in ``{0, 1/255, ..., 1}``. The
window saturates metal (> 3000 HU) at the top and air (-1000 HU) at the bottom; ``rgb_to_hu`` maps back through the
inverse window (the mean of the three channels), so a restored image lies in [-500, 1300] HU.

Conditioning (Sec. 2.3), one of ``MODES``:

* ``none``: the corrupted slice alone, the reference-free case ``F(I_src, T)`` of Eq. 1;
* ``multi``: the corrupted slice and five clean references as one six-image call (Eq. 3), the prompt labelling
  image 1 as the corrupted scan and images 2-6 as the references;
* ``grid``: the six images tiled 2 x 3 (corrupted slice top-left, references in row order), each cell half the
  slice's side (the paper's 256 x 256 cells of 512 x 512 slices), one ``H x 1.5 W`` image and the grid prompt.

The references are metal-free slices of the same category from other patients (Sec. 2.3, 3.1): ``pick_references``
chooses them from a pool, seeded by the slice id, so a slice always gets the same five.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from marbench.converters import window

__all__ = ["WINDOW_HU", "MODES", "N_REFERENCES", "PROMPTS", "hu_to_rgb", "rgb_to_hu", "grid_image", "grid_cells",
           "condition_images", "pick_references"]

WINDOW_HU = (-500.0, 1300.0)
MODES = ("none", "multi", "grid")
N_REFERENCES = 5
# The instructions of Sec. 2.3 ("Image 1 is the CT scan with metal artifacts ... Images 2-6 are clean reference
# CTs"; "The input is a 2x3 grid. Top-left is the CT scan ... the other five cells are clean reference CTs"); the
# paper quotes them only in part, the rest is ours.
PROMPTS = {
    "none": "Remove the metal artifacts from this CT scan.",
    "multi": ("Image 1 is the CT scan with metal artifacts. Images 2-6 are clean reference CTs of the same body "
              "region from other patients. Remove the metal artifacts from image 1."),
    "grid": ("The input is a 2x3 grid. Top-left is the CT scan with metal artifacts; the other five cells are clean "
             "reference CTs of the same body region from other patients. Output the top-left CT scan with the "
             "metal artifacts removed."),
}


def hu_to_rgb(hu: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` HU -> ``(B, 3, H, W)`` 8-bit grey in [0, 1] (Sec. 2.5: window [-500, 1300], 8 bit, RGB).

    >>> hu_to_rgb(torch.tensor([[[[-1000.0, 400.0, 4000.0]]]]))[0, :, 0].tolist()
    [[0.0, 0.5019607543945312, 1.0], [0.0, 0.5019607543945312, 1.0], [0.0, 0.5019607543945312, 1.0]]
    """
    if hu.ndim != 4 or hu.shape[1] != 1:
        raise ValueError(f"expected HU images of shape (B, 1, H, W), found {tuple(hu.shape)}")
    grey = torch.round(window(hu.float(), *WINDOW_HU) * 255.0) / 255.0
    return grey.expand(-1, 3, -1, -1).contiguous()


def rgb_to_hu(rgb: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1] -> ``(B, 1, H, W)`` HU in [-500, 1300]: the inverse window of the channels' mean
    (values outside [0, 1], which a decoder may give, are clamped: the window cannot represent them)."""
    if rgb.ndim != 4 or rgb.shape[1] != 3:
        raise ValueError(f"expected RGB images of shape (B, 3, H, W), found {tuple(rgb.shape)}")
    low, high = WINDOW_HU
    return low + rgb.float().mean(dim=1, keepdim=True).clamp(0.0, 1.0) * (high - low)


def grid_cells(height: int, width: int) -> list[tuple[int, int, int, int]]:
    """The six cells ``(top, left, cell_height, cell_width)`` of the 2 x 3 grid of ``height x width`` slices, in
    the prompt's order: the corrupted slice top-left, the references left to right, then the second row.

    Raises:
        ValueError: odd slice sides (a cell is half a side).
    """
    if height % 2 or width % 2:
        raise ValueError(f"grid conditioning halves the slice; expected even sides, found {height} x {width}")
    ch, cw = height // 2, width // 2
    return [(r * ch, c * cw, ch, cw) for r in range(2) for c in range(3)]


def grid_image(source: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """The grid condition (Sec. 2.3): ``source`` ``(3, H, W)`` and ``references`` ``(5, 3, H, W)`` tiled 2 x 3
    into one ``(3, H, 3 W / 2)`` image, each resized to ``H/2 x W/2`` (area averaging).

    Raises:
        ValueError: not exactly five references, or references of another size than the source.
    """
    if references.ndim != 4 or references.shape[0] != N_REFERENCES or references.shape[1:] != source.shape:
        raise ValueError(f"grid conditioning expects {N_REFERENCES} references of shape {tuple(source.shape)}, "
                         f"found {tuple(references.shape)}")
    _, h, w = source.shape
    cells = grid_cells(h, w)
    tiles = F.interpolate(torch.cat([source[None], references]), size=(h // 2, w // 2), mode="area")
    out = source.new_zeros(3, h, 3 * (w // 2))
    for (top, left, ch, cw), tile in zip(cells, tiles, strict=True):
        out[:, top:top + ch, left:left + cw] = tile
    return out


def condition_images(mode: str, source: torch.Tensor, references: torch.Tensor | None) -> list[torch.Tensor]:
    """The edit images of one slice for ``mode``: ``[source]`` (``none``), ``[source, r1, ..., r5]`` (``multi``,
    Eq. 3's order) or ``[grid_image(source, references)]`` (``grid``); each ``(3, h, w)`` in [0, 1].

    Raises:
        ValueError: an unknown mode; ``multi`` or ``grid`` without exactly five references (expected vs found).
    """
    if mode not in MODES:
        raise ValueError(f"unknown conditioning {mode!r}; expected one of {MODES}")
    if mode == "none":
        return [source]
    found = 0 if references is None else int(references.shape[0])
    if found != N_REFERENCES:
        raise ValueError(f"{mode!r} conditioning needs {N_REFERENCES} clean reference slices, found {found}")
    if mode == "multi":
        return [source, *references.unbind(0)]
    return [grid_image(source, references)]


def pick_references(slice_id: str, pool: list[str], k: int = N_REFERENCES, seed: int = 0) -> list[str]:
    """``k`` reference ids from ``pool`` (the same category's clean slices of other patients, the slice itself
    excluded), drawn without replacement by a generator seeded from the slice id: the same slice always gets the
    same references, whatever else is in its batch.

    Raises:
        ValueError: fewer than ``k`` candidates (names the slice, expected and found).
    """
    candidates = sorted(p for p in pool if p != slice_id)
    if len(candidates) < k:
        raise ValueError(f"slice {slice_id}: expected at least {k} clean reference slices of its category from other "
                         f"patients, found {len(candidates)}")
    digest = hashlib.sha256(f"{slice_id}|{seed}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return [candidates[i] for i in sorted(rng.choice(len(candidates), k, replace=False))]
