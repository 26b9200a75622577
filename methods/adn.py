"""``adn``: the Artifact Disentanglement Network (Liao, Lin, Zhou & Luo, "ADN: Artifact Disentanglement Network
for Unsupervised Metal Artifact Reduction", IEEE TMI 39(3), 2020; official code: github.com/liaohaofu/adn).

ADN splits a metal-affected image into a content code (``encoder_low``) and artifact features
(``encoder_art``) and learns from *unpaired* images: an artifact-free image's code (``encoder_high``) decodes
to itself (``hh``) and, with the artifact features added, to a metal-affected image (``hl``); the metal-affected
image's code decodes to an artifact-free image (``lh``) and back to itself (``ll``); ``hl`` decoded without
artifact returns to the clean image (``hlh``, self-reduction); the artifacts removed (``l - lh``) and added
(``hl - h``) must agree (``art``); two PatchGAN discriminators judge ``lh`` against clean images and ``hl``
against metal-affected ones (LSGAN). Loss weights: ``config/adn.yaml`` (20 on every L1 term, 1 on each GAN
term, ``lh`` 0 unless the data are paired). Inference: ``forward1(x_low) -> pred_lh``.

Module names, shapes and hyperparameters match the official code key for key, so the official checkpoint
(``deep_lesion_49.pt``: a dict whose ``model_g``, ``model_dl`` and ``model_dh`` are state dicts of these
modules) loads with ``load_official_checkpoint``.

Input convention (``marbench.converters.hu_to_adn``): DeepLesion attenuation ``HU/1000*0.192 + 0.192``
clipped to ``[0, 0.5]`` and mapped to ``[-1, 1]``; the output is mapped back to HU (at most ~1604 HU: the
published range) and metal pixels take the metal-affected image's values (metal put back).

Departures from the official code:
  - the generator step is taken before the discriminator steps (official: after them); both use the same
    pre-update discriminator outputs and the same detached fakes, so the gradients are the official ones
    (the official order needs in-place updates that current PyTorch refuses in the generator's backward);
  - unpaired training pairs each metal-affected slice with the clean image of another slice in the batch (the
    official loader draws clean images from a held-out half of DeepLesion); with ``lh > 0`` (paired data) the
    slice's own clean image is used;
  - ``encoder_art`` runs twice per step (the official code caches its output between ``forward1`` and
    ``forward2``); the values are identical.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from marbench.checkpoints import load_checkpoint_file, load_state_dict_exactly
from marbench.converters import adn_to_hu, hu_to_adn
from marbench.datasets.batch import Batch
from marbench.method import MARMethod, MethodCard, put_metal_back
from marbench.physics import CTPhysics

__all__ = ["ADNGenerator", "PatchDiscriminator", "ADN", "OFFICIAL_LOSS_WEIGHTS"]

# liaohaofu/adn config/adn.yaml ``loss.wgts``
OFFICIAL_LOSS_WEIGHTS = {"ll": 20.0, "lh": 0.0, "hh": 20.0, "lhl": 0.0, "hlh": 20.0, "art": 20.0, "gh": 1.0,
                         "gl": 1.0}


class _LayerNorm(nn.Module):
    """Layer norm over ``(C, H, W)`` of each sample with a per-channel affine (``gamma``, ``beta``); ADN's
    decoder norm (official ``blocks.LayerNorm``, ``gamma`` initialised uniform on [0, 1])."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.rand(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x, x.shape[1:], eps=self.eps)
        return x * self.gamma.view(1, -1, 1, 1) + self.beta.view(1, -1, 1, 1)


_NORMS = {"none": lambda c: nn.Identity(), "instance": nn.InstanceNorm2d, "layer": _LayerNorm}
_ACTIVATIONS = {"none": nn.Identity, "relu": lambda: nn.ReLU(inplace=True),
                "lrelu": lambda: nn.LeakyReLU(0.2, inplace=True), "tanh": nn.Tanh}


