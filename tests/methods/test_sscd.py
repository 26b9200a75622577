import pytest
import torch

from marbench.methods.sscd import MaskPyramidUNet, SelfSupervisedCrossDomainMAR, metal_trace_replacement
from marbench.physics import CTPhysics, FanBeamGeometry, geometry_key, linear_interpolation, metal_trace

# a small full-rotation fan beam (AAPM source and detector distances) so that a training loop runs in seconds
GEOMETRY = FanBeamGeometry(n_views=64, n_channels=57, image_size=32, fov_mm=400.0, channel_pitch_mm=16.0)
KEY = geometry_key(GEOMETRY)  # no preset: the batch names it by its canonical JSON


def _phantoms(n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` elliptical bodies with a bright insert (mm^-1) and one small metal mask each, on the 32 x 32 grid."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    images, masks = [], []
    for i in range(n):
        a, b = 0.7 + 0.1 * torch.rand(1, generator=g).item(), 0.55 + 0.1 * i
        body = ((xx / a) ** 2 + (yy / b) ** 2 < 1).float()
        insert = ((xx - 0.2 * i + 0.2) ** 2 + (yy + 0.1) ** 2 < 0.03).float()
        images.append(0.02 * body + 0.02 * insert)
        m = torch.zeros(32, 32, dtype=torch.bool)
        m[10 + 4 * i:13 + 4 * i, 12 + 3 * i:15 + 3 * i] = True
        masks.append(m)
    return torch.stack(images)[:, None], torch.stack(masks)[:, None]


@pytest.fixture(scope="module")
def setup():
    projector = CTPhysics().projector(KEY)
    images, masks = _phantoms()
    return projector, projector.fp(images), masks


def test_mtr_keeps_every_value_outside_the_trace_and_removes_a_prior_offset(setup):
    projector, sinogram, masks = setup
    trace = metal_trace(projector, masks)
    s_li = linear_interpolation(sinogram, trace)
    prior = sinogram + 0.3  # a prior with the right structure but biased by a constant
    corrected = metal_trace_replacement(s_li, prior, trace)
    assert torch.equal(corrected[~trace], s_li[~trace])
    # Eq. 8: the residual LI carries the offset seen at the trace borders inside, so the bias cancels exactly
    torch.testing.assert_close(corrected[trace], sinogram[trace], rtol=0, atol=1e-5)


def test_the_fbp_consistency_gradient_reaches_sinonet_and_matches_finite_differences(setup):
    projector, sinogram, masks = setup
    torch.manual_seed(0)
    model = SelfSupervisedCrossDomainMAR(variant="sinonet+fbpcons", base=4, depth=2).double()
    pair = (masks, masks.roll(1, 0))
    s = sinogram.double()

    def fbp_loss():  # the projector follows the input's dtype: float64 for a clean finite difference
        return model.losses(s, pair, projector)["fbp"]

    bias = model.sinonet.head.bias
    loss = fbp_loss()
    (grad,) = torch.autograd.grad(loss, bias)
    assert grad.abs().item() > 0
    h = 1e-4
    with torch.no_grad():
        bias += h
        up = fbp_loss().item()
        bias -= 2 * h
        down = fbp_loss().item()
        bias += h
    assert grad.item() == pytest.approx((up - down) / (2 * h), rel=1e-3)


def test_one_batch_overfit(setup, fit_on_one_batch):
    projector, sinogram, masks = setup
    torch.manual_seed(0)
    model = SelfSupervisedCrossDomainMAR(variant="joint", base=8, depth=2, lr=3e-3)
    batch = {"gt_sinogram": sinogram, "metal_mask": masks, "geometry": [KEY] * 3}

    def total():
        with torch.no_grad():
            return sum(model.losses(sinogram, (masks.roll(1, 0), masks.roll(2, 0)), projector).values()).item()

    first = total()
    fit_on_one_batch(model, batch, 200)
    assert total() < first / 5


def test_every_variant_names_its_row_and_the_untrained_ones_are_li(setup):
    projector, sinogram, masks = setup
    images, _ = _phantoms()
    ma_image = torch.where(masks, torch.full_like(images, 3000.0), (images / 0.02 - 1) * 1000)
    batch = {"ma_image": ma_image, "ma_sinogram": sinogram, "metal_mask": masks, "geometry": [KEY] * 3}
    names = set()
    for variant in ("sinonet", "sinonet+fbpcons", "joint", "joint+mtr"):
        model = SelfSupervisedCrossDomainMAR(variant=variant, base=4, depth=2).eval()
        out = model.predict_step(batch)
        # the paper's threshold segmentation finds the same metal here (3000 HU metal, tissue below 2000 HU)
        thresholded = SelfSupervisedCrossDomainMAR(variant=variant, base=4, depth=2, metal_mask_source="threshold")
        thresholded.load_state_dict(model.state_dict())
        thresholded.eval()
        assert torch.equal(thresholded.predict_step({k: v for k, v in batch.items() if k != "metal_mask"}), out)
        names.add(model.card.name)
        if variant != "joint+mtr":  # zero-initialised heads: untrained, these are the LI reconstruction
            li = projector.fbp(linear_interpolation(sinogram, metal_trace(projector, masks)))
            torch.testing.assert_close(out[~masks], ((li / 0.02 - 1) * 1000)[~masks], rtol=0, atol=0.05)
    assert names == {"sscd-sinonet", "sscd-sinonet-fbpcons", "sscd-joint", "sscd-joint-mtr"}


def test_bad_configurations_are_refused(setup):
    projector, sinogram, masks = setup
    with pytest.raises(ValueError, match="unknown variant 'mtr'"):
        SelfSupervisedCrossDomainMAR(variant="mtr")
    with pytest.raises(ValueError, match="metal_mask_source must be"):
        SelfSupervisedCrossDomainMAR(metal_mask_source="segmentation")
    model = SelfSupervisedCrossDomainMAR(variant="sinonet", base=4, depth=2)
    with pytest.raises(ValueError, match="at least 2 slices"):
        model.training_step({"gt_sinogram": sinogram[:1], "metal_mask": masks[:1], "geometry": [KEY]}, 0)


def test_mask_pyramid_unet_pads_any_sinogram_shape():
    net = MaskPyramidUNet(1, 1, base=4, depth=3)
    x, m = torch.randn(2, 1, 30, 21), torch.rand(2, 1, 30, 21)
    assert net(x, m).shape == x.shape
