import dataclasses
import math

import numpy as np
import pytest
import torch

from marbench.physics import FanBeamGeometry, ParallelBeamGeometry, Projector, preset
from marbench.physics.fbp import backprojection_entries
from marbench.physics.joseph import matrix_entries
from marbench.physics.sparse_cache import CachedCSRPair, QuarterTurnOperator

from .phantoms import ellipses_mu

SMALL = {
    "curved": FanBeamGeometry(n_views=96, n_channels=128, image_size=64, fov_mm=200.0, channel_pitch_mm=3.0,
                              channel_offset=-1.25),
    "flat": FanBeamGeometry(n_views=96, n_channels=128, image_size=64, fov_mm=200.0, channel_pitch_mm=3.0,
                            detector="flat", channel_offset=-1.25),
    "parallel": ParallelBeamGeometry(n_views=90, n_channels=100, image_size=64, fov_mm=200.0, channel_pitch_mm=2.5,
                                     channel_offset=0.25),
    # no quarter-turn symmetry: the sparse backend must store every view
    "curved_odd": FanBeamGeometry(n_views=90, n_channels=128, image_size=64, fov_mm=200.0, channel_pitch_mm=3.0),
    # turning clockwise: the sparse backend stores a quarter of the views (QuarterTurnOperator, torch.rot90(x, 1))
    "curved_cw": FanBeamGeometry(n_views=96, n_channels=128, image_size=64, fov_mm=200.0, channel_pitch_mm=3.0,
                                 channel_offset=-1.25, rotation_direction=-1, channel_direction=-1),
}
TINY = FanBeamGeometry(n_views=8, n_channels=12, image_size=6, fov_mm=60.0, channel_pitch_mm=12.0,
                       channel_offset=-0.25)


@pytest.mark.parametrize("backend", ["sparse", "raysampling"])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_bp_is_the_adjoint_of_fp(name, backend):
    g = SMALL[name]
    p = Projector(g, backend=backend)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((3, 1, *g.image_shape), generator=gen)
    y = torch.rand((3, 1, *g.sinogram_shape), generator=gen)
    lhs = (p.fp(x).double() * y.double()).sum()
    rhs = (x.double() * p.bp(y).double()).sum()
    assert abs(lhs - rhs) / abs(lhs) <= 1e-5


@pytest.mark.parametrize("name", ["curved", "flat", "parallel"])
def test_disk_line_integrals_equal_chord_length_times_mu(name):
    base = SMALL[name]
    g = type(base)(**{**{k: v for k, v in base.to_dict().items() if k != "kind"}, "image_size": 256})
    xs, ys = g.pixel_centres_mm()
    radius, mu, sub = 70.0, 0.02, 8
    # area-weighted pixel coverage of the disk (8 x 8 sub-pixels)
    off = (np.arange(sub) + 0.5) / sub - 0.5
    cover = np.zeros(g.image_shape)
    for ox in off:
        for oy in off:
            cover += np.hypot(xs + ox * g.pixel_size_mm, ys + oy * g.pixel_size_mm) < radius
    img = torch.tensor(cover / sub**2 * mu, dtype=torch.float32)[None, None]
    sino = Projector(g, backend="sparse").fp(img)[0, 0].double().numpy()
    # distance of each ray from the disk centre (the isocentre)
    origin, direction = g.rays()
    origin = np.broadcast_to(origin, direction.shape if origin.shape[1] == 1 else origin.shape)
    direction = np.broadcast_to(direction, origin.shape)
    dist = np.abs(origin[..., 0] * direction[..., 1] - origin[..., 1] * direction[..., 0])
    chord = 2 * np.sqrt(np.clip(radius**2 - dist**2, 0, None)) * mu
    central = dist < 0.8 * radius
    assert central.sum() > 1000
    rel = np.abs(sino[central] - chord[central]) / chord[central]
    assert rel.max() <= 0.005


