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
import torch.nn.functional as F

from marbench.converters import hu_to_unit, unit_to_hu
from marbench.method import MARMethod, MethodCard
from marbench.registry import register

__all__ = ["ResidualUNet", "UNet", "conv_block"]


def conv_block(cin: int, cout: int) -> nn.Sequential:
    """Two 3 x 3 conv + batch norm + ReLU layers ``(B, cin, H, W) -> (B, cout, H, W)``."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """U-Net with ``depth`` poolings and ``base * 2^k`` channels at level ``k``; ``(B, cin, H, W) -> (B, cout, H, W)``
    for ``H, W`` divisible by ``2^depth``."""

    def __init__(self, cin: int = 1, cout: int = 1, base: int = 32, depth: int = 4):
        super().__init__()
        chans = [base * 2**k for k in range(depth + 1)]
        self.down = nn.ModuleList([conv_block(cin, chans[0])]
                                  + [conv_block(chans[k], chans[k + 1]) for k in range(depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(chans[k + 1], chans[k], 2, stride=2) for k in range(depth)])
        self.merge = nn.ModuleList([conv_block(2 * chans[k], chans[k]) for k in range(depth)])
        self.head = nn.Conv2d(chans[0], cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for k, block in enumerate(self.down):
            x = block(x if k == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for k in reversed(range(len(self.up))):
            x = self.merge[k](torch.cat([self.up[k](x), skips.pop()], dim=1))
        return self.head(x)


@register("unet")
class ResidualUNet(MARMethod):
    """Supervised residual U-Net (see the module docstring).

    Args:
        base, depth: U-Net width and depth.
        lr: Adam learning rate (cosine-annealed over the run's epochs).
    """

    card = MethodCard(
        name="unet", paper="CNNMAR (Zhang & Yu, IEEE TMI 2018) as DuDoCROP Table IV 'CNN'; U-Net (MICCAI 2015)",
        needs=("ma_image", "li_image", "gt_image", "metal_mask"), trainable=True,
        metal="metal-mask pixels take the metal-affected image's values (metal put back)",
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

    def restore(self, batch: dict) -> torch.Tensor:
        return torch.where(batch["metal_mask"], batch["ma_image"], self(batch["ma_image"], batch["li_image"]))
