"""The registered DuDoCROP method: its rows and configs, the three training stages (each step trains only its
stage's parameters), the composition of its outputs (Eq. 10-15), batch-invariant sampling and its errors. The
building blocks have their own tests (``test_dudocrop_irsde``, ``_unet``, ``_clip``, ``_captions``)."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from marbench.methods.dudocrop import DuDoCROP
from marbench.methods.dudocrop.method import SCALES, _rows

ROOT = Path(__file__).parents[2]
CONFIGS = sorted((ROOT / "configs" / "bench").glob("dudocrop*.yaml"))


def _init_args(config: Path) -> dict:
    return yaml.safe_load(config.read_text())["model"]["init_args"]


def _tiny(**kwargs) -> DuDoCROP:
    torch.manual_seed(0)
    return DuDoCROP(scale="tiny", **kwargs)


def test_every_row_config_names_its_paper_row_and_the_sum_of_its_stages():
    names = {}
    for config in CONFIGS:
        args = _init_args(config)
        model = DuDoCROP(**{**args, "scale": "tiny"})
        names[config.stem] = model.card.name
        assert args["scale"] == "smoke"
        steps = dict(zip(("clip", "sde", "residual"), SCALES["smoke"]["stage_steps"], strict=True))
        expected = sum(steps[s] for s, _ in model.schedule)
        found = yaml.safe_load(config.read_text())["trainer"]["max_steps"]
        assert found == expected, f"{config.name}: max_steps {found}, its stages {model.schedule} sum to {expected}"
    assert len(set(names.values())) == len(names), names
    tables = {row for t in DuDoCROP.paper_tables for row, _ in t.rows}
    fig12 = {"dudocrop-no-embedding", "dudocrop-image-embedding", "dudocrop-control-embedding", "dudocrop"}
    assert set(names.values()) == tables | fig12


def _snapshot(model: DuDoCROP) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before: dict, after: dict) -> set[str]:
    groups = set()
    for k, v in after.items():
        if not torch.equal(v, before[k]):
            groups.add(k.split(".")[0] if not k.startswith("nets.") else ".".join(k.split(".")[:2]))
    return groups


class _Recorder(L.Callback):
    def __init__(self):
        self.changes = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before = _snapshot(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.changes.append(_changed(self.before, _snapshot(module)))


def test_each_stage_trains_only_its_parameters_in_order(tiny_batch):
    _, batch = tiny_batch
    model = _tiny()
    frozen_before = {k: v.clone() for k, v in model.clip.state_dict().items() if k.startswith("clip.")}
    recorder = _Recorder()
    trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder])
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader([batch] * 6, batch_size=None))
    assert [model.stage_at(i) for i in range(6)] == ["clip", "clip", "sde", "sde", "residual", "residual"]
    assert recorder.changes[:2] == [{"clip"}, {"clip"}]
    assert recorder.changes[2:4] == [{"nets.image", "nets.sinogram"}] * 2
    assert recorder.changes[4:] == [{"nets.residual"}] * 2
    frozen_after = model.clip.state_dict()
    assert all(torch.equal(v, frozen_after[k]) for k, v in frozen_before.items()), "the CLIP towers must stay frozen"
    # stage 3 sampled and kept the priors of at most residual_slices training slices
    assert 0 < len(model._residual_cache) <= model.hparams.residual_slices


def test_a_row_without_embeddings_skips_the_clip_stage_and_checks_max_steps(tiny_batch):
    _, batch = tiny_batch
    model = _tiny(output="image", image_embedding=False, control_embedding=False)
    assert model.clip is None and model.schedule == [("sde", 2)] and set(model.nets) == {"image"}
    assert model.card.name == "dudocrop-image-sde-no-embedding"
    trainer = L.Trainer(accelerator="cpu", max_steps=5, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"max_steps must be the sum of the used stages \{'sde': 2\} = 2, found 5"):
        trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader([batch] * 5, batch_size=None))


def _perturbed(model: DuDoCROP, seed: int = 1) -> DuDoCROP:
    """Small random output layers, so that the untrained networks change their inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for net in model.nets.values():
            net.final_conv.weight.copy_(0.02 * torch.randn(net.final_conv.weight.shape, generator=g))
    return model.eval()


def _sharing(reference: DuDoCROP, **kwargs) -> DuDoCROP:
    model = _tiny(**kwargs)
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in reference.state_dict().items() if k in own}, strict=False)
    return model.eval()


