"""The artifact-reducing VAE (ARVAE) of Han et al., "Reducing CT Metal Artifacts by Learning Latent Space Alignment
with Gemstone Spectral Imaging Data", Sec. 3.2 and Fig. 3 (a).

Equations, in the order the pipeline uses them:

* Eq. 3 ``z_n[i] = E(S_n[i])``, ``z_g[j] = E(S_g[j])``: ONE encoder ``E`` for the ordinary (``n``) and the GSI
  (``g``) sequence.
* Eq. 6 ``V[i] = {S[i-k'], ..., S[i], ..., S[i+k']}`` and Eq. 7 ``z[i] = E(V[i])``: the encoder reads a volume of
  adjacent slices and returns the latent of the centre slice only. Here the stack is ``(B, k, H, W)`` with ``k``
  the number of slices (``k = 2 k' + 1``, odd; the paper's ``k'`` is "up to k adjacent slices on each side"). The
  encoder is diffusers' ``Encoder`` with ``in_channels=k`` followed by the 1x1 ``quant_conv`` as in ``AutoencoderKL``,
  giving mean and log-variance of a ``DiagonalGaussianDistribution`` (``sample``/``mode``).
* Volume aggregation augmentation (Sec. 3.2, no equation): the centre slice ``S[i]`` of ``V[i]`` is altered by
  random masking, blurring or down-sampling (``volume_aggregation_augment``), the neighbours are not; the
  reconstruction loss is taken on the UNALTERED ``S[i]``, which forces ``E`` to take what the centre lacks from
  the neighbours.
* Asymmetric decoding (Sec. 3.2): two decoders from diffusers' ``Decoder``, ``D_n`` for ordinary CT and ``D_g``
  for GSI CT; only ``D_g`` is used at inference, Eq. 5 ``S_p[i] = D_g(z_bar_n[i])``.
* Training data of ``D_g`` (Sec. 3.2): 25 % GSI slices and 75 % clean slices of patients without implants
  (``decoder_batch_mix``); ``D_n`` is trained on ordinary slices, ``E`` on both.

Loss (``vae_loss``): the paper gives none for the VAE; we use the KL-regularised VAE objective of the diffusers /
latent-diffusion ``AutoencoderKL`` it builds on, reconstruction + ``kl_weight`` x KL with ``kl_weight = 1e-6``
(LDM's value), the reconstruction as the pixel MSE (the paper's choice for every other image loss, Eq. 13) and
the KL per image pixel so that the two terms stand in LDM's ratio (LDM: both summed per sample).
Optimiser (Sec. 5.1): AdamW, learning rate 1e-5, 10 epochs.

Intensity scale (``hu_to_unit``/``unit_to_hu``): HU clipped to ``HU_RANGE`` = [-1024, 3071] HU (the 12-bit range
of clinical scanners) mapped linearly to [-1, 1]. The paper states only its display window (level 500, width
2000, i.e. [-500, 1500] HU, ``DISPLAY_WINDOW``) and that outputs are "reverted to their original data range" for
display, so the models work on a normalisation of the full data range, not on the display window; a display
window would also clip metal (> 2500 HU) and cortical bone together, while the paper segments the implant from
the outputs (Table 2).

Departures and readings:

* ``k`` counts all slices of the stack (the dataset's ``ma_stack``/``gt_stack`` convention), the paper's ``k`` the
  slices on each side. Default ``k = 3`` (one neighbour each side): the paper gives no value.
* Widths: the paper says only that it uses diffusers; the defaults are Stable Diffusion's ``AutoencoderKL``
  configuration (``block_out_channels = (128, 256, 512, 512)``, ``layers_per_block = 2``, ``latent_channels = 4``,
  32 GroupNorm groups, down-sampling by 8), with one output channel. Tests use tiny widths.
* Each decoder has its own 1x1 ``post_quant_conv`` (``AutoencoderKL`` has one in front of its single decoder).
* Decoder initialisation (not given): ``decoder_init="independent"`` (default) draws ``D_g`` and ``D_n`` from
  independent random initialisations; ``"copy"`` starts ``D_g`` as a copy of ``D_n``. ``shared_decoder=True``
  uses one decoder for both (the "2D VAE with a single decoder" of the Table 1 baseline, with ``k = 1``).
* Augmentation: per slice of the batch, with probability ``p`` (default 0.5, so that the encoder also sees
  unaltered centres as at inference), ONE of masking (1-4 random squares of side ``H/8``-``H/4`` set to ``fill``,
  default -1 = the bottom of the HU range, air), Gaussian blurring (sigma uniform in [1, 3] px, reflected
  borders) or down-sampling (average-pooling by 2 or 4, bilinear up-sampling back); the paper names these three
  kinds ("random masking, blurring, and other information down-sampling techniques") but no parameters.
* ``decoder_batch_mix`` realises the 25 / 75 % rule per batch (exactly, up to rounding), not over the epoch.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import Decoder, DiagonalGaussianDistribution, Encoder

__all__ = [
    "ARVAE",
    "AUGMENTATIONS",
    "DISPLAY_WINDOW",
    "GSI_FRACTION",
    "HU_RANGE",
    "KL_WEIGHT",
    "centre_slice",
    "decoder_batch_mix",
    "hu_to_unit",
    "unit_to_hu",
    "vae_loss",
    "volume_aggregation_augment",
]

HU_RANGE = (-1024.0, 3071.0)
"""HU mapped to [-1, 1] (values outside are clipped): the 12-bit range of clinical scanners (paper: not stated)."""
DISPLAY_WINDOW = (-500.0, 1500.0)
"""The paper's display window (level 500, width 2000 HU, Sec. 5.4), for figures only."""
GSI_FRACTION = 0.25
"""Share of GSI slices in the training data of ``D_g`` (Sec. 3.2); the rest are clean slices."""
KL_WEIGHT = 1e-6
"""KL weight of ``vae_loss`` (LDM's ``AutoencoderKL`` value; the paper gives none)."""
AUGMENTATIONS = ("mask", "blur", "downsample")
"""The volume aggregation augmentations of Sec. 3.2, applied to the centre slice only."""


