"""Result records: one JSON per dataset x method row x protocol x training seed, written atomically, with a
reproducibility manifest (git sha and dirty flag, resolved config, dataset and split sha256, protocol and its
version, weights, package versions, seed, device, world size, timings).

``Record`` is the one record type and ``build_record`` its one builder: the evaluator writes every record through
them, the leaderboard and ``marbench verify`` read them back with ``read_record``.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from marbench.files import atomic_write_json, library_versions

__all__ = ["RECORD_VERSION", "Record", "build_record", "read_record", "record_name", "manifest", "aggregate"]

RECORD_VERSION = "2"
_PACKAGES = ("marbench", "torch", "lightning", "torchmetrics", "numpy", "scipy", "pandas", "diffusers", "peft",
             "transformers", "open_clip_torch", "lpips", "torch-fidelity")


def record_name(dataset: str, method: str, protocol: str, seed: int) -> str:
    """``<dataset>__<method>__<protocol>__seed<seed>.json``."""
    return f"{dataset}__{method}__{protocol}__seed{seed}.json"


@dataclass
class Record:
    """One result record.

    Attributes:
        method: the method card (``MethodCard.to_dict``) plus ``weights`` (``MARMethod.weights_info``).
        dataset: ``name``, ``root``, ``split``, ``split_sha256``, ``data_manifest_sha256``, ``slices``.
        protocol: ``Protocol.to_dict`` (conventions, version, metric specs, weights).
        seed: the training seed of the row.
        metrics: ``overall`` and ``per_category`` (metric -> mean, std, n over slices) and ``set`` (set-level).
        slices: one dict per slice: ``slice_id``, ``category``, ``seconds``, the protocol's row keys and metrics.
        manifest: see ``manifest``.
    """

    method: dict
    dataset: dict
    protocol: dict
    seed: int
    metrics: dict
    slices: list[dict]
    manifest: dict
    record_version: str = RECORD_VERSION
    path: Path | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return record_name(self.dataset["name"], self.method["name"], self.protocol["name"], self.seed)

    @property
    def metric_specs(self) -> list[dict]:
        """The protocol's metric declarations (name, higher_is_better, unit, digits, level, description)."""
        return self.protocol["metrics"]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("path")
        return d

    def write(self, directory: str | os.PathLike) -> Path:
        """Write to ``<directory>/<name>`` atomically; returns the path."""
        self.path = Path(directory) / self.name
        atomic_write_json(self.path, self.to_dict(), indent=1)
        return self.path


def aggregate(frame: pd.DataFrame, metric_names: list[str]) -> dict:
    """Mean and std (population, over slices; NaN entries skipped) of each metric, overall and per category."""

    def stats(df: pd.DataFrame) -> dict:
        return {m: {"mean": float(df[m].mean()), "std": float(df[m].std(ddof=0)), "n": int(df[m].count())}
                for m in metric_names}

    return {"overall": stats(frame),
            "per_category": {str(c): stats(g) for c, g in frame.groupby("category", sort=True)}}


def _git(*args: str) -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def manifest(config: dict | None, seed: int, device: str, world_size: int, timings: dict) -> dict:
    """The reproducibility manifest of a run (git state read from the source checkout, if any; ``torch_threads``:
    CPU kernels sum in an order that follows the thread count, so a trained row re-runs bit for bit only with the
    count it ran with, which ``marbench verify`` sets)."""
    import torch

    packages = library_versions(_PACKAGES)
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
        "torch_threads": torch.get_num_threads(),
        "timings": timings,
    }


def build_record(*, method_card: dict, method_weights: dict, protocol, dataset: dict, seed: int,
                 frame: pd.DataFrame, set_values: dict[str, float], config: dict | None, device: str,
                 world_size: int, timings: dict) -> Record:
    """The record of one protocol's evaluation.

    Args:
        method_card: ``MethodCard.to_dict()``; method_weights: ``MARMethod.weights_info()``.
        protocol: the (bound) ``Protocol``.
        dataset: ``name``, ``root``, ``split``, ``split_sha256``, ``data_manifest_sha256``.
        frame: one row per slice: ``slice_id``, ``category``, ``seconds``, the protocol's row keys and its
            slice-level metrics.
        set_values: the protocol's set-level metrics.
    Raises:
        ValueError: ``frame`` lacks a slice-level metric of the protocol, or ``set_values`` a set-level one.
    """
    slice_metrics = [m.name for m in protocol.metrics if m.level == "slice"]
    set_metrics = [m.name for m in protocol.metrics if m.level == "set"]
    missing = [m for m in slice_metrics if m not in frame.columns] + [m for m in set_metrics if m not in set_values]
    if missing:
        raise ValueError(f"protocol {protocol.name!r}: the evaluation produced no values for {missing}")
    keep = ["slice_id", "category", "seconds", *protocol.row_keys, *slice_metrics]
    frame = frame[keep].sort_values("slice_id").reset_index(drop=True)
    return Record(
        method={**method_card, "weights": method_weights},
        dataset={**dataset, "slices": int(len(frame))},
        protocol=protocol.to_dict(),
        seed=seed,
        metrics={**aggregate(frame, slice_metrics + ["seconds"]), "set": {m: set_values[m] for m in set_metrics}},
        slices=json.loads(frame.to_json(orient="records", double_precision=15)),
        manifest=manifest(config, seed, device, world_size, timings),
    )


def read_record(path: str | os.PathLike) -> Record:
    """Read and check a record.

    Raises:
        ValueError: not JSON, a missing field, or another record version (names the file and what differs).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON result record ({e})") from None
    if data.get("record_version") != RECORD_VERSION:
        raise ValueError(f"{path}: record_version {data.get('record_version')!r}, expected {RECORD_VERSION!r} "
                         "(regenerate it with this version of marbench)")
    required = [f for f in Record.__dataclass_fields__ if f not in ("path", "record_version")]
    missing = [f for f in required if f not in data]
    if missing:
        raise ValueError(f"{path}: result record misses fields {missing}")
    return Record(**{f: data[f] for f in required}, record_version=data["record_version"], path=path)
