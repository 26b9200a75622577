"""The stand-in backbone: a small Qwen-Image-Edit of the same architecture, pre-trained once on the benchmark's
training split on edits that are **not** metal artifact reduction, so that the LoRA adapts a prior as in the paper
(Emirdagi et al., Sec. 2.2: "rich visual priors" of a model pretrained at scale) instead of a random network.

Pre-training (``StandinRecipe``), on the training part's slices in the editor's representation
(``conditioning.hu_to_rgb``), both metal-affected and metal-free:

1. the VAE as an autoencoder of CT slices: random crops through the posterior mean (as the editor encodes), L1 +
   MSE reconstruction, AdamW with cosine annealing; then its latents' per-channel mean and std over the slices
   become its config's ``latents_mean`` / ``latents_std`` (the released VAE's config normalises its own the same
   way);
2. the MMDiT (with the frozen VAE and the seeded random instruction encoder), AdamW with cosine annealing, on
   instruction edits of the metal-free slices: ``denoise`` (Gaussian noise added to the edit image), ``deblur``
   (Gaussian blur) and ``identity``, by the editor's own flow-matching loss (``EditorBackbone.flow_matching_loss``),
   with the edit image alone, as picture 1 of a six-image call with five other slices, or top-left in the 2 x 3
   grid (the conditionings the editor uses, so the prior knows their layout, not the MAR task).

The result is cached under ``$MARBENCH_CACHE/editor-standin/<key>/`` in the snapshot layout of the real model
(``backbone.save_backbone``), keyed by the data manifest, the split and the recipe; a run writes it into a
temporary folder and renames it into place, so an interrupted run leaves nothing. Its digest
(``backbone.folder_sha256``) goes into every record as ``stand-in <sha256>``; records and tables say "stand-in
backbone", and no number of it stands for the paper's 20B model.

Command (the suite's command for it; ``make bench`` builds it on first use)::

    python -m marbench.methods.editor.standin --root data/smoke --split datasets/splits/synthetic_smoke.txt
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from marbench.files import cache_lock, sha256_file
from marbench.physics.backends import default_cache_dir

from .backbone import EditorBackbone, build_backbone, folder_sha256, load_backbone, save_backbone
from .conditioning import N_REFERENCES, condition_images, hu_to_rgb

__all__ = ["StandinRecipe", "STANDIN_EDITS", "standin_backbone", "pretrain_standin", "degrade"]

# edits of the pre-training: not metal artifact reduction
STANDIN_EDITS = {
    "denoise": "Remove the noise from picture 1.",
    "deblur": "Make picture 1 sharp.",
    "identity": "Return picture 1 unchanged.",
}
_VERSION = 2  # bump when the pre-training code changes what it produces (2: the VAE's 2D image convolutions)


@dataclass(frozen=True)
class StandinRecipe:
    """How the stand-in is pre-trained (sizes, steps, crops, learning rates, the seed)."""

    size: str = "standin"
    seed: int = 0
    vae_steps: int = 1000
    vae_batch: int = 8
    vae_crop: int = 64
    vae_lr: float = 1e-3
    transformer_steps: int = 500
    transformer_crop: int = 128
    transformer_lr: float = 1e-3
    noise_std: float = 0.05
    blur_sigma_px: float = 1.5


def degrade(rgb: torch.Tensor, edit: str, recipe: StandinRecipe, generator: torch.Generator) -> torch.Tensor:
    """The edit image whose ``edit`` gives ``rgb`` ``(B, 3, H, W)``: noisy (``denoise``), blurred (``deblur``) or
    itself (``identity``); values in [0, 1]."""
    if edit == "identity":
        return rgb
    if edit == "denoise":
        noise = torch.randn(rgb[:, :1].shape, generator=generator) * recipe.noise_std
        return (rgb + noise).clamp(0.0, 1.0)
    if edit == "deblur":
        radius = int(3 * recipe.blur_sigma_px + 0.5)
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * (x / recipe.blur_sigma_px) ** 2)
        k = k / k.sum()
        grey = F.pad(rgb[:, :1], (radius,) * 4, mode="reflect")
        grey = F.conv2d(F.conv2d(grey, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
        return grey.expand_as(rgb).contiguous()
    raise ValueError(f"unknown stand-in edit {edit!r}; expected one of {sorted(STANDIN_EDITS)}")


def _crops(images: torch.Tensor, size: int, n: int, generator: torch.Generator) -> torch.Tensor:
    _, _, h, w = images.shape
    if h < size or w < size:
        raise ValueError(f"stand-in pre-training crops {size} x {size}; the slices are {h} x {w}")
    idx = torch.randint(0, images.shape[0], (n,), generator=generator)
    tops = torch.randint(0, h - size + 1, (n,), generator=generator)
    lefts = torch.randint(0, w - size + 1, (n,), generator=generator)
    return torch.stack([images[i, :, t:t + size, x:x + size] for i, t, x in zip(idx, tops, lefts, strict=True)])


def _step(opt: torch.optim.Optimizer, schedule, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    schedule.step()


def _decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """``vae.decode`` of one-frame latents without its final clamp to [-1, 1]: a clamped pixel gets no gradient,
    and training through the clamp was unstable (the loss rose again between steps); the same decoder calls as
    diffusers' ``AutoencoderKLQwenImage._decode``."""
    vae.clear_cache()
    vae._conv_idx = [0]
    out = vae.decoder(vae.post_quant_conv(z), feat_cache=vae._feat_map, feat_idx=vae._conv_idx)
    vae.clear_cache()
    return out