def hu_to_unit(hu: torch.Tensor, hu_range: tuple[float, float] = HU_RANGE) -> torch.Tensor:
    """HU -> [-1, 1]: clip to ``hu_range`` and map it linearly (``hu_range[0]`` -> -1, ``hu_range[1]`` -> 1).

    Any shape; returns the same shape and dtype. Raises ``ValueError`` if ``hu_range`` is not increasing.
    """
    lo, hi = _check_range(hu_range)
    return (hu.clamp(lo, hi) - lo) / (hi - lo) * 2.0 - 1.0


def unit_to_hu(x: torch.Tensor, hu_range: tuple[float, float] = HU_RANGE) -> torch.Tensor:
    """[-1, 1] -> HU, the inverse of ``hu_to_unit`` on ``hu_range`` (no clipping: decoder outputs may overshoot)."""
    lo, hi = _check_range(hu_range)
    return (x + 1.0) / 2.0 * (hi - lo) + lo


def _check_range(hu_range: tuple[float, float]) -> tuple[float, float]:
    lo, hi = float(hu_range[0]), float(hu_range[1])
    if not hi > lo:
        raise ValueError(f"hu_range must be increasing (low, high); found {hu_range}")
    return lo, hi


def _check_stack(stack: torch.Tensor, k: int | None = None) -> int:
    """Validate a ``(B, k, H, W)`` stack (odd ``k``, or the given one); return its ``k``."""
    if stack.ndim != 4:
        raise ValueError(f"expected a slice stack of shape (B, k, H, W); found shape {tuple(stack.shape)}")
    found = stack.shape[1]
    if k is not None and found != k:
        raise ValueError(f"expected k = {k} slices in the stack (B, {k}, H, W); found k = {found} "
                         f"(shape {tuple(stack.shape)})")
    if found % 2 != 1:
        raise ValueError(f"expected an odd number of slices k (a centre slice and its neighbours); found k = {found}")
    return found


