"""The evaluator: runs a ``MARMethod`` over a datamodule's test data through a Lightning ``Trainer`` and writes one
result record per protocol.

``Evaluator`` is a Lightning ``Callback`` (so a LightningCLI config can name it under ``trainer.callbacks``).
At every test batch it times the method's ``test_step`` per slice, asks each protocol to ``score`` the
prediction (and, for set-level metrics such as FID, for its features), and keeps one row per slice. At the end
it gathers the rows and features of every process, keeps one row per slice (a distributed sampler pads with
repeats), computes the set-level metrics against the reference images' features (cached per dataset split,
``reference_features``), and rank 0 writes each protocol's record through ``records.build_record``.
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

from .protocols import Protocol, get_protocol
from .records import build_record
from .reference_features import load_reference_features, reference_cache_path, save_reference_features

__all__ = ["Evaluator", "evaluate"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Evaluator(L.Callback):
    """Evaluate the test data under the named protocols and write records.

    Args:
        protocols: protocol names (``marbench.evaluation.protocols.PROTOCOLS``) or ``Protocol`` instances; a test
            run scores those whose ``data`` is the datamodule's (``"test"``, or ``"sweeps"`` for ``SweepDataModule``).
        dataset: dataset name for the records and the leaderboard (e.g. ``synthetic-smoke``).
        out_dir: where records go (``leaderboards/results``).
        seed: the training seed of the row (part of the record's name).
        config: the resolved run configuration, stored in the manifest.
        example_slice: ``slice_id`` whose input, prediction and target are saved for the qualitative panel
            (default: the first slice evaluated); ``None`` with ``save_example=False`` saves none.
    Raises:
        KeyError: an unknown protocol name.
    """

    def __init__(self, protocols: list[str | Protocol], dataset: str, out_dir: str = "leaderboards/results",
                 seed: int = 0, config: dict | None = None, example_slice: str | None = None,
                 save_example: bool = True):
        self.protocols = [get_protocol(p) if isinstance(p, str) else p for p in protocols]
        self.dataset, self.out_dir, self.seed = dataset, Path(out_dir), seed
        self.config, self.example_slice, self.save_example = config, example_slice, save_example
        self.written: list[Path] = []

    def on_test_start(self, trainer, pl_module) -> None:
        if not isinstance(pl_module, MARMethod):
            raise ValueError(f"the evaluator needs a MARMethod, found {type(pl_module).__name__}")
        dm = trainer.datamodule
        # a protocol scores one kind of data: the split's test slices, or the metal sweeps (SweepDataModule)
        data = getattr(dm, "data", "test")
        self.bound = [p.bind(dm) for p in self.protocols if p.data == data]
        self.rows: list[dict] = []
        self.example: dict | None = None
        self.protocol_s = {p.name: 0.0 for p in self.bound}
        # set-level metrics: protocol -> slice_id -> metric -> features, for the method and the references
        self.features: dict[str, dict] = {p.name: {} for p in self.bound}
        self.references: dict[str, dict] = {}
        self.cached_reference_ids: dict[str, set] = {}
        self.reference_paths: dict[str, Path] = {}
        for p in self.bound:
            if p.reference_features:
                path = reference_cache_path(self.dataset, getattr(dm, "split_sha256", None), p.to_dict(),
                                            p.weights_sha256())
                self.reference_paths[p.name] = path
                self.references[p.name] = load_reference_features(path)
                self.cached_reference_ids[p.name] = set(self.references[p.name])
        self._t0 = time.perf_counter()

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        _sync(pl_module.device)
        self._tb = time.perf_counter()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        _sync(pl_module.device)
        seconds = (time.perf_counter() - self._tb) / outputs.shape[0]
        ids = list(batch["slice_id"])
        rows = [{"slice_id": sid, "category": batch["category"][i], "seconds": seconds} for i, sid in enumerate(ids)]
        for p in self.bound:
            t = time.perf_counter()
            p.check_batch(batch)
            scores, features = p.score_and_features(outputs, batch)
            for i, row in enumerate(rows):
                row.update({f"{p.name}/{k}": float(v[i]) for k, v in scores.items()})
                row.update({f"{p.name}/{k}": _plain(batch[k][i]) for k in p.row_keys})
            if features:
                feats = {k: v.detach().cpu().numpy() for k, v in features.items()}
                self.features[p.name].update({sid: {k: v[i] for k, v in feats.items()} for i, sid in enumerate(ids)})
                missing = [i for i, sid in enumerate(ids) if sid not in self.references[p.name]]
                if missing:
                    ref = p.features(batch["gt_image"][missing], batch)
                    ref = {k: v.detach().cpu().numpy() for k, v in ref.items()}
                    self.references[p.name].update({ids[i]: {k: v[j] for k, v in ref.items()}
                                                    for j, i in enumerate(missing)})
            self.protocol_s[p.name] += time.perf_counter() - t
        self.rows.extend(rows)
        if self.save_example and self.example is None and "gt_image" in batch:
            wanted = self.example_slice or ids[0]
            if wanted in ids:
                i = ids.index(wanted)
                self.example = {"slice_id": wanted, "ma_image": batch["ma_image"][i, 0].cpu().numpy(),
                                "prediction": outputs[i, 0].cpu().numpy(),
                                "gt_image": batch["gt_image"][i, 0].cpu().numpy()}

    def on_test_end(self, trainer, pl_module) -> None:
        rows, examples = self.rows, [self.example]
        features, references, protocol_s = self.features, self.references, [self.protocol_s]
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, (self.rows, self.example, self.features, self.references,
                                              self.protocol_s))
            rows = [r for part in gathered for r in part[0]]
            examples = [part[1] for part in gathered]
            features = {n: {k: v for part in gathered for k, v in part[2][n].items()} for n in self.features}
            references = {n: {k: v for part in gathered for k, v in part[3][n].items()} for n in self.references}
            protocol_s = [part[4] for part in gathered]
        if trainer.global_rank != 0:
            return
        frame = pd.DataFrame(rows).drop_duplicates("slice_id", keep="first").sort_values("slice_id")
        dm = trainer.datamodule
        elapsed = time.perf_counter() - self._t0
        data = {"name": self.dataset, "root": str(getattr(dm, "root", "")),
                "split": str(getattr(dm, "split_path", "")), "split_sha256": getattr(dm, "split_sha256", None),
                "data_manifest_sha256": _manifest_sha(getattr(dm, "root", None))}
        method_s = float(frame["seconds"].sum())
        for p in self.bound:
            sub = frame[["slice_id", "category", "seconds", *[c for c in frame.columns
                                                              if c.startswith(p.name + "/")]]]
            sub = sub.rename(columns=lambda c: c.split("/", 1)[-1])
            set_values = {}
            if p.name in self.reference_paths:
                ids = list(sub["slice_id"])
                refs = references[p.name]
                if not set(ids) <= self.cached_reference_ids[p.name]:
                    save_reference_features(self.reference_paths[p.name], {sid: refs[sid] for sid in ids})
                names = sorted(next(iter(features[p.name].values()))) if features[p.name] else []
                set_values = p.set_metrics(sub, {m: np.stack([features[p.name][s][m] for s in ids]) for m in names},
                                           {m: np.stack([refs[s][m] for s in ids]) for m in names})
            else:
                set_values = p.set_metrics(sub, {}, {})
            timings = {"evaluation_s": elapsed, "method_s": method_s,
                       "protocol_s": max(part[p.name] for part in protocol_s),
                       "seconds_per_slice_mean": float(sub["seconds"].mean())}
            record = build_record(method_card=pl_module.card.to_dict(), method_weights=pl_module.weights_info(),
                                  protocol=p, dataset=data, seed=self.seed, frame=sub, set_values=set_values,
                                  config=self.config, device=str(pl_module.device), world_size=world,
                                  timings=timings)
            self.written.append(record.write(self.out_dir))
        example = next((e for e in examples if e is not None), None)
        if example is not None:
            buffer = io.BytesIO()
            # float16 keeps the committed panels small; HU beyond its range (starved rays) saturate, as on screen
            half = np.finfo(np.float16).max
            np.savez_compressed(buffer, **{k: (np.clip(v, -half, half).astype(np.float16)
                                               if isinstance(v, np.ndarray) else v) for k, v in example.items()})
            atomic_write(self.out_dir / f"{self.dataset}__{pl_module.card.name}__example.npz", buffer.getvalue())


def _plain(value):
    """A batch metadata entry as a JSON-friendly scalar."""
    return value.item() if isinstance(value, torch.Tensor) else value


def _manifest_sha(root) -> str | None:
    if root is None or not (Path(root) / "manifest.json").is_file():
        return None
    return sha256_file(Path(root) / "manifest.json")


def evaluate(method: MARMethod, datamodule: L.LightningDataModule, protocols: list[str | Protocol], dataset: str,
             out_dir: str = "leaderboards/results", seed: int = 0, config: dict | None = None,
             accelerator: str = "cpu", devices: int | str = 1, strategy: str = "auto",
             save_example: bool = True) -> list[Path]:
    """Run ``method`` over ``datamodule``'s test data and write one record per protocol; returns their paths."""
    evaluator = Evaluator(protocols, dataset, out_dir, seed, config, save_example=save_example)
    trainer = L.Trainer(accelerator=accelerator, devices=devices, strategy=strategy, logger=False,
                        enable_checkpointing=False, callbacks=[evaluator], enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.test(method, datamodule=datamodule, verbose=False)
    return evaluator.written
