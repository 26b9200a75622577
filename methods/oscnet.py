"""``oscnet`` and ``oscnet_plus``: orientation-shared convolutional networks for MAR (Wang, Xie, Li, Meng &
Zheng, "Orientation-Shared Convolution Representation for CT Metal Artifact Learning", MICCAI 2022 (OSCNet);
"OSCNet: Orientation-Shared Convolutional Network for CT Metal Artifact Learning", IEEE TMI 43(1), 2024
(OSCNet+); official code: github.com/hongwang01/OSCNet).

Model: the metal-affected image is ``Xma = X + A`` outside the metal, with the artifact ``A = C (*) M`` a
convolution of feature maps ``M`` (``num_M`` per orientation) with a filter ``C`` shared across ``num_rot``
rotations: ``C`` is a Fourier-series expansion on a rotated grid (Xie et al., IEEE TPAMI 2022, F-Conv), so only
the expansion coefficients are learned (OSCNet) or predicted per image from ``(X, Xma)`` by a small weight net
(OSCNet+). ``S`` unrolled proximal-gradient stages alternate an ``M`` step (gradient through ``C``, then the
proximal ResNet ``proxNet_M``) and an ``X`` step
``X_mid = (1 - eta_X * Mask/10) * X + eta_X * Mask/10 * (Xma - A)`` followed by ``proxNet_X`` on ``X_mid``
concatenated with ``num_Q`` dual channels; ``Mask`` is the non-metal mask. The loss (official ``train.py``)
is ``L2(X) + 5e-4 * (L1(X) + L1(A))`` (sums for L1) on the final stage plus 0.1 x the same on every
intermediate stage and on the initial ``X0``, all inside ``Mask``.

Module names, shapes and hyperparameters match the official code key for key (``num_M=4, num_rot=8,
num_Q=32, S=10, T=3, sizeP=9, inP=5, etaM=1, etaX=5``), so the released ``net_latest.pt`` state dicts load
with ``load_official_checkpoint``; OSCNet's file also holds the filter cached by the official ``eval()``
(``fcnn.filter``, ``fcnn.bias``), which is checked against the one derived from the coefficients and dropped.

Input convention (``marbench.converters.hu_to_oscnet``): DeepLesion attenuation clipped to ``[0, 1]`` cm^-1
then x255; the LI image is the sinogram LI prior (``prior="sinogram"``) or, as Emirdagi et al. (Sec. 3.2) do on AAPM
images, OpenCV TELEA inpainting of a ``HU > 2000`` mask dilated by a 7 x 7 ellipse (``prior="image"``, see
``marbench.image_prior``); metal pixels take the metal-affected image's values (metal put back).

Departures from the official code:
  - ``C0`` (the filter of the initialisation step) starts from the orientation-shared filter of random
    Fourier coefficients (official: ``utils/init_kernel.mat``, not redistributed here); checkpoints replace it;
  - the Fourier basis is orthonormalised with a symmetric eigendecomposition (official: an SVD of the same
    Gram matrix), which spans the same filters; checkpoints carry the basis as a buffer;
  - training patches are cropped from our datamodule's slices inside the method (official: 64 x 64 crops in
    the data loader), with the same random flips.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from marbench.checkpoints import load_checkpoint_file, load_state_dict_exactly
from marbench.converters import hu_to_oscnet, oscnet_to_hu
from marbench.datasets.batch import Batch
from marbench.image_prior import telea_inpainting, threshold_metal_mask
from marbench.method import MARMethod, MethodCard
from marbench.physics import CTPhysics

__all__ = ["fourier_rotation_basis", "OSCNetwork", "OSCNet", "OSCNetPlus", "oscnet_loss", "rotation_conv",
           "rotation_conv_transpose", "official_rotation_conv", "official_rotation_conv_transpose"]


def fourier_rotation_basis(size: int = 9, rotations: int = 8, frequencies: int = 5,
                           smooth: bool = True) -> tuple[torch.Tensor, np.ndarray]:
    """The F-Conv filter basis: 2-D Fourier modes on a grid rotated by ``2*pi*r/rotations``, orthonormalised.

    Modes ``cos/sin(pi*(n-1)/n * (k x + l y))`` with integer frequencies ``k, l`` in ``[-n/2, n/2)``
    (``n = frequencies``) on ``[-1, 1]^2``, damped outside the unit disc by ``exp(-(r^2-1)/0.2)``; the modes of
    all rotations together are orthonormalised (Gram eigendecomposition, eigenvalues > 1e-4), then with
    ``smooth`` each basis filter is scaled by ``1/max(v, 0.04)/25``, ``v`` its variance across rotations
    relative to its energy (official ``GetBasis_PCA``).

    Returns:
        ``(basis, weight)``: ``basis`` ``(size, size, rotations, rank)`` float32 and the per-filter ``weight``
        ``(rank,)`` used to scale the initial coefficients.
    """
    half = (size - 1) / 2
    axis = np.arange(-half, half + 1) / half
    x0, y0 = np.meshgrid(axis, axis)
    taper = np.exp(-np.maximum(x0**2 + y0**2 - 1.0, 0.0) / 0.2)
    theta = 2 * np.pi * np.arange(rotations) / rotations
    x = np.cos(theta) * x0[..., None] - np.sin(theta) * y0[..., None]  # (size, size, rotations)
    y = np.cos(theta) * y0[..., None] + np.sin(theta) * x0[..., None]
    idx = np.arange(frequencies)
    freq = np.where(idx > frequencies / 2, idx - frequencies, idx) * np.pi * (frequencies - 1) / frequencies
    phase = freq[:, None] * x[..., None, None] + freq[None, :] * y[..., None, None]  # (s, s, r, n, n)
    modes = np.concatenate([np.cos(phase), np.sin(phase)], axis=-1).reshape(size, size, rotations, -1)
    modes = (modes * taper[..., None, None]).reshape(size * size * rotations, -1)
    eigval, eigvec = np.linalg.eigh(modes.T @ modes)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    rank = int((eigval > 1e-4).sum())
    basis = modes @ eigvec[:, :rank] / np.sqrt(eigval[:rank] + 1e-10)
    per_rotation = basis.reshape(size * size, rotations, rank)
    dc = per_rotation.sum(axis=0) ** 2
    energy = (per_rotation**2).sum(axis=0) * size * size
    variation = (dc.std(axis=0) + energy.std(axis=0)) / (dc + energy).mean(axis=0)
    weight = 1.0 / np.maximum(variation, 0.04) / 25
    if smooth:
        basis = basis * weight
    return torch.from_numpy(basis.reshape(size, size, rotations, rank)).float(), weight


def _initial_coefficients(num_M: int, weight: np.ndarray, rng: torch.Generator | None = None) -> torch.Tensor:
    """Uniform coefficients scaled like He init and by the basis weight (official ``Getini_reg``): ``(num_M, 1,
    1, rank)``."""
    rank = weight.shape[0]
    u = torch.rand(num_M, 1, 1, rank, generator=rng) * 2 - 1
    return u * 2.4495 / np.sqrt(rank) * torch.from_numpy(weight).float()


def _filters_from_coefficients(basis: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """``basis (s, s, r, K)`` and ``coeffs (..., num_M, K)`` -> filters ``(..., num_M * r, s, s)``, channel
    ``m * r + rotation`` (the official einsum ``'ijok,mnak->monaij'`` order)."""
    s, _, r, k = basis.shape
    w = coeffs @ basis.permute(3, 0, 1, 2).reshape(k, s * s * r)  # (..., num_M, s*s*r)
    return w.reshape(*coeffs.shape[:-1], s, s, r).movedim(-1, -3).reshape(*coeffs.shape[:-2], -1, s, s)


class _OrientationSharedFilter(nn.Module):
    """OSCNet's learned rotation-shared filter (official ``Fconv.Fconv_PCA`` with ``ifIni=1``): buffers
    ``Basis``; parameters ``weights (num_M, 1, 1, rank)`` and the scalar bias ``c``."""

    def __init__(self, num_M: int, num_rot: int, sizeP: int, inP: int):
        super().__init__()
        basis, weight = fourier_rotation_basis(sizeP, num_rot, inP)
        self.register_buffer("Basis", basis)
        self.weights = nn.Parameter(_initial_coefficients(num_M, weight))
        self.c = nn.Parameter(torch.zeros(1, 1, 1, 1))
        self.padding = sizeP // 2

    def filter(self) -> torch.Tensor:
        """``(1, num_M * num_rot, sizeP, sizeP)``."""
        size = self.Basis.shape[0]
        # the official einsum, kept term for term: the filter then matches the official one bit for bit
        return torch.einsum("ijok,mnak->monaij", self.Basis, self.weights).reshape(1, -1, size, size)

    def forward(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature maps ``(B, num_M*num_rot, H, W)`` -> artifact ``(B, 1, H, W)`` and the filter."""
        c = self.filter()
        return rotation_conv(m, c, self.padding) + self.c, c


