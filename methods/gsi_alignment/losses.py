"""The information invariant loss and the alignment objective of Han et al., "Reducing CT Metal Artifacts by Learning
Latent Space Alignment with Gemstone Spectral Imaging Data", Sec. 3.4 (Eq. 10-13) and Sec. 5.1.

Equations:

* Eq. 10 ``f_n = Ec_n(z_n)``, ``f_g = Ec_g(z_g)``: two small convolutional encoders map ARVAE latents (not images)
  of the ordinary and the GSI slice to feature maps (``InvarianceEncoders``).
* Eq. 11, contrastive training of ``Ec_n``, ``Ec_g`` on pooled (one-dimensional) embeddings ``e = pool(f)``:
  ``D_min = sum_i ||e_n[i] - e_g[i]||^2`` (same position), ``D_max = sum_i sum_{j != i} ||e_n[i] - e_g[j]||^2``
  (different patients or positions), minimise ``D_min - gamma D_max`` (``contrastive_distances``,
  ``contrastive_objective``). The encoders are then frozen (``InvarianceEncoders.freeze``).
* Eq. 12 ``L_inv = sum_i ||Ec_n(z_n[i]) - Ec_g(z_bar_n[i])||^2``, pixel-wise on the feature maps, with ``z_bar_n``
  the ALU-Net output (``information_invariant_loss``).
* Eq. 13 ``L = L_i + alpha L_l + beta L_inv``: ``L_i`` the MSE between prediction and target in image space
  (``D_g(z_bar_n)`` against the GSI slice), ``L_l`` the MSE in latent space (``z_bar_n`` against ``z_g``);
  ``alpha = 1``, ``beta = 0.001`` (Sec. 5.1, written ``alpha_1 = 1``) (``total_loss``). Optimiser: AdamW, lr 1e-5,
  50 epochs for the alignment network (Sec. 5.1).

Departures and readings:

* ``pool`` is the global average over the feature map (the paper: "the pooling operation").
* Eq. 11 as written is unbounded below (scaling the embeddings up grows ``D_max`` without limit); the embeddings
  are L2-normalised before the distances (``normalize=True``, default), which bounds every squared distance by 4.
  ``normalize=False`` gives the literal form.
* ``gamma`` is not given in the paper; the default ``None`` means ``1 / (B - 1)``, so that ``gamma D_max`` sums,
  like ``D_min``, ``B`` terms (one average negative distance per slice).
* Negatives: every ``j != i`` of the batch (a batch holds different positions or patients); ``negatives`` can
  exclude pairs known to be the same position.
* Eq. 12 is read as the MSE over slices and feature elements (``reduction="mean"``, default), as the paper calls
  the other two terms of Eq. 13 MSE losses; ``reduction="sum"`` is the literal sum. The sum makes ``beta L_inv``
  scale with the batch and the feature-map size (``B x 128 x 32 x 32`` elements for 512 x 512 slices with the
  defaults here, i.e. ``beta L_inv`` ~ 130 B times the mean) and, in our tiny tests, leaves a floor from the pull
  of ``L_inv`` towards ``z_n`` against that of ``L_l`` towards ``z_g`` that keeps the Eq. 13 total from falling
  5x on one batch; the mean reading keeps Eq. 13 a sum of per-element averages.
* Encoders (widths not given): conv 3x3 (latent -> ``width``), GN, SiLU, conv 3x3 stride 2 (-> ``2 width``), GN,
  SiLU, conv 3x3 (-> ``feature_channels``); defaults ``width = 64``, ``feature_channels = 128``. GroupNorm only,
  so frozen encoders behave the same in train and eval mode.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ALPHA", "BETA", "AlignmentLoss", "InvarianceEncoders", "contrastive_distances", "contrastive_objective",
           "information_invariant_loss", "pool_embedding", "total_loss"]

ALPHA = 1.0
"""Eq. 13 weight of the latent MSE ``L_l`` (Sec. 5.1)."""
BETA = 0.001
"""Eq. 13 weight of the information invariant loss ``L_inv`` (Sec. 5.1)."""


def pool_embedding(f: torch.Tensor) -> torch.Tensor:
    """``pool`` of Eq. 11: global average of a ``(B, C, h, w)`` feature map -> ``(B, C)``.

    Raises ``ValueError`` for a non-4-D input.
    """
    if f.ndim != 4:
        raise ValueError(f"expected a feature map of shape (B, C, h, w); found {tuple(f.shape)}")
    return f.mean(dim=(-2, -1))


def contrastive_distances(e_n: torch.Tensor, e_g: torch.Tensor, negatives: torch.Tensor | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(D_min, D_max)`` of Eq. 11 for paired embeddings (row ``i`` of both: the same slice position).

    Args:
        e_n, e_g: ``(B, C)`` embeddings of the ordinary and GSI slices.
        negatives: optional bool ``(B, B)``: which ``(i, j)`` enter ``D_max`` (default: every ``j != i``).
    Returns:
        Scalars ``D_min = sum_i ||e_n[i] - e_g[i]||^2``, ``D_max = sum_{(i, j) negative} ||e_n[i] - e_g[j]||^2``.
    Raises:
        ValueError: shapes differ or are not 2-D, or ``negatives`` is not ``(B, B)``.
    """
    if e_n.ndim != 2 or e_n.shape != e_g.shape:
        raise ValueError(f"expected two embeddings of the same shape (B, C); found {tuple(e_n.shape)} and "
                         f"{tuple(e_g.shape)}")
    b = e_n.shape[0]
    d = (e_n[:, None, :] - e_g[None, :, :]).pow(2).sum(-1)  # d[i, j] = ||e_n[i] - e_g[j]||^2
    if negatives is None:
        negatives = ~torch.eye(b, dtype=torch.bool, device=d.device)
    elif negatives.shape != (b, b):
        raise ValueError(f"expected negatives of shape ({b}, {b}); found {tuple(negatives.shape)}")
    return d.diagonal().sum(), d[negatives.to(d.device, torch.bool)].sum()


