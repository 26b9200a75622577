"""Exact resume of a killed training: the random states that a Lightning checkpoint does not carry.

Lightning's checkpoint holds the weights, the optimiser, the schedulers and the loops' progress, not the random
states. A training resumed from it would draw other batches (the train loader's shuffling generator, which
``marbench.datasets.batch.seeded_loader`` seeds, restarts from the seed) and other noise (the global torch, numpy
and Python generators: random crops, time steps, dropout). ``RandomStateCheckpoint`` saves these states with
every checkpoint and puts them back when the first resumed epoch starts, so the grid's resumed job ends with the
weights of an uninterrupted one (``tests/test_grid.py`` kills a grid mid-training and compares the records).

The states are saved as tensors and plain integers, so the checkpoint still loads with ``weights_only=True``.
Not restored: random draws inside data-loader worker processes (``num_workers > 0`` seeds them from the loader's
iterator, which Lightning builds before the resumed epoch's hooks run), and, under DDP, the other ranks' own
states (rank 0 writes the checkpoint, and every rank restores rank 0's).
"""
from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

__all__ = ["RandomStateCheckpoint"]


def _loader_generators(trainer: L.Trainer) -> list[tuple[torch.Generator, bool]]:
    """The generators of the train loaders, each once, in order: ``(generator, is a DataLoader's own)`` (its
    ``generator`` argument, which its sampler usually shares) or a sampler's own."""
    loaders = trainer.train_dataloader
    if isinstance(loaders, DataLoader):
        loaders = [loaders]
    elif isinstance(loaders, dict):
        loaders = list(loaders.values())
    out: list[tuple[torch.Generator, bool]] = []
    for dl in loaders or []:
        for g, own in ((getattr(dl, "generator", None), True),
                       (getattr(getattr(dl, "sampler", None), "generator", None), False)):
            if isinstance(g, torch.Generator) and not any(g is h for h, _ in out):
                out.append((g, own))
    return out


class RandomStateCheckpoint(L.Callback):
    """Saves the global torch (and CUDA), numpy and Python random states and the train loaders' generators with
    each checkpoint (at the end of an epoch) and restores them at the start of the first epoch after a resume.

    Raises (on resume):
        ValueError: the checkpoint holds another number of loader generators than the resumed training has.
    """

    def __init__(self):
        self._trainer: L.Trainer | None = None
        self._pending: dict | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict:
        np_state = np.random.get_state()
        py_version, py_state, py_gauss = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
            "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
            "loaders": [g.get_state() for g, _ in _loader_generators(self._trainer)] if self._trainer else [],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict  # the loaders do not exist yet: restore when the first epoch starts

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        generators = _loader_generators(trainer)
        if len(generators) != len(state["loaders"]):
            raise ValueError(f"resume: the checkpoint holds {len(state['loaders'])} train-loader generators, the "
                             f"resumed training has {len(generators)}")
        for (g, own), s in zip(generators, state["loaders"], strict=True):
            g.set_state(s)
            if own:
                # this epoch's DataLoader iterator already exists (Lightning builds it before this hook), made
                # from the fresh generator; an uninterrupted run drew its base seed (torch's
                # _BaseDataLoaderIter.__init__: one int64 from the loader's generator) after the saved state
                torch.empty((), dtype=torch.int64).random_(generator=g)
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        n = state["numpy"]
        np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        p = state["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
