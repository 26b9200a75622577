"""Building blocks of the latent GSI alignment framework (Han et al.): ARVAE, ALU-Net, information invariant loss.

Tiny widths on 32 x 32 slices; every random draw is seeded."""
import re

import pytest
import torch

from marbench.methods.gsi_alignment import (
    ALPHA,
    ARVAE,
    BETA,
    GSI_FRACTION,
    HU_RANGE,
    IMPLANT_TYPES,
    ALUNet,
    InvarianceEncoders,
    centre_slice,
    decoder_batch_mix,
    hu_to_unit,
    metal_mask,
    total_loss,
    unit_to_hu,
    vae_loss,
    volume_aggregation_augment,
)

K = 3
LATENT = 4
TINY_VAE = dict(k=K, latent_channels=LATENT, block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4)
TINY_ALU = dict(latent_channels=LATENT, channels=(16, 32), blocks_per_level=1, heads=2, norm_groups=4)


pytestmark = pytest.mark.usefixtures("one_thread")


def _phantoms(n: int, seed: int, streaks: bool) -> torch.Tensor:
    """``(n, K, 32, 32)`` stacks in [-1, 1]: an ellipse body with a bright insert drifting across the slices;
    ``streaks=True`` adds an artifact (the 'ordinary CT' data): bright and dark lobes ``cos(2 theta)`` around the
    insert, like the dark band between implants and the bright streaks of photon starvation."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    out = torch.empty(n, K, 32, 32)
    for i in range(n):
        a, b, cx, cy = (torch.rand(4, generator=g) * torch.tensor([0.3, 0.3, 0.4, 0.4])
                        + torch.tensor([0.5, 0.4, -0.2, -0.2])).tolist()
        for s in range(K):
            body = ((xx / a) ** 2 + (yy / b) ** 2 < 1).float()
            insert = ((xx - cx - 0.05 * s) ** 2 + (yy - cy) ** 2 < 0.02).float()
            img = -0.8 + 0.8 * body + 0.8 * insert
            if streaks:
                img = img + 0.6 * torch.cos(2 * torch.atan2(yy - cy, xx - cx)) * body
            out[i, s] = img.clamp(-1, 1)
    return out


def test_the_multi_slice_encoder_uses_the_neighbour_slices():
    torch.manual_seed(0)
    vae = ARVAE(**TINY_VAE).eval()
    stack = _phantoms(2, seed=1, streaks=True)
    alone = stack.clone()
    alone[:, [0, 2]] = 0.0
    with torch.no_grad():
        z, z_alone = vae.encode(stack).mode(), vae.encode(alone).mode()
    assert z.shape == (2, LATENT, 8, 8)
    assert (z - z_alone).abs().max() > 1e-3


def _same_decoders(vae: ARVAE) -> bool:
    d_n, d_g = vae.decoder_n.state_dict(), vae.decoder_g.state_dict()
    return d_n.keys() == d_g.keys() and all(torch.equal(d_n[key], d_g[key]) for key in d_n)


def test_the_two_decoders_start_equal_with_copy_init_and_part_on_their_own_data():
    torch.manual_seed(0)
    assert not _same_decoders(ARVAE(**TINY_VAE))  # default "independent": two random initialisations
    # decoder_init="copy": D_g starts as D_n, so any later difference comes from their different training data
    vae = ARVAE(**TINY_VAE, decoder_init="copy")
    assert _same_decoders(vae)
    # paired data: the ordinary slices are the GSI slices plus an artifact pattern
    ordinary, gsi = _phantoms(4, seed=2, streaks=True), _phantoms(4, seed=2, streaks=False)
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    for _ in range(20):
        opt.zero_grad()
        # the posterior mode: at initialisation the posterior std is ~1 and would drown 20 steps in noise
        rec_n, post_n = vae(ordinary, "ordinary", sample=False)
        rec_g, post_g = vae(gsi, "gsi", sample=False)
        (vae_loss(rec_n, centre_slice(ordinary), post_n)[0] + vae_loss(rec_g, centre_slice(gsi), post_g)[0]).backward()
        opt.step()
    assert not _same_decoders(vae)
    with torch.no_grad():
        z_n, z_g = vae.encode(ordinary).mode(), vae.encode(gsi).mode()

        def err(domain, z, stack):
            return torch.mean((vae.decode(z, domain) - centre_slice(stack)) ** 2).item()

        # each decoder reproduces its own domain better than the other decoder does ...
        assert err("gsi", z_g, gsi) < err("ordinary", z_g, gsi)
        assert err("ordinary", z_n, ordinary) < err("gsi", z_n, ordinary)
        # ... and D_n - D_g on the same latent points along the artifact pattern
        diff = (vae.decode(z_n, "ordinary") - vae.decode(z_n, "gsi")).flatten()
        artifact = (centre_slice(ordinary) - centre_slice(gsi)).flatten()
        assert torch.nn.functional.cosine_similarity(diff, artifact, dim=0) > 0.2


def test_the_alignment_network_with_the_loss_terms_overfits_one_batch():
    torch.manual_seed(0)
    vae = ARVAE(**TINY_VAE).eval().requires_grad_(False)
    ordinary, gsi = _phantoms(2, seed=4, streaks=True), _phantoms(2, seed=4, streaks=False)
    with torch.no_grad():
        z_n, z_g = vae.encode(ordinary).mode(), vae.encode(gsi).mode()
        target = vae.decode(z_g, "gsi")  # the GSI slice as this (untrained) VAE reproduces it: a reachable target
    mask = metal_mask(unit_to_hu(centre_slice(ordinary)))  # Eq. 8: the bright insert (2661 HU) > 2500 HU
    implant = torch.tensor([1, 3])
    # Eq. 11: contrastive training of Ec_n, Ec_g, then frozen (Sec. 3.4)
    enc = InvarianceEncoders(LATENT, width=8, feature_channels=16, groups=4)
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-2)
    first = enc.contrastive_loss(z_n, z_g).item()
    for _ in range(10):
        opt.zero_grad()
        enc.contrastive_loss(z_n, z_g).backward()
        opt.step()
    assert enc.contrastive_loss(z_n, z_g).item() < first
    enc.freeze()
    assert not any(p.requires_grad for p in enc.parameters())
    net = ALUNet(**TINY_ALU)
    # L_inv alone reaches the alignment network through the frozen encoders
    enc.invariance_loss(z_n, net(z_n, implant, mask)).backward()
    assert net.conv_out.weight.grad.abs().sum() > 0 and all(p.grad is None for p in enc.parameters())
    net.zero_grad()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        z_bar = net(z_n, implant, mask)
        loss = total_loss(vae.decode(z_bar, "gsi"), target, z_bar, z_g, enc.invariance_loss(z_n, z_bar),
                          alpha=ALPHA, beta=BETA)
        loss.total.backward()
        opt.step()
        losses.append(loss.total.item())
    assert (ALPHA, BETA) == (1.0, 0.001)
    assert mask.sum() > 0 and losses[-1] < losses[0] / 5, losses[::10]


def test_l_inv_is_zero_for_an_unchanged_latent_and_tied_encoders():
    torch.manual_seed(0)
    enc = InvarianceEncoders(LATENT, width=8, feature_channels=16, groups=4)
    z = torch.randn(3, LATENT, 8, 8)
    assert enc.invariance_loss(z, z).item() > 0  # Ec_n != Ec_g
    enc.ec_g.load_state_dict(enc.ec_n.state_dict())
    assert enc.invariance_loss(z, z).item() == 0.0
    assert enc.invariance_loss(z, z + 0.1 * torch.randn_like(z)).item() > 0
    no_inv = total_loss(torch.zeros(3, 1, 32, 32), torch.ones(3, 1, 32, 32), z, z + 1.0)
    assert no_inv.invariance.item() == 0.0 and no_inv.total.item() == pytest.approx(1.0 + ALPHA * 1.0)


def test_implant_type_and_metal_mask_reach_the_network_but_not_the_plain_one():
    torch.manual_seed(0)
    z = torch.randn(2, LATENT, 8, 8)
    mask = torch.zeros(2, 1, 32, 32)
    mask_metal = mask.clone()
    mask_metal[:, :, 10:14, 12:16] = 1.0
    implant, other = torch.tensor([0, 1]), torch.tensor([2, 3])
    for plain in (False, True):
        net = ALUNet(**TINY_ALU, plain=plain).eval()
        with torch.no_grad():
            base = net(z, implant, mask)
            by_implant = net(z, other, mask)
            by_mask = net(z, implant, mask_metal)
        assert base.shape == z.shape
        if plain:
            assert torch.equal(base, by_implant) and torch.equal(base, by_mask)
            assert torch.equal(base, net(z))
        else:
            assert (base - by_implant).abs().max() > 1e-4
            assert (base - by_mask).abs().max() > 1e-4
            # the priors act per slice: metal in slice 1 only leaves the output of slice 0 as it was
            only_1 = mask.clone()
            only_1[1] = mask_metal[1]
            with torch.no_grad():
                routed = net(z, implant, only_1)
            torch.testing.assert_close(routed[0], base[0], rtol=0, atol=1e-6)
            assert (routed[1] - base[1]).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["mask", "blur", "downsample", None])
def test_the_augmentation_alters_only_the_centre_slice_and_is_seeded(kind):
    stack = _phantoms(3, seed=5, streaks=True) + 0.05 * torch.randn(3, K, 32, 32, generator=torch.Generator()
                                                                      .manual_seed(6))
    before = stack.clone()
    kinds = ("mask", "blur", "downsample") if kind is None else (kind,)
    out = volume_aggregation_augment(stack, torch.Generator().manual_seed(7), p=1.0, augmentations=kinds)
    assert torch.equal(stack, before)  # the input is not modified
    assert torch.equal(out[:, [0, 2]], stack[:, [0, 2]])
    assert ((out[:, 1] - stack[:, 1]).abs().amax(dim=(-2, -1)) > 1e-3).all()
    again = volume_aggregation_augment(stack, torch.Generator().manual_seed(7), p=1.0, augmentations=kinds)
    assert torch.equal(out, again)
    untouched = volume_aggregation_augment(stack, torch.Generator().manual_seed(7), p=0.0)
    assert torch.equal(untouched, stack)


def test_the_decoder_batch_mix_holds_a_quarter_gsi_and_the_hu_scale_round_trips():
    gsi = torch.arange(8.0).view(8, 1, 1, 1).expand(8, K, 2, 2)
    clean = -1.0 - torch.arange(8.0).view(8, 1, 1, 1).expand(8, K, 2, 2)
    batch, is_gsi = decoder_batch_mix(gsi, clean, generator=torch.Generator().manual_seed(0))
    assert GSI_FRACTION == 0.25 and batch.shape == gsi.shape and int(is_gsi.sum()) == 2
    assert torch.equal(is_gsi, batch[:, 0, 0, 0] >= 0)  # the flags mark the GSI items
    assert len(set(batch[:, 0, 0, 0].tolist())) == 8  # drawn without replacement
    again = decoder_batch_mix(gsi, clean, generator=torch.Generator().manual_seed(0))
    assert torch.equal(batch, again[0]) and torch.equal(is_gsi, again[1])
    hu = torch.tensor([HU_RANGE[0], 0.0, HU_RANGE[1], 5000.0])
    unit = hu_to_unit(hu)
    assert unit[0] == -1.0 and unit[2] == 1.0 and unit[3] == 1.0
    torch.testing.assert_close(unit_to_hu(unit[:3]), hu[:3])


def test_bad_inputs_raise_value_errors_naming_expected_and_found():
    torch.manual_seed(0)
    vae = ARVAE(**TINY_VAE)
    with pytest.raises(ValueError, match=re.escape("expected k = 3") + ".*" + re.escape("found k = 5")):
        vae.encode(torch.zeros(1, 5, 32, 32))
    with pytest.raises(ValueError, match="odd.*found k = 4"):
        ARVAE(**{**TINY_VAE, "k": 4})
    with pytest.raises(ValueError, match=re.escape("(B, 4, h, w); found (1, 3, 8, 8)")):
        vae.decode(torch.zeros(1, 3, 8, 8))
    net = ALUNet(**TINY_ALU)
    z, mask = torch.zeros(2, LATENT, 8, 8), torch.zeros(2, 1, 32, 32)
    with pytest.raises(ValueError, match=re.escape("(B, 4, h, w); found (2, 3, 8, 8)")):
        net(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]), mask)
    with pytest.raises(ValueError, match=re.escape("divisible by 2; found 7 x 8")):
        net(torch.zeros(2, LATENT, 7, 8), torch.tensor([0, 1]), torch.zeros(2, 1, 28, 32))
    n = len(IMPLANT_TYPES)
    with pytest.raises(ValueError, match=re.escape(f"in [0, {n})") + ".*" + re.escape(f"found [0, {n}]")):
        net(z, torch.tensor([0, n]), mask)
    with pytest.raises(ValueError, match=re.escape("found [-1, 0]")):
        net(z, torch.tensor([-1, 0]), mask)
    with pytest.raises(ValueError, match=re.escape("(B, 1, m*8, n*8)") + ".*" + re.escape("found (2, 1, 30, 32)")):
        net(z, torch.tensor([0, 1]), torch.zeros(2, 1, 30, 32))
    with pytest.raises(ValueError, match="found None"):
        net(z, None, mask)
