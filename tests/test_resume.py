"""The random states that the grid's checkpoints carry (``marbench.resume``): a resumed epoch draws what an
uninterrupted one would, through a ``weights_only`` load. The grid-level check (kill mid-training, compare the
records) is in ``tests/test_grid.py``."""
import io
import random
from types import SimpleNamespace

import numpy as np
import torch
from torch.utils.data import DataLoader

from marbench.resume import RandomStateCheckpoint


def _loader() -> DataLoader:
    return DataLoader(list(range(12)), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3))


def _epoch(iterator) -> tuple:
    """One epoch's batches and the global draws a training step might make."""
    return ([b.tolist() for b in iterator], torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random())


def test_a_resumed_epoch_draws_the_batches_and_noise_of_an_uninterrupted_one():
    loader = _loader()
    callback = RandomStateCheckpoint()
    callback.setup(SimpleNamespace(train_dataloader=loader), None, "fit")
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    _epoch(iter(loader))  # an epoch before the checkpoint
    saved = io.BytesIO()
    torch.save(callback.state_dict(), saved)
    uninterrupted = _epoch(iter(loader))

    # a new process: fresh loader and global states, the checkpoint loaded, Lightning's order of events (the
    # epoch's iterator is built before on_train_epoch_start)
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    loader = _loader()
    resumed = RandomStateCheckpoint()
    saved.seek(0)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    iterator = iter(loader)
    resumed.on_train_epoch_start(SimpleNamespace(train_dataloader=loader), None)
    assert _epoch(iterator) == uninterrupted
    # without the restore the epoch differs (the test can fail)
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    assert _epoch(iter(_loader())) != uninterrupted