@pytest.mark.parametrize("name", ["curved", "flat", "parallel"])
@pytest.mark.parametrize("backend", ["sparse", "raysampling"])
def test_fbp_of_fp_recovers_the_phantom(name, backend):
    base = SMALL[name]
    fields = {k: v for k, v in base.to_dict().items() if k != "kind"}
    fields.update(image_size=256, n_views=400, n_channels=400, channel_pitch_mm=base.channel_pitch_mm / 3)
    g = type(base)(**fields)
    p = Projector(g, backend=backend)
    mu = ellipses_mu(g)
    rec = p.fbp(p.fp(mu))
    xs, ys = g.pixel_centres_mm()
    inside = torch.tensor(np.hypot(xs, ys) < 0.9 * g.fov_mm / 2)
    err = (rec - mu)[0, 0][inside]
    assert float(err.norm() / mu[0, 0][inside].norm()) <= 0.015


def test_aapm_preset_fbp_is_in_hu_scale():
    g = preset("aapm_body_256")
    p = Projector(g)
    mu = ellipses_mu(g)
    rec = p.fbp(p.fp(mu))
    centre = rec[0, 0, 100:156, 100:156] - mu[0, 0, 100:156, 100:156]
    assert abs(float(centre.mean())) / 0.02 * 1000 < 2.0  # below 2 HU of bias