def test_outputs_compose_as_eq10_to_15(tiny_batch):
    _, batch = tiny_batch
    full = _perturbed(_tiny(k=0.0))
    fusion, norm, fidelity = (_sharing(full, output=o) for o in ("fusion", "image-norm", "sinogram-fidelity"))
    metal = batch["metal_mask"]
    with torch.no_grad():
        (projector, rows), = list(full.physics.groups(batch))
        part = _rows(batch, rows)
        x_p = norm.reconstruct(part, projector, metal)
        x_pp = fidelity.reconstruct(part, projector, metal)
        # Eq. 12: X_p lies on the range of X'_p, slice by slice (Eq. 11)
        assert torch.allclose(x_p.amin(dim=(1, 2, 3)), x_pp.amin(dim=(1, 2, 3)), rtol=1e-5, atol=1e-7)
        assert torch.allclose(x_p.amax(dim=(1, 2, 3)), x_pp.amax(dim=(1, 2, 3)), rtol=1e-5, atol=1e-7)
        assert not torch.allclose(x_p, x_pp)
        # Eq. 15 without refinement
        assert torch.allclose(fusion.reconstruct(part, projector, metal), 0.5 * x_p + 0.5 * x_pp, atol=1e-7)
        # Eq. 13-14 with k = 0 leave X_p as it is: the full output equals the fusion
        assert torch.allclose(full.reconstruct(part, projector, metal), 0.5 * x_p + 0.5 * x_pp, atol=1e-6)
        refined = _sharing(full, k=1.0).reconstruct(part, projector, metal)
        assert not torch.allclose(refined, 0.5 * x_p + 0.5 * x_pp, atol=1e-6)


def test_untrained_rows_return_their_input_and_sampling_is_batch_invariant(tiny_batch):
    _, batch = tiny_batch
    model = _tiny(output="image").eval()
    with torch.no_grad():
        out = model.checked_restore(batch)
        # the zero-initialised correction samples the exact reverse process towards F_0 = mu (the windowed input)
        ma, outside = batch["ma_image"].clamp(-1024.0, 3072.0), ~batch["metal_mask"]
        assert (out - ma)[outside].abs().max() < 0.05
        assert torch.equal(out[~outside], batch["ma_image"][~outside])  # metal put back
        model = _perturbed(model)
        together = model.checked_restore(batch)
        alone = torch.cat([model.checked_restore(_rows(batch, [i])) for i in range(len(batch["slice_id"]))])
    # per-slice generators: the same noise alone or in a batch (float32 convolutions may differ in the last bits)
    assert torch.allclose(together, alone, atol=1e-2, rtol=0)


def test_the_network_predicts_the_clean_state_minus_mu_and_sinogram_crops_sit_on_the_trace():
    model = _perturbed(_tiny(output="sinogram", image_embedding=False, control_embedding=False))
    g = torch.Generator().manual_seed(0)
    xt, mu = torch.rand(2, 1, 16, 16, generator=g), torch.rand(2, 1, 16, 16, generator=g)
    t = torch.tensor([1, 2])
    with torch.no_grad():
        r = model.nets["sinogram"](xt, mu, t)
        x0_hat = model.sde.predicted_x0(xt, mu, model.noise("sinogram", xt, mu, t), t)
    assert r.abs().max() > 1e-3
    torch.testing.assert_close(x0_hat, mu + r, rtol=0, atol=1e-4)  # float32 through exp(gbar_t) and back
    # every crop of a slice with a metal trace is centred on one of its pixels
    trace = torch.zeros(2, 1, 80, 90, dtype=torch.bool)
    trace[0, 0, 40, 20:70] = True
    trace[1, 0, 30:50, 45] = True
    marked = trace.float()
    for _ in range(5):
        crops, _ = model._crop(marked, marked, rotate=False, focus=trace)
        c = model.hparams.crop
        assert crops.shape == (2, 1, c, c) and bool((crops[:, 0, c // 2, c // 2] == 1).all())


def test_bad_input_is_named(tiny_batch, tmp_path):
    _, batch = tiny_batch
    with pytest.raises(ValueError, match="unknown output 'sinogram-only'"):
        _tiny(output="sinogram-only")
    with pytest.raises(ValueError, match="unknown scale"):
        DuDoCROP(scale="huge")
    # CLIP weights with the wrong sha256
    weights = tmp_path / "clip.pt"
    torch.save(_tiny().clip.clip.state_dict(), weights)
    with pytest.raises(ValueError, match="sha256"):
        _tiny(clip_weights=str(weights), clip_sha256="0" * 64)
    # a sinogram on another grid than the slice's geometry
    model = _tiny(output="sinogram-fidelity").eval()
    bad = dict(batch, ma_sinogram=batch["ma_sinogram"][..., :-3])
    with pytest.raises(ValueError, match="ma_sinogram"), torch.no_grad():
        model.checked_restore(bad)
    # a caption file without one of the batch's slices
    captions = tmp_path / "captions.json"
    first = batch["slice_id"][0]
    captions.write_text(json.dumps({first: {"content": "a CT slice", "metal": "one small implant"}}))
    model = _tiny(caption_file=str(captions))
    with pytest.raises(ValueError, match=batch["slice_id"][1]):
        model.clip_loss(batch)