class _WeightNet(nn.Module):
    """OSCNet+'s coefficient predictor (official ``Fconv_wnet.WNet``): three 3 x 3 convs on ``(X, Xma)``, a
    global average, a linear layer to ``num_M x rank`` coefficients, ReLU, each row normalised to unit L2."""

    def __init__(self, num_M: int, rank: int):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, 1, 1)
        self.conv2 = nn.Conv2d(6, 6, 3, 1, 1)
        self.conv3 = nn.Conv2d(6, 6, 3, 1, 1)
        self.f1 = nn.Linear(6, num_M * rank)
        self.num_M, self.rank = num_M, rank

    def forward(self, x: torch.Tensor, xma: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` twice -> coefficients ``(B, num_M, rank)``."""
        h = self.conv3(self.conv2(self.conv1(torch.cat((x, xma), dim=1))))
        h = F.avg_pool2d(h, h.shape[-2:]).flatten(1)
        w = F.relu(self.f1(h)).reshape(-1, self.num_M, self.rank)
        return w / (w.norm(dim=2, keepdim=True) + 1e-6)


class _AdaptiveOrientationSharedFilter(nn.Module):
    """OSCNet+'s per-image rotation-shared filter (official ``Fconv_wnet.Fconv_PCA``): buffer ``Basis``,
    ``wnet``, scalar bias ``c``; the filter is divided by ``cdiv``."""

    def __init__(self, num_M: int, num_rot: int, sizeP: int, inP: int, cdiv: float = 1.0):
        super().__init__()
        basis, _ = fourier_rotation_basis(sizeP, num_rot, inP)
        self.register_buffer("Basis", basis)
        self.wnet = _WeightNet(num_M, basis.shape[3])
        self.c = nn.Parameter(torch.zeros(1, 1, 1, 1))
        self.padding, self.cdiv = sizeP // 2, cdiv

    def forward(self, m: torch.Tensor, x: torch.Tensor, xma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature maps ``(B, C, H, W)``, current image and input ``(B, 1, H, W)`` -> artifact ``(B, 1, H, W)`` and
        the per-image filters ``(B, C, sizeP, sizeP)``."""
        c = _filters_from_coefficients(self.Basis, self.wnet(x, xma))
        return rotation_conv(m, c / self.cdiv, self.padding) + self.c, c


def rotation_conv(m: torch.Tensor, c: torch.Tensor, padding: int) -> torch.Tensor:
    """The artifact layer ``A = C (*) M``: feature maps ``(B, C, H, W)`` convolved with rotation-shared filters
    ``c``, ``(1, C, s, s)`` (OSCNet: one filter) or ``(B, C, s, s)`` (OSCNet+: one per image), summed over the
    channels -> ``(B, 1, H, W)``; the official ``F.conv2d(M, C)`` (per image for OSCNet+).

    Computed as one depthwise convolution over the ``B * C`` maps and a channel sum: oneDNN's convolutions with a
    single output channel (and grouped by image) are slow on the CPU. On one thread, ``B = 4`` images of
    256 x 256 and ``C = 32``: 0.27 s -> 0.09 s for OSCNet+'s per-image filters, 0.21 -> 0.08 s for OSCNet's;
    equal to float rounding (relative 1e-5).
    """
    b, ch, h, w = m.shape
    s = c.shape[-1]
    k = c.expand(b, ch, s, s).reshape(b * ch, 1, s, s)
    out = F.conv2d(m.reshape(1, b * ch, h, w), k, padding=padding, groups=b * ch)
    return out.reshape(b, ch, h, w).sum(1, keepdim=True)


def rotation_conv_transpose(a: torch.Tensor, c: torch.Tensor, padding: int) -> torch.Tensor:
    """Adjoint of ``rotation_conv``: ``(B, 1, H, W)`` -> ``(B, C, H, W)``; the official
    ``F.conv_transpose2d(A, C)`` (per image for OSCNet+).

    Computed as a convolution of each image with its spatially flipped filters (one group per image, ``C``
    outputs each): oneDNN's transposed convolutions of one input channel, grouped by image, took 0.79-1.07 s for
    ``B = 4`` images of 256 x 256 and ``C = 32`` on one CPU thread, this 0.05 s (0.23 s for OSCNet's shared
    filter); equal to float rounding.
    """
    b, _, h, w = a.shape
    ch, s = c.shape[1], c.shape[-1]
    k = c.expand(b, ch, s, s).flip(-1, -2).reshape(b * ch, 1, s, s)
    return F.conv2d(a.reshape(1, b, h, w), k, padding=s - 1 - padding, groups=b).reshape(b, ch, h, w)


def official_rotation_conv(m: torch.Tensor, c: torch.Tensor, padding: int) -> torch.Tensor:
    """``rotation_conv`` as the official OSCNet / OSCNet+ code computes it, the reference that the tests and
    ``perf/oscnet_speed.py`` compare with: ``F.conv2d(M, C)`` with one filter ``(1, C, s, s)``, grouped by image
    for per-image filters ``(B, C, s, s)``; ``(B, C, H, W)`` -> ``(B, 1, H, W)``."""
    b, ch, h, w = m.shape
    if c.shape[0] == 1:
        return F.conv2d(m, c, padding=padding)
    return F.conv2d(m.reshape(1, b * ch, h, w), c, padding=padding, groups=b).reshape(b, 1, h, w)


def official_rotation_conv_transpose(a: torch.Tensor, c: torch.Tensor, padding: int) -> torch.Tensor:
    """``rotation_conv_transpose`` as the official code computes it (the reference of the tests and the perf
    script): ``F.conv_transpose2d(A, C)``, grouped by image for per-image filters; ``(B, 1, H, W)`` ->
    ``(B, C, H, W)``."""
    b, _, h, w = a.shape
    if c.shape[0] == 1:
        return F.conv_transpose2d(a, c, padding=padding)
    return F.conv_transpose2d(a.reshape(1, b, h, w), c, padding=padding, groups=b).reshape(b, -1, h, w)


def _resblocks(channels: int, count: int) -> nn.Sequential:
    return nn.Sequential(*[nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1), nn.BatchNorm2d(channels), nn.ReLU(),
                                         nn.Conv2d(channels, channels, 3, 1, 1), nn.BatchNorm2d(channels))
                           for _ in range(count)])


class _ProxNetX(nn.Module):
    """Proximal net of the image (official ``Xnet``): ``T`` residual blocks on ``(X, Q)`` ``(B, 1+num_Q, H, W)``."""

    def __init__(self, num_Q: int, T: int):
        super().__init__()
        self.layer = _resblocks(num_Q + 1, T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layer:
            x = F.relu(x + block(x))
        return x


class _ProxNetM(nn.Module):
    """Proximal net of the feature maps (official ``Mnet``): ``T`` residual blocks, then soft thresholding at the
    learned ``tau`` (one per channel, initial 0.5)."""

    def __init__(self, channels: int, T: int):
        super().__init__()
        self.layer = _resblocks(channels, T)
        self.tau = nn.Parameter(torch.full((1, channels, 1, 1), 0.5))

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        for block in self.layer:
            m = F.relu(m + block(m))
        return F.relu(m - self.tau)


class OSCNetwork(nn.Module):
    """The unrolled OSCNet (``plus=False``) or OSCNet+ (``plus=True``) network.

    ``forward(xma, xli, mask)``: metal-affected and LI images ``(B, 1, H, W)`` in OSCNet units (``hu_to_oscnet``)
    and the non-metal mask ``(B, 1, H, W)`` (1 outside metal) -> ``(X0, list_x, list_a)``: the initial image, the
    ``S + 1`` stage images (the last after ``proxNet_X_last_layer``) and the ``S`` artifact layers, all
    ``(B, 1, H, W)``.
    """

    def __init__(self, plus: bool = False, S: int = 10, T: int = 3, num_M: int = 4, num_rot: int = 8,
                 num_Q: int = 32, sizeP: int = 9, inP: int = 5, etaM: float = 1.0, etaX: float = 5.0,
                 cdiv: float = 1.0):
        super().__init__()
        self.plus, self.S, self.padding = plus, S, sizeP // 2
        self.etaM_S = nn.Parameter(torch.full((S - 1, 1), float(etaM)))
        self.etaX_S = nn.Parameter(torch.full((S, 1), float(etaX)))
        if plus:
            self.fcnn = _AdaptiveOrientationSharedFilter(num_M, num_rot, sizeP, inP, cdiv)
            basis = self.fcnn.Basis
            c0 = _filters_from_coefficients(basis, _initial_coefficients(num_M, fourier_rotation_basis(
                sizeP, num_rot, inP)[1])[:, 0, 0])[None]
        else:
            self.fcnn = _OrientationSharedFilter(num_M, num_rot, sizeP, inP)
            c0 = self.fcnn.filter().detach()
        self.C0 = nn.Parameter(c0.clone())
        self.C_q = nn.Parameter(torch.full((num_Q, 1, 3, 3), 1.0 / 9))  # 3 x 3 mean filter initialises Q
        self.proxNet_X_0 = _ProxNetX(num_Q, T)
        self.proxNet_X_S = nn.Sequential(*[_ProxNetX(num_Q, T) for _ in range(S)])
        self.proxNet_M_S = nn.Sequential(*[_ProxNetM(num_M * num_rot, T) for _ in range(S)])
        self.proxNet_X_last_layer = _ProxNetX(num_Q, T)
        self.tau = nn.Parameter(torch.ones(1))

    def _artifact(self, m, x, xma):
        return self.fcnn(m, x, xma) if self.plus else self.fcnn(m)

    def forward(self, xma: torch.Tensor, xli: torch.Tensor, mask: torch.Tensor):
        pad = self.padding
        xq = self.proxNet_X_0(torch.cat((xli, F.conv2d(xli, self.C_q, padding=1)), dim=1))
        x0, q = xq[:, :1], xq[:, 1:]
        a_hat = F.relu(mask * (xma - x0) - self.tau)
        m = self.proxNet_M_S[0](rotation_conv_transpose(a_hat, self.C0 / 10, pad))
        a, c = self._artifact(m, x0, xma)
        x_mid = (1 - self.etaX_S[0] * mask / 10) * x0 + self.etaX_S[0] * mask / 10 * (xma - a)
        xq = self.proxNet_X_S[0](torch.cat((x_mid, q), dim=1))
        x, q = xq[:, :1], xq[:, 1:]
        list_x, list_a = [x], [a]
        for i in range(self.S - 1):
            residual = mask * a - mask * (xma - x)
            cs = c / self.fcnn.cdiv if self.plus else c
            m = self.proxNet_M_S[i + 1](m - self.etaM_S[i] / 10 * rotation_conv_transpose(residual, cs, pad))
            a = rotation_conv(m, cs, pad)
            list_a.append(a)
            x_mid = (1 - self.etaX_S[i + 1] * mask / 10) * x + self.etaX_S[i + 1] * mask / 10 * (xma - a)
            xq = self.proxNet_X_S[i + 1](torch.cat((x_mid, q), dim=1))
            x, q = xq[:, :1], xq[:, 1:]
            if self.plus:  # OSCNet+ refreshes the filter (and the artifact used next) from the new image
                a, c = self.fcnn(m, x, xma)
            list_x.append(x)
        list_x.append(self.proxNet_X_last_layer(xq)[:, :1])
        return x0, list_x, list_a

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """This network's state in the layout of the official ``net_latest.pt`` (OSCNet adds the filter and bias
        its ``eval()`` caches)."""
        state = dict(self.state_dict())
        if not self.plus:
            state["fcnn.filter"] = self.fcnn.filter().detach().clone()
            state["fcnn.bias"] = self.fcnn.c.detach().clone()
        return state

    def load_official_state_dict(self, state: dict, where: str = "state dict") -> None:
        """Load an official ``net_latest.pt`` state dict, key for key.

        Raises:
            ValueError: keys or shapes differ; OSCNet's cached filter disagrees with its coefficients.
        """
        state = dict(state)
        cached = (state.pop("fcnn.filter", None), state.pop("fcnn.bias", None)) if not self.plus else (None, None)
        load_state_dict_exactly(self, state, where)
        if cached[0] is not None:
            derived = self.fcnn.filter().detach()
            if not torch.allclose(cached[0].to(derived), derived, rtol=1e-4, atol=1e-6):
                raise ValueError(f"{where}: the cached fcnn.filter differs from the filter of fcnn.weights "
                                 f"(max |diff| {(cached[0] - derived).abs().max().item():.3g})")


def oscnet_loss(x0: torch.Tensor, list_x: list[torch.Tensor], list_a: list[torch.Tensor], xma: torch.Tensor,
                gt: torch.Tensor, mask: torch.Tensor, l1_weight: float = 5e-4) -> torch.Tensor:
    """The official training loss (``train.py``): MSE + ``l1_weight`` x summed L1 on the image and the artifact
    ``mask * (Xma - GT)``, final stage weight 1, the ``S`` earlier stage images and ``X0`` weight 0.1, all inside
    the non-metal ``mask``."""
    x_gt, a_gt = mask * gt, mask * (xma - gt)

    def image_terms(x):
        return F.mse_loss(x * mask, x_gt) + l1_weight * (x * mask - x_gt).abs().sum()

    def artifact_term(a):
        return l1_weight * (mask * a - a_gt).abs().sum()

    intermediate = sum(image_terms(x) + artifact_term(a) for x, a in zip(list_x[:-1], list_a, strict=True))
    return image_terms(list_x[-1]) + artifact_term(list_a[-1]) + 0.1 * (intermediate + image_terms(x0))


class _OSCNetMethod(MARMethod):
    """Shared Lightning wrapper of OSCNet / OSCNet+ (see the module docstring).

    Args:
        S, T, num_M, num_rot, num_Q, sizeP, inP, etaM, etaX, cdiv: network (official defaults).
        prior: ``"sinogram"`` (the dataset's LI image and metal mask) or ``"image"`` (HU > 2000 dilated by a
            7 x 7 ellipse, TELEA-inpainted LI; Emirdagi et al. Sec. 3.2).
        patch_size: training crop (official 64); None trains on whole slices.
        lr, milestones, gamma: Adam (betas (0.5, 0.999)) and MultiStepLR by epoch (official 2e-4,
            [30, 60, 90, 120, 150, 180], 0.5).
        checkpoint, checkpoint_sha256: an official ``net_latest.pt`` to start from, and its digest.
    Raises:
        ValueError: unknown ``prior``.
    """

    plus = False

    def __init__(self, S: int = 10, T: int = 3, num_M: int = 4, num_rot: int = 8, num_Q: int = 32, sizeP: int = 9,
                 inP: int = 5, etaM: float = 1.0, etaX: float = 5.0, cdiv: float = 1.0, prior: str = "sinogram",
                 patch_size: int | None = 64, lr: float = 2e-4,
                 milestones: tuple[int, ...] = (30, 60, 90, 120, 150, 180), gamma: float = 0.5,
                 checkpoint: str | None = None, checkpoint_sha256: str | None = None):
        super().__init__()
        if prior not in ("sinogram", "image"):
            raise ValueError(f"prior must be 'sinogram' or 'image', found {prior!r}")
        self.save_hyperparameters()
        if prior == "image":  # the image-domain prior needs only the metal-affected image and thresholds its own mask
            self.card = replace(type(self).card, inputs=("ma_image",), puts_metal_back=False)
        self.net = OSCNetwork(self.plus, S, T, num_M, num_rot, num_Q, sizeP, inP, etaM, etaX, cdiv)
        # channels-last weights make oneDNN's convolutions run on channels-last features: a 256 x 256 slice took
        # 1.6 (OSCNet) and 1.3 (OSCNet+) times less time at S=3, T=2 on one CPU thread, the same output to float
        # rounding; loading a state dict copies into these weights and keeps their layout
        self.net.to(memory_format=torch.channels_last)
        if checkpoint:
            self.load_official_checkpoint(checkpoint, checkpoint_sha256)

    def load_official_checkpoint(self, path: str | Path, sha256: str | None = None) -> None:
        """Load an official ``net_latest.pt`` (a plain state dict).

        Raises:
            FileNotFoundError, ValueError: see ``marbench.checkpoints`` and ``OSCNetwork.load_official_state_dict``.
        """
        folder = "model_oscplus" if self.plus else "model_osc"
        state = load_checkpoint_file(path, sha256, f"pretrained_model/{folder}/net_latest.pt of "
                                                   "github.com/hongwang01/OSCNet")
        self.net.load_official_state_dict(state, str(path))

    def _inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(Xma, XLI, non-metal mask)`` in OSCNet units, and the metal mask used."""
        ma = batch["ma_image"]
        if self.hparams.prior == "image":
            metal = threshold_metal_mask(ma)
            li = telea_inpainting(ma, metal)
        else:
            metal, li = batch["metal_mask"], batch["li_image"]
        return hu_to_oscnet(ma), hu_to_oscnet(li), (~metal).to(ma.dtype)

    def forward(self, ma_hu: torch.Tensor, li_hu: torch.Tensor, metal_mask: torch.Tensor) -> torch.Tensor:
        """Restored images in HU ``(B, 1, H, W)`` (final stage, not yet with metal put back)."""
        keep = (~metal_mask).to(ma_hu.dtype)
        return oscnet_to_hu(self.net(hu_to_oscnet(ma_hu), hu_to_oscnet(li_hu), keep)[1][-1])

    def _patches(self, *images: torch.Tensor) -> list[torch.Tensor]:
        size = self.hparams.patch_size
        h, w = images[0].shape[-2:]
        if size is None or size >= min(h, w):
            return list(images)
        top = int(torch.randint(0, h - size + 1, (1,)))
        left = int(torch.randint(0, w - size + 1, (1,)))
        flips = [d for d, on in ((-1, torch.rand(()) < 0.5), (-2, torch.rand(()) < 0.5)) if on]
        crops = [im[..., top:top + size, left:left + size] for im in images]
        return [c.flip(flips) if flips else c for c in crops]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        xma, xli, keep = self._inputs(batch)
        xma, xli, keep, gt = self._patches(xma, xli, keep, hu_to_oscnet(batch["gt_image"]))
        loss = oscnet_loss(*self.net(xma, xli, keep), xma, gt, keep)
        self.log("train_loss", loss, prog_bar=True, batch_size=xma.shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        xma, xli, keep = self._inputs(batch)
        x = self.net(xma, xli, keep)[1][-1]
        err = ((x - hu_to_oscnet(batch["gt_image"])) * keep).abs().sum() / keep.sum().clamp(min=1)
        self.log("val_l1", err, prog_bar=True, batch_size=xma.shape[0])

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, betas=(0.5, 0.999))
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(self.hparams.milestones),
                                                     gamma=self.hparams.gamma)
        return {"optimizer": opt, "lr_scheduler": sched}

    @classmethod
    def contract_instance(cls) -> "_OSCNetMethod":
        return cls(S=2, T=1, num_Q=8)

    def restore(self, batch: Batch, physics: CTPhysics) -> torch.Tensor:
        xma, xli, keep = self._inputs(batch)
        out = oscnet_to_hu(self.net(xma, xli, keep)[1][-1])
        return torch.where(keep.bool(), out, batch["ma_image"])


class OSCNet(_OSCNetMethod):
    __doc__ = _OSCNetMethod.__doc__
    card = MethodCard(
        name="oscnet", paper="Wang, Xie, Zeng, Meng & Zheng, 'Orientation-Shared Convolution Representation for CT "
                             "Metal Artifact Learning', MICCAI 2022; github.com/hongwang01/OSCNet",
        inputs=("ma_image", "li_image", "metal_mask"), training_inputs=("gt_image",), trainable=True,
        metal="pixels of the metal mask used (dataset or threshold) take the metal-affected image's values",
        departures=("C0 initialised from the rotation-shared filter of random coefficients (official: "
                    "init_kernel.mat)", "basis orthonormalised by eigendecomposition (same span)",
                    "patches cropped inside the method"),
    )


class OSCNetPlus(_OSCNetMethod):
    __doc__ = _OSCNetMethod.__doc__
    plus = True
    card = MethodCard(
        name="oscnet_plus", paper="Wang, Xie, Zeng, Meng & Zheng, 'Adaptive Convolutional Dictionary Network for "
                                  "CT Metal Artifact Reduction' (OSCNet+), IEEE TMI 2024; github.com/hongwang01/OSCNet",
        inputs=OSCNet.card.inputs, training_inputs=OSCNet.card.training_inputs, trainable=True,
        metal=OSCNet.card.metal, departures=OSCNet.card.departures,
    )