@pytest.mark.parametrize("backend", ["sparse", "raysampling"])
def test_gradcheck_fp_bp_fbp_in_float64(backend):
    p = Projector(TINY, backend=backend)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand((2, 1, *TINY.image_shape), dtype=torch.float64, generator=gen, requires_grad=True)
    y = torch.rand((2, 1, *TINY.sinogram_shape), dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(p.fp, (x,))
    assert torch.autograd.gradcheck(p.bp, (y,))
    assert torch.autograd.gradcheck(p.fbp, (y,))
    assert torch.autograd.gradgradcheck(p.fp, (x,))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_backends_agree(name):
    g = SMALL[name]
    x = ellipses_mu(g)
    a = Projector(g, backend="sparse").fp(x)
    b = Projector(g, backend="raysampling").fp(x)
    assert float((a - b).norm() / b.norm()) <= 0.005
    assert float((a - b).abs().max() / b.abs().max()) <= 1e-4  # one operator, two evaluations


# (rotation_direction, channel_direction): the AAPM presets, syndeeplesion, and the old (mirrored) convention
CONVENTIONS = [(1, 1), (1, -1), (-1, -1)]


@pytest.mark.parametrize("conventions", CONVENTIONS)
@pytest.mark.parametrize("name", ["flat", "parallel"])
def test_astra_vectors_are_the_suite_rays(name, conventions):
    pytest.importorskip("astra")
    from marbench.physics.astra_reference import AstraProjector

    rot, chan = conventions
    g = dataclasses.replace(SMALL[name], rotation_direction=rot, channel_direction=chan,
                            view_start_rad=0.3 if name == "flat" else 0.0)
    vectors = AstraProjector(g).proj_geom["Vectors"]
    start, direction = g.rays()
    k = np.arange(g.n_channels)[None, :, None] - (g.n_channels - 1) / 2
    pixel = vectors[:, None, 2:4] + k * vectors[:, None, 4:6]  # detector cell centres (fan) / ray offsets
    if name == "flat":
        np.testing.assert_allclose(vectors[:, None, 0:2], start, atol=1e-9)
        ray = pixel - vectors[:, None, 0:2]
        np.testing.assert_allclose(ray / np.linalg.norm(ray, axis=-1, keepdims=True), direction, atol=1e-12)
    else:
        np.testing.assert_allclose(vectors[:, None, 0:2], direction, atol=1e-12)
        # a ray through the offset point, along the direction: the suite's start point lies on it
        offset = start - pixel
        cross = offset[..., 0] * direction[..., 1] - offset[..., 1] * direction[..., 0]
        np.testing.assert_allclose(cross, 0.0, atol=1e-9)


@pytest.mark.parametrize("conventions", CONVENTIONS)
@pytest.mark.parametrize("name", ["flat", "parallel"])
def test_agrees_with_astra(name, conventions):
    pytest.importorskip("astra")
    from marbench.physics.astra_reference import AstraProjector

    rot, chan = conventions
    g = dataclasses.replace(SMALL[name], rotation_direction=rot, channel_direction=chan)
    x = ellipses_mu(g)
    ref = AstraProjector(g).fp(x[0, 0].numpy())
    for backend in ("sparse", "raysampling"):
        ours = Projector(g, backend=backend).fp(x)[0, 0].numpy()
        assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= 0.01


def test_astra_refuses_curved_detectors():
    pytest.importorskip("astra")
    from marbench.physics.astra_reference import AstraProjector

    with pytest.raises(ValueError, match="flat detector"):
        AstraProjector(SMALL["curved"])


def test_system_matrix_is_cached_and_memory_mapped(tmp_path):
    g = SMALL["curved_cw"]
    first = Projector(g, cache_dir=tmp_path)
    files = sorted(p.name for p in first.backend.path.iterdir())
    assert "m_val.npy" in files and "mt_crow.npy" in files
    assert first.backend.path.name.startswith(g.hash)
    second = Projector(g, cache_dir=tmp_path)
    arrays = second.backend.operator.matrix.arrays
    assert isinstance(arrays["m_val"], np.memmap) and arrays["m_col"].dtype == np.int32
    x = ellipses_mu(g)
    assert torch.equal(first.fp(x), second.fp(x))
    assert torch.equal(first.fbp(first.fp(x)), second.fbp(second.fp(x)))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_sparse_and_sampled_fbp_are_the_same_operator(name):
    g = SMALL[name]
    sino = Projector(g, backend="raysampling").fp(ellipses_mu(g))
    a = Projector(g, backend="sparse").fbp(sino)
    b = Projector(g, backend="raysampling").fbp(sino)
    assert float((a - b).abs().max() / b.abs().max()) <= 1e-4


def test_window_filters_trade_noise_for_resolution():
    g = SMALL["curved"]
    p = Projector(g)
    noise = torch.randn((1, 1, *g.sinogram_shape), generator=torch.Generator().manual_seed(0)) * 1e-2
    std = {f: float(p.fbp(noise, f).std()) for f in ("ram-lak", "shepp-logan", "hann", "standard")}
    assert std["hann"] < std["shepp-logan"] < std["ram-lak"]
    assert std["standard"] < std["ram-lak"]
    with pytest.raises(ValueError, match="unknown FBP filter"):
        p.fbp(noise, "cosine-ish")


@pytest.mark.parametrize("call, arg, match", [
    ("fp", torch.zeros(1, 1, 32, 64), r"expected shape \(B, 1, 64, 64\).*found \(1, 1, 32, 64\)"),
    ("fp", torch.zeros(1, 64, 64), r"found \(1, 64, 64\)"),
    ("fp", torch.zeros(1, 1, 64, 64, dtype=torch.int32), "expected dtype float32 or float64, found torch.int32"),
    ("fp", torch.full((1, 1, 64, 64), float("nan")), "4096 NaN/Inf"),
    ("fbp", torch.zeros(1, 1, 90, 128), r"expected shape \(B, 1, 96, 128\).*found \(1, 1, 90, 128\)"),
    ("bp", np.zeros((1, 1, 96, 128)), "expected a torch.Tensor"),
])
def test_bad_input_names_expected_and_found(call, arg, match):
    p = Projector(SMALL["curved"], backend="raysampling")
    with pytest.raises(ValueError, match=match):
        getattr(p, call)(arg)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown projector backend"):
        Projector(SMALL["curved"], backend="torch-radon")


def test_fan_fbp_needs_a_full_rotation():
    g = FanBeamGeometry(n_views=16, n_channels=16, image_size=8, fov_mm=50.0, view_span_rad=math.pi)
    with pytest.raises(ValueError, match="views over 2\\*pi"):
        Projector(g, backend="raysampling")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["sparse", "raysampling"])
