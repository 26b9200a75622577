"""``sscd``: self-supervised cross-domain MAR with an FBP-consistency loss (Yu, Zhang, Li, Ren, Zhao & Xing,
"Metal Artifact Reduction in 2D CT Images with Self-supervised Cross-domain Learning", Phys. Med. Biol. 66(17),
2021), with the four rows of its Table I ablation as ``variant``.

Training needs only metal-free sinograms ``S`` and metal masks: each step pairs one sinogram batch with two
mask batches (the masks of other slices of the batch), traces ``Tr = P(M) > 0`` (Eq. 1), ``S_ma`` = ``S`` with
the trace removed and ``S_LI`` its linear interpolation (Eq. 9). SinoNet, a mask-pyramid U-Net (Liao et al.,
MICCAI 2019: the trace average-pooled to every encoder level and concatenated there), completes the trace:
``S_sn = f_S(S_LI, Tr) * Tr + S_LI * (1 - Tr)`` (Eq. 2), ``L_SN = |S_sn - S|_1`` (Eq. 3). The FBP-consistency
loss (Eq. 4) reconstructs both completions with the differentiable FBP and compares them outside both metal
masks. ImgNet, a U-Net with half the channels, refines ``X_out = FBP(S_sn) + f_I(FBP(S_sn))`` (Eq. 5) against
``FBP(S)`` (Eq. 6). Total ``L_SN + alpha1 L_FBP + alpha2 L_IN`` (Eq. 7, alpha1 = alpha2 = 1); Adam 1e-4,
betas (0.5, 0.999).

Inference (Sec. II-C): metal mask (the dataset's, as every other row of the benchmark uses, or the paper's
``ma_image > 2000 HU`` with ``metal_mask_source="threshold"``), trace by forward projection, LI of the
metal-affected sinogram, SinoNet, FBP, ImgNet, then prior-image metal trace replacement with residual LI (Eq. 8):
``S_corr = S_prior + LI(S_LI - S_prior, Tr)`` with ``S_prior = P(X_out)``, and a final FBP.

Variants (Table I): ``sinonet`` (L_SN; output FBP(S_sn)), ``sinonet+fbpcons`` (+ L_FBP), ``joint`` (+ ImgNet
and L_IN; output X_out), ``joint+mtr`` (the full method; output FBP(S_corr)).

Units: sinograms are line integrals (divided by ``line_integral_scale`` inside SinoNet), images are attenuation
over the geometry's water attenuation (water 1) inside ImgNet and in the image losses; every L1 is a mean.
The AAPM protocol asks for metal back in the image: pixels of the metal mask used take the metal-affected
image's values.

Departures from the paper: f_S and f_I predict a correction of their input (zero-initialised last layers, so
training starts from LI / from FBP(S_sn)); L_SN and L_IN are averaged over both completions of a step; the
metal masks are those of the training slices (the paper: 90 masks from CNNMAR); MTR replaces values inside
the trace only, so that values outside are exactly the input's (Eq. 8 equals that up to rounding); the
inference metal mask is the dataset's by default: on the synthetic benchmark a 2000 HU threshold also takes in
bright streaks and blooming around the metal (4589 pixels against 2029 metal pixels on 8 test slices), whose
trace and put-back made the untrained (LI) method 264 HU RMSE against 54 HU with the dataset's mask.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from marbench.datasets.batch import Batch
from marbench.method import MARMethod, MethodCard, PaperTable
from marbench.networks import UNet, conv_block
from marbench.physics import CTPhysics, Projector, linear_interpolation, metal_trace, mu_to_hu

__all__ = ["MaskPyramidUNet", "SelfSupervisedCrossDomainMAR", "metal_trace_replacement", "VARIANTS"]

VARIANTS = ("sinonet", "sinonet+fbpcons", "joint", "joint+mtr")


class MaskPyramidUNet(nn.Module):
    """U-Net whose encoder sees the mask at every level (Liao et al., MICCAI 2019 mask pyramid).

    ``forward(x, mask)``: ``x`` ``(B, cin, H, W)``, ``mask`` ``(B, 1, H, W)`` in [0, 1] -> ``(B, cout, H, W)``;
    any ``H, W`` (padded to a multiple of ``2**depth``: circularly along ``H``, the views of a full rotation,
    by replication along ``W``, the detector channels; cropped back).
    """

    def __init__(self, cin: int = 1, cout: int = 1, base: int = 32, depth: int = 4):
        super().__init__()
        chans = [base * 2**k for k in range(depth + 1)]
        self.depth = depth
        self.down = nn.ModuleList([conv_block(cin + 1, chans[0])]
                                  + [conv_block(chans[k] + 1, chans[k + 1]) for k in range(depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(chans[k + 1], chans[k], 2, stride=2) for k in range(depth)])
        self.merge = nn.ModuleList([conv_block(2 * chans[k], chans[k]) for k in range(depth)])
        self.head = nn.Conv2d(chans[0], cout, 1)
        self.to(memory_format=torch.channels_last)  # as marbench.networks.UNet: faster convolutions on the CPU

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2**self.depth
        ph, pw = -h % m, -w % m
        x = F.pad(F.pad(x, (0, 0, 0, ph), mode="circular"), (0, pw, 0, 0), mode="replicate")
        x = x.contiguous(memory_format=torch.channels_last)
        mask = F.pad(F.pad(mask, (0, 0, 0, ph), mode="circular"), (0, pw, 0, 0), mode="replicate")
        skips = []
        for k, block in enumerate(self.down):
            if k:
                x, mask = F.max_pool2d(x, 2), F.avg_pool2d(mask, 2)
            x = block(torch.cat((x, mask), dim=1))
            skips.append(x)
        x = skips.pop()
        for k in reversed(range(self.depth)):
            x = self.merge[k](torch.cat([self.up[k](x), skips.pop()], dim=1))
        return self.head(x)[..., :h, :w].contiguous()


def metal_trace_replacement(li_sinogram: torch.Tensor, prior_sinogram: torch.Tensor,
                            trace: torch.Tensor) -> torch.Tensor:
    """Prior-image metal trace replacement with residual LI (Eq. 8-9).

    Args:
        li_sinogram: ``(B, 1, V, C)`` the LI-completed metal-affected sinogram (line integrals).
        prior_sinogram: ``(B, 1, V, C)`` forward projection of the prior image.
        trace: bool ``(B, 1, V, C)`` metal trace.
    Returns:
        ``S_prior + LI(S_LI - S_prior, Tr)`` inside the trace; ``S_LI`` itself (bit for bit) outside.
    """
    residual = linear_interpolation(li_sinogram - prior_sinogram, trace)
    return torch.where(trace, prior_sinogram + residual, li_sinogram)


class SelfSupervisedCrossDomainMAR(MARMethod):
    """Yu et al.'s self-supervised cross-domain MAR (see the module docstring).

    Args:
        variant: one of ``VARIANTS`` (Table I rows); the record's method name is ``sscd-<variant>`` with ``+``
            written ``-``.
        base, depth: SinoNet width and depth; ImgNet has ``base // 2`` channels (Sec. II-A3).
        alpha_fbp, alpha_img: Eq. 7 weights (paper: 1, 1).
        lr: Adam learning rate (paper 1e-4, betas (0.5, 0.999)).
        metal_mask_source: ``"dataset"`` (the batch's ``metal_mask``) or ``"threshold"`` (Sec. II-C:
            ``ma_image > metal_threshold_hu``).
        metal_threshold_hu: the threshold (2000 HU).
        line_integral_scale: sinograms are divided by it inside SinoNet.
    Raises:
        ValueError: unknown ``variant`` or ``metal_mask_source``; a training batch of fewer than 2 slices (two
            different traces are needed).
    """

    paper_tables = (PaperTable(
        name="sscd-ablation",
        source="Yu et al., 'Metal Artifact Reduction in 2D CT Images with Self-supervised Cross-domain Learning', "
               "Table I (DeepLesion simulation)",
        protocol="aapm-hu",
        rows=(("sscd-sinonet", "SinoNet"), ("sscd-sinonet-fbpcons", "SinoNet+FBPcons"),
              ("sscd-joint", "JointLearning"), ("sscd-joint-mtr", "JointLearning+MTR")),
        values={"SinoNet": {"rmse_hu": 42.60, "ssim": 0.9727}, "SinoNet+FBPcons": {"rmse_hu": 41.97, "ssim": 0.9731},
                "JointLearning": {"rmse_hu": 36.28, "ssim": 0.9755},
                "JointLearning+MTR": {"rmse_hu": 34.20, "ssim": 0.9773}},
        order_metric="rmse_hu",
        note="paper: DeepLesion images, 416 x 416, 640 views, 180 epochs at base 32; ours: the synthetic smoke "
             "benchmark at 256 x 256 and a short CPU schedule (configs/bench/sscd_*.yaml)",
    ),)

    card = MethodCard(
        name="sscd", paper="Yu, Zhang, Li, Ren, Zhao & Xing, 'Metal Artifact Reduction in 2D CT Images with "
                           "Self-supervised Cross-domain Learning', Phys. Med. Biol. 66(17), 2021",
        inputs=("ma_image", "ma_sinogram", "metal_mask", "geometry"), trainable=True,
        training_inputs=("gt_sinogram", "gt_image"),
        departures=("SinoNet/ImgNet predict corrections of their inputs (zero-initialised heads)",
                    "training masks: the other slices' metal masks in the batch",
                    "MTR replaces values inside the trace only (outside exactly the input)",
                    "inference metal mask: the dataset's (the paper thresholds at 2000 HU: metal_mask_source)"),
    )

    def __init__(self, variant: str = "joint+mtr", base: int = 32, depth: int = 4, alpha_fbp: float = 1.0,
                 alpha_img: float = 1.0, lr: float = 1e-4, metal_mask_source: str = "dataset",
                 metal_threshold_hu: float = 2000.0, line_integral_scale: float = 4.0):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
        if metal_mask_source not in ("dataset", "threshold"):
            raise ValueError(f"metal_mask_source must be 'dataset' or 'threshold', found {metal_mask_source!r}")
        self.save_hyperparameters()
        self.variant = variant
        card = replace(type(self).card, name=f"sscd-{variant.replace('+', '-')}")
        if metal_mask_source == "threshold":  # its own mask: the dataset's is neither needed nor put back
            card = replace(card, inputs=tuple(k for k in card.inputs if k != "metal_mask"), puts_metal_back=False)
        self.card = card
        self.sinonet = MaskPyramidUNet(1, 1, base, depth)
        nn.init.zeros_(self.sinonet.head.weight)
        nn.init.zeros_(self.sinonet.head.bias)
        self.imgnet = None
        if variant.startswith("joint"):
            self.imgnet = UNet(1, 1, max(base // 2, 1), depth)
            nn.init.zeros_(self.imgnet.head.weight)
            nn.init.zeros_(self.imgnet.head.bias)

    # -- the networks -------------------------------------------------------------------------------------------
    def complete(self, li_sinogram: torch.Tensor, trace: torch.Tensor) -> torch.Tensor:
        """SinoNet completion ``S_sn`` (Eq. 2) of ``(B, 1, V, C)`` LI sinograms over bool traces."""
        scale = self.hparams.line_integral_scale
        t = trace.to(li_sinogram.dtype)
        f = li_sinogram + scale * self.sinonet(li_sinogram / scale, t)
        return f * t + li_sinogram * (1 - t)

    def refine(self, image_mu: torch.Tensor, mu_water_per_mm: float) -> torch.Tensor:
        """ImgNet refinement ``X_out = X + f_I(X)`` (Eq. 5) of ``(B, 1, N, N)`` attenuation in mm^-1."""
        x = image_mu / mu_water_per_mm
        return (x + self.imgnet(x)) * mu_water_per_mm

    # -- training -----------------------------------------------------------------------------------------------
    def losses(self, sinogram: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor],
               projector: Projector) -> dict[str, torch.Tensor]:
        """Eq. 3, 4 and 6 for one anatomy's slices.

        Args:
            sinogram: ``(B, 1, V, C)`` metal-free line integrals ``S``.
            masks: two bool ``(B, 1, N, N)`` metal-mask batches (``M1``, ``M2``).
            projector: the slices' projector.
        Returns:
            ``{"sn", "fbp", "img"}`` (the last two only where the variant uses them), each a scalar.
        """
        mu_w = projector.geometry.mu_water_per_mm
        completions, recons = [], []
        for mask in masks:
            trace = metal_trace(projector, mask)
            s_li = linear_interpolation(sinogram.masked_fill(trace, 0.0), trace)
            s_sn = self.complete(s_li, trace)
            completions.append(s_sn)
            if self.variant != "sinonet":
                recons.append(projector.fbp(s_sn))
        out = {"sn": sum(F.l1_loss(s, sinogram) for s in completions) / 2}
        if recons:
            outside = ~(masks[0] | masks[1])
            diff = (recons[0] - recons[1]) / mu_w
            out["fbp"] = diff.abs().masked_select(outside).mean()
        if self.imgnet is not None:
            with torch.no_grad():
                reference = projector.fbp(sinogram) / mu_w
            out["img"] = sum(F.l1_loss(self.refine(x, mu_w) / mu_w, reference) for x in recons) / 2
        return out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        sinogram, metal = batch["gt_sinogram"], batch["metal_mask"]
        n = sinogram.shape[0]
        if n < 2:
            raise ValueError("sscd: a training batch needs at least 2 slices (each sinogram gets the metal masks "
                             f"of two other slices), found {n}")
        # two mask batches: the masks of the next and the second-next slice (M1 != M2 whenever n >= 2)
        m1, m2 = metal.roll(1, dims=0), metal.roll(2 if n > 2 else 0, dims=0)
        totals: dict[str, torch.Tensor] = {}
        for projector, idx in self.physics.groups(batch):
            parts = self.losses(sinogram[idx], (m1[idx], m2[idx]), projector)
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v * len(idx) / n
        weights = {"sn": 1.0, "fbp": self.hparams.alpha_fbp, "img": self.hparams.alpha_img}
        loss = sum(weights[k] * v for k, v in totals.items())
        self.log("train_loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({f"train_{k}": v.detach() for k, v in totals.items()}, batch_size=n)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        keep = (batch["gt_image"] > -500) & ~self.inference_metal_mask(batch)
        err = (self.restore(batch, self.physics) - batch["gt_image"]).abs()
        self.log("val_mae_hu", err[keep].mean(), prog_bar=True, batch_size=batch["ma_image"].shape[0])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, betas=(0.5, 0.999))

    # -- inference ----------------------------------------------------------------------------------------------
    def reconstruct(self, ma_sinogram: torch.Tensor, metal_mask: torch.Tensor, projector: Projector) -> torch.Tensor:
        """The variant's output image ``(B, 1, N, N)`` in mm^-1 from metal-affected sinograms ``(B, 1, V, C)`` and
        bool metal masks ``(B, 1, N, N)`` (Sec. II-C)."""
        trace = metal_trace(projector, metal_mask)
        s_li = linear_interpolation(ma_sinogram, trace)
        x = projector.fbp(self.complete(s_li, trace))
        if self.imgnet is None:
            return x
        x = self.refine(x, projector.geometry.mu_water_per_mm)
        if self.variant == "joint":
            return x
        return projector.fbp(metal_trace_replacement(s_li, projector.fp(x), trace))

    def inference_metal_mask(self, batch: dict) -> torch.Tensor:
        """The bool ``(B, 1, N, N)`` metal mask inference uses (see ``metal_mask_source``)."""
        if self.hparams.metal_mask_source == "threshold":
            return batch["ma_image"] > self.hparams.metal_threshold_hu
        return batch["metal_mask"]

    @classmethod
    def contract_instance(cls) -> "SelfSupervisedCrossDomainMAR":
        return cls(variant="joint+mtr", base=4, depth=2)

    def restore(self, batch: Batch, physics: CTPhysics) -> torch.Tensor:
        ma = batch["ma_image"]
        metal = self.inference_metal_mask(batch)
        out = torch.empty_like(ma)
        for p, idx in physics.groups(batch):
            mu = self.reconstruct(batch["ma_sinogram"][idx], metal[idx], p)
            out[idx] = mu_to_hu(mu, p.geometry.mu_water_per_mm)
        return torch.where(metal, ma, out)
