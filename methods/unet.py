"""``unet``: a supervised image-domain CNN, the "CNN" row of DuDoCROP Table IV. That row is CNNMAR (DuDoCROP
ref. [5]: Zhang & Yu, "Convolutional neural network based metal artifact reduction in x-ray computed
tomography", IEEE TMI 37(6), 2018), whose CNN takes the uncorrected and the corrected (LI, BHC) images as
channels. Here the CNN is a U-Net (Ronneberger, Fischer & Brox, MICCAI 2015) on two channels, the
metal-affected image and the LI image, predicting a correction of the LI image.

Input conversion (``converters``): the metal-affected image clipped to ``[-1000, 3000]`` HU (metal saturates)
and the LI image, both ``hu_to_unit``. Output: ``LI + f(x)`` in HU; the last layer starts at zero so training
starts from LI. Loss: L1 against the metal-free target outside the metal mask. Metal is put back.

Departures from CNNMAR: a U-Net instead of their 5-layer CNN, no BHC input channel, and the CNN output is the
result (no tissue-processed prior and sinogram replacement step).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from marbench.converters import hu_to_unit, unit_to_hu
from marbench.datasets.batch import Batch
from marbench.method import MARMethod, MethodCard, put_metal_back
from marbench.networks import UNet
from marbench.physics import CTPhysics

__all__ = ["ResidualUNet"]


class ResidualUNet(MARMethod):
    """Supervised residual U-Net (see the module docstring).

    Args:
        base, depth: U-Net width and depth.
        lr: Adam learning rate (cosine-annealed over the run's epochs).
    """

    card = MethodCard(
        name="unet", paper="CNNMAR (Zhang & Yu, IEEE TMI 2018) as DuDoCROP Table IV 'CNN'; U-Net (MICCAI 2015)",
        inputs=("ma_image", "li_image", "metal_mask"), training_inputs=("gt_image",), trainable=True,
        departures=("U-Net on (metal-affected, LI) channels correcting the LI image; no BHC channel; "
                    "no tissue-processing / sinogram-replacement step; L1 loss outside the metal",),
    )

    def __init__(self, base: int = 32, depth: int = 4, lr: float = 1e-3, input_max_hu: float = 3000.0):
        super().__init__()
        self.save_hyperparameters()
        self.net = UNet(2, 1, base, depth)
        nn.init.zeros_(self.net.head.weight)
        nn.init.zeros_(self.net.head.bias)
        self.lr, self.input_max_hu = lr, input_max_hu

    def forward(self, ma_hu: torch.Tensor, li_hu: torch.Tensor) -> torch.Tensor:
        x = torch.cat([hu_to_unit(ma_hu.clamp(-1000.0, self.input_max_hu)), hu_to_unit(li_hu)], dim=1)
        return unit_to_hu(x[:, 1:] + self.net(x))

    def _loss(self, batch: dict) -> torch.Tensor:
        keep = (~batch["metal_mask"]).float()
        err = (hu_to_unit(self(batch["ma_image"], batch["li_image"])) - hu_to_unit(batch["gt_image"])).abs()
        return (err * keep).sum() / keep.sum().clamp(min=1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_l1", loss, prog_bar=True, batch_size=batch["ma_image"].shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_l1", self._loss(batch), prog_bar=True, batch_size=batch["ma_image"].shape[0])

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        epochs = self.trainer.max_epochs if self.trainer and self.trainer.max_epochs else 1
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)}

    def restore(self, batch: Batch, physics: CTPhysics) -> torch.Tensor:
        return put_metal_back(self(batch["ma_image"], batch["li_image"]), batch)