def centre_slice(stack: torch.Tensor) -> torch.Tensor:
    """The centre slice ``S[i]`` of ``V[i]`` (Eq. 6): ``(B, k, H, W)`` -> ``(B, 1, H, W)`` (a view).

    Raises ``ValueError`` for a non-4-D stack or an even ``k``.
    """
    k = _check_stack(stack)
    return stack[:, k // 2: k // 2 + 1]


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(1, 1, H, W)`` with reflected borders (radius ``ceil(3 sigma)``, capped)."""
    h, w = img.shape[-2:]
    radius = max(1, min(math.ceil(3.0 * sigma), h - 1, w - 1))
    x = torch.arange(-radius, radius + 1, dtype=img.dtype, device=img.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = F.conv2d(F.pad(img, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return lo + (hi - lo) * torch.rand((), generator=generator).item()


def _randint(lo: int, hi: int, generator: torch.Generator | None) -> int:
    """Uniform integer in ``[lo, hi]`` (both included)."""
    return int(torch.randint(lo, hi + 1, (), generator=generator).item())


def volume_aggregation_augment(stack: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5,
                               augmentations: Sequence[str] = AUGMENTATIONS, fill: float = -1.0) -> torch.Tensor:
    """The volume aggregation data augmentation of Sec. 3.2 on the centre slice of ``V[i]`` (Eq. 6).

    Per slice stack of the batch, with probability ``p``, one augmentation drawn uniformly from ``augmentations``
    alters the centre slice: ``"mask"`` sets 1-4 random squares (side ``H/8`` to ``H/4``) to ``fill``; ``"blur"``
    applies a Gaussian blur with sigma uniform in [1, 3] px; ``"downsample"`` average-pools by 2 or 4 and
    up-samples back bilinearly. The neighbour slices are returned unchanged (bit for bit). The reconstruction
    target stays the unaltered centre slice of the input (``centre_slice(stack)``).

    Args:
        stack: ``(B, k, H, W)`` float, ``k`` odd, intensities in [-1, 1] (``hu_to_unit``).
        generator: CPU ``torch.Generator`` for every random draw (``None``: the global generator); the same seed
            gives the same output.
        p: probability of altering a stack's centre slice, in [0, 1].
        augmentations: a non-empty subset of ``AUGMENTATIONS``.
        fill: value of masked pixels (-1: the bottom of ``HU_RANGE``).
    Returns:
        A new ``(B, k, H, W)`` tensor; the input is not modified.
    Raises:
        ValueError: a non-4-D stack, an even ``k``, ``p`` outside [0, 1], an unknown or empty ``augmentations``.
    """
    k = _check_stack(stack)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"expected p in [0, 1]; found {p}")
    augmentations = tuple(augmentations)
    unknown = [a for a in augmentations if a not in AUGMENTATIONS]
    if not augmentations or unknown:
        raise ValueError(f"expected a non-empty subset of {AUGMENTATIONS}; found {augmentations}")
    out = stack.clone()
    c = k // 2
    h, w = stack.shape[-2:]
    for b in range(stack.shape[0]):
        if torch.rand((), generator=generator).item() >= p:
            continue
        kind = augmentations[_randint(0, len(augmentations) - 1, generator)]
        img = stack[b: b + 1, c: c + 1]
        if kind == "mask":
            img = img.clone()
            for _ in range(_randint(1, 4, generator)):
                side = _randint(max(1, h // 8), max(1, h // 4), generator)
                r = _randint(0, max(0, h - side), generator)
                q = _randint(0, max(0, w - side), generator)
                img[..., r: r + side, q: q + side] = fill
        elif kind == "blur":
            img = _gaussian_blur(img, _uniform(1.0, 3.0, generator))
        else:
            factor = (2, 4)[_randint(0, 1, generator)]
            factor = max(1, min(factor, h, w))
            img = F.interpolate(F.avg_pool2d(img, factor), size=(h, w), mode="bilinear", align_corners=False)
        out[b, c] = img[0, 0]
    return out


def decoder_batch_mix(gsi: torch.Tensor, clean: torch.Tensor, fraction: float = GSI_FRACTION,
                      generator: torch.Generator | None = None, batch_size: int | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch for ``D_g``: ``fraction`` GSI items, the rest clean items (Sec. 3.2: 25 % / 75 %).

    ``round(fraction * batch_size)`` items are drawn without replacement from ``gsi``, the others from ``clean``,
    and the batch is shuffled; all draws use ``generator``.

    Args:
        gsi: ``(Ng, ...)`` GSI slices or stacks of implant patients (e.g. ``(Ng, k, H, W)`` in [-1, 1]).
        clean: ``(Nc, ...)`` clean slices or stacks of patients without implants, same trailing shape.
        fraction: share of GSI items, in [0, 1].
        generator: CPU ``torch.Generator`` (``None``: the global one).
        batch_size: size of the mixed batch (default ``Ng``: the GSI batch with 75 % of it replaced).
    Returns:
        ``(batch, is_gsi)``: ``(batch_size, ...)`` and a bool ``(batch_size,)`` marking the GSI items.
    Raises:
        ValueError: different trailing shapes, ``fraction`` outside [0, 1], or too few items in either input.
    """
    if gsi.shape[1:] != clean.shape[1:]:
        raise ValueError(f"gsi and clean must share their item shape; found {tuple(gsi.shape[1:])} and "
                         f"{tuple(clean.shape[1:])}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"expected fraction in [0, 1]; found {fraction}")
    n = gsi.shape[0] if batch_size is None else int(batch_size)
    n_gsi = int(round(fraction * n))
    n_clean = n - n_gsi
    if n_gsi > gsi.shape[0] or n_clean > clean.shape[0]:
        raise ValueError(f"a batch of {n} needs {n_gsi} GSI and {n_clean} clean items; found {gsi.shape[0]} and "
                         f"{clean.shape[0]}")
    pick_g = torch.randperm(gsi.shape[0], generator=generator)[:n_gsi].to(gsi.device)
    pick_c = torch.randperm(clean.shape[0], generator=generator)[:n_clean].to(clean.device)
    batch = torch.cat([gsi[pick_g], clean[pick_c].to(gsi.device, gsi.dtype)])
    is_gsi = torch.cat([torch.ones(n_gsi, dtype=torch.bool), torch.zeros(n_clean, dtype=torch.bool)])
    order = torch.randperm(n, generator=generator)
    return batch[order.to(batch.device)], is_gsi[order].to(batch.device)


def vae_loss(recon: torch.Tensor, target: torch.Tensor, posterior: DiagonalGaussianDistribution,
             kl_weight: float = KL_WEIGHT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VAE objective: ``MSE(recon, target) + kl_weight * KL(q(z|V) || N(0, I)) / (H W)``.

    Args:
        recon: ``(B, 1, H, W)`` decoder output, [-1, 1] scale.
        target: ``(B, 1, H, W)`` the UNALTERED centre slice (``centre_slice`` of the un-augmented stack).
        posterior: the encoder's ``DiagonalGaussianDistribution`` for the same batch.
        kl_weight: weight of the KL term (default ``KL_WEIGHT`` = 1e-6).
    Returns:
        ``(total, reconstruction, kl)`` scalars; ``kl`` is the per-sample KL summed over the latent, averaged over
        the batch and divided by ``H * W`` (so ``total`` is LDM's per-sample sum ratio on a per-pixel scale).
    Raises:
        ValueError: ``recon`` and ``target`` differ in shape or are not 4-D.
    """
    if recon.shape != target.shape or recon.ndim != 4:
        raise ValueError(f"expected recon and target of the same shape (B, 1, H, W); found {tuple(recon.shape)} "
                         f"and {tuple(target.shape)}")
    rec = F.mse_loss(recon, target)
    kl = posterior.kl().mean() / (target.shape[-2] * target.shape[-1])
    return rec + kl_weight * kl, rec, kl


class _LatentDecoder(nn.Module):
    """``post_quant_conv`` (1x1) + diffusers ``Decoder``: ``(B, latent_channels, h, w)`` -> ``(B, 1, H, W)``."""

    def __init__(self, latent_channels: int, block_out_channels: tuple[int, ...], layers_per_block: int,
                 norm_num_groups: int, mid_block_add_attention: bool):
        super().__init__()
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.decoder = Decoder(in_channels=latent_channels, out_channels=1,
                               up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
                               block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                               norm_num_groups=norm_num_groups, mid_block_add_attention=mid_block_add_attention)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


class ARVAE(nn.Module):
    """Artifact-reducing VAE (Sec. 3.2): one multi-slice encoder ``E`` (Eq. 6-7), decoders ``D_n`` and ``D_g``.

    Args:
        k: slices per input stack (odd; ``2 k' + 1`` for the paper's ``k'`` neighbours per side). Default 3.
        latent_channels: latent channels (default 4).
        block_out_channels: encoder/decoder widths per level; the latent grid is ``H / 2**(len - 1)``
            (default ``(128, 256, 512, 512)``, down-sampling by 8).
        layers_per_block: ResNet layers per encoder level (decoder: one more, as diffusers does). Default 2.
        norm_num_groups: GroupNorm groups (must divide every width). Default 32.
        mid_block_add_attention: attention in the encoder/decoder mid blocks (default ``True``).
        decoder_init: ``"independent"`` (default) or ``"copy"`` (``D_g`` starts as a copy of ``D_n``).
        shared_decoder: one decoder for both domains (the Table 1 baseline's single-decoder VAE).
    Raises:
        ValueError: even or non-positive ``k``, unknown ``decoder_init``, widths not divisible by the groups.

    ``encode(stack)`` -> ``DiagonalGaussianDistribution`` of the centre latent, ``decode(z, domain)`` and
    ``forward(stack, domain)`` -> ``(recon, posterior)``.
    """

    DOMAINS = ("ordinary", "gsi")

    def __init__(self, k: int = 3, latent_channels: int = 4,
                 block_out_channels: Sequence[int] = (128, 256, 512, 512), layers_per_block: int = 2,
                 norm_num_groups: int = 32, mid_block_add_attention: bool = True,
                 decoder_init: str = "independent", shared_decoder: bool = False):
        super().__init__()
        if k < 1 or k % 2 != 1:
            raise ValueError(f"expected an odd number of slices k >= 1; found k = {k}")
        if decoder_init not in ("independent", "copy"):
            raise ValueError(f"expected decoder_init 'independent' or 'copy'; found {decoder_init!r}")
        block_out_channels = tuple(int(c) for c in block_out_channels)
        bad = [c for c in block_out_channels if c % norm_num_groups]
        if bad:
            raise ValueError(f"expected widths divisible by norm_num_groups = {norm_num_groups}; found {bad}")
        self.k = k
        self.latent_channels = latent_channels
        self.downsampling = 2 ** (len(block_out_channels) - 1)
        self.encoder = Encoder(in_channels=k, out_channels=latent_channels,
                               down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
                               block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                               norm_num_groups=norm_num_groups, double_z=True,
                               mid_block_add_attention=mid_block_add_attention)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        args = (latent_channels, block_out_channels, layers_per_block, norm_num_groups, mid_block_add_attention)
        self.decoder_n = _LatentDecoder(*args)
        if shared_decoder:
            self.decoder_g = self.decoder_n
        else:
            self.decoder_g = _LatentDecoder(*args)
            if decoder_init == "copy":
                self.decoder_g.load_state_dict(self.decoder_n.state_dict())

    def encode(self, stack: torch.Tensor) -> DiagonalGaussianDistribution:
        """``E(V[i])`` (Eq. 7): ``(B, k, H, W)`` in [-1, 1] -> posterior over the centre latent
        ``(B, latent_channels, H / d, W / d)`` (``d = self.downsampling``; ``.mode()``, ``.sample(generator)``).

        Raises ``ValueError`` naming expected and found ``k`` or shape, or ``H, W`` not divisible by ``d``.
        """
        _check_stack(stack, self.k)
        h, w = stack.shape[-2:]
        if h % self.downsampling or w % self.downsampling:
            raise ValueError(f"expected H and W divisible by {self.downsampling}; found {h} x {w}")
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(stack)))

    def decoder(self, domain: str) -> nn.Module:
        """``D_g`` for ``domain="gsi"``, ``D_n`` for ``"ordinary"``; ``ValueError`` otherwise."""
        if domain == "gsi":
            return self.decoder_g
        if domain == "ordinary":
            return self.decoder_n
        raise ValueError(f"expected domain in {self.DOMAINS}; found {domain!r}")

    def decode(self, z: torch.Tensor, domain: str = "gsi") -> torch.Tensor:
        """``D_g(z)`` (Eq. 5) or ``D_n(z)``: ``(B, latent_channels, h, w)`` -> ``(B, 1, d h, d w)``, [-1, 1] scale.

        Raises ``ValueError`` naming expected and found shape, or for an unknown ``domain``.
        """
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected a latent of shape (B, {self.latent_channels}, h, w); found "
                             f"{tuple(z.shape)}")
        return self.decoder(domain)(z)

    def forward(self, stack: torch.Tensor, domain: str = "gsi", sample: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Encode a stack and decode its centre slice with ``D_g`` or ``D_n``: ``(recon (B, 1, H, W), posterior)``.

        ``sample=True`` decodes a posterior sample (training), ``False`` its mode.
        """
        posterior = self.encode(stack)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z, domain), posterior
