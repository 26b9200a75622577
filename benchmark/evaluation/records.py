"""Result records: one JSON per method x dataset x protocol x seed, written atomically, with a
reproducibility manifest (git sha and dirty flag, resolved config, dataset and split sha256, protocol and
version, package versions, seed, device, world size, timings)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from marbench.files import atomic_write_json

__all__ = ["RECORD_VERSION", "REQUIRED_FIELDS", "record_name", "write_record", "read_record", "manifest"]

RECORD_VERSION = "1"
REQUIRED_FIELDS = ("record_version", "method", "dataset", "protocol", "seed", "metrics", "slices", "manifest")
_PACKAGES = ("marbench", "torch", "lightning", "torchmetrics", "numpy", "scipy", "pandas", "astra-toolbox")


def record_name(dataset: str, method: str, protocol: str, seed: int) -> str:
    return f"{dataset}__{method}__{protocol}__seed{seed}.json"


def _git(*args: str) -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def manifest(config: dict | None, seed: int, device: str, world_size: int, timings: dict) -> dict:
    """The reproducibility manifest of a run (git state read from the source checkout, if any)."""
    packages = {}
    for name in _PACKAGES:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    # the code and configs that made the run; the leaderboard outputs a bench run writes do not count
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)leaderboards")
    return {
        "git_sha": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "config": config or {},
        "packages": packages,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "seed": seed,
        "device": device,
        "world_size": world_size,
        "timings": timings,
    }


def write_record(directory: str | os.PathLike, record: dict) -> Path:
    """Write ``record`` as ``<dataset>__<method>__<protocol>__seed<seed>.json`` atomically; returns the path.

    Raises:
        ValueError: a record missing a required field.
    """
    missing = [f for f in REQUIRED_FIELDS if f not in record]
    if missing:
        raise ValueError(f"result record misses fields {missing}")
    path = Path(directory) / record_name(record["dataset"]["name"], record["method"]["name"],
                                         record["protocol"]["name"], record["seed"])
    atomic_write_json(path, record, indent=1)
    return path


def read_record(path: str | os.PathLike) -> dict:
    """Read and check a record.

    Raises:
        ValueError: not JSON, or a required field is missing (names the file and the field).
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON result record ({e})") from None
    missing = [f for f in REQUIRED_FIELDS if f not in record]
    if missing:
        raise ValueError(f"{path}: result record misses fields {missing}")
    if record["record_version"] != RECORD_VERSION:
        raise ValueError(f"{path}: record_version {record['record_version']!r}, expected {RECORD_VERSION!r}")
    return record
