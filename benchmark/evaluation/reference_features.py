"""On-disk cache of the reference (metal-free) images' features for set-level metrics (FID, FID-Rad).

The reference side of FID is the same for every method evaluated on a split, so its features are computed
once per dataset split, protocol and backbone weights, stored under ``$MARBENCH_CACHE/reference-features``,
and reused. The key hashes the dataset name, the split's sha256, the protocol's full definition and the sha256
(or ``random``) of every weight file.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np

from marbench.files import atomic_write
from marbench.physics.backends import default_cache_dir

__all__ = ["reference_cache_path", "load_reference_features", "save_reference_features"]


def reference_cache_path(dataset: str, split_sha256: str | None, protocol: dict, weights: dict[str, str]) -> Path:
    """The cache file of one (dataset split, protocol, weights)."""
    key = json.dumps({"dataset": dataset, "split_sha256": split_sha256, "protocol": protocol, "weights": weights},
                     sort_keys=True)
    return default_cache_dir() / "reference-features" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"


def load_reference_features(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """``slice_id -> metric -> (D,)`` features, or ``{}`` if the cache file does not exist."""
    if not path.is_file():
        return {}
    with np.load(path) as z:
        ids = [str(s) for s in z["slice_id"]]
        names = [k for k in z.files if k != "slice_id"]
        return {sid: {n: z[n][i] for n in names} for i, sid in enumerate(ids)}


def save_reference_features(path: Path, features: dict[str, dict[str, np.ndarray]]) -> None:
    """Write ``slice_id -> metric -> (D,)`` features atomically."""
    ids = sorted(features)
    names = sorted(next(iter(features.values())))
    arrays = {n: np.stack([features[s][n] for s in ids]).astype(np.float32) for n in names}
    buffer = io.BytesIO()
    np.savez(buffer, slice_id=np.array(ids), **arrays)
    atomic_write(path, buffer.getvalue())
