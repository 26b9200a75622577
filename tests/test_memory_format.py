"""The networks kept channels-last for the CPU's sake (``marbench.networks.UNet``, SSCD's ``MaskPyramidUNet``,
OSCNet's network, the perceptual backbones) compute what their NCHW twins compute, gradients included, and hand
NCHW-contiguous outputs to code that may ``view`` them."""
from __future__ import annotations

import copy

import pytest
import torch

from marbench.evaluation.perceptual import Backbones
from marbench.methods.oscnet import OSCNetPlus
from marbench.methods.sscd import MaskPyramidUNet
from marbench.networks import UNet


def _unet():
    return UNet(2, 3, base=4, depth=2), (torch.rand(2, 2, 24, 20),)


def _mask_pyramid():
    return MaskPyramidUNet(1, 1, base=4, depth=2), (torch.rand(2, 1, 18, 22), (torch.rand(2, 1, 18, 22) > 0.8).float())


def _oscnet():
    torch.manual_seed(0)
    method = OSCNetPlus(S=2, T=1, num_M=2, num_rot=4, num_Q=4, patch_size=None)
    ma = torch.rand(1, 1, 24, 24) * 2000 - 1000
    metal = torch.zeros(1, 1, 24, 24, dtype=torch.bool)
    metal[..., 10:13, 10:13] = True
    return method.net, method._inputs({"ma_image": ma, "li_image": ma.clone(), "metal_mask": metal})


def _assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    """Equal to float rounding against the tensor's scale (oneDNN sums in another order per layout)."""
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= tol * float(b.abs().max()), float((a - b).abs().max() / b.abs().max())


def _conv_weights(net: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]


@pytest.mark.parametrize("build", [_unet, _mask_pyramid, _oscnet], ids=["unet", "mask-pyramid-unet", "oscnet"])
def test_channels_last_networks_match_their_nchw_twins(build):
    torch.manual_seed(0)
    net, inputs = build()
    assert _conv_weights(net) and all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(net))
    twin = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
    # a weight of one input channel or a 1 x 1 kernel is both layouts at once; the others are NCHW in the twin
    assert not any(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(twin)
                   if w.shape[1] > 1 and w.shape[-1] > 1)
    outs = []
    for model in (net, twin):
        model.zero_grad()
        out = model(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        out.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        outs.append((out.detach(), grads))
    (a, ga), (b, gb) = outs
    assert a.is_contiguous()
    _assert_close(a, b)
    assert len(ga) == len(gb) > 0
    # against the scale of all gradients: a bias before a batch norm has a gradient of zero up to rounding
    _assert_close(torch.cat([g.flatten() for g in ga]), torch.cat([g.flatten() for g in gb]), 1e-4)


def test_perceptual_backbones_are_channels_last_and_match_nchw():
    torch.manual_seed(0)
    bb = Backbones("random")
    twin = copy.deepcopy(bb).to(memory_format=torch.contiguous_format)
    x, y = torch.rand(2, 1, 64, 64), torch.rand(2, 1, 64, 64)
    assert bb.lpips.model.net.slice1[0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        features = bb.lpips.normalized_features(x)
        twin_features = twin.lpips.normalized_features(x)
        for f, g in zip(features, twin_features, strict=True):
            _assert_close(f, g)
        _assert_close(bb.radimagenet.layer4(y), twin.radimagenet.layer4(y))
        _assert_close(bb.inception(y), twin.inception(y))
