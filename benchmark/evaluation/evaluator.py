"""The evaluator: runs a ``MARMethod`` over a datamodule's test split through a Lightning ``Trainer`` and writes
one result record per protocol.

``Evaluator`` is a Lightning ``Callback`` (so a LightningCLI config can name it under ``trainer.callbacks``):
at every test batch it times the method's ``test_step`` per slice and updates each protocol's torchmetrics
(and keeps per-slice features for set-level metrics such as FID); at the end it gathers the per-slice rows
and features from every process, keeps one row per slice (a distributed sampler pads with repeats),
aggregates mean and std overall and per category with pandas, computes the set-level metrics against the
reference features (cached per split, ``reference_features``), and rank 0 writes the records atomically.
"""
from __future__ import annotations

import io
import time
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from marbench.files import atomic_write, sha256_file
from marbench.method import MARMethod

from .protocols import get_protocol
from .records import RECORD_VERSION, manifest, write_record
from .reference_features import load_reference_features, reference_cache_path, save_reference_features

__all__ = ["Evaluator", "evaluate", "aggregate"]


def aggregate(frame: pd.DataFrame, metric_names: list[str]) -> dict:
    """Mean and std (population over slices) of each metric, overall and per category."""

    def stats(df: pd.DataFrame) -> dict:
        return {m: {"mean": float(df[m].mean()), "std": float(df[m].std(ddof=0)), "n": int(df[m].count())}
                for m in metric_names}

    return {"overall": stats(frame),
            "per_category": {str(c): stats(g) for c, g in frame.groupby("category", sort=True)}}


