"""The alignment network ALU-Net of Han et al., "Reducing CT Metal Artifacts by Learning Latent Space Alignment with
Gemstone Spectral Imaging Data", Sec. 3.3 and Fig. 3 (b).

Equations:

* Eq. 4 ``z_bar_n = F(z_n)``: the network maps the ARVAE latent of the ordinary slice to an "aligned" latent of the
  same shape, meant to resemble the GSI latent ``z_g``; ``D_g`` decodes it (Eq. 5, ``vae.ARVAE.decode``).
* Eq. 8 ``M(x, y) = 1 if HU(x, y) > threshold else 0``: the metal mask prior (``metal_mask``).
* Eq. 9 ``z_bar_n = ALU-Net(z_n, I, M)``: a U-Net (encoder-decoder with skips, Ronneberger et al.) whose encoder
  and decoder levels hold Residual Blocks, which merge the metal mask ``M`` with the features (local), and
  Transformer Blocks, which fuse the implant-type prior ``I`` -- a one-hot over ``IMPLANT_TYPES`` (none, hip
  prosthesis, fracture internal fixation, spinal internal fixation; "None" when unknown) -- with the features
  (global).

Structure here: ``conv_in`` -> per level ``blocks_per_level`` x (ResidualBlock(M), TransformerBlock(I)) and a
stride-2 down-sampling between levels -> middle (ResidualBlock, TransformerBlock, ResidualBlock) -> per level, in
reverse, ``blocks_per_level`` x (skip concatenation, ResidualBlock(M), TransformerBlock(I)) and nearest
up-sampling -> GroupNorm, SiLU, ``conv_out``; the output is ``z_n + conv_out(...)``.

* ResidualBlock: ``h = conv(SiLU(GN(x)) ++ M_l)``, ``h = conv(SiLU(GN(h)) ++ M_l)``, ``x' = skip(x) + h``, with
  ``M_l`` the mask max-pooled to the level's grid (``++``: channel concatenation).
* TransformerBlock (pre-norm): spatial self-attention over the ``h w`` feature tokens, cross-attention from the
  feature tokens to ``context_tokens`` tokens made from the one-hot implant vector by a linear map, and a GELU MLP,
  each with a residual connection.

``plain=True``: the "plain alignment network" of Table 1 (Sec. 5.2: "an Alignment Network without additional input
signals or transformer-residual modules"): the same U-Net with plain conv blocks (conv, GN, SiLU, twice; no
residual connection, no mask), no transformer blocks and no implant input; ``implant`` and ``mask`` are ignored.

Departures and readings:

* The output is residual, ``z_bar_n = z_n + F'(z_n, I, M)``: the alignment changes the representation, not the
  content (Sec. 3.4). ``conv_out`` keeps PyTorch's default initialisation (zero initialisation would make the
  network the identity, blind to both priors, until its first step).
* The mask reaches every Residual Block at its level's resolution by max-pooling (any metal pixel in a latent cell
  marks the cell, so thin screws survive down-sampling); ``metal_mask`` thresholds at ``METAL_THRESHOLD_HU`` =
  2500 HU (the paper gives no value; the ArtifactGSI reader uses the same). The caller may pass the mask at image
  resolution or on the latent grid: any size that is an integer multiple of the latent grid.
* Implant fusion by cross-attention to ``context_tokens`` (default 4) learned tokens per implant type: with one
  token the cross-attention would reduce to a per-type bias. Widths (default ``(128, 256, 512)``), 2 blocks per
  level, 8 heads: the paper gives none.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from marbench.datasets.artifactgsi import IMPLANT_TYPES, METAL_THRESHOLD_HU

__all__ = ["IMPLANT_TYPES", "METAL_THRESHOLD_HU", "ALUNet", "ResidualBlock", "TransformerBlock", "implant_one_hot",
           "metal_mask", "mask_to_grid"]

# The implant prior I (Sec. 3.3 and 4, index 0 "none": no implant or unknown) and the Eq. 8 threshold are the
# dataset's: one home, the ArtifactGSI reader.


def metal_mask(hu: torch.Tensor, threshold_hu: float = METAL_THRESHOLD_HU) -> torch.Tensor:
    """Eq. 8: ``1`` where ``HU > threshold_hu``, else ``0``; ``(B, 1, H, W)`` HU -> float ``(B, 1, H, W)``."""
    return (hu > threshold_hu).to(hu.dtype if hu.is_floating_point() else torch.float32)


def mask_to_grid(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Max-pool a ``(B, 1, Hm, Wm)`` mask in [0, 1] to ``(B, 1, h, w)`` = ``size``.

    Raises ``ValueError`` naming expected and found shape unless ``mask`` is 4-D with one channel and ``Hm, Wm``
    are integer multiples of ``h, w``.
    """
    h, w = size
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[-2] % h or mask.shape[-1] % w:
        raise ValueError(f"expected a metal mask of shape (B, 1, m*{h}, n*{w}) for integers m, n >= 1; found "
                         f"{tuple(mask.shape)}")
    mask = mask.float() if not mask.is_floating_point() else mask
    fh, fw = mask.shape[-2] // h, mask.shape[-1] // w
    return F.max_pool2d(mask, (fh, fw)) if (fh, fw) != (1, 1) else mask