def _train_vae(backbone: EditorBackbone, slices: torch.Tensor, recipe: StandinRecipe, g: torch.Generator, log):
    vae = backbone.vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, recipe.vae_steps)
    for step in range(recipe.vae_steps):
        x = _crops(slices, recipe.vae_crop, recipe.vae_batch, g) * 2.0 - 1.0
        # the posterior mean, as the editor encodes ("argmax"): a deterministic autoencoder
        y = _decode_unclamped(vae, vae.encode(x[:, :, None]).latent_dist.mode())[:, :, 0]
        loss = F.l1_loss(y, x) + F.mse_loss(y, x)
        _step(opt, schedule, loss)
        if step % 100 == 0 or step == recipe.vae_steps - 1:
            log(f"stand-in VAE step {step}: loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    # the released config normalises its own VAE's latents to unit scale per channel (latents_mean / latents_std);
    # the stand-in's get their own statistics over the training slices, written into its config the same way
    with torch.no_grad():
        z = torch.cat([vae.encode(slices[i:i + 8, :, None] * 2.0 - 1.0).latent_dist.mode()[:, :, 0]
                       for i in range(0, len(slices), 8)])
    mean, std = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3))
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    backbone.latents_mean.copy_(mean.view(1, -1, 1, 1))
    backbone.latents_std.copy_(std.view(1, -1, 1, 1))
    log(f"stand-in VAE latents: mean {[round(v, 3) for v in mean.tolist()]}, std {[round(v, 3) for v in std.tolist()]}")


def _train_transformer(backbone: EditorBackbone, clean: torch.Tensor, recipe: StandinRecipe, g: torch.Generator,
                       log):
    transformer = backbone.transformer.train().requires_grad_(True)
    opt = torch.optim.AdamW(transformer.parameters(), lr=recipe.transformer_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, recipe.transformer_steps)
    edits, layouts = sorted(STANDIN_EDITS), ("none", "multi", "grid")
    for step in range(recipe.transformer_steps):
        edit = edits[int(torch.randint(0, len(edits), (1,), generator=g))]
        layout = layouts[int(torch.randint(0, len(layouts), (1,), generator=g))]
        crops = _crops(clean, recipe.transformer_crop, 1 + N_REFERENCES, g)
        target, references = crops[:1], crops[1:]
        source = degrade(target, edit, recipe, g)[0]
        images = condition_images(layout, source, references if layout != "none" else None)
        with torch.no_grad():
            z = backbone.encode(target)
        cond, shapes = backbone.condition(images, target.shape[-2:])
        loss = backbone.flow_matching_loss(z, cond, shapes, backbone.instruction(STANDIN_EDITS[edit], images), g)
        _step(opt, schedule, loss)
        if step % 100 == 0 or step == recipe.transformer_steps - 1:
            log(f"stand-in transformer step {step} ({edit}, {layout}): loss {loss.item():.4f}")
    transformer.eval().requires_grad_(False)


