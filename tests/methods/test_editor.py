"""The LoRA image editor (Emirdagi et al.): LoRA placement, the flow-matching objective and sampler, the
conditionings, self-ensembling, the VAE ceiling, LoRA files and the errors a user meets. The tiny backbone has the
real architecture (diffusers' QwenImageTransformer2DModel and AutoencoderKLQwenImage, transformers' Qwen2.5-VL)."""
import re
from collections import Counter

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from marbench.methods.editor import LORA_TARGET_MODULES, LoRAEditor, build_backbone, load_backbone
from marbench.methods.editor.backbone import pack, save_backbone, training_sigmas, training_weights, unpack
from marbench.methods.editor.conditioning import (
    N_REFERENCES,
    WINDOW_HU,
    condition_images,
    grid_cells,
    grid_image,
    hu_to_rgb,
    pick_references,
    rgb_to_hu,
)
from marbench.methods.editor.instruction import format_instruction


@pytest.fixture(scope="module")
def pool(tiny_batch):
    """A reference pool (category -> slice id -> (1, H, W) HU): the tiny benchmark has one training slice per
    category, so every clean training slice stands in the first test slice's category."""
    dm, batch = tiny_batch
    train = dm.dataset("train", ("gt_image",))
    return {batch["category"][0]: {train[i]["slice_id"]: train[i]["gt_image"] for i in range(len(train))}}


def _editor(**kwargs) -> LoRAEditor:
    torch.manual_seed(0)
    return LoRAEditor(scale="tiny", **{"rank": 4, "train_pairs": 4, **kwargs}).eval()


def _batch(tiny_batch, n: int = 2) -> dict:
    _, batch = tiny_batch
    return {k: (v[:n] if isinstance(v, torch.Tensor) else v[:n]) for k, v in batch.items()}


