"""Training determinism: a trainable row trained twice on CPU with the same seed and data gives the same weights, bit
for bit (``seed_everything``, ``trainer.deterministic``, a training order shuffled with the run's seed); another
seed gives other weights."""
import pytest
import torch
from lightning.pytorch import seed_everything

from marbench.datasets.aapm import AAPMCTMARDataModule
from marbench.lightning_cli import build_cli


@pytest.fixture(autouse=True)
def _seed_env(monkeypatch):
    """``seed_everything`` sets ``PL_GLOBAL_SEED``; put back what the session had after each test."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)


@pytest.fixture
def tiny_unet(tiny_benchmark, tmp_path):
    out, _ = tiny_benchmark
    cfg = tmp_path / "unet.yaml"
    cfg.write_text(f"""
model:
  class_path: marbench.methods.unet.ResidualUNet
  init_args: {{base: 4, depth: 2, lr: 0.01}}
data:
  class_path: marbench.datasets.aapm.AAPMCTMARDataModule
  init_args:
    root: {out}
    split: {out / 'split.txt'}
    anatomy: [body]
    keys: [ma_image, li_image, gt_image, metal_mask]
    batch_size: 2
trainer:
  accelerator: cpu
  devices: 1
  deterministic: true
  max_epochs: 2
  limit_val_batches: 0
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
""")
    return cfg


def _train(cfg, seed: int) -> dict[str, torch.Tensor]:
    cli = build_cli(["--config", str(cfg), "--seed_everything", str(seed)], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    n = len(cli.datamodule.datasets["train"])
    assert n >= 3 and cli.trainer.global_step == 2 * -(-n // 2)  # 2 epochs of batches of 2, the last one short
    return {k: v.detach().clone() for k, v in cli.model.state_dict().items()}


def test_the_same_seed_trains_the_same_weights_bit_for_bit(tiny_unet):
    first = _train(tiny_unet, seed=3)
    torch.rand(1000)  # random numbers drawn between the runs change nothing: each run seeds afresh
    second = _train(tiny_unet, seed=3)
    assert first.keys() == second.keys() and len(first) > 4
    differ = [k for k in first if not torch.equal(first[k], second[k])]
    assert differ == []
    # training moved the weights (the U-Net head starts at zero)
    assert first["net.head.weight"].abs().sum() > 0
    other = _train(tiny_unet, seed=4)
    assert not torch.equal(first["net.head.weight"], other["net.head.weight"])


def test_the_training_order_follows_the_seed(tiny_benchmark):
    out, _ = tiny_benchmark

    def order(seed: int) -> list[str]:
        seed_everything(seed)
        torch.rand(7)  # the model's initialisation draws from the global generator; the order must not care
        dm = AAPMCTMARDataModule(out, anatomy=["body", "head"], split=out / "split.txt", keys=["metal_mask"],
                                 batch_size=1)
        dm.setup("fit")
        loader = dm.train_dataloader()  # as in a fit: one loader, iterated once per epoch
        return [b["slice_id"][0] for epoch in range(2) for b in loader]

    zero = order(0)
    assert len(zero) == 20 and len(set(zero[:10])) == 10  # two epochs over the ten training slices
    assert zero[:10] != zero[10:]  # reshuffled each epoch
    assert order(0) == zero
    assert order(1) != zero