def implant_one_hot(implant: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """Implant indices ``(B,)`` int in ``[0, len(IMPLANT_TYPES))`` -> one-hot ``(B, 4)`` float.

    Raises ``ValueError`` naming the expected range/shape and what was found.
    """
    n = len(IMPLANT_TYPES)
    if implant.is_floating_point() or implant.is_complex() or implant.dtype == torch.bool:
        raise ValueError(f"expected integer implant indices in [0, {n}); found dtype {implant.dtype}")
    if implant.ndim != 1 or (batch is not None and implant.shape[0] != batch):
        raise ValueError(f"expected implant indices of shape ({'B' if batch is None else batch},); found "
                         f"{tuple(implant.shape)}")
    if implant.numel() and (int(implant.min()) < 0 or int(implant.max()) >= n):
        raise ValueError(f"expected implant indices in [0, {n}) {IMPLANT_TYPES}; found {implant.tolist()}")
    return F.one_hot(implant.long(), n).float()


def _groups(channels: int, groups: int) -> int:
    return math.gcd(channels, groups)


class ResidualBlock(nn.Module):
    """Residual block merging the metal mask (Sec. 3.3): ``(B, cin, h, w)``, mask ``(B, 1, h, w)`` -> ``(B, cout,
    h, w)``. With ``use_mask=False`` the mask is not an input (``mask`` must be ``None``)."""

    def __init__(self, cin: int, cout: int, groups: int = 32, use_mask: bool = True):
        super().__init__()
        extra = 1 if use_mask else 0
        self.use_mask = use_mask
        self.norm1 = nn.GroupNorm(_groups(cin, groups), cin)
        self.conv1 = nn.Conv2d(cin + extra, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(cout, groups), cout)
        self.conv2 = nn.Conv2d(cout + extra, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        def merge(h):
            return torch.cat([h, mask], dim=1) if self.use_mask else h

        h = self.conv1(merge(F.silu(self.norm1(x))))
        h = self.conv2(merge(F.silu(self.norm2(h))))
        return self.skip(x) + h


class _PlainBlock(nn.Module):
    """Conv, GN, SiLU, twice (no residual, no mask): the blocks of the plain alignment network."""

    def __init__(self, cin: int, cout: int, groups: int = 32):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(_groups(cout, groups), cout),
                                  nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1),
                                  nn.GroupNorm(_groups(cout, groups), cout), nn.SiLU())

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.body(x)


