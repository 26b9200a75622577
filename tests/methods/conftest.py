import lightning as L
import pytest
import torch

from marbench.datasets.aapm import AAPMCTMARDataModule


@pytest.fixture(scope="package")
def tiny_batch(tiny_benchmark):
    """The datamodule and one training batch (4 body slices, 128 x 128) of the tiny benchmark."""
    out, _ = tiny_benchmark
    dm = AAPMCTMARDataModule(out, anatomy=("body",), split=str(out / "split.txt"), batch_size=4)
    dm.setup("test")
    return dm, next(iter(dm.train_dataloader()))


def _fit_on_one_batch(model: L.LightningModule, batch: dict, steps: int) -> None:
    loader = torch.utils.data.DataLoader([batch] * steps, batch_size=None)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, train_dataloaders=loader)


@pytest.fixture
def fit_on_one_batch():
    """``fit(model, batch, steps)``: ``steps`` optimiser steps of ``model.training_step`` on the same batch through
    a Lightning Trainer (so that manual optimisation and schedulers run as in ``make bench``)."""
    return _fit_on_one_batch


@pytest.fixture
def one_thread():
    """Tiny networks run several times faster on one intra-op thread (less so on a loaded machine); the thread
    count is restored after the test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