def contrastive_objective(f_n: torch.Tensor, f_g: torch.Tensor, gamma: float | None = None, normalize: bool = True,
                          negatives: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 11 objective ``D_min - gamma D_max`` on pooled feature maps (minimised over ``Ec_n``, ``Ec_g``).

    Args:
        f_n, f_g: ``(B, C, h, w)`` feature maps ``Ec_n(z_n)``, ``Ec_g(z_g)``, row ``i`` the same position; ``B >= 2``.
        gamma: weight of ``D_max`` (default ``1 / (B - 1)``).
        normalize: L2-normalise the pooled embeddings first (default; see the module docstring).
        negatives: see ``contrastive_distances``.
    Raises:
        ValueError: fewer than two slices, or shapes as in ``pool_embedding`` / ``contrastive_distances``.
    """
    e_n, e_g = pool_embedding(f_n), pool_embedding(f_g)
    b = e_n.shape[0]
    if b < 2:
        raise ValueError(f"expected at least 2 slices for the contrastive loss (negatives); found B = {b}")
    if normalize:
        e_n, e_g = F.normalize(e_n, dim=1), F.normalize(e_g, dim=1)
    d_min, d_max = contrastive_distances(e_n, e_g, negatives)
    gamma = 1.0 / (b - 1) if gamma is None else gamma
    return d_min - gamma * d_max


def information_invariant_loss(f_n: torch.Tensor, f_bar: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Eq. 12: ``L_inv = sum_i ||f_n[i] - f_bar[i]||^2`` with ``f_n = Ec_n(z_n)``, ``f_bar = Ec_g(z_bar_n)``, by
    default as the mean over slices and elements (see the module docstring).

    Args:
        f_n, f_bar: ``(B, C, h, w)`` feature maps.
        reduction: ``"mean"`` (default: the MSE) or ``"sum"`` (Eq. 12 literally: over slices and elements).
    Raises:
        ValueError: shapes differ, or unknown ``reduction``.
    """
    if f_n.shape != f_bar.shape:
        raise ValueError(f"expected feature maps of the same shape; found {tuple(f_n.shape)} and "
                         f"{tuple(f_bar.shape)}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"expected reduction 'sum' or 'mean'; found {reduction!r}")
    return F.mse_loss(f_n, f_bar, reduction=reduction)


class AlignmentLoss(NamedTuple):
    """Eq. 13 terms: ``total = image + alpha latent + beta invariance`` (unweighted terms, scalars)."""

    total: torch.Tensor
    image: torch.Tensor
    latent: torch.Tensor
    invariance: torch.Tensor


def total_loss(image_pred: torch.Tensor, image_target: torch.Tensor, latent_pred: torch.Tensor,
               latent_target: torch.Tensor, l_inv: torch.Tensor | None = None, alpha: float = ALPHA,
               beta: float = BETA) -> AlignmentLoss:
    """Eq. 13: ``L = L_i + alpha L_l + beta L_inv`` (Sec. 5.1: ``alpha = 1``, ``beta = 0.001``).

    Args:
        image_pred: ``(B, 1, H, W)`` ``D_g(z_bar_n)``, [-1, 1] scale; ``image_target`` the GSI slice, same shape.
        latent_pred: ``(B, C, h, w)`` ``z_bar_n``; ``latent_target`` ``z_g``, same shape.
        l_inv: Eq. 12 value (``InvarianceEncoders.invariance_loss``), or ``None`` for the Table 1 rows without the
            information invariant loss (the term is then 0).
    Returns:
        ``AlignmentLoss(total, image, latent, invariance)``.
    Raises:
        ValueError: prediction and target shapes differ.
    """
    for name, p, t in (("image", image_pred, image_target), ("latent", latent_pred, latent_target)):
        if p.shape != t.shape:
            raise ValueError(f"expected {name} prediction and target of the same shape; found {tuple(p.shape)} "
                             f"and {tuple(t.shape)}")
    l_i = F.mse_loss(image_pred, image_target)
    l_l = F.mse_loss(latent_pred, latent_target)
    l_inv = torch.zeros((), dtype=l_i.dtype, device=l_i.device) if l_inv is None else l_inv
    return AlignmentLoss(l_i + alpha * l_l + beta * l_inv, l_i, l_l, l_inv)


def _conv_encoder(latent_channels: int, width: int, feature_channels: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(latent_channels, width, 3, padding=1), nn.GroupNorm(math.gcd(width, groups), width), nn.SiLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(math.gcd(2 * width, groups), 2 * width),
        nn.SiLU(), nn.Conv2d(2 * width, feature_channels, 3, padding=1))


class InvarianceEncoders(nn.Module):
    """``Ec_n`` and ``Ec_g`` of Eq. 10: ``(B, latent_channels, h, w)`` -> ``(B, feature_channels, ceil(h/2),
    ceil(w/2))``.

    Args:
        latent_channels: ARVAE latent channels (default 4).
        width, feature_channels: encoder widths (defaults 64, 128).
        groups: GroupNorm groups (the gcd with each width is used).

    Train with ``contrastive_loss`` (Eq. 11), then ``freeze()`` and use ``invariance_loss`` (Eq. 12) while the
    alignment network trains; gradients still flow through the frozen encoders into ``z_bar_n``.
    """

    def __init__(self, latent_channels: int = 4, width: int = 64, feature_channels: int = 128, groups: int = 32):
        super().__init__()
        self.latent_channels = latent_channels
        self.ec_n = _conv_encoder(latent_channels, width, feature_channels, groups)
        self.ec_g = _conv_encoder(latent_channels, width, feature_channels, groups)

    def _check(self, name: str, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected {name} of shape (B, {self.latent_channels}, h, w); found {tuple(z.shape)}")

    def forward(self, z_n: torch.Tensor, z_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 10: ``(f_n, f_g) = (Ec_n(z_n), Ec_g(z_g))``; ``ValueError`` for a wrong latent shape."""
        self._check("z_n", z_n)
        self._check("z_g", z_g)
        return self.ec_n(z_n), self.ec_g(z_g)

    def contrastive_loss(self, z_n: torch.Tensor, z_g: torch.Tensor, gamma: float | None = None,
                         normalize: bool = True, negatives: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 11 on paired latents ``(B, C, h, w)`` (row ``i``: the same position); see ``contrastive_objective``."""
        f_n, f_g = self(z_n, z_g)
        return contrastive_objective(f_n, f_g, gamma, normalize, negatives)

    def invariance_loss(self, z_n: torch.Tensor, z_bar: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Eq. 12: ``||Ec_n(z_n[i]) - Ec_g(z_bar_n[i])||^2`` over ``i``, as the mean (default) or the sum;
        ``z_n``, ``z_bar`` ``(B, C, h, w)``; ``ValueError`` for a wrong latent shape."""
        f_n, f_bar = self(z_n, z_bar)
        return information_invariant_loss(f_n, f_bar, reduction)

    def freeze(self) -> InvarianceEncoders:
        """Fix ``Ec_n``, ``Ec_g`` after Eq. 11 (Sec. 3.4): gradients cleared, no parameter requires grad, eval mode.
        Returns self."""
        self.zero_grad(set_to_none=True)
        self.requires_grad_(False)
        return self.eval()