class _Attention(nn.Module):
    """Multi-head attention of ``x`` ``(B, N, dim)`` over ``context`` ``(B, M, context_dim)`` (self if ``None``)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        context_dim = dim if context_dim is None else context_dim
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(context_dim, dim, bias=False)
        self.v = nn.Linear(context_dim, dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, d = x.shape

        def split(t):
            return t.view(b, -1, self.heads, d // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(context)), split(self.v(context)))
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """Transformer block fusing the implant prior (Sec. 3.3): self-attention over the ``h w`` tokens of
    ``(B, dim, h, w)``, cross-attention to ``context`` ``(B, M, context_dim)``, MLP (pre-norm, residual each).
    ``context=None`` skips the cross-attention. Output ``(B, dim, h, w)``."""

    def __init__(self, dim: int, heads: int, context_dim: int, groups: int = 32):
        super().__init__()
        if dim % heads:
            raise ValueError(f"expected a width divisible by heads = {heads}; found {dim}")
        self.norm_in = nn.GroupNorm(_groups(dim, groups), dim)
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.ln1, self.attn1 = nn.LayerNorm(dim), _Attention(dim, heads)
        self.ln2, self.attn2 = nn.LayerNorm(dim), _Attention(dim, heads, context_dim)
        self.ln3 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.proj_in(self.norm_in(x)).flatten(2).transpose(1, 2)
        t = t + self.attn1(self.ln1(t))
        if context is not None:
            t = t + self.attn2(self.ln2(t), context)
        t = t + self.mlp(self.ln3(t))
        return x + self.proj_out(t.transpose(1, 2).reshape(b, c, h, w))


class ALUNet(nn.Module):
    """ALU-Net (Eq. 9): ``forward(z_n, implant, mask)`` -> aligned latent ``z_bar_n`` of the shape of ``z_n``.

    Args:
        latent_channels: channels of the ARVAE latent (default 4).
        channels: widths per U-Net level; the latent's ``h, w`` must be divisible by ``2**(len - 1)``.
            Default ``(128, 256, 512)``.
        blocks_per_level: (ResidualBlock, TransformerBlock) pairs per level and path (default 2).
        heads: attention heads (must divide every width). Default 8.
        context_tokens: tokens the implant one-hot is mapped to (default 4).
        norm_groups: GroupNorm groups (the gcd with each width is used). Default 32.
        plain: the plain alignment network of Table 1 (no priors, no transformer-residual modules).
    Raises:
        ValueError: empty ``channels``, widths not divisible by ``heads``.
    """

    def __init__(self, latent_channels: int = 4, channels: Sequence[int] = (128, 256, 512), blocks_per_level: int = 2,
                 heads: int = 8, context_tokens: int = 4, norm_groups: int = 32, plain: bool = False):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not channels:
            raise ValueError("expected at least one U-Net level; found channels = ()")
        self.latent_channels = latent_channels
        self.channels = channels
        self.plain = plain
        self.multiple = 2 ** (len(channels) - 1)
        self.context_tokens = context_tokens
        n_types = len(IMPLANT_TYPES)
        ctx_dim = channels[0]
        self.implant_embed = None if plain else nn.Linear(n_types, context_tokens * ctx_dim)

        def block(cin, cout):
            return _PlainBlock(cin, cout, norm_groups) if plain else ResidualBlock(cin, cout, norm_groups)

        def attn(dim):
            return None if plain else TransformerBlock(dim, heads, ctx_dim, norm_groups)

        self.conv_in = nn.Conv2d(latent_channels, channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.down_attn = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skip_channels = []
        cin = channels[0]
        for level, ch in enumerate(channels):
            for _ in range(blocks_per_level):
                self.down.append(block(cin, ch))
                self.down_attn.append(attn(ch) or nn.Identity())
                skip_channels.append(ch)
                cin = ch
            if level < len(channels) - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.mid1, self.mid_attn, self.mid2 = block(cin, cin), attn(cin) or nn.Identity(), block(cin, cin)
        self.up = nn.ModuleList()
        self.up_attn = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(len(channels))):
            ch = channels[level]
            for _ in range(blocks_per_level):
                self.up.append(block(cin + skip_channels.pop(), ch))
                self.up_attn.append(attn(ch) or nn.Identity())
                cin = ch
            if level > 0:
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.norm_out = nn.GroupNorm(_groups(cin, norm_groups), cin)
        self.conv_out = nn.Conv2d(cin, latent_channels, 3, padding=1)
        self.blocks_per_level = blocks_per_level

    def _check_latent(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected a latent z_n of shape (B, {self.latent_channels}, h, w); found "
                             f"{tuple(z.shape)}")
        h, w = z.shape[-2:]
        if h % self.multiple or w % self.multiple:
            raise ValueError(f"expected latent h and w divisible by {self.multiple}; found {h} x {w}")

    def forward(self, z_n: torch.Tensor, implant: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 9: ``z_bar_n = ALU-Net(z_n, I, M)``.

        Args:
            z_n: ``(B, latent_channels, h, w)`` ARVAE latent of the ordinary slice.
            implant: ``(B,)`` int64 indices into ``IMPLANT_TYPES`` (required unless ``plain``).
            mask: ``(B, 1, Hm, Wm)`` metal mask in [0, 1] (Eq. 8, ``metal_mask``), ``Hm, Wm`` integer multiples of
                ``h, w`` (image or latent resolution). Required unless ``plain``.
        Returns:
            ``(B, latent_channels, h, w)`` aligned latent.
        Raises:
            ValueError: wrong latent shape, implant index out of range / wrong shape, wrong mask shape, a missing
                prior (not ``plain``); each message names what was expected and what was found.
        """
        self._check_latent(z_n)
        b, _, h, w = z_n.shape
        context = None
        masks = None
        if implant is not None or not self.plain:
            if implant is None:
                raise ValueError("expected implant indices of shape (B,) for the non-plain ALU-Net; found None")
            one_hot = implant_one_hot(implant.to(z_n.device), batch=b)
            if not self.plain:
                context = self.implant_embed(one_hot.to(z_n.dtype)).view(b, self.context_tokens, -1)
        if mask is not None or not self.plain:
            if mask is None:
                raise ValueError(f"expected a metal mask of shape (B, 1, m*{h}, n*{w}) for the non-plain ALU-Net; "
                                 f"found None")
            if mask.shape[0] != b:
                raise ValueError(f"expected a metal mask for {b} slices; found shape {tuple(mask.shape)}")
            base = mask_to_grid(mask.to(z_n.device), (h, w)).to(z_n.dtype)
            if not self.plain:
                masks = [base]
                for _ in range(len(self.channels) - 1):
                    masks.append(F.max_pool2d(masks[-1], 2))

        x = self.conv_in(z_n)
        skips = []
        i = 0
        for level in range(len(self.channels)):
            m = masks[level] if masks else None
            for _ in range(self.blocks_per_level):
                x = self.down[i](x, m)
                if context is not None:
                    x = self.down_attn[i](x, context)
                skips.append(x)
                i += 1
            if level < len(self.channels) - 1:
                x = self.downsample[level](x)
        m = masks[-1] if masks else None
        x = self.mid1(x, m)
        if context is not None:
            x = self.mid_attn(x, context)
        x = self.mid2(x, m)
        i = 0
        for j, level in enumerate(reversed(range(len(self.channels)))):
            m = masks[level] if masks else None
            for _ in range(self.blocks_per_level):
                x = self.up[i](torch.cat([x, skips.pop()], dim=1), m)
                if context is not None:
                    x = self.up_attn[i](x, context)
                i += 1
            if level > 0:
                x = self.upsample[j](F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return z_n + self.conv_out(F.silu(self.norm_out(x)))
