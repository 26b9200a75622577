"""The perceptual indicators PI_q and PI_s (DuDoCROP, Eq. 18-19) on the synthetic benchmark's controlled sweeps.

A sweep holds each base slice with 1..5 metal objects (``sweeps/quantity``) or one object at growing sizes
(``sweeps/size``); everything else (anatomy, shapes, noise) is shared along a sweep. For each level the
method's output and the metal-free image are compared with LPIPS (VGG16 v0.1) in the ``editmar`` HU window:
``LP = mean local LPIPS + global LPIPS`` (Eq. 18), the local LPIPS on a square of ``local_window_mm``
centred on each metal object (PI_q: every object; PI_s: the largest only). PI is the mean slope of LP over
consecutive levels, against the number of objects (PI_q) or the largest object's area in mm^2 (PI_s); lower is
better. Pinned here (the paper leaves them open): the window, the square's side, objects as 8-connected
components of the metal mask.

The result is an ordinary record (protocol ``perceptual-indicators``): one row per sweep level (``lp``, ``x``)
and the set-level ``pi_q`` and ``pi_s``.
"""
from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from marbench.converters import window

from .evaluator import aggregate
from .perceptual import backbones, perceptual_indicator
from .records import RECORD_VERSION, manifest, write_record

__all__ = ["IndicatorProtocol", "metal_objects", "level_lpips", "evaluate_indicators"]


@dataclass(frozen=True)
class IndicatorProtocol:
    name: str = "perceptual-indicators"
    version: str = "1"
    low_hu: float = -500.0
    high_hu: float = 1300.0
    local_window_mm: float = 60.0
    weights: str = "auto"

    def to_dict(self) -> dict:
        return {**asdict(self), "kind": type(self).__name__, "directions": {"lp": False},
                "set_directions": {"pi_q": False, "pi_s": False},
                "weights_sha256": {"vgg16-lpips": backbones(self.weights).weights_sha256()["vgg16-lpips"]}}


def metal_objects(metal_mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected components of a 2-D bool metal mask, largest first, each as a bool mask."""
    labels, n = ndimage.label(metal_mask, structure=np.ones((3, 3)))
    objects = [labels == k for k in range(1, n + 1)]
    return sorted(objects, key=lambda o: -int(o.sum()))


def _square(obj: np.ndarray, side: int) -> tuple[slice, slice]:
    """A ``side`` x ``side`` window centred on the object's centroid, shifted to lie inside the image."""
    cy, cx = ndimage.center_of_mass(obj)
    h, w = obj.shape
    side = min(side, h, w)
    y0 = int(np.clip(round(cy - side / 2), 0, h - side))
    x0 = int(np.clip(round(cx - side / 2), 0, w - side))
    return slice(y0, y0 + side), slice(x0, x0 + side)


def level_lpips(lpips_net, pred01: torch.Tensor, target01: torch.Tensor, metal_mask: np.ndarray, side_px: int,
                largest_only: bool) -> float:
    """Eq. 18 for one level: mean local LPIPS over the metal objects (or the largest) plus the global LPIPS.

    Args:
        lpips_net: ``LPIPSVGG``; ``pred01``, ``target01``: ``(1, 1, H, W)`` in [0, 1]; ``metal_mask``: ``(H, W)``.
    Raises:
        ValueError: a level without metal.
    """
    objects = metal_objects(metal_mask)
    if not objects:
        raise ValueError("a sweep level without metal: the local LPIPS of Eq. 18 needs at least one object")
    if largest_only:
        objects = objects[:1]
    with torch.no_grad():
        global_lp = float(lpips_net(pred01, target01))
        local = [float(lpips_net(pred01[..., sy, sx], target01[..., sy, sx]))
                 for sy, sx in (_square(o, side_px) for o in objects)]
    return float(np.mean(local)) + global_lp


def evaluate_indicators(method, data_root: str | Path, dataset: str, out_dir: str | Path, seed: int = 0,
                        protocol: IndicatorProtocol = IndicatorProtocol(), config: dict | None = None) -> Path:
    """Run ``method`` over ``<data_root>/sweeps/{quantity,size}`` and write its ``perceptual-indicators`` record.

    Raises:
        FileNotFoundError: a sweep folder or its ``sweep.csv`` is missing.
    """
    import time

    from marbench.datasets.aapm import ALL_KEYS, AAPMCTMARDataModule

    lpips_net = backbones(protocol.weights).lpips.to(method.device)
    keys = sorted((set(method.required_keys) & set(ALL_KEYS)) | {"ma_image", "gt_image", "metal_mask"})
    rows, levels = [], {"quantity": {}, "size": {}}
    t0 = time.perf_counter()
    method.eval()
    for kind in ("quantity", "size"):
        root = Path(data_root) / "sweeps" / kind
        table = root / "sweep.csv"
        if not table.is_file():
            raise FileNotFoundError(f"{table} not found: generate the benchmark with its sweeps "
                                    "(marbench simulate) first")
        with open(table, newline="") as f:
            meta = {r["case_id"]: r for r in csv.DictReader(f)}
        dm = AAPMCTMARDataModule(root, split=None, keys=keys, batch_size=1)
        dm.setup("test")
        method.attach_geometries(dm.geometries)
        for batch in dm.test_dataloader():
            batch = {k: v.to(method.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with torch.no_grad():
                pred = method.predict_step(batch)
            sid = batch["slice_id"][0]
            metal = batch["metal_mask"][0, 0].cpu().numpy()
            pixel_mm = float(batch["fov_mm"][0]) / metal.shape[-1]
            lp = level_lpips(lpips_net, window(pred, protocol.low_hu, protocol.high_hu),
                             window(batch["gt_image"], protocol.low_hu, protocol.high_hu), metal,
                             max(16, round(protocol.local_window_mm / pixel_mm)), largest_only=kind == "size")
            x = (float(meta[sid]["n_objects"]) if kind == "quantity"
                 else float(metal_objects(metal)[0].sum()) * pixel_mm**2)
            base = meta[sid]["base_slice"]
            levels[kind].setdefault(base, []).append((x, lp))
            rows.append({"slice_id": f"{kind}/{sid}", "category": kind, "lp": lp, "x": x, "seconds": 0.0})
    sweeps = {k: [sorted(v) for _, v in sorted(levels[k].items())] for k in levels}
    pi = {"pi_q": perceptual_indicator(sweeps["quantity"]), "pi_s": perceptual_indicator(sweeps["size"])}
    record = {
        "record_version": RECORD_VERSION, "method": method.card.to_dict(),
        "dataset": {"name": dataset, "root": str(data_root), "split": "sweeps", "split_sha256": None,
                    "data_manifest_sha256": None, "slices": len(rows)},
        "seed": seed, "protocol": protocol.to_dict(),
        "metrics": {**aggregate(pd.DataFrame(rows), ["lp"]), "set": pi},
        "slices": rows,
        "manifest": manifest(config, seed, str(method.device), 1, {"evaluation_s": time.perf_counter() - t0}),
    }
    return write_record(out_dir, record)