def test_cuda_matches_cpu(backend):
    g = SMALL["curved"]
    x = ellipses_mu(g)
    cpu = Projector(g, backend=backend)
    gpu = Projector(g, backend=backend, device="cuda")
    torch.testing.assert_close(gpu.fp(x.cuda()).cpu(), cpu.fp(x), rtol=1e-4, atol=1e-5)
    s = cpu.fp(x)
    torch.testing.assert_close(gpu.fbp(s.cuda()).cpu(), cpu.fbp(s), rtol=1e-4, atol=1e-6)


def test_a_stale_cache_folder_is_replaced(tmp_path):
    g = SMALL["curved"]
    first = Projector(g, cache_dir=tmp_path)
    path = first.backend.path
    (path / "m_val.npy").unlink()  # a folder left incomplete (older format, interrupted copy)
    again = Projector(g, cache_dir=tmp_path)
    assert (path / "m_val.npy").is_file()
    x = ellipses_mu(g)
    torch.testing.assert_close(again.fp(x), Projector(g, backend="raysampling").fp(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_support_projection_equals_fp(name):
    g = SMALL[name]
    p = Projector(g)
    x = torch.zeros((2, 1, *g.image_shape))
    x[0, 0, 10:14, 40:43] = 3.0
    x[1, 0, 50, 7] = 1.5
    torch.testing.assert_close(p.fp_small_support(x), p.fp(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(Projector(g, backend="raysampling").fp_small_support(x),
                       Projector(g, backend="raysampling").fp(x))


def _operator(g, entries, path, turns, k):
    """The cached operator of ``g`` storing ``n_views // turns`` views, applied with quarter turns ``k``."""
    import scipy.sparse as sp

    stored = g.n_views // turns
    shape = (stored * g.n_channels, g.image_size**2)

    def build():
        ray, pix, w = entries(g, slice(0, stored))
        return sp.csr_matrix((w.astype(np.float32), (ray, pix)), shape=shape)

    return QuarterTurnOperator(CachedCSRPair(path, shape, build, torch.device("cpu")), g.image_size, g.n_views,
                               g.n_channels, turns, k=k)


@pytest.mark.parametrize("entries", [matrix_entries, backprojection_entries], ids=["joseph", "fbp"])
@pytest.mark.parametrize("conventions", [(1, 1), (1, -1), (-1, -1), (-1, 1)])
def test_quarter_turn_operator_is_the_full_operator(conventions, entries, tmp_path):
    rot, chan = conventions
    g = FanBeamGeometry(n_views=32, n_channels=40, image_size=24, fov_mm=150.0, channel_pitch_mm=6.0,
                        channel_offset=-1.25, view_start_rad=0.1, rotation_direction=rot, channel_direction=chan)
    k = g.quarter_turn_rot90()
    assert k == -rot
    full = _operator(g, entries, tmp_path / "full", 1, 0)
    quarter = _operator(g, entries, tmp_path / "quarter", 4, k)
    wrong = _operator(g, entries, tmp_path / "quarter", 4, -k)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand((2, *g.image_shape), generator=gen, dtype=torch.float64)
    y = torch.rand((2, *g.sinogram_shape), generator=gen, dtype=torch.float64)
    x[1, :, :] = 0
    x[1, 3:6, 15:17] = 2.0  # a small support, off-centre (it moves under a quarter turn)
    # the same float32 weights: equal up to the order of the float64 sums (measured: ~1e-15 relative)
    tol = dict(rtol=1e-12, atol=1e-12 * float(full.forward(x).abs().max()))
    torch.testing.assert_close(quarter.forward(x), full.forward(x), **tol)
    torch.testing.assert_close(quarter.forward_small_support(x), full.forward(x), **tol)
    torch.testing.assert_close(quarter.transpose(y), full.transpose(y), rtol=1e-12,
                               atol=1e-12 * float(full.transpose(y).abs().max()))
    # turning the other way is a different operator (the test tells the two senses apart)
    assert float((wrong.forward(x) - full.forward(x)).norm() / full.forward(x).norm()) > 0.05
    assert float((wrong.transpose(y) - full.transpose(y)).norm() / full.transpose(y).norm()) > 0.05
