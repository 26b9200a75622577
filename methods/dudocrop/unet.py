"""The embedding-guided conditional noise network of DuDoCROP's IR-SDEs (Zhang et al., "Dual-Domain CLIP-Assisted
Residual Optimization Perception Model for Metal Artifact Reduction", Sec. III.B.2 "Embedding Guided Conditional
Network" and Fig. 3b): ``eps_Theta(F_t, mu, t, e^{I1}, e^{I2})``, the noise predictor used by ``IRSDE.loss``
(Eq. 9) and ``IRSDE.sample`` (Eq. 5) in the image, sinogram and residual domains.

What the paper says, and how it is realised here:

* "A conditional U-Net is introduced in IR-SDE to estimate the noise ``eps_t``. Its up- and down-sampling branches
  are composed of alternating ResBlock and Linear attention (LA) modules, while the deepest residual convolutional
  layers are embedded Spatial Transformer (ST) modules." Every level of the encoder is ResBlock, ResBlock,
  attention, down-sampling; every level of the decoder is (skip concatenation, ResBlock) twice, attention,
  up-sampling; a middle ResBlock, attention, ResBlock sits between them. The attention is ``LinearAttention`` at the
  outer levels and ``SpatialTransformer`` at the ``transformer_levels`` deepest levels and in the middle (with the
  image embedding switched off: linear attention everywhere, as the reference's ablation).
* "The image embedding ``e^{I1}`` as cross-attention guide ST Module": ``F_in`` ``(h w, c)`` -> ``Q``; the
  embedding (length ``l_1 = 512``) -> ``K, V`` (one token); ``n_h`` heads; the attention output is projected back
  by a linear layer to ``F_out`` of ``F_in``'s size. Each ST is a transformer block (self-attention,
  cross-attention to the embedding, gated feed-forward, pre-layer-norms) between a group norm + 1 x 1 ``proj_in``
  and a 1 x 1 ``proj_out``, with a residual connection.
* "The control embedding ``e^{I2}`` is added with the time embedding which is encoded by MLP, and is introduced to
  ResBlocks": ``e^t = MLP(sinusoid(t)) + prompt_mlp(softmax(text_mlp(e^{I2})) * prompt)`` (the reference's
  degradation "prompt" path: a learned prompt vector, ``prompt`` ~ U(0, 1) at initialisation, gated by a softmax
  over the MLP-encoded control embedding). In every ResBlock ``e^t`` is mapped (SiLU, linear) to ``2 c_2`` values
  and "chunked as two parts ``e^t_1, e^t_2`` used for scaling and shifting ``F_in^(2)``":
  ``h = SiLU(conv(F_in) * (1 + e^t_1) + e^t_2)``, ``F_out = SiLU(conv(h)) + res(F_in)``.
* Input: the network sees ``cat(F_t - mu, mu)`` (``2 C`` channels; ``F_t - mu`` is the noise-plus-residual "initial
  guess") through a 7 x 7 convolution; the output ``(B, C, H, W)`` is the predicted noise.

Facts taken from the public IR-SDE/DA-CLIP reference (Algolzw/daclip-uir, ``universal-image-restoration/config/
daclip-sde/models/modules/``: ``DenoisingUNet_arch.py`` class ``ConditionalUNet``, ``module_util.py``
(``SinusoidalPosEmb``, ``ResBlock``/``Block``, ``LinearAttention``, ``LayerNorm``/``PreNorm``/``Residual``,
``Upsample``/``Downsample``) and ``attention.py`` (``SpatialTransformer``, ``BasicTransformerBlock``,
``CrossAttention``, ``FeedForward``/``GEGLU``); ``options/train.yml`` for ``nf = 64, ch_mult = [1, 2, 4, 8],
context_dim = 512``): the ``F_t - mu`` / ``mu`` concatenation and 7 x 7 bias-free first convolution; the sinusoidal
embedding of the raw integer step (``nf`` features, ``10000`` base) -> Linear -> GELU -> Linear to ``4 nf``; the
prompt path above; bias-free 3 x 3 convolutions and SiLU in the ResBlocks; channel layer norm (gain only) as
pre-norm of every attention, itself wrapped in a residual; linear attention (4 heads of 32, softmax of ``q`` over
features and of ``k`` over positions, output 1 x 1 conv + channel layer norm); ST with ``c / 32`` heads of 32,
a zero-initialised ``proj_out`` (so at initialisation the ST adds nothing and the image embedding reaches the
output only once ``proj_out`` is trained), depth 1, GEGLU feed-forward of width ``4 c``; 4 x 4 stride-2 convolution
down, nearest x 2 + 3 x 3 convolution up, a 3 x 3 convolution instead at the deepest level (down) and outermost level
(up), so ``len(mults)`` levels down-sample ``len(mults) - 1`` times; the first convolution's features concatenated
before a final ResBlock and a 3 x 3 output convolution.

Departures and readings:

* Sizes: ``H, W`` not divisible by ``2 ** (len(mults) - 1)`` are padded at the bottom/right (reflect, or replicate
  where the input is too small to reflect) and the output is cropped back to ``(H, W)``; the reference pads to
  ``2 ** len(mults)``, one level more than it down-samples.
* Widths: ``base``, ``mults`` and the head width ``head_dim`` (reference 32) are arguments, so tests and smoke runs
  can use a few channels; the ST uses ``max(1, c // head_dim)`` heads (the reference's ``c // 32`` is 0 below 32
  channels) and its group norm ``gcd(32, c)`` groups (the reference: 32 groups, impossible below 32 channels).
* ``transformer_levels`` counts STs from the deepest level (default 1: with the reference's four levels this is its
  ``i >= 3`` rule). The paper does not give the number.
* The reference wraps the (already residual) ST in ``Residual(PreNorm(...))``; that is kept, so the ST's own
  identity path adds the layer-normed features once more.
* With a flag on, its embedding is required (``ValueError`` if missing: the reference silently skips the
  conditioning when it is ``None``); with a flag off, the embedding is ignored and no parameter is built for it, so
  the four variants of the Fig. 12 ablation are ``use_image_context`` x ``use_control``.
* No gradient checkpointing and no dropout (the reference's ST has dropout 0).

Evaluation (the same function, for CPU speed at the sinogram's size): the features are channels-last, and
``LinearAttention`` runs in pixel blocks with its products reassociated (see its docstring); outputs equal the plain
NCHW evaluation up to float rounding.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ChannelLayerNorm", "ConditionalUNet", "LinearAttention", "ResBlock", "SpatialTransformer",
           "sinusoidal_embedding"]


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``(B,)`` time steps -> ``(B, dim)`` float ``[sin(t w_k), cos(t w_k)]``, ``w_k = 10000^(-k / (dim/2 - 1))``,
    ``k = 0..dim/2 - 1`` (the transformer/DDPM position embedding of the raw step, as the reference)."""
    if dim < 4 or dim % 2:
        raise ValueError(f"sinusoidal_embedding: expected an even dim >= 4, found {dim}")
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
    arg = t.float()[:, None] * freqs[None, :]
    return torch.cat([arg.sin(), arg.cos()], dim=-1)


