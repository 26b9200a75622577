"""DuDoCLIP (DuDoCROP Sec. III.B.1, Eq. 2-3): the zero-initialised control, what trains and what stays frozen,
dual-domain contrastive training on a fixed batch, Eq. 2 against an independent reference, weight files (digests,
OpenAI's TorchScript archive), input checks, and the real ViT-B-32 architecture built offline."""
from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transformer import QuickGELU

from marbench.files import sha256_file
from marbench.methods.dudocrop.clip import KNOWN_WEIGHTS, DuDoCLIP, contrastive_distance

# the CPU smoke stand-in: ViT-B-32's layout (patch 32, 224 px, 512-d embeddings, CLIP's vocabulary), narrow and shallow
TINY = {"embed_dim": 512,
        "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 8, "layers": 2}}

CONTENT = ["liver and spine in the abdomen", "two lungs and the heart", "pelvis with both femoral heads",
           "brain with ventricles", "kidneys beside the aorta"]
QSPD = ["(1, small, left, bright streaks)", "(2, large, centre, dark bands)", "(1, medium, right, shading)",
        "(3, small, posterior, star streaks)", "(2, medium, anterior, blooming)"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: nothing may be downloaded."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _tiny(**kw) -> DuDoCLIP:
    return DuDoCLIP(model_cfg=TINY, **kw)


def _patterns(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """``(n, 1, h, w)`` distinct smooth random patterns in ``[0, 1]``."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 6, 6, generator=g)
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)


def _step(model: DuDoCLIP, opt: torch.optim.Optimizer, x: torch.Tensor, texts: tuple[torch.Tensor, torch.Tensor]
          ) -> float:
    opt.zero_grad()
    loss = model.contrastive_loss({"image": model.encode_image(x)}, {"image": texts})
    loss.backward()
    opt.step()
    return float(loss)


def test_zero_init_equals_clip_then_control_moves():
    model = _tiny()
    x = _patterns(3, 64, 80, seed=1)
    e1, e2 = model.encode_image(x)
    plain = model.encode_image_uncontrolled(x)
    assert e1.shape == e2.shape == plain.shape == (3, model.embed_dim) == (3, 512)
    # the controlled forward (replicated here) against open_clip's own forward, zero control added
    assert torch.allclose(e1, plain, rtol=0, atol=1e-6)
    # the control net starts as an exact copy of the visual tower, so its own embedding starts there too
    assert torch.allclose(e2, plain, rtol=0, atol=1e-6)
    assert torch.allclose(e1.norm(dim=-1), torch.ones(3), atol=1e-5)

    texts = (model.encode_text(CONTENT[:3]), model.encode_text(QSPD[:3]))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    opt.zero_grad()
    loss = model.contrastive_loss({"image": model.encode_image(x)}, {"image": texts})
    assert loss.item() > 0
    loss.backward()
    # the zero layers receive gradient although they output zeros (their input, the control states, is not zero)
    assert all(z.weight.grad is not None and z.weight.grad.abs().sum() > 0 for z in model.zero_linears)
    opt.step()
    with torch.no_grad():
        e1, e2 = model.encode_image(x)
        assert (e1 - model.encode_image_uncontrolled(x)).abs().max() > 1e-4
        assert (e1 - e2).abs().max() > 1e-4


def test_control_order():
    corresponding, reversed_ = _tiny(), _tiny(control_order="reversed")
    x = _patterns(2, 40, 40, seed=2)
    with torch.no_grad():
        assert torch.allclose(reversed_.encode_image(x)[0], reversed_.encode_image_uncontrolled(x), rtol=0, atol=1e-6)
        for m in (corresponding, reversed_):
            g = torch.Generator().manual_seed(3)
            m.zero_linears[0].weight.copy_(0.05 * torch.randn(m.zero_linears[0].weight.shape, generator=g))
        # block 0's control goes after block 0 in one order and after the last block in the other
        assert (corresponding.encode_image(x)[0] - reversed_.encode_image(x)[0]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="control_order"):
        _tiny(control_order="backwards")


def test_only_control_net_and_temperature_train():
    model = _tiny()
    trainable = {id(p) for p in model.trainable_parameters()}
    requires = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == requires
    assert id(model.logit_scale) in trainable
    assert all(not p.requires_grad for p in model.clip.parameters())  # text and image towers of CLIP
    assert all(p.requires_grad for p in [*model.control.parameters(), *model.zero_linears.parameters()])

    model.train()
    assert model.training and model.control.training
    assert not model.clip.training and not any(m.training for m in model.clip.modules())

    frozen = {k: v.clone() for k, v in model.clip.state_dict().items()}
    control = {k: v.clone() for k, v in model.control.state_dict().items()}
    x = _patterns(3, 48, 48, seed=4)
    texts = (model.encode_text(CONTENT[:3]), model.encode_text(QSPD[:3]))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    for _ in range(3):
        _step(model, opt, x, texts)
    assert all(torch.equal(v, frozen[k]) for k, v in model.clip.state_dict().items())
    assert any(not torch.equal(v, control[k]) for k, v in model.control.state_dict().items())


def test_dual_domain_contrastive_training_pairs_images_with_their_texts():
    model = _tiny()
    images, sinograms = _patterns(5, 64, 64, seed=5), _patterns(5, 45, 90, seed=6)
    # the sinogram descriptions differ from the image ones, as the paper's prompts P3/P4 from P1/P2
    texts = {"image": (model.encode_text(CONTENT), model.encode_text(QSPD)),
             "sinogram": (model.encode_text([f"sinogram of {c}" for c in CONTENT]),
                          model.encode_text([f"sinogram trace {q}" for q in QSPD]))}
    shuffled = {d: tuple(t.roll(1, dims=0) for t in pair) for d, pair in texts.items()}

    def losses() -> tuple[float, float]:
        with torch.no_grad():
            emb = {"image": model.encode_image(images), "sinogram": model.encode_image(sinograms)}
            return model.contrastive_loss(emb, texts).item(), model.contrastive_loss(emb, shuffled).item()

    before, _ = losses()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    model.train()
    for _ in range(30):
        opt.zero_grad()
        emb = {"image": model.encode_image(images), "sinogram": model.encode_image(sinograms)}
        model.contrastive_loss(emb, texts).backward()
        opt.step()
    matched, mismatched = losses()
    assert matched < 0.5 * before
    assert matched < mismatched


def test_contrastive_loss_is_the_sum_of_four_distances():
    model = _tiny(init_temperature=0.05)
    assert model.temperature == pytest.approx(0.05, rel=1e-5)
    g = torch.Generator().manual_seed(7)
    emb = {d: tuple(torch.randn(4, 8, generator=g) for _ in range(2)) for d in ("image", "sinogram")}
    txt = {d: tuple(torch.randn(4, 8, generator=g) for _ in range(2)) for d in ("image", "sinogram")}
    s = 1 / 0.05
    expected = sum(contrastive_distance(F.normalize(a, dim=-1), F.normalize(b, dim=-1), s)
                   for d in emb for a, b in zip(emb[d], txt[d], strict=True))
    assert model.contrastive_loss(emb, txt).item() == pytest.approx(expected.item(), rel=1e-5)
    only_image = model.contrastive_loss({"image": emb["image"]}, {"image": txt["image"]})
    assert only_image.item() < expected.item()
    # CLIP's cap: tau never below 0.01
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(100.0)
    with pytest.raises(ValueError, match="domains"):
        model.contrastive_loss(emb, {"image": txt["image"]})
    with pytest.raises(ValueError, match="domains"):
        model.contrastive_loss({"ct": emb["image"]}, {"ct": txt["image"]})


def test_contrastive_distance_against_cross_entropy_and_by_hand():
    g = torch.Generator().manual_seed(8)
    a = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    b = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    scale = torch.tensor(7.3, requires_grad=True)
    ours = contrastive_distance(a, b, scale)
    reference = F.cross_entropy(scale * a @ b.T, torch.arange(6))
    assert ours.item() == pytest.approx(reference.item(), rel=1e-6)
    ours.backward()
    assert scale.grad is not None and torch.isfinite(scale.grad)

    # 2 x 2 by hand, tau = 1: a_0.b = (0, 1), a_1.b = (0.8, 0.6)
    a2 = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    b2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    by_hand = (math.log(1 + math.e) + math.log(1 + math.exp(0.2))) / 2
    assert contrastive_distance(a2, b2, 1.0).item() == pytest.approx(by_hand, rel=1e-6)
    # one-directional as Eq. 2: swapping the roles changes the value (the symmetric CLIP loss would not)
    assert contrastive_distance(b2, a2, 1.0).item() != pytest.approx(by_hand, rel=1e-3)

    with pytest.raises(ValueError, match="one shape"):
        contrastive_distance(a, b[:5], 1.0)
    with pytest.raises(ValueError, match="logit_scale"):
        contrastive_distance(a, b, 0.0)


def test_weight_files(tmp_path, no_network):
    missing = tmp_path / "ViT-B-32.pt"
    with pytest.raises(FileNotFoundError, match="ViT-B-32.pt") as err:
        DuDoCLIP(weights=missing)
    assert str(missing) in str(err.value) and "laion" in str(err.value).lower()

    source = _tiny(seed=3)
    path = tmp_path / "tiny_clip.bin"
    torch.save(source.clip.state_dict(), path)
    digest = sha256_file(path)
    wrong = "0" * 64
    with pytest.raises(ValueError) as err:
        _tiny(weights=path, sha256=wrong)
    assert wrong in str(err.value) and digest in str(err.value) and str(path) in str(err.value)
    with pytest.raises(ValueError, match="sha256="):  # unknown file name, no digest given
        _tiny(weights=path)

    loaded = _tiny(weights=path, sha256=digest.upper(), seed=0)
    assert loaded.weights_info() == {"dudoclip-ViT-B-32": digest}
    assert _tiny().weights_info() == {"dudoclip-ViT-B-32": "random"}
    assert all(torch.equal(v, source.clip.state_dict()[k]) for k, v in loaded.clip.state_dict().items())
    # the control net starts as a copy of the loaded visual tower
    assert all(torch.equal(v, source.clip.visual.state_dict()[k]) for k, v in loaded.control.state_dict().items())

    narrow = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "width": 128}}
    with pytest.raises(ValueError, match="does not fit"):
        DuDoCLIP(model_cfg=narrow, weights=path, sha256=digest)

    # a file with a known name is checked against KNOWN_WEIGHTS
    fake = tmp_path / "known" / "ViT-B-32.pt"
    fake.parent.mkdir()
    fake.write_bytes(b"not the OpenAI weights")
    with pytest.raises(ValueError) as err:
        DuDoCLIP(weights=fake)
    assert KNOWN_WEIGHTS["ViT-B-32.pt"] in str(err.value) and sha256_file(fake) in str(err.value)


def test_openai_torchscript_archive(tmp_path, no_network):
    """OpenAI's ``.pt`` is a TorchScript archive of half-precision weights with its hyper-parameters among them; it
    is read with torch.jit.load and implies QuickGELU."""
    source = _tiny(seed=5)

    class Archive(nn.Module):
        def __init__(self):
            super().__init__()
            for name, child in source.clip.named_children():
                self.add_module(name, child)
            for name, p in source.clip.named_parameters(recurse=False):
                self.register_parameter(name, nn.Parameter(p.detach().half()))
            self.register_buffer("input_resolution", torch.tensor(224))

        def forward(self, x):
            return x * self.logit_scale

    path = tmp_path / "openai_tiny.pt"
    with pytest.warns(FutureWarning):  # torch deprecates TorchScript; the archive is still written
        torch.jit.trace(Archive(), torch.ones(1)).save(str(path))
    loaded = _tiny(weights=path, sha256=sha256_file(path))
    acts = [type(b.mlp.gelu) for b in loaded.clip.visual.transformer.resblocks]
    assert acts == [QuickGELU] * len(acts)
    assert torch.equal(loaded.clip.text_projection, source.clip.text_projection.half().float())
    assert torch.equal(loaded.clip.visual.conv1.weight, source.clip.visual.conv1.weight)


def test_preprocess_and_bad_inputs():
    model = _tiny()
    sino = torch.full((2, 1, 50, 90), 0.5)  # a non-square "sinogram": resized, not cropped
    out = model.preprocess(sino)
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.float32
    expected = (0.5 - torch.tensor(OPENAI_DATASET_MEAN)) / torch.tensor(OPENAI_DATASET_STD)
    assert torch.allclose(out.mean(dim=(0, 2, 3)), expected, atol=1e-5)
    assert torch.allclose(out.amax(dim=(0, 2, 3)), out.amin(dim=(0, 2, 3)), atol=1e-5)
    # overshoot of the bicubic kernel is clamped to the [0, 1] of an 8-bit image
    step = torch.zeros(1, 1, 30, 30)
    step[..., 15:] = 1.0
    grey = model.preprocess(step)[:, 0] * OPENAI_DATASET_STD[0] + OPENAI_DATASET_MEAN[0]
    assert grey.min() >= -1e-6 and grey.max() <= 1 + 1e-6

    with pytest.raises(ValueError, match=r"\(B, 1, H, W\).*\(2, 3, 32, 32\)"):
        model.preprocess(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="int64"):
        model.encode_image(torch.ones(2, 1, 32, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model.encode_image(torch.rand(1, 32, 32))
    with pytest.raises(ValueError, match="list of strings"):
        model.encode_text("a single string")
    with pytest.raises(ValueError, match="list of strings"):
        model.encode_text([])
    with pytest.raises(ValueError, match="init_temperature"):
        _tiny(init_temperature=0.0)
    with pytest.raises(ValueError, match="patch dropout"):
        DuDoCLIP(model_cfg={**TINY, "vision_cfg": {**TINY["vision_cfg"], "patch_dropout": 0.5}})
    with pytest.raises(ValueError, match="built-in"):
        DuDoCLIP("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    with pytest.raises(ValueError, match="without weights"):
        _tiny(sha256="0" * 64)


def test_vit_b32_builds_offline(no_network):
    """The slowest test here (a few seconds): the paper's ViT-B-32, random weights, one forward."""
    model = DuDoCLIP()
    assert model.embed_dim == 512 and model.weights_info() == {"dudoclip-ViT-B-32": "random"}
    assert len(model.zero_linears) == 12 and model.zero_linears[0].in_features == 768
    with torch.no_grad():
        e1, e2 = model.encode_image(_patterns(1, 64, 80, seed=9))
    assert e1.shape == e2.shape == (1, 512)
    assert torch.isfinite(e1).all() and torch.isfinite(e2).all()
    # seeded: the same seed gives the same CLIP, and the global RNG is untouched
    state = torch.get_rng_state()
    again = DuDoCLIP(model_cfg=TINY, seed=0).clip.visual.proj
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(again, _tiny(seed=0).clip.visual.proj) and not torch.equal(again, _tiny(seed=1).clip.visual.proj)