def pretrain_standin(slices_hu: dict[str, torch.Tensor], recipe: StandinRecipe, folder: Path, log=print) -> str:
    """Pre-train the stand-in on ``slices_hu`` (``"clean"`` and ``"corrupted"``: ``(N, 1, H, W)`` HU of the
    training part) and write it to ``folder`` (snapshot layout); returns its ``folder_sha256``."""
    with torch.inference_mode(False), torch.enable_grad():
        g = torch.Generator().manual_seed(recipe.seed)
        work = Path(tempfile.mkdtemp(prefix=".standin-", dir=Path(folder).parent))
        try:
            backbone = build_backbone(recipe.size, seed=recipe.seed, folder=work / "build")
            clean = hu_to_rgb(slices_hu["clean"])
            _train_vae(backbone, torch.cat([clean, hu_to_rgb(slices_hu["corrupted"])]), recipe, g, log)
            _train_transformer(backbone, clean, recipe, g, log)
            snapshot = work / "snapshot"
            save_backbone(backbone, snapshot)
            (snapshot / "recipe.json").write_text(json.dumps(asdict(recipe), sort_keys=True, indent=1) + "\n")
            if Path(folder).exists():  # another process finished first: keep its copy
                return folder_sha256(folder)
            os.replace(snapshot, folder)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return folder_sha256(folder)


def _cache_key(datamodule, recipe: StandinRecipe) -> str:
    manifest = Path(datamodule.root) / "manifest.json"
    data = sha256_file(manifest) if manifest.is_file() else str(datamodule.root)
    key = json.dumps({"data": data, "split": datamodule.split_sha256, "recipe": asdict(recipe),
                      "version": _VERSION}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def standin_backbone(datamodule, recipe: StandinRecipe = StandinRecipe(), log=print) -> tuple[EditorBackbone, str]:
    """The pre-trained stand-in of a benchmark split (pre-trained now if not cached) and its digest.

    Args:
        datamodule: a set-up datamodule of the suite's convention (``root``, ``split_sha256``,
            ``dataset(part, keys)``); the stand-in trains on its ``train`` part.
    Raises:
        ValueError: the split has no training part.
    """
    folder = default_cache_dir() / "editor-standin" / _cache_key(datamodule, recipe)
    with cache_lock(folder):  # concurrent grid workers pre-train it once
        if not folder.is_dir():
            train = datamodule.dataset("train", ("gt_image", "ma_image"))
            items = [train[i] for i in range(len(train))]
            slices = {"clean": torch.stack([it["gt_image"] for it in items]),
                      "corrupted": torch.stack([it["ma_image"] for it in items])}
            log(f"pre-training the editor's stand-in backbone on {len(items)} training slices into {folder}")
            pretrain_standin(slices, recipe, folder, log)
    return load_backbone(folder), folder_sha256(folder)


def main(argv: list[str] | None = None) -> int:
    from marbench.datasets.aapm import AAPMCTMARDataModule

    parser = argparse.ArgumentParser(prog="python -m marbench.methods.editor.standin",
                                     description="pre-train the LoRA editor's stand-in backbone of a benchmark split")
    parser.add_argument("--root", required=True, help="benchmark root (e.g. data/smoke)")
    parser.add_argument("--split", required=True, help="split file whose train part it learns from")
    args = parser.parse_args(argv)
    dm = AAPMCTMARDataModule(args.root, split=args.split, keys=("gt_image",))
    dm.setup("fit")
    _, sha = standin_backbone(dm)
    print(f"stand-in backbone sha256 {sha}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