class ChannelLayerNorm(nn.Module):
    """Layer norm over the channels of ``(B, C, H, W)`` at every pixel, learned gain only (no bias)."""

    def __init__(self, channels: int):
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = 1e-5 if x.dtype in (torch.float32, torch.float64) else 1e-3
        # mean, then the mean square of the centred values: the same population variance as torch.var_mean over
        # dim 1, whose strided reduction over a few channels took a fifth of the sinogram network's CPU time
        centred = x - x.mean(dim=1, keepdim=True)
        var = (centred * centred).mean(dim=1, keepdim=True)
        return centred * torch.rsqrt(var + eps) * self.g


class ResBlock(nn.Module):
    """Time-modulated residual block ``(B, cin, H, W), (B, time_dim) -> (B, cout, H, W)`` (Sec. III.B.2):
    ``[e1, e2] = Linear(SiLU(e^t))``, ``h = SiLU(conv3(x) (1 + e1) + e2)``, ``out = SiLU(conv3(h)) + res(x)``
    (``res`` a 1 x 1 conv when ``cin != cout``)."""

    def __init__(self, cin: int, cout: int, time_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * cout))
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.res = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.mlp(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.conv1(x), 1 + scale))  # one pass over the features, not two
        return F.silu(self.conv2(h)) + self.res(x)