class Evaluator(L.Callback):
    """Evaluate the test split under the named protocols and write records.

    Args:
        protocols: protocol names (``aapm-hu``, ``editmar``, ``syndeeplesion``, ``perceptual``, ``segmentation``)
            or ``Protocol`` instances.
        dataset: dataset name for the record and the leaderboard (e.g. ``synthetic-smoke``).
        out_dir: where records go (``leaderboards/results``).
        seed: the run's seed (part of the record's name).
        config: the resolved run configuration, stored in the manifest.
        example_slice: ``slice_id`` whose input, prediction and target are saved for the qualitative panel
            (default: the first slice of the test split).
    """

    def __init__(self, protocols: list[str], dataset: str, out_dir: str = "leaderboards/results", seed: int = 0,
                 config: dict | None = None, example_slice: str | None = None):
        self.protocols = [get_protocol(p) if isinstance(p, str) else p for p in protocols]
        self.dataset, self.out_dir, self.seed = dataset, Path(out_dir), seed
        self.config, self.example_slice = config, example_slice
        self.written: list[Path] = []

    def on_test_start(self, trainer, pl_module) -> None:
        if not isinstance(pl_module, MARMethod):
            raise ValueError(f"the evaluator needs a MARMethod, found {type(pl_module).__name__}")
        dm = trainer.datamodule
        pl_module.attach_geometries(getattr(dm, "geometries", {}) or {})
        self.protocols = [p.bind(dm) for p in self.protocols]
        self.metrics = {p.name: {k: m.to(pl_module.device) for k, m in p.metrics().items()} for p in self.protocols}
        self.rows: list[dict] = []
        self.example: dict | None = None
        # set-level metrics: protocol -> slice_id -> metric -> features, for the method and the references
        self.features: dict[str, dict] = {p.name: {} for p in self.protocols if p.set_directions}
        self.references: dict[str, dict] = {}
        self.cached_reference_ids: dict[str, set] = {}
        self.reference_paths: dict[str, Path] = {}
        for p in self.protocols:
            if p.set_directions:
                path = reference_cache_path(self.dataset, getattr(dm, "split_sha256", None), p.to_dict(),
                                            p.weights_sha256())
                self.reference_paths[p.name] = path
                self.references[p.name] = load_reference_features(path)
                self.cached_reference_ids[p.name] = set(self.references[p.name])
        self._t0 = time.perf_counter()

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self._tb = time.perf_counter()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - self._tb) / outputs.shape[0]
        values: dict[str, torch.Tensor] = {}
        ids = list(batch["slice_id"])
        for p in self.protocols:
            metrics = self.metrics[p.name]
            features = p.update(metrics, outputs, batch)
            for k, m in metrics.items():
                values[f"{p.name}/{k}"] = m.values[-1]
            if not p.set_directions:
                continue
            feats = {k: v.cpu().numpy() for k, v in features.items()}
            self.features[p.name].update({sid: {k: v[i] for k, v in feats.items()} for i, sid in enumerate(ids)})
            missing = [i for i, sid in enumerate(ids) if sid not in self.references[p.name]]
            if missing:
                ref = {k: v.cpu().numpy() for k, v in p.set_features(batch["gt_image"][missing], batch).items()}
                self.references[p.name].update({ids[i]: {k: v[j] for k, v in ref.items()}
                                                for j, i in enumerate(missing)})
        for i in range(outputs.shape[0]):
            row = {"slice_id": batch["slice_id"][i], "category": batch["category"][i], "seconds": seconds}
            row.update({k: float(v[i]) for k, v in values.items()})
            self.rows.append(row)
            wanted = self.example_slice or (self.rows[0]["slice_id"] if self.rows else None)
            if self.example is None and batch["slice_id"][i] == wanted:
                self.example = {"slice_id": wanted, "ma_image": batch["ma_image"][i, 0].cpu().numpy(),
                                "prediction": outputs[i, 0].cpu().numpy(),
                                "gt_image": batch["gt_image"][i, 0].cpu().numpy()}

    def on_test_end(self, trainer, pl_module) -> None:
        rows, examples = self.rows, [self.example]
        features, references = self.features, self.references
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, (self.rows, self.example, self.features, self.references))
            rows = [r for part in gathered for r in part[0]]
            examples = [part[1] for part in gathered]
            features = {n: {k: v for part in gathered for k, v in part[2][n].items()} for n in self.features}
            references = {n: {k: v for part in gathered for k, v in part[3][n].items()} for n in self.references}
        if trainer.global_rank != 0:
            return
        frame = pd.DataFrame(rows).drop_duplicates("slice_id", keep="first").sort_values("slice_id")
        dm = trainer.datamodule
        card = pl_module.card.to_dict()
        elapsed = time.perf_counter() - self._t0
        data = {"name": self.dataset, "root": str(getattr(dm, "root", "")),
                "split": str(getattr(dm, "split_path", "")), "split_sha256": getattr(dm, "split_sha256", None),
                "data_manifest_sha256": _manifest_sha(getattr(dm, "root", None)), "slices": int(len(frame))}
        timing = {"evaluation_s": elapsed, "seconds_per_slice_mean": float(frame["seconds"].mean())}
        for p in self.protocols:
            cols = [c for c in frame.columns if c.startswith(p.name + "/")]
            sub = frame[["slice_id", "category", "seconds", *cols]].rename(columns=lambda c: c.split("/", 1)[-1])
            names = [c.split("/", 1)[1] for c in cols]
            set_values = {}
            if p.set_directions:
                ids = list(sub["slice_id"])
                refs = references[p.name]
                if not set(ids) <= self.cached_reference_ids[p.name]:
                    save_reference_features(self.reference_paths[p.name], {sid: refs[sid] for sid in ids})
                for m in p.set_directions:
                    set_values[m] = p.set_metric(m, np.stack([features[p.name][sid][m] for sid in ids]),
                                                 np.stack([refs[sid][m] for sid in ids]))
            record = {
                "record_version": RECORD_VERSION, "method": card, "dataset": data, "seed": self.seed,
                "protocol": {**p.to_dict(), "directions": p.directions, "set_directions": p.set_directions,
                             "weights_sha256": p.weights_sha256()},
                "metrics": {**aggregate(sub, names + ["seconds"]), "set": set_values},
                "slices": sub.to_dict(orient="records"),
                "manifest": manifest(self.config, self.seed, str(pl_module.device), world, timing),
            }
            self.written.append(write_record(self.out_dir, record))
        example = next((e for e in examples if e is not None), None)
        if example is not None:
            buffer = io.BytesIO()
            np.savez_compressed(buffer, **{k: (v.astype(np.float16) if isinstance(v, np.ndarray) else v)
                                           for k, v in example.items()})
            atomic_write(self.out_dir / f"{self.dataset}__{card['name']}__example.npz", buffer.getvalue())


def _manifest_sha(root) -> str | None:
    if root is None or not (Path(root) / "manifest.json").is_file():
        return None
    return sha256_file(Path(root) / "manifest.json")


def evaluate(method: MARMethod, datamodule: L.LightningDataModule, protocols: list[str], dataset: str,
             out_dir: str = "leaderboards/results", seed: int = 0, config: dict | None = None,
             accelerator: str = "cpu", devices: int | str = 1, strategy: str = "auto") -> list[Path]:
    """Run ``method`` over ``datamodule``'s test split and write one record per protocol; returns their paths."""
    evaluator = Evaluator(protocols, dataset, out_dir, seed, config)
    trainer = L.Trainer(accelerator=accelerator, devices=devices, strategy=strategy, logger=False,
                        enable_checkpointing=False, callbacks=[evaluator], enable_progress_bar=True,
                        enable_model_summary=False)
    trainer.test(method, datamodule=datamodule, verbose=False)
    return evaluator.written