class _ConvBlock(nn.Module):
    """Reflect pad -> conv -> norm -> activation (official ``ConvolutionBlock``: submodules ``pad``, ``conv``,
    ``norm``, ``activ``)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int, padding: int, norm: str, activ: str):
        super().__init__()
        self.pad = nn.ReflectionPad2d(padding)
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride)
        self.norm = _NORMS[norm](cout)
        self.activ = _ACTIVATIONS[activ]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activ(self.norm(self.conv(self.pad(x))))


class _ResidualBlock(nn.Module):
    """Two 3 x 3 conv blocks plus the identity (official ``ResidualBlock``: ``model.0``, ``model.1``)."""

    def __init__(self, channels: int, norm: str, activ: str):
        super().__init__()
        self.model = nn.Sequential(_ConvBlock(channels, channels, 3, 1, 1, norm, activ),
                                   _ConvBlock(channels, channels, 3, 1, 1, norm, "none"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) + x


class _Encoder(nn.Module):
    """``conv0`` (7 x 7), ``conv1..num_down`` (4 x 4, stride 2), ``res0..`` ; returns the code and the outputs
    of every layer, deepest first (the artifact side features)."""

    def __init__(self, input_ch: int, base_ch: int, num_down: int, num_residual: int, norm: str = "instance"):
        super().__init__()
        self.conv0 = _ConvBlock(input_ch, base_ch, 7, 1, 3, norm, "relu")
        ch = base_ch
        for i in range(1, num_down + 1):
            setattr(self, f"conv{i}", _ConvBlock(ch, ch * 2, 4, 2, 1, norm, "relu"))
            ch *= 2
        for i in range(num_residual):
            setattr(self, f"res{i}", _ResidualBlock(ch, norm, "relu"))
        self._order = [f"conv{i}" for i in range(num_down + 1)] + [f"res{i}" for i in range(num_residual)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        sides = []
        for name in self._order:
            x = getattr(self, name)(x)
            sides.append(x)
        return x, sides[::-1]


class _Decoder(nn.Module):
    """``res0..`` (leaky ReLU), ``conv0..num_up-1`` (nearest upsampling + 5 x 5 conv, layer norm), a final 7 x 7
    conv with tanh; ``fuse0..num_sides-1`` (1 x 1 convs) merge the artifact side features into the last
    ``num_sides`` layers' inputs (official ``fuse=True``)."""

    def __init__(self, output_ch: int, base_ch: int, num_up: int, num_residual: int, num_sides: int):
        super().__init__()
        ch = base_ch * 2**num_up
        input_chs = []
        for i in range(num_residual):
            setattr(self, f"res{i}", _ResidualBlock(ch, "instance", "lrelu"))
            input_chs.append(ch)
        for i in range(num_up):
            setattr(self, f"conv{i}", nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                                    _ConvBlock(ch, ch // 2, 5, 1, 2, "layer", "lrelu")))
            input_chs.append(ch)
            ch //= 2
        setattr(self, f"conv{num_up}", _ConvBlock(base_ch, output_ch, 7, 1, 3, "none", "tanh"))
        input_chs.append(base_ch)
        for i, c in enumerate(input_chs[-num_sides:]):
            setattr(self, f"fuse{i}", nn.Conv2d(2 * c, c, 1))
        self._order = [f"res{i}" for i in range(num_residual)] + [f"conv{i}" for i in range(num_up + 1)]

    def forward(self, x: torch.Tensor, sides: list[torch.Tensor] = ()) -> torch.Tensor:
        first_fused = len(self._order) - len(sides)
        for j, name in enumerate(self._order):
            if j >= first_fused:
                x = getattr(self, f"fuse{j - first_fused}")(torch.cat((x, sides[j - first_fused]), 1))
            x = getattr(self, name)(x)
        return x


class ADNGenerator(nn.Module):
    """ADN's generator (official ``networks.adn.ADN`` with ``config/adn.yaml``).

    Images ``(B, 1, H, W)`` in ``[-1, 1]`` with ``H, W`` divisible by ``2**num_down``; every output likewise.
    """

    def __init__(self, input_ch: int = 1, base_ch: int = 64, num_down: int = 2, num_residual: int = 4,
                 num_sides: int = 3):
        super().__init__()
        self.num_sides = num_sides
        self.encoder_low = _Encoder(input_ch, base_ch, num_down, num_residual)
        self.encoder_high = _Encoder(input_ch, base_ch, num_down, num_residual)
        self.encoder_art = _Encoder(input_ch, base_ch, num_down, num_residual)
        self.decoder = _Decoder(input_ch, base_ch, num_down, num_residual, num_sides)
        self.decoder_art = copy.deepcopy(self.decoder)

    def _artifact_sides(self, x_low: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder_art(x_low)[1][-self.num_sides:]

    def forward1(self, x_low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pred_ll, pred_lh)``: the metal-affected image reconstructed and with its artifacts removed."""
        code, _ = self.encoder_low(x_low)
        return self.decoder_art(code, self._artifact_sides(x_low)), self.decoder(code)

    def forward2(self, x_low: torch.Tensor, x_high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pred_hl, pred_hh)``: the clean image with ``x_low``'s artifacts added, and reconstructed."""
        code, _ = self.encoder_high(x_high)
        return self.decoder_art(code, self._artifact_sides(x_low)), self.decoder(code)

    def forward_lh(self, x_low: torch.Tensor) -> torch.Tensor:
        """Artifact removal alone (``hlh`` when applied to ``pred_hl``)."""
        return self.decoder(self.encoder_low(x_low)[0])


class PatchDiscriminator(nn.Module):
    """PatchGAN (official ``NLayerDiscriminator``, instance norm, no sigmoid): ``(B, 1, H, W)`` -> a map of
    real/fake scores ``(B, 1, h, w)``."""

    def __init__(self, input_nc: int = 1, ndf: int = 64, n_layers: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1), nn.InstanceNorm2d(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1), nn.InstanceNorm2d(ndf * mult), nn.LeakyReLU(0.2, True),
                   nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _lsgan(scores: torch.Tensor, real: bool) -> torch.Tensor:
    return F.mse_loss(scores, torch.full_like(scores, 1.0 if real else 0.0))


class ADN(MARMethod):
    """ADN as a Lightning module (manual optimisation: generator, then the two discriminators).

    Args:
        base_ch, num_down, num_residual, num_sides: generator size (official: 64, 2, 4, 3).
        ndf, n_layers: discriminator size (official: 64, 2).
        loss_weights: overrides of ``OFFICIAL_LOSS_WEIGHTS`` (keys ``ll lh hh lhl hlh art gh gl``).
        lr, betas, weight_decay: Adam for all three networks (official: 1e-4, (0.5, 0.999), 1e-4).
        checkpoint: an official ``deep_lesion_49.pt`` (or one of ours) to start from; ``checkpoint_sha256``
            pins its digest.
    Raises:
        ValueError: unknown loss-weight names.
    """

    card = MethodCard(
        name="adn", paper="Liao, Lin, Zhou & Luo, 'ADN: Artifact Disentanglement Network for Unsupervised Metal "
                          "Artifact Reduction', IEEE TMI 39(3), 2020; github.com/liaohaofu/adn",
        inputs=("ma_image", "metal_mask"), training_inputs=("gt_image",), trainable=True,
        departures=("generator step before the discriminator steps (same gradients as the official order)",
                    "unpaired pairs drawn within the batch; paired when lh > 0",
                    "output limited to the published input range [-1000, ~1604] HU"),
    )

    def __init__(self, base_ch: int = 64, num_down: int = 2, num_residual: int = 4, num_sides: int = 3,
                 ndf: int = 64, n_layers: int = 2, loss_weights: dict[str, float] | None = None, lr: float = 1e-4,
                 betas: tuple[float, float] = (0.5, 0.999), weight_decay: float = 1e-4,
                 checkpoint: str | None = None, checkpoint_sha256: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        unknown = set(loss_weights or {}) - set(OFFICIAL_LOSS_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown ADN loss weights {sorted(unknown)}; known: {sorted(OFFICIAL_LOSS_WEIGHTS)}")
        self.weights = {**OFFICIAL_LOSS_WEIGHTS, **(loss_weights or {})}
        self.automatic_optimization = False
        self.model_g = ADNGenerator(1, base_ch, num_down, num_residual, num_sides)
        self.model_dl = PatchDiscriminator(1, ndf, n_layers)  # judges pred_lh against clean images
        self.model_dh = PatchDiscriminator(1, ndf, n_layers)  # judges pred_hl against metal-affected images
        if checkpoint:
            self.load_official_checkpoint(checkpoint, checkpoint_sha256)

    def load_official_checkpoint(self, path: str | Path, sha256: str | None = None) -> None:
        """Load ``model_g`` (and ``model_dl``/``model_dh`` where present) from an official ADN checkpoint.

        Raises:
            FileNotFoundError, ValueError: see ``marbench.checkpoints.load_checkpoint_file``; ValueError also
                when the file has no ``model_g`` or its keys/shapes differ from this module's.
        """
        state = load_checkpoint_file(path, sha256, "ADN's deep_lesion_49.pt: see github.com/liaohaofu/adn (README, "
                                                   "'Pretrained models')")
        if "model_g" not in state:
            raise ValueError(f"{path}: expected an ADN checkpoint with a 'model_g' entry, found keys {sorted(state)}")
        for name in ("model_g", "model_dl", "model_dh"):
            if name in state:
                load_state_dict_exactly(getattr(self, name), state[name], f"{path}:{name}")

    def forward(self, ma_hu: torch.Tensor) -> torch.Tensor:
        """Artifact-reduced images in HU ``(B, 1, H, W)`` (official ``forward1(x_low)[1]``)."""
        return adn_to_hu(self.model_g.forward1(hu_to_adn(ma_hu))[1])

    def generator_losses(self, x_low: torch.Tensor, x_high: torch.Tensor):
        """The generator's loss terms (unweighted) for images in ADN's range, and ``pred_lh``, ``pred_hl``.

        Returns:
            ``(losses, pred_lh, pred_hl)``; ``losses`` has the keys of ``OFFICIAL_LOSS_WEIGHTS`` whose weight is
            non-zero.
        """
        w, g = self.weights, self.model_g
        pred_ll, pred_lh = g.forward1(x_low)
        pred_hl, pred_hh = g.forward2(x_low, x_high)
        terms = {
            "ll": lambda: F.l1_loss(pred_ll, x_low), "lh": lambda: F.l1_loss(pred_lh, x_high),
            "hh": lambda: F.l1_loss(pred_hh, x_high), "hlh": lambda: F.l1_loss(g.forward_lh(pred_hl), x_high),
            "lhl": lambda: F.l1_loss(g.forward2(pred_hl, pred_lh)[0], x_low),
            "art": lambda: F.l1_loss(x_low - pred_lh, pred_hl - x_high),  # official gt_art: True
            "gl": lambda: _lsgan(self.model_dl(pred_lh), True), "gh": lambda: _lsgan(self.model_dh(pred_hl), True),
        }
        return {k: f() for k, f in terms.items() if w[k]}, pred_lh, pred_hl

    def training_step(self, batch: dict, batch_idx: int) -> None:
        w = self.weights
        x_low = hu_to_adn(batch["ma_image"])
        x_high = hu_to_adn(batch["gt_image"])
        if w["lh"] == 0:
            x_high = x_high.roll(1, dims=0)  # unpaired: another slice's clean image
        losses, pred_lh, pred_hl = self.generator_losses(x_low, x_high)
        # GAN terms enter unweighted when on (official _get_criterion uses the weight only as a switch)
        g_loss = sum(v if k in ("gl", "gh") else w[k] * v for k, v in losses.items())
        opt_g, opt_dl, opt_dh = self.optimizers()
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        d_losses = {}
        for key, disc, opt, fake, real in (("dl", self.model_dl, opt_dl, pred_lh, x_high),
                                           ("dh", self.model_dh, opt_dh, pred_hl, x_low)):
            if not w["g" + key[1]]:
                continue
            d_losses[key] = 0.5 * (_lsgan(disc(real), True) + _lsgan(disc(fake.detach()), False))
            opt.zero_grad()
            self.manual_backward(d_losses[key])
            opt.step()
        bs = x_low.shape[0]
        self.log("train_g", g_loss, prog_bar=True, batch_size=bs)
        self.log_dict({f"train_{k}": v.detach() for k, v in {**losses, **d_losses}.items()}, batch_size=bs)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        keep = (~batch["metal_mask"]).float()
        err = (hu_to_adn(self(batch["ma_image"])) - hu_to_adn(batch["gt_image"])).abs()
        self.log("val_l1", (err * keep).sum() / keep.sum().clamp(min=1), prog_bar=True,
                 batch_size=batch["ma_image"].shape[0])

    def configure_optimizers(self):
        hp = self.hparams
        return [torch.optim.Adam(m.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
                for m in (self.model_g, self.model_dl, self.model_dh)]

    @classmethod
    def contract_instance(cls) -> "ADN":
        return cls(base_ch=8, num_residual=1, ndf=8)

    def restore(self, batch: Batch, physics: CTPhysics) -> torch.Tensor:
        return put_metal_back(self(batch["ma_image"]), batch)