class LinearAttention(nn.Module):
    """Linear (channel) attention ``(B, C, H, W) -> (B, C, H, W)``: per head, ``softmax_d(q) / sqrt(d)`` against the
    context ``softmax_n(k) v^T / (H W)``, O(H W) in the pixels; 1 x 1 output conv + channel layer norm.

    Evaluated in blocks of ``block`` pixels with every product reassociated, so that no ``3 x heads x head_dim``
    channel tensor of the full image is ever formed (at the sinogram's 512 x 464 pixels those are hundreds of MB,
    and writing them cost more than the arithmetic): pass 1 accumulates ``softmax_n(k) x^T`` (``hidden x C`` per
    slice) with a running maximum (the online softmax: the blocks' exponentials rescaled to a common maximum, the
    same sums as one softmax); ``v = W_v x`` and the ``1 / (H W)`` then give the context, which is folded with the
    scale and the output convolution's weight into one ``C x hidden`` matrix per slice; pass 2 applies it to
    ``softmax_d(q)`` of each block and layer-norms the block. Equal to the plain evaluation up to float rounding;
    the parameters are the same ``to_qkv``/``to_out`` modules.
    """

    block = 8192  # pixels per block: the block's (B, hidden, block) temporaries stay in the cache

    def __init__(self, channels: int, heads: int = 4, head_dim: int = 32):
        super().__init__()
        self.heads, self.head_dim, self.scale = heads, head_dim, head_dim**-0.5
        hidden = heads * head_dim
        self.to_qkv = nn.Conv2d(channels, 3 * hidden, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden, channels, 1), ChannelLayerNorm(channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        n, heads, dh = h * w, self.heads, self.head_dim
        hidden = heads * dh
        w_q, w_k, w_v = self.to_qkv.weight.view(3, hidden, c).unbind(0)
        pixels = x.permute(0, 2, 3, 1).reshape(b, n, c)  # a view for a channels-last x
        starts = range(0, n, self.block)
        # pass 1: m running maximum of k over the positions, s sum of exp(k - m), acc sum of exp(k - m) x^T
        m = s = acc = None
        for start in starts:
            xb = pixels[:, start:start + self.block]  # (B, nb, C)
            k = torch.bmm(w_k.expand(b, -1, -1), xb.transpose(1, 2))  # (B, hidden, nb), no transposing copy
            m_block = k.amax(dim=2, keepdim=True)
            if m is None:
                m = m_block
                e = (k - m).exp()
                s, acc = e.sum(dim=2, keepdim=True), torch.bmm(e, xb)
            else:
                m_new = torch.maximum(m, m_block)
                rescale = (m - m_new).exp()
                e = (k - m_new).exp()
                s = s * rescale + e.sum(dim=2, keepdim=True)
                acc = torch.baddbmm(acc * rescale, e, xb)
                m = m_new
        # context of every (k channel, v channel) pair, softmax_n(k) v^T / n, and its per-head diagonal blocks
        pairs = torch.matmul(acc / s, w_v.t()) / n  # (B, hidden, hidden)
        ctx = pairs.view(b, heads, dh, heads, dh).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # (B, h, d, e)
        # to_out conv of (ctx^T softmax_d(q) scale) is (W_out ctx^T scale) softmax_d(q): one (C, hidden) matrix
        conv_out, norm_out = self.to_out
        w_out = conv_out.weight.view(c, heads, dh)
        mix = torch.einsum("che,bhde->bchd", w_out, ctx).reshape(b, c, hidden) * self.scale
        bias = conv_out.bias.view(1, c, 1)
        blocks = []
        for start in starts:
            xb = pixels[:, start:start + self.block]
            q = torch.bmm(w_q.expand(b, -1, -1), xb.transpose(1, 2)).view(b, heads, dh, -1)
            q = (q - q.amax(dim=2, keepdim=True)).exp()  # softmax over the head's features, as Tensor.softmax
            q = q / q.sum(dim=2, keepdim=True)
            y = torch.baddbmm(bias, mix, q.view(b, hidden, -1))  # (B, C, nb)
            blocks.append(norm_out(y.unsqueeze(-1)).squeeze(-1).transpose(1, 2))
        return torch.cat(blocks, dim=1).view(b, h, w, c).permute(0, 3, 1, 2)  # channels-last (B, C, H, W)


class _Attention(nn.Module):
    """Multi-head (cross-)attention on tokens ``(B, N, dim)`` against ``(B, L, context_dim)`` (``context=None``:
    self-attention); bias-free Q/K/V, linear output back to ``dim``."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        b = x.shape[0]
        q, k, v = (z.reshape(b, z.shape[1], self.heads, -1).transpose(1, 2)
                   for z in (self.to_q(x), self.to_k(ctx), self.to_v(ctx)))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(Q K^T / sqrt(d)) V per head
        return self.to_out(out.transpose(1, 2).reshape(b, x.shape[1], -1))


class SpatialTransformer(nn.Module):
    """Spatial transformer (ST) of Fig. 3b, ``(B, C, H, W), (B, L, context_dim) -> (B, C, H, W)``.

    ``x + proj_out(block(proj_in(GroupNorm(x))))`` where ``block`` acts on the ``H W`` tokens:
    ``z += SelfAttn(LN(z))``; ``z += CrossAttn(LN(z), context)`` (Q from the features, K, V from the image
    embedding, ``heads`` heads); ``z += GEGLU-FFN(LN(z))``. ``proj_out`` is zero-initialised (the reference's), so
    a fresh ST is the identity.
    """

    def __init__(self, channels: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.norm = nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(inner), nn.LayerNorm(inner), nn.LayerNorm(inner)
        self.self_attn = _Attention(inner, heads, head_dim)
        self.cross_attn = _Attention(inner, heads, head_dim, context_dim)
        self.ff_in = nn.Linear(inner, 2 * 4 * inner)  # GEGLU: value and gate
        self.ff_out = nn.Linear(4 * inner, inner)
        self.proj_out = nn.Conv2d(inner, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        if context is None:
            raise ValueError("SpatialTransformer: expected a context (B, L, context_dim), found None")
        b, _, h, w = x.shape
        z = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, HW, inner)
        z = z + self.self_attn(self.norm1(z))
        z = z + self.cross_attn(self.norm2(z), context)
        val, gate = self.ff_in(self.norm3(z)).chunk(2, dim=-1)
        z = z + self.ff_out(val * F.gelu(gate))
        return x + self.proj_out(z.transpose(1, 2).reshape(b, -1, h, w))


class _PreNormResidual(nn.Module):
    """``x + fn(ChannelLayerNorm(x), context)`` (the reference's ``Residual(PreNorm(fn))``)."""

    def __init__(self, channels: int, fn: nn.Module):
        super().__init__()
        self.norm, self.fn = ChannelLayerNorm(channels), fn

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        return x + self.fn(self.norm(x), context)


class ConditionalUNet(nn.Module):
    """``eps_Theta(F_t, mu, t, e^{I1}, e^{I2})``: the embedding-guided conditional U-Net of Fig. 3b (see the module
    docstring for the structure, the reference and the departures).

    Args:
        in_ch: channels ``C`` of the states (1 for CT images, sinograms and residuals).
        base: width of the first level (reference ``nf = 64``); the time embedding has ``4 base`` features.
        mults: width multipliers of the levels (reference ``(1, 2, 4, 8)``); ``len(mults) - 1`` down-samplings.
        context_dim: length ``l_1`` of the DuDoCLIP embeddings (512, CLIP ViT-B/32).
        use_image_context: cross-attend to the image embedding ``e^{I1}`` in the ST modules (Fig. 12 ablation).
        use_control: add the control embedding ``e^{I2}`` to the time embedding (Fig. 12 ablation).
        transformer_levels: how many of the deepest levels (down and up) use an ST instead of linear attention when
            ``use_image_context``; the middle block always does then.
        head_dim: features per attention head (reference 32); linear attention has 4 heads of this width.
    Raises:
        ValueError: non-positive sizes, empty ``mults``, ``transformer_levels`` outside ``0..len(mults)``.

    ``forward(x_t, mu, t, image_embedding=None, control_embedding=None)``: ``x_t``, ``mu`` ``(B, in_ch, H, W)``
    float (the IR-SDE state and the degraded image, [0, 1]), ``t`` long ``(B,)`` (or a Python int) in ``1..T``,
    embeddings ``(B, context_dim)``; returns the predicted noise ``(B, in_ch, H, W)`` in ``x_t``'s dtype. Any
    ``H, W``: padded to a multiple of ``2 ** (len(mults) - 1)`` and cropped back. Slices of a batch do not interact
    (no batch statistics).
    """

    def __init__(self, in_ch: int = 1, base: int = 64, mults: tuple[int, ...] = (1, 2, 4, 8), context_dim: int = 512,
                 use_image_context: bool = True, use_control: bool = True, transformer_levels: int = 1,
                 head_dim: int = 32):
        super().__init__()
        mults = tuple(int(m) for m in mults)
        if in_ch < 1 or base < 2 or context_dim < 1 or head_dim < 1 or not mults or min(mults) < 1:
            raise ValueError(f"ConditionalUNet: expected positive sizes (in_ch, base >= 2, context_dim, head_dim, "
                             f"non-empty mults), found in_ch={in_ch}, base={base}, mults={mults}, "
                             f"context_dim={context_dim}, head_dim={head_dim}")
        if not 0 <= transformer_levels <= len(mults):
            raise ValueError(f"ConditionalUNet: expected 0 <= transformer_levels <= {len(mults)}, "
                             f"found {transformer_levels}")
        self.in_ch, self.context_dim = in_ch, context_dim
        self.use_image_context, self.use_control = bool(use_image_context), bool(use_control)
        self.depth = len(mults)
        self.factor = 2 ** (self.depth - 1)
        time_dim = 4 * base
        self.time_features = max(4, base + base % 2)
        self.time_mlp = nn.Sequential(nn.Linear(self.time_features, time_dim), nn.GELU(),
                                      nn.Linear(time_dim, time_dim))
        if self.use_control:
            self.prompt = nn.Parameter(torch.rand(1, time_dim))
            self.text_mlp = nn.Sequential(nn.Linear(context_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
            self.prompt_mlp = nn.Linear(time_dim, time_dim)

        def attention(channels: int, level: int) -> nn.Module:
            if self.use_image_context and level >= self.depth - transformer_levels:
                fn = SpatialTransformer(channels, max(1, channels // head_dim), head_dim, context_dim)
            else:
                fn = LinearAttention(channels, 4, head_dim)
            return _PreNormResidual(channels, fn)

        self.init_conv = nn.Conv2d(2 * in_ch, base, 7, padding=3, bias=False)
        widths = [base] + [base * m for m in mults]
        self.downs, self.ups = nn.ModuleList(), nn.ModuleList()
        for i in range(self.depth):
            cin, cout = widths[i], widths[i + 1]
            last = i == self.depth - 1
            self.downs.append(nn.ModuleList([
                ResBlock(cin, cin, time_dim), ResBlock(cin, cin, time_dim), attention(cin, i),
                nn.Conv2d(cin, cout, 3, padding=1, bias=False) if last else nn.Conv2d(cin, cout, 4, 2, 1)]))
            self.ups.insert(0, nn.ModuleList([
                ResBlock(cout + cin, cout, time_dim), ResBlock(cout + cin, cout, time_dim), attention(cout, i),
                nn.Conv2d(cout, cin, 3, padding=1, bias=False) if i == 0
                else nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cout, cin, 3, padding=1))]))
        mid = widths[-1]
        self.mid_block1 = ResBlock(mid, mid, time_dim)
        self.mid_attn = attention(mid, self.depth)
        self.mid_block2 = ResBlock(mid, mid, time_dim)
        self.final_block = ResBlock(2 * base, base, time_dim)
        self.final_conv = nn.Conv2d(base, in_ch, 3, padding=1)

    # -- conditioning -------------------------------------------------------------------------------------------
    def _embedding(self, name: str, e: torch.Tensor | None, batch: int, like: torch.Tensor) -> torch.Tensor:
        if e is None:
            raise ValueError(f"ConditionalUNet: {name} is switched on; expected a ({batch}, {self.context_dim}) "
                             f"tensor, found None")
        if not isinstance(e, torch.Tensor) or e.shape != (batch, self.context_dim) or not e.is_floating_point():
            found = (f"{tuple(e.shape)} {e.dtype}" if isinstance(e, torch.Tensor) else type(e).__name__)
            raise ValueError(f"ConditionalUNet: {name}: expected a float ({batch}, {self.context_dim}) tensor, "
                             f"found {found}")
        return e.to(device=like.device, dtype=like.dtype)

    def time_embedding(self, t: torch.Tensor, control_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """``e^t`` ``(B, 4 base)``: ``MLP(sinusoid(t))``, plus ``prompt_mlp(softmax(text_mlp(e^{I2})) * prompt)``
        when ``use_control`` (Sec. III.B.2)."""
        w = self.time_mlp[0].weight
        emb = self.time_mlp(sinusoidal_embedding(t, self.time_features).to(w.dtype))
        if self.use_control:
            e = self._embedding("control_embedding", control_embedding, t.shape[0], w)
            emb = emb + self.prompt_mlp(torch.softmax(self.text_mlp(e), dim=1) * self.prompt)
        return emb

    # -- forward ------------------------------------------------------------------------------------------------
    def _check(self, x_t: torch.Tensor, mu: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        for name, x in (("x_t", x_t), ("mu", mu)):
            if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != self.in_ch or not x.is_floating_point():
                found = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"ConditionalUNet: {name}: expected a float (B, {self.in_ch}, H, W) tensor, "
                                 f"found {found}")
        if mu.shape != x_t.shape:
            raise ValueError(f"ConditionalUNet: mu: expected the shape of x_t {tuple(x_t.shape)}, "
                             f"found {tuple(mu.shape)}")
        t = torch.as_tensor(t, device=x_t.device)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"ConditionalUNet: expected integer time steps, found dtype {t.dtype}")
        b = x_t.shape[0]
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"ConditionalUNet: expected t of shape ({b},) or a scalar, found {tuple(t.shape)}")
        return t.long()

    def forward(self, x_t: torch.Tensor, mu: torch.Tensor, t: torch.Tensor | int,
                image_embedding: torch.Tensor | None = None,
                control_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted noise ``(B, in_ch, H, W)`` (see the class docstring).

        Raises:
            ValueError: ``x_t``/``mu`` not float ``(B, in_ch, H, W)`` of one shape; ``t`` not integer ``(B,)`` or
                scalar; a switched-on embedding missing or not float ``(B, context_dim)``.
        """
        t = self._check(x_t, mu, t)
        b, _, h, w = x_t.shape
        emb = self.time_embedding(t, control_embedding)
        context = None
        if self.use_image_context:
            context = self._embedding("image_embedding", image_embedding, b, x_t)[:, None, :]  # (B, 1, l_1)

        x = torch.cat([x_t - mu, mu], dim=1)
        ph, pw = -h % self.factor, -w % self.factor
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")
        # channels-last features: oneDNN's 3 x 3 convolutions of a few channels ran 3-4 times faster on them than
        # on NCHW (the same sums, bit for bit in a test); the linear attention then reads the pixels as rows
        x = self.init_conv(x.contiguous(memory_format=torch.channels_last))
        first = x
        skips = []
        for block1, block2, attn, down in self.downs:
            x = block1(x, emb)
            skips.append(x)
            x = attn(block2(x, emb), context)
            skips.append(x)
            x = down(x)
        x = self.mid_block2(self.mid_attn(self.mid_block1(x, emb), context), emb)
        for block1, block2, attn, up in self.ups:
            x = block1(torch.cat([x, skips.pop()], dim=1), emb)
            x = block2(torch.cat([x, skips.pop()], dim=1), emb)
            x = up(attn(x, context))
        x = self.final_conv(self.final_block(torch.cat([x, first], dim=1), emb))
        return x[..., :h, :w].contiguous()
