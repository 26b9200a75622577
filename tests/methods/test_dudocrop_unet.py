"""DuDoCROP's embedding-guided conditional noise network (Sec. III.B.2, Fig. 3b): shapes, the conditioning paths of
the Fig. 12 ablation, time dependence, Eq. 9 training on one batch, and the IR-SDE sampler with it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from marbench.methods.dudocrop import IRSDE
from marbench.methods.dudocrop.unet import ConditionalUNet, SpatialTransformer

TINY = dict(base=8, mults=(1, 2), head_dim=8)


pytestmark = pytest.mark.usefixtures("one_thread")


def _net(seed: int = 0, **kw) -> ConditionalUNet:
    """A tiny network whose zero-initialised ST output projections are randomised, so that the image embedding
    reaches the output before training (a fresh ST is the identity, as in the reference)."""
    torch.manual_seed(seed)
    net = ConditionalUNet(**{**TINY, **kw})
    for m in net.modules():
        if isinstance(m, SpatialTransformer):
            torch.nn.init.normal_(m.proj_out.weight, std=0.2)
            torch.nn.init.normal_(m.proj_out.bias, std=0.2)
    return net.eval()


def _inputs(b: int = 2, h: int = 32, w: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x0 = F.interpolate(torch.rand(b, 1, 8, 8, generator=g), size=(h, w), mode="bilinear")
    mu = (x0 + 0.3 * torch.rand(b, 1, h, w, generator=g)).clamp(0, 1)
    xt = (mu + 0.2 * torch.randn(b, 1, h, w, generator=g)).float()
    t = torch.randint(1, 21, (b,), generator=g)
    e1, e2 = torch.randn(b, 512, generator=g), torch.randn(b, 512, generator=g)
    return x0, mu, xt, t, e1, e2


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=0, atol=1e-6)


@torch.no_grad()
def test_shape_dtype_and_padding():
    net = _net()
    _, mu, xt, t, e1, e2 = _inputs()
    out = net(xt, mu, t, e1, e2)
    assert out.shape == xt.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    # H, W not divisible by 2 ** (len(mults) - 1): padded and cropped back
    _, mu, xt, t, e1, e2 = _inputs(b=3, h=31, w=17)
    assert net(xt, mu, t, e1, e2).shape == (3, 1, 31, 17)
    # float64 network and a Python int step
    out64 = net.double()(xt.double(), mu.double(), 5, e1.double(), e2.double())
    assert out64.dtype == torch.float64 and out64.shape == (3, 1, 31, 17)


@torch.no_grad()
def test_default_widths_build_and_fresh_st_is_identity():
    net = ConditionalUNet()  # reference widths nf = 64, ch_mult (1, 2, 4, 8): ST at the deepest level and the middle
    sts = [m for m in net.modules() if isinstance(m, SpatialTransformer)]
    assert len(sts) == 3
    x = torch.randn(1, 512, 4, 4)
    assert torch.equal(sts[-1](x, torch.randn(1, 1, 512)), x)
    assert sum(isinstance(m, SpatialTransformer) for m in ConditionalUNet(use_image_context=False).modules()) == 0


@pytest.mark.parametrize("use_image_context, use_control", [(False, False), (True, False), (False, True),
                                                            (True, True)])
@torch.no_grad()
def test_embeddings_reach_the_output_only_when_switched_on(use_image_context, use_control):
    net = _net(use_image_context=use_image_context, use_control=use_control)
    _, mu, xt, t, e1, e2 = _inputs()
    base = net(xt, mu, t, e1, e2)
    other_image = net(xt, mu, t, e1 + torch.randn_like(e1), e2)
    other_control = net(xt, mu, t, e1, e2 + torch.randn_like(e2))
    assert _close(other_image, base) != use_image_context
    assert _close(other_control, base) != use_control
    if use_image_context:
        # the embedding of one slice only acts on that slice
        e1b = e1.clone()
        e1b[1] = torch.randn(512)
        out = net(xt, mu, t, e1b, e2)
        assert torch.allclose(out[0], base[0], atol=1e-5) and not _close(out[1], base[1])


@torch.no_grad()
def test_time_step_reaches_the_output_per_slice():
    net = _net()
    _, mu, xt, t, e1, e2 = _inputs()
    base = net(xt, mu, t, e1, e2)
    t2 = t.clone()
    t2[0] = t[0] % 20 + 1
    out = net(xt, mu, t2, e1, e2)
    assert not _close(out[0], base[0]) and torch.allclose(out[1], base[1], atol=1e-5)


def test_invalid_inputs_raise():
    net = _net()
    _, mu, xt, t, e1, e2 = _inputs()
    with pytest.raises(ValueError, match="image_embedding"):
        net(xt, mu, t, None, e2)
    with pytest.raises(ValueError, match="control_embedding"):
        net(xt, mu, t, e1, e2[:, :100])
    with pytest.raises(ValueError, match="mu"):
        net(xt, mu[..., :16], t, e1, e2)
    with pytest.raises(ValueError, match="integer"):
        net(xt, mu, t.float(), e1, e2)
    with pytest.raises(ValueError, match=r"\(2, 1, H, W\)|\(B, 1, H, W\)"):
        net(xt.repeat(1, 2, 1, 1), mu.repeat(1, 2, 1, 1), t, e1, e2)
    with pytest.raises(ValueError, match="transformer_levels"):
        ConditionalUNet(mults=(1, 2), transformer_levels=3)


def test_overfits_one_batch_with_eq9_loss():
    torch.manual_seed(0)
    net = ConditionalUNet(**TINY)  # untouched initialisation: the zero ST output projections must train too
    sde = IRSDE(T=20)
    g = torch.Generator().manual_seed(0)
    x0, mu, _, _, e1, e2 = _inputs(b=2, seed=0)
    t = sde.random_timesteps(2, g)
    xt = sde.sample_xt(x0, mu, t, torch.randn(x0.shape, generator=g))
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    losses = []
    for _ in range(150):
        loss = sde.loss(net(xt, mu, t, e1, e2), xt, x0, mu, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] / min(losses[-10:]) >= 5.0, (losses[0], losses[-10:])
    st = next(m for m in net.modules() if isinstance(m, SpatialTransformer))
    assert st.proj_out.weight.abs().sum() > 0


@torch.no_grad()
def test_irsde_sampling_batched_and_deterministic():
    net = _net()
    sde = IRSDE(T=4)
    _, mu, _, _, e1, e2 = _inputs(b=3)
    cond = {"image_embedding": e1, "control_embedding": e2}

    def noise_fn(x, m, t, **c):
        return net(x, m, t, **c)

    a = sde.sample(mu, noise_fn, cond=cond, generator=torch.Generator().manual_seed(7))
    b = sde.sample(mu, noise_fn, cond=cond, generator=torch.Generator().manual_seed(7))
    c = sde.sample(mu, noise_fn, cond=cond, generator=torch.Generator().manual_seed(8))
    assert a.shape == mu.shape and torch.isfinite(a).all()
    assert torch.equal(a, b) and not _close(a, c)
    # one generator per slice: the batch equals the slices sampled one by one
    batched = sde.sample(mu, noise_fn, cond=cond, generator=[torch.Generator().manual_seed(s) for s in range(3)])
    for s in range(3):
        one = sde.sample(mu[s:s + 1], noise_fn, cond={k: v[s:s + 1] for k, v in cond.items()},
                         generator=[torch.Generator().manual_seed(s)])
        assert torch.allclose(batched[s:s + 1], one, atol=1e-5)


@pytest.mark.parametrize("block", [64, 8192])  # several blocks (the online softmax) and one
def test_blocked_linear_attention_equals_the_plain_formula_and_its_gradients(block):
    from marbench.methods.dudocrop.unet import LinearAttention

    torch.manual_seed(0)
    attn = LinearAttention(channels=4, heads=2, head_dim=8)
    torch.nn.init.normal_(attn.to_out[0].bias)
    attn.block = block
    x = (3 * torch.randn(2, 4, 12, 20)).requires_grad_()  # 240 pixels: 4 blocks of 64, the last one short

    def plain(x):  # the reference's formula on full-size q, k, v
        b, _, h, w = x.shape
        q, k, v = (z.reshape(b, 2, 8, h * w) for z in attn.to_qkv(x).chunk(3, dim=1))
        ctx = torch.einsum("bhdn,bhen->bhde", k.softmax(dim=-1), v / (h * w))
        out = torch.einsum("bhde,bhdn->bhen", ctx, q.softmax(dim=-2) * attn.scale)
        return attn.to_out(out.reshape(b, -1, h, w))

    got, want = attn(x), plain(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g_got = torch.autograd.grad(got.square().sum(), [x, attn.to_qkv.weight])
    g_want = torch.autograd.grad(want.square().sum(), [x, attn.to_qkv.weight])
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