# -- LoRA placement ----------------------------------------------------------------------------------------------
def test_lora_sits_on_exactly_the_twelve_module_types_of_every_block_and_only_lora_trains():
    editor = _editor()
    transformer = editor.backbone.transformer
    adapted = [name for name, _ in transformer.named_modules() if name.endswith(".lora_A")]
    per_block = Counter(int(re.match(r"transformer_blocks\.(\d+)\.", n).group(1)) for n in adapted)
    blocks = len(transformer.transformer_blocks)
    assert per_block == {b: 12 for b in range(blocks)}
    types = {re.sub(r"^transformer_blocks\.\d+\.(attn\.)?", "", n).removesuffix(".lora_A") for n in adapted}
    assert types == set(LORA_TARGET_MODULES)
    trainable = [n for n, p in editor.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 12 * blocks
    optimiser = editor.configure_optimizers()
    assert sum(p.numel() for g in optimiser.param_groups for p in g["params"]) == sum(
        p.numel() for p in editor.parameters() if p.requires_grad)
    # Eq. 2's alpha / r = 1 (DiffSynth's alpha = rank); B starts at zero, so the adapted model is the base model
    layer = transformer.transformer_blocks[0].attn.to_q
    assert layer.scaling["default"] == 1.0 and torch.count_nonzero(layer.lora_B["default"].weight) == 0


def test_the_zero_shot_and_vae_ceiling_rows_have_no_adapter_and_do_not_train():
    for kwargs, name in (({"lora": False}, "lora-editor-zero-shot"), ({"output": "vae-ceiling"},
                                                                      "lora-editor-vae-ceiling")):
        editor = _editor(**kwargs)
        assert editor.card.name == name and not editor.card.trainable
        assert not any(p.requires_grad for p in editor.parameters())
        assert not any("lora_" in n for n, _ in editor.backbone.transformer.named_parameters())


def test_row_names_follow_the_tables():
    assert _editor(conditioning="multi", ensemble=10, train_pairs=128, rank=64).card.name == "lora-editor-multi-ens10"
    assert _editor(train_pairs=16, rank=64).card.name == "lora-editor-n16"
    assert _editor(train_pairs=128, rank=128).card.name == "lora-editor-r128"
    assert _editor(conditioning="grid", train_pairs=128, rank=64).card.name == "lora-editor-grid"


# -- flow matching -----------------------------------------------------------------------------------------------
def test_training_sigmas_and_weights_are_diffsynths_qwen_image_schedule():
    s = training_sigmas()
    assert len(s) == 1000 and s[0] == pytest.approx(1.0) and s[-1] == pytest.approx(0.02)
    assert bool((s[1:] < s[:-1]).all())
    # index 500: t = 0.5 shifted by e^0.8 / (e^0.8 + 1) then stretched to the terminal 0.02
    shifted = torch.tensor(0.8).exp() / (torch.tensor(0.8).exp() + 1.0)
    last = torch.tensor(0.8).exp() / (torch.tensor(0.8).exp() + 999.0)
    expected = 1.0 - (1.0 - shifted) / ((1.0 - last) / 0.98)
    assert float(s[500]) == pytest.approx(float(expected), rel=1e-6)
    w = training_weights(s)
    assert float(w.mean()) == pytest.approx(1.0) and float(w[0]) == pytest.approx(0.0, abs=1e-9)
    assert int(torch.argmax(w)) == int(torch.argmin((s * 1000 - 500).abs()))


def test_pack_and_unpack_are_inverse_and_match_diffusers():
    from diffusers import QwenImageEditPlusPipeline

    z = torch.randn(2, 16, 6, 8)
    tokens = pack(z)
    assert torch.equal(tokens, QwenImageEditPlusPipeline._pack_latents(z, 2, 16, 6, 8))
    assert torch.equal(unpack(tokens, 6, 8), z)


def test_the_vae_convolves_images_in_2d_as_diffusers_does_in_3d_values_and_gradients():
    """``image_convolutions`` against diffusers' own ``QwenImageCausalConv3d.forward`` (every temporal tap random,
    not only the last): encoding, decoding and the weight gradients of a one-frame input agree to float rounding;
    a two-frame video (its first frame alone, then the second with the first cached) agrees too; the state dict
    keys are unchanged."""
    import copy

    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

    from marbench.methods.editor.backbone import image_convolutions

    torch.manual_seed(0)
    fast = build_backbone("tiny").vae.float().requires_grad_(True)
    for m in fast.modules():
        if isinstance(m, torch.nn.Conv3d):
            torch.nn.init.normal_(m.weight, std=0.1)  # the taps that meet the causal zeros are not zero here
    reference = copy.deepcopy(fast)
    n = image_convolutions(reference, enabled=False)
    assert n > 10 and not any(type(m) is QwenImageCausalConv3d for m in fast.modules())
    assert list(fast.state_dict()) == list(reference.state_dict())
    x = torch.rand(2, 3, 1, 32, 32) * 2 - 1
    grads = []
    for vae in (fast, reference):
        vae.zero_grad()
        z = vae.encode(x).latent_dist.mode()
        y = vae.decode(z).sample
        (y.square().mean() + z.square().mean()).backward()
        # parameters a single frame never reaches (the temporal down- and up-sampling) have no gradient in either
        grads.append((z.detach(), y.detach(), [None if p.grad is None else p.grad.clone() for p in vae.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-5, rtol=1e-4)
    assert sum(g is not None for g in grads[0][2]) > 20
    for g_fast, g_ref in zip(grads[0][2], grads[1][2], strict=True):
        assert (g_fast is None) == (g_ref is None)
        if g_fast is not None:
            torch.testing.assert_close(g_fast, g_ref, atol=1e-5, rtol=1e-3)
    video = torch.rand(1, 3, 2, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(fast.encode(video).latent_dist.mode(), reference.encode(video).latent_dist.mode(),
                                   atol=1e-5, rtol=1e-4)


def test_the_sampler_follows_the_straight_path_to_the_target():
    """With the exact velocity of Eq. 5's straight path, ``v = (x - z) / sigma``, the Euler loop lands on ``z``
    for any step count: the sampler's sigmas, signs and the final sigma 0 agree with the training convention."""
    backbone = build_backbone("tiny")
    z = torch.randn(1, 16, 64)
    backbone.velocity = lambda x, cond, shapes, instruction, sigma: (x - z) / sigma[:, None, None]
    for steps in (2, 3, 8):
        out = backbone.sample(None, None, None, torch.randn(1, 16, 64), steps)
        torch.testing.assert_close(out, z, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="at least 2 steps"):
        backbone.sample(None, None, None, torch.randn(1, 16, 64), 1)


def test_one_batch_overfit_the_flow_matching_loss_falls_five_fold(tiny_batch, one_thread):
    editor = _editor(rank=8, lr=1e-2)
    # a pre-trained backbone's output head spans the velocity's range; the random tiny one's is about a quarter of
    # it, and no LoRA (which leaves proj_out frozen, as the paper's 12 module types do) could reach the target
    with torch.no_grad():
        editor.backbone.transformer.proj_out.weight.mul_(4.0)
    _, batch = tiny_batch
    target = editor.backbone.encode(hu_to_rgb(batch["gt_image"][:1]))
    cond, shapes, instruction, _ = editor._conditioned("x", "body", batch["ma_image"][0])
    optimiser = editor.configure_optimizers()

    def loss() -> torch.Tensor:  # one batch: the same noise and sigma at every step
        return editor.backbone.flow_matching_loss(target, cond, shapes, instruction, torch.Generator().manual_seed(3))

    with torch.no_grad():
        first = float(loss())
    for _ in range(120):
        optimiser.zero_grad()
        value = loss()
        value.backward()
        optimiser.step()
    with torch.no_grad():
        last = float(loss())
    assert last < first / 5, (first, last)


def test_a_lightning_fit_trains_the_lora_on_the_n_pair_subset(tiny_batch, one_thread):
    dm, _ = tiny_batch
    editor = _editor(train_pairs=3, lr=1e-3, gradient_checkpointing=True)
    before = {n: p.detach().clone() for n, p in editor.named_parameters() if p.requires_grad}
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(editor, datamodule=dm)
    changed = [n for n, p in editor.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and all("lora_" in n for n in changed)
    pairs = [p["slice_id"] for p in editor._training_pairs()]
    train_ids = [dm.dataset("train", ("gt_image",)).cases[i].case_id for i in range(len(dm.datasets["train"]))]
    assert len(pairs) == 3 and set(pairs) <= set(train_ids)
    # the N-subsets are nested prefixes of one permutation, whatever the training seed
    larger = _editor(train_pairs=5)
    larger.trainer = trainer  # reads the same datamodule
    assert set(pairs) <= {p["slice_id"] for p in larger._training_pairs()}
    # a repeat visits each pair once
    assert sorted(editor.pair_at(s)["slice_id"] for s in range(3)) == sorted(pairs)


# -- LoRA files ----------------------------------------------------------------------------------------------------
def test_a_saved_and_reloaded_lora_gives_bit_identical_samples(tiny_batch, tmp_path):
    editor = _editor()
    with torch.no_grad():
        for name, p in editor.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    sha = editor.save_lora(tmp_path)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file() and len(sha) == 64
    batch = _batch(tiny_batch)
    with torch.no_grad():
        first = editor.predict_step(batch)
    fresh = _editor()
    fresh.load_lora(tmp_path, sha)
    with torch.no_grad():
        second = fresh.predict_step(batch)
    assert torch.equal(first, second)
    assert fresh.weights_info()["lora (peft safetensors)"] == sha
    # the file is diffusers' LoRA format: the Qwen-Image pipelines' loader reads it into a model without an adapter
    from diffusers import QwenImageEditPlusPipeline

    plain = _editor(lora=False)
    state = QwenImageEditPlusPipeline.lora_state_dict(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
    QwenImageEditPlusPipeline.load_lora_into_transformer(state, transformer=plain.backbone.transformer)
    with torch.no_grad():
        torch.testing.assert_close(plain.predict_step(batch), first)
    with pytest.raises(ValueError, match="differs from the expected"):
        fresh.load_lora(tmp_path, "0" * 64)
    with pytest.raises(ValueError, match="LoRA tensors"):
        _editor(rank=8).load_lora(tmp_path)


def test_checkpoints_hold_the_lora_only_and_restore_before_the_backbone_exists():
    editor = _editor()
    state = editor.state_dict()
    assert state and all("lora_" in k for k in state)
    with torch.no_grad():
        for v in state.values():
            v.add_(0.01)
    fresh = _editor()
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(RuntimeError, match="LoRA tensors"):
        fresh.load_state_dict({k: v for i, (k, v) in enumerate(state.items()) if i})


# -- representation and conditionings ------------------------------------------------------------------------------
def test_the_window_round_trip_is_exact_on_the_8_bit_levels_and_within_half_a_level_inside_the_window():
    low, high = WINDOW_HU
    levels = low + torch.arange(256, dtype=torch.float32) / 255.0 * (high - low)
    back = rgb_to_hu(hu_to_rgb(levels.view(1, 1, 16, 16)))
    torch.testing.assert_close(back.flatten(), levels, atol=1e-3, rtol=0)
    hu = torch.linspace(low, high, 10001).view(1, 1, 1, -1)
    assert float((rgb_to_hu(hu_to_rgb(hu)) - hu).abs().max()) <= (high - low) / 255 / 2 + 1e-3
    rgb = hu_to_rgb(torch.tensor([[[[-1000.0, 4000.0]]]]))  # air and metal saturate
    assert rgb.shape == (1, 3, 1, 2) and rgb[0, :, 0].tolist() == [[0.0, 1.0]] * 3


def test_multi_builds_the_six_image_call_in_order_and_the_prompt_names_six_pictures(tiny_batch, pool):
    editor = _editor(conditioning="multi")
    editor.set_reference_pool(pool)
    _, batch = tiny_batch
    sid, category = batch["slice_id"][0], batch["category"][0]
    refs = editor.references(sid, category)
    images = condition_images("multi", hu_to_rgb(batch["ma_image"][:1])[0], refs)
    assert len(images) == 6 and torch.equal(images[0], hu_to_rgb(batch["ma_image"][:1])[0])
    chosen = pick_references(sid, list(pool[category]))
    for k, rid in enumerate(chosen, start=1):
        assert torch.equal(images[k], hu_to_rgb(pool[category][rid][None])[0])
    cond, shapes, _, used = editor._conditioned(sid, category, batch["ma_image"][0])
    assert len(shapes) == 7 and all(torch.equal(a, b) for a, b in zip(used, images, strict=True))
    with torch.no_grad():
        expected = torch.cat([pack(editor.backbone.encode(im[None])) for im in images], dim=1)
    torch.testing.assert_close(cond, expected)
    text = format_instruction("x", 6)
    assert [int(i) for i in re.findall(r"Picture (\d+):", text)] == [1, 2, 3, 4, 5, 6]


def test_grid_tiles_are_where_the_prompt_says():
    source = torch.rand(3, 32, 48)
    refs = torch.rand(N_REFERENCES, 3, 32, 48)
    grid = grid_image(source, refs)
    assert grid.shape == (3, 32, 72)  # H x 1.5 W: 512 x 768 for 512 x 512 slices
    cells = grid_cells(32, 48)
    assert cells[0][:2] == (0, 0)  # "Top-left is the CT scan"
    for (top, left, h, w), image in zip(cells, [source, *refs], strict=True):
        torch.testing.assert_close(grid[:, top:top + h, left:left + w], F.avg_pool2d(image[None], 2)[0])
    with pytest.raises(ValueError, match="5 references"):
        grid_image(source, refs[:3])


def test_references_come_from_the_pool_and_never_the_slice_itself():
    ids = [f"body1/body{i}" for i in range(12)]
    for sid in ids[:3]:
        chosen = pick_references(sid, ids)
        assert len(set(chosen)) == 5 and sid not in chosen and set(chosen) <= set(ids)
        assert chosen == pick_references(sid, ids)


# -- self-ensembling and the VAE ceiling ---------------------------------------------------------------------------
def test_an_ensemble_of_identical_seeds_equals_one_sample_and_distinct_seeds_average(tiny_batch):
    batch = _batch(tiny_batch, 1)
    with torch.no_grad():
        one = _editor(ensemble=1, ensemble_seeds=[5]).predict_step(batch)
        three = _editor(ensemble=3, ensemble_seeds=[5, 5, 5]).predict_step(batch)
        other = _editor(ensemble=1, ensemble_seeds=[6]).predict_step(batch)
        mixed = _editor(ensemble=2, ensemble_seeds=[5, 6]).predict_step(batch)
    torch.testing.assert_close(three, one, atol=1e-2, rtol=0)  # HU; batched float32 sums differ in the last bits
    assert not torch.equal(one, other)
    metal = batch["metal_mask"]
    inside = (one > WINDOW_HU[0] + 5) & (one < WINDOW_HU[1] - 5) & (other > WINDOW_HU[0] + 5) & ~metal
    torch.testing.assert_close(mixed[inside], ((one + other) / 2)[inside], atol=1e-2, rtol=0)


def test_the_test_time_arguments_leave_training_alone(tiny_batch, one_thread):
    """The grid trains the ens-10 row once, with the multi row (``weights_from``): the adapters that two editors
    differing only in ``test_time_args`` train must be equal."""
    dm, _ = tiny_batch
    assert set(LoRAEditor.test_time_args) == {"ensemble", "ensemble_seeds", "sample_seed"}
    adapters = []
    for kwargs in ({}, {"ensemble": 3, "ensemble_seeds": [4, 5, 6], "sample_seed": 9}):
        L.seed_everything(0)
        editor = _editor(train_pairs=3, lr=1e-3, gradient_checkpointing=False, **kwargs)
        trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        trainer.fit(editor, datamodule=dm)
        adapters.append(editor.state_dict())
    assert adapters[0] and adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


def test_the_vae_ceiling_row_is_the_clean_target_encoded_and_decoded(tiny_batch):
    editor = _editor(output="vae-ceiling")
    batch = {"gt_image": _batch(tiny_batch)["gt_image"], "ma_image": _batch(tiny_batch)["ma_image"]}
    with torch.no_grad():
        out = editor.predict_step(batch)
        expected = rgb_to_hu(editor.backbone.decode(editor.backbone.encode(hu_to_rgb(batch["gt_image"]))))
    assert torch.equal(out, expected)


# -- the stand-in and real weights ---------------------------------------------------------------------------------
def test_a_saved_backbone_reloads_from_the_snapshot_layout(tmp_path):
    backbone = build_backbone("tiny", seed=1)
    save_backbone(backbone, tmp_path / "snap")
    for sub in ("transformer", "vae", "text_encoder", "processor", "scheduler"):
        assert (tmp_path / "snap" / sub).is_dir()
    loaded = load_backbone(tmp_path / "snap")
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), backbone.encode(x))
        torch.testing.assert_close(loaded.instruction("a", [x[0]]).embeds, backbone.instruction("a", [x[0]]).embeds)


def test_the_stand_in_pretrains_once_and_is_cached(tiny_batch, tmp_path, monkeypatch):
    from dataclasses import replace

    from marbench.methods.editor import standin

    monkeypatch.setenv("MARBENCH_CACHE", str(tmp_path))
    dm, _ = tiny_batch
    recipe = replace(standin.StandinRecipe(), size="tiny", vae_steps=2, vae_batch=2, vae_crop=32,
                     transformer_steps=3, transformer_crop=32)
    calls = []
    real = standin.pretrain_standin
    monkeypatch.setattr(standin, "pretrain_standin", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, sha = standin.standin_backbone(dm, recipe, log=lambda *_: None)
    _, again = standin.standin_backbone(dm, recipe, log=lambda *_: None)
    assert sha == again and len(calls) == 1
    assert not list((tmp_path / "editor-standin").glob(".standin-*"))  # no temporary folder left behind


def test_the_stand_in_edits_are_not_metal_artifact_reduction():
    from marbench.methods.editor.standin import STANDIN_EDITS, StandinRecipe, degrade

    x = torch.rand(1, 3, 32, 32).expand(1, 3, 32, 32).contiguous()
    g = torch.Generator().manual_seed(0)
    assert torch.equal(degrade(x, "identity", StandinRecipe(), g), x)
    blurred = degrade(x, "deblur", StandinRecipe(), g)
    assert float(blurred.std()) < float(x.std())
    assert not any("metal" in text.lower() for text in STANDIN_EDITS.values())


# -- errors ----------------------------------------------------------------------------------------------------------
def test_a_missing_base_model_folder_is_named_with_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)qwen-edit.*Qwen/Qwen-Image-Edit-2511"):
        load_backbone(tmp_path / "qwen-edit")
    editor = LoRAEditor(scale="paper", base=str(tmp_path / "qwen-edit"))
    with pytest.raises(FileNotFoundError, match="qwen-edit"):
        editor.setup("fit")
    with pytest.raises(ValueError, match="needs `base`"):
        LoRAEditor(scale="paper")


def test_multi_with_fewer_than_five_references_names_expected_and_found(tiny_batch, pool):
    editor = _editor(conditioning="multi")
    _, batch = tiny_batch
    category = batch["category"][0]
    few = dict(list(pool[category].items())[:3])
    editor.set_reference_pool({category: few})
    with pytest.raises(ValueError, match=r"expected at least 5 .* found [0-3]"):
        editor.predict_step(_batch(tiny_batch, 1))
    with pytest.raises(ValueError, match="needs 5 clean reference slices, found 2"):
        condition_images("multi", torch.rand(3, 16, 16), torch.rand(2, 3, 16, 16))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="conditioning"):
        _editor(conditioning="collage")
    with pytest.raises(ValueError, match="rank must be >= 1"):
        _editor(rank=0)
    with pytest.raises(ValueError, match="3 ensemble seeds expected, found 2"):
        _editor(ensemble=3, ensemble_seeds=[1, 2])
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        hu_to_rgb(torch.zeros(1, 3, 4, 4))
