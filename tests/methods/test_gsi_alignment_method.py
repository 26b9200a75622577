"""The registered method ``gsi-alignment`` (Han et al.): its two training stages, Table 1's variants, the cached
pre-training, and the whole pipeline on the simulated ArtifactGSI analogue with the datamodule's simulated
sinograms."""
import pytest
import torch

from marbench.methods.gsi_alignment import VARIANTS, GSIAlignment, PretrainRecipe, pretrain, pretrained, unit_to_hu
from marbench.methods.gsi_alignment import method as gsi_method

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = PretrainRecipe(block_out_channels=(8, 8, 16), norm_num_groups=4, steps=60, batch_size=4, encoder_width=8,
                      feature_channels=8, contrastive_steps=20, lr=3e-3)


def _slices(n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """``(n, 3, 32, 32)`` stacks in [-1, 1]: discs drifting over the slices; the ordinary stack carries a streak
    pattern around a bright insert, the GSI stack a weaker one, the clean stack none."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    out = {name: torch.empty(n, 3, 32, 32) for name in ("ordinary", "gsi", "clean")}
    for i in range(n):
        r, cx, cy = (torch.rand(3, generator=g) * torch.tensor([0.3, 0.4, 0.4]) + torch.tensor([0.5, -0.2, -0.2])
                     ).tolist()
        for s in range(3):
            body = (xx ** 2 + yy ** 2 < r ** 2).float()
            insert = ((xx - cx - 0.04 * s) ** 2 + (yy - cy) ** 2 < 0.01).float()
            streak = torch.cos(2 * torch.atan2(yy - cy, xx - cx)) * body
            clean = -0.8 + 0.6 * body + 0.9 * insert
            out["clean"][i, s] = clean
            out["gsi"][i, s] = (clean + 0.1 * streak).clamp(-1, 1)
            out["ordinary"][i, s] = (clean + 0.5 * streak).clamp(-1, 1)
    return out


def _batch(slices: dict[str, torch.Tensor]) -> dict:
    ma, gt = unit_to_hu(slices["ordinary"]), unit_to_hu(slices["gsi"])
    return {"ma_stack": ma, "gt_stack": gt, "ma_image": ma[:, 1:2], "gt_image": gt[:, 1:2],
            "metal_mask": ma[:, 1:2] > 2500, "implant_index": torch.arange(ma.shape[0]) % 4}


def _method(variant: str = "full") -> GSIAlignment:
    torch.manual_seed(0)
    return GSIAlignment(variant=variant, scale="tiny", lr=3e-3)


def test_pretraining_trains_both_decoders_apart_and_the_2d_baseline_shares_one():
    slices = _slices()
    vae, invariance = pretrain(slices, TINY, log=lambda *_: None)
    assert not any(p.requires_grad for p in [*vae.parameters(), *invariance.parameters()])
    d_n = torch.cat([p.flatten() for p in vae.decoder_n.parameters()])
    d_g = torch.cat([p.flatten() for p in vae.decoder_g.parameters()])
    assert d_n.shape == d_g.shape and not torch.allclose(d_n, d_g)
    # D_n reconstructs the ordinary slice better than D_g does, and D_g the GSI slice better than D_n does
    with torch.no_grad():
        z_n = vae.encode(slices["ordinary"]).mode()
        z_g = vae.encode(slices["gsi"]).mode()
        err = {(d, s): float((vae.decode(z, d) - slices[s][:, 1:2]).pow(2).mean())
               for d in ("ordinary", "gsi") for s, z in (("ordinary", z_n), ("gsi", z_g))}
    assert err["ordinary", "ordinary"] < err["gsi", "ordinary"]
    assert err["gsi", "gsi"] < err["ordinary", "gsi"]
    baseline, _ = pretrain({k: v[:, 1:2] for k, v in slices.items()},
                           PretrainRecipe(**{**TINY.__dict__, "k": 1, "shared_decoder": True, "augment": False,
                                             "steps": 2, "contrastive_steps": 1}), log=lambda *_: None)
    assert baseline.decoder_g is baseline.decoder_n and baseline.k == 1


def test_the_alignment_stage_overfits_one_batch_through_lightning(fit_on_one_batch):
    slices = _slices()
    vae, invariance = pretrain(slices, TINY, log=lambda *_: None)
    model = _method()
    model.use_pretrained({"vae": vae.state_dict(), "invariance": invariance.state_dict()}, "test")
    batch = _batch(slices)
    frozen = {k: v.clone() for k, v in model.vae.state_dict().items()}
    with torch.no_grad():
        before = float(model.alignment_loss(batch).total)
    fit_on_one_batch(model, batch, 80)
    with torch.no_grad():
        after = float(model.alignment_loss(batch).total)
    assert after < 0.5 * before, (before, after)
    # only the alignment network learns: E, D_n, D_g stay as pre-trained
    assert all(torch.equal(v, model.vae.state_dict()[k]) for k, v in frozen.items())
    out = model.restore(batch)
    assert out.shape == batch["gt_image"].shape


def test_the_alignment_stage_encodes_each_stack_once_and_its_loss_equals_direct_encoding(monkeypatch):
    """The frozen-VAE latent cache of the alignment stage: the loss equals the one from encoding every batch (to
    float rounding); a stack seen before is not encoded again, a changed stack is, and new pre-trained weights
    empty the cache."""
    slices = _slices(6)
    model = _method()
    batch = _batch(slices)
    with torch.no_grad():
        z_n = model.vae.encode(model._stack(batch, "ma_stack")).mode()
        z_g = model.vae.encode(model._stack(batch, "gt_stack")).mode()
        z_bar = model._align(z_n, batch)
        pred = model.vae.decode(z_bar, "gsi")
        direct = gsi_method.total_loss(pred, gsi_method.hu_to_unit(batch["gt_image"].float()), z_bar, z_g,
                                       model.invariance.invariance_loss(z_n, z_bar), model.hparams.alpha,
                                       model.hparams.beta).total
    encoded = []
    encode = model.vae.encode
    monkeypatch.setattr(model.vae, "encode", lambda x: encoded.append(x.shape[0]) or encode(x))
    with torch.no_grad():
        first = model.alignment_loss(batch).total
        again = model.alignment_loss(batch).total
        torch.testing.assert_close(first, direct, atol=1e-6, rtol=1e-5)
        assert torch.equal(first, again) and encoded == [6, 6]  # ma and gt stacks once each
        half = {k: v[:3] for k, v in batch.items()}
        model.alignment_loss({**half, "ma_stack": half["ma_stack"] + 1.0})
        assert encoded == [6, 6, 3]  # three changed ma stacks; their gt stacks were seen
    model.use_pretrained({"vae": model.vae.state_dict(), "invariance": model.invariance.state_dict()}, "again")
    with torch.no_grad():
        model.alignment_loss(batch)
    assert encoded == [6, 6, 3, 6, 6]


def test_implant_type_and_mask_reach_the_full_network_but_not_the_plain_one():
    batch = _batch(_slices(4))
    for variant, reaches in (("full", True), ("arvae-plain", False)):
        model = _method(variant).eval()
        with torch.no_grad():
            base = model.restore(batch)
            other_implant = model.restore({**batch, "implant_index": (batch["implant_index"] + 1) % 4})
            other_mask = model.restore({**batch, "metal_mask": ~batch["metal_mask"]})
        assert (not torch.equal(base, other_implant)) == reaches, variant
        assert (not torch.equal(base, other_mask)) == reaches, variant


def test_variants_name_their_rows_and_the_paper_tables_name_registered_rows():
    names = {v: _method(v).card.name for v in VARIANTS}
    assert names["full"] == "gsi-alignment" and names["2d-vae-plain"] == "gsi-alignment-2d-vae-plain"
    ablation = next(t for t in GSIAlignment.paper_tables if t.name == "gsi-alignment-ablation")
    assert [r for r, _ in ablation.rows] == [names[v] for v in VARIANTS]
    assert set(ablation.values) == {spec["label"] for spec in VARIANTS.values()}
    assert _method("2d-vae-plain").recipe.k == 1 and _method("full").recipe.k == 3
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        GSIAlignment(variant="nope")
    with pytest.raises(ValueError, match="unknown scale 'huge'"):
        GSIAlignment(scale="huge")


def test_a_stack_thinner_than_the_encoder_reads_is_named():
    batch = _batch(_slices(2))
    with pytest.raises(ValueError, match=r"reads 3 adjacent slices; batch\['ma_stack'\] has shape \(2, 1, 32, 32\)"):
        _method().restore({**batch, "ma_stack": batch["ma_stack"][:, :1]})
    # the 2D baseline reads the centre slice of a thicker stack
    assert _method("2d-vae-plain").restore(batch).shape == (2, 1, 32, 32)


class _FakeDataModule:
    def __init__(self, root, slices):
        self.root, self.split_sha256, self.slices = root, "0" * 64, slices

    def dataset(self, part, keys, clean=False):
        hu = {k: unit_to_hu(v) for k, v in self.slices.items()}
        if clean:
            return [{"ma_stack": s} for s in hu["clean"]]
        return [{"ma_stack": a, "gt_stack": b} for a, b in zip(hu["ordinary"], hu["gsi"], strict=True)]


def test_the_pretraining_is_cached_per_data_split_and_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("MARBENCH_CACHE", str(tmp_path / "cache"))
    dm = _FakeDataModule(tmp_path, _slices(4))
    recipe = PretrainRecipe(**{**TINY.__dict__, "steps": 2, "contrastive_steps": 1})
    state, sha = pretrained(dm, recipe, log=lambda *_: None)
    assert set(state) == {"vae", "invariance"}

    def fail(*_, **__):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(gsi_method, "pretrain", fail)
    again, sha_again = pretrained(dm, recipe, log=lambda *_: None)
    assert sha_again == sha and all(torch.equal(again["vae"][k], v) for k, v in state["vae"].items())
    with pytest.raises(AssertionError, match="retrained"):
        pretrained(dm, PretrainRecipe(**{**recipe.__dict__, "seed": 1}), log=lambda *_: None)
    dm.split_sha256 = "1" * 64
    with pytest.raises(AssertionError, match="retrained"):
        pretrained(dm, recipe, log=lambda *_: None)



def test_the_datamodule_simulates_sinograms_of_the_ordinary_slices(gsi_tiny):
    from marbench.datasets.artifactgsi import ArtifactGSIDataModule
    from marbench.physics import Projector, hu_to_mu, preset

    root, _ = gsi_tiny
    keys = ("ma_image", "metal_mask", "ma_sinogram", "metal_trace", "li_sinogram", "li_image")
    dm = ArtifactGSIDataModule(root, geometry="aapm_body_128", keys=keys)
    dm.setup("test")
    item = dm.datasets["test"][1]
    g = preset("aapm_body_128")
    projector = Projector(g)
    expected = projector.fp(hu_to_mu(item["ma_image"][None], g.mu_water_per_mm))[0]
    assert torch.allclose(item["ma_sinogram"], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(item["metal_trace"], projector.fp(item["metal_mask"][None].float())[0] > 0)
    assert item["metal_trace"].any() and item["geometry"] and torch.isfinite(item["li_image"]).all()
    # LI replaces exactly the metal trace of the sinogram
    trace = item["metal_trace"]
    assert torch.equal(item["li_sinogram"][~trace], item["ma_sinogram"][~trace])
    assert not torch.allclose(item["li_sinogram"][trace], item["ma_sinogram"][trace])
    with pytest.raises(ValueError, match="simulated from the ordinary slices by forward projection; give a geometry"):
        ArtifactGSIDataModule(root, keys=keys).setup("test")
    dm = ArtifactGSIDataModule(root, geometry="aapm_body_256", keys=keys)
    dm.setup("test")
    with pytest.raises(ValueError, match=r"ordinary\.nii\.gz: slice \d: expected the geometry's image grid "
                                         r"\(256, 256\), found \(128, 128\)"):
        dm.datasets["test"][0]


def test_fit_pretrains_once_then_restores_the_analogue(gsi_tiny):
    import lightning as L

    from marbench.datasets.artifactgsi import ArtifactGSIDataModule

    root, _ = gsi_tiny
    keys = ("ma_image", "ma_stack", "gt_image", "gt_stack", "metal_mask", "labels")
    dm = ArtifactGSIDataModule(root, k=3, keys=keys, batch_size=2)
    model = _method()
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert model.weights_info()["arvae+invariance-encoders"].startswith("pre-trained ")
    batch = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        out = model.eval().checked_restore(batch)
    assert out.shape == batch["gt_image"].shape == (2, 1, 128, 128)
