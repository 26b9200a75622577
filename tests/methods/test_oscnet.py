import json
from pathlib import Path

import numpy as np
import pytest
import torch

from marbench.converters import hu_to_oscnet
from marbench.files import sha256_file
from marbench.methods.oscnet import (
    OSCNet,
    OSCNetPlus,
    OSCNetwork,
    fourier_rotation_basis,
    official_rotation_conv,
    official_rotation_conv_transpose,
    oscnet_loss,
    rotation_conv,
    rotation_conv_transpose,
)

OFFICIAL = json.loads((Path(__file__).parents[1] / "data" / "official_state_dicts.json").read_text())


def test_the_unsmoothed_basis_is_orthonormal_and_spans_the_rotated_fourier_modes():
    basis, _ = fourier_rotation_basis(9, 8, 5, smooth=False)
    flat = basis.reshape(-1, basis.shape[-1]).double()
    assert basis.shape == (9, 9, 8, 25)  # 13 cosine + 12 sine modes survive for 5 x 5 frequencies
    torch.testing.assert_close(flat.T @ flat, torch.eye(25, dtype=torch.float64), atol=1e-5, rtol=0)
    # an independent mode: cos(pi*4/5 * x') on the rotated grids, with the Gaussian taper outside the disc
    axis = np.linspace(-1, 1, 9)
    x0, y0 = np.meshgrid(axis, axis)
    theta = 2 * np.pi * np.arange(8) / 8
    xr = np.cos(theta) * x0[..., None] - np.sin(theta) * y0[..., None]
    mode = np.cos(np.pi * 4 / 5 * xr) * np.exp(-np.maximum(x0**2 + y0**2 - 1, 0) / 0.2)[..., None]
    mode = torch.from_numpy(mode.reshape(-1))
    residual = mode - flat @ (flat.T @ mode)
    assert residual.norm() < 1e-5 * mode.norm()


def test_the_filter_is_shared_across_rotations():
    """A quarter turn of the grid is two of the 8 rotations: the filter at rotation r+2 is the one at r turned
    by 90 degrees (the orientation-sharing that gives OSCNet its name)."""
    torch.manual_seed(0)
    net = OSCNetwork(S=2, T=1)
    c = net.fcnn.filter().detach()[0].reshape(4, 8, 9, 9)  # (num_M, num_rot, 9, 9)
    turned = torch.rot90(c[:, :6], k=1, dims=(-2, -1))
    diffs = [(turned - c[:, 2:]).abs().max(), (torch.rot90(c[:, :6], k=-1, dims=(-2, -1)) - c[:, 2:]).abs().max()]
    assert min(diffs) < 1e-5 * c.abs().max()


@pytest.mark.parametrize("plus, key", [(False, "oscnet"), (True, "oscnetplus")])
def test_official_state_dict_layout(plus, key):
    state = OSCNetwork(plus=plus).official_state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == OFFICIAL[key]


@pytest.mark.parametrize("cls", [OSCNet, OSCNetPlus])
def test_official_checkpoint_loads_and_reproduces_the_forward_bit_for_bit(cls, tmp_path):
    torch.manual_seed(0)
    source = cls(S=3, T=1, num_Q=4).eval()
    for p in source.parameters():  # move off the initial values (BN statistics included below)
        p.data += 0.01 * torch.randn_like(p)
    for name, buf in source.net.named_buffers():
        if "running" in name:
            buf.uniform_(0.5, 1.5)
    path = tmp_path / "net_latest.pt"
    torch.save(source.net.official_state_dict(), path)
    torch.manual_seed(1)
    loaded = cls(S=3, T=1, num_Q=4, checkpoint=str(path), checkpoint_sha256=sha256_file(path)).eval()
    ma = torch.rand(2, 1, 24, 24) * 3000 - 1000
    li = ma.clamp(max=1500)
    metal = ma > 1800
    assert torch.equal(loaded(ma, li, metal), source(ma, li, metal))


def test_a_cached_filter_that_disagrees_with_the_coefficients_is_refused(tmp_path):
    state = OSCNetwork(S=2, T=1).official_state_dict()
    state["fcnn.filter"] = state["fcnn.filter"] + 1.0
    with pytest.raises(ValueError, match="cached fcnn.filter differs"):
        OSCNetwork(S=2, T=1).load_official_state_dict(state)
    with pytest.raises(FileNotFoundError, match=r"model_osc/net_latest\.pt of github\.com/hongwang01/OSCNet"):
        OSCNet(checkpoint=str(tmp_path / "net_latest.pt"))


def test_loss_is_the_official_stage_weighting():
    torch.manual_seed(0)
    gt, xma = torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8)
    mask = torch.ones(1, 1, 8, 8)
    exact = [gt.clone() for _ in range(4)]
    artifacts = [xma - gt for _ in range(3)]
    assert oscnet_loss(gt, exact, artifacts, xma, gt, mask).item() == 0.0
    off = [x + 1.0 for x in exact]  # every image 1 off: MSE 1, L1 sum 64 per stage
    expected = (1 + 5e-4 * 64) * (1 + 0.1 * 3)  # the final stage at 1, the 3 earlier at 0.1; X0 is exact
    assert oscnet_loss(gt, off, artifacts, xma, gt, mask).item() == pytest.approx(expected)


@pytest.mark.parametrize("cls", [OSCNet, OSCNetPlus])
def test_oscnet_overfits_one_batch(cls, tiny_batch, fit_on_one_batch):
    _, batch = tiny_batch
    lo = 32
    batch = {k: (v[:2, :, lo:lo + 64, lo:lo + 64] if torch.is_tensor(v) and v.ndim == 4 else v[:2])
             for k, v in batch.items()}
    torch.manual_seed(0)
    model = cls(S=3, T=1, num_Q=8, patch_size=None, lr=5e-3)
    xma, xli, keep = model._inputs(batch)
    gt = hu_to_oscnet(batch["gt_image"])

    def training_loss():
        with torch.no_grad():
            return oscnet_loss(*model.net(xma, xli, keep), xma, gt, keep).item()

    first = training_loss()
    fit_on_one_batch(model, batch, 150)
    assert training_loss() < first / 10  # measured: 210 -> 14 (OSCNet), 379 -> 24 (OSCNet+)


@pytest.mark.parametrize("per_image", [False, True])
def test_rotation_convolutions_are_the_official_convolutions_and_adjoint(per_image):
    g = torch.Generator().manual_seed(0)
    b, ch, s, pad = 3, 8, 9, 4
    m, a = torch.randn(b, ch, 20, 17, generator=g), torch.randn(b, 1, 20, 17, generator=g)
    c = torch.randn(b if per_image else 1, ch, s, s, generator=g)
    ref, ref_t = official_rotation_conv(m, c, pad), official_rotation_conv_transpose(a, c, pad)
    torch.testing.assert_close(rotation_conv(m, c, pad), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(rotation_conv_transpose(a, c, pad), ref_t, rtol=1e-5, atol=1e-4)
    lhs = (rotation_conv(m.double(), c.double(), pad) * a.double()).sum()
    rhs = (m.double() * rotation_conv_transpose(a.double(), c.double(), pad)).sum()
    assert abs(float(lhs - rhs)) < 1e-9 * float(lhs.abs())
