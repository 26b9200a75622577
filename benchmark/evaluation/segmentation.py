"""Downstream segmentation as a MAR metric (ArtifactGSI Table 2): a tissue-segmentation U-Net trained on the
clean images of the training split, applied to each method's restored images, scored per slice with
torchmetrics' mean IoU against the synthetic benchmark's tissue labels.

The segmenter is trained once per (benchmark, split, recipe) and cached under
``$MARBENCH_CACHE/segmentation``; its sha256 goes into every record, so rows are only compared under one
segmenter. Reference rows: the uncorrected input (a method) and the clean image itself (``CleanImage``,
the segmenter's ceiling).
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics.functional.segmentation import mean_iou

from marbench.converters import window
from marbench.files import atomic_write, sha256_file
from marbench.method import MARMethod, MethodCard
from marbench.physics.backends import default_cache_dir

from .metrics import SliceMetric

__all__ = ["SegmentationRecipe", "segmenter", "MeanIoUMetric", "ClassIoUMetric", "CleanImage"]


@dataclass(frozen=True)
class SegmentationRecipe:
    """How the segmenter is trained: a U-Net (``marbench.methods.unet.UNet``) on clean images given as two
    windows mapped to [0, 1] (a wide one for air, lung and bone, a soft-tissue one that separates fat, muscle and
    organ), cross entropy over the tissue classes, Adam, fixed seed."""

    class_names: tuple[str, ...] = ("air", "lung", "fat", "muscle", "organ", "cancellous_bone", "cortical_bone",
                                    "brain", "csf")  # label ids of datasets.synthetic.tissues
    wide_hu: tuple[float, float] = (-1000.0, 1500.0)
    soft_tissue_hu: tuple[float, float] = (-150.0, 150.0)
    base: int = 8
    depth: int = 4
    epochs: int = 4
    batch_size: int = 8
    lr: float = 3e-3
    seed: int = 0

    def network(self) -> torch.nn.Module:
        from marbench.methods.unet import UNet

        return UNet(2, self.classes, self.base, self.depth)

    @property
    def classes(self) -> int:
        return len(self.class_names)

    def inputs(self, hu: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` HU -> ``(B, 2, H, W)`` network input."""
        return torch.cat([window(hu, *self.wide_hu), window(hu, *self.soft_tissue_hu)], dim=1)


def _cache_key(root: Path, split: str | None, recipe: SegmentationRecipe) -> str:
    manifest = root / "manifest.json"
    data = sha256_file(manifest) if manifest.is_file() else str(root)
    split_sha = sha256_file(split) if split else None
    key = json.dumps({"data": data, "split": split_sha, "recipe": recipe.__dict__}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:32]


_LOADED: dict[tuple, tuple[torch.nn.Module, str]] = {}


def segmenter(root: str | Path, split: str | None, recipe: SegmentationRecipe = SegmentationRecipe(),
              log=print) -> tuple[torch.nn.Module, str]:
    """The trained segmenter of a benchmark split (trained now if not cached on disk; loaded once per process)
    and its state file's sha256.

    Raises:
        ValueError: the split has no training part or the benchmark no tissue labels (FileNotFoundError).
    """
    path = default_cache_dir() / "segmentation" / f"{_cache_key(Path(root), split, recipe)}.pt"
    if (path, recipe) in _LOADED:
        return _LOADED[(path, recipe)]
    # evaluation runs under inference mode; the segmenter is built and, if needed, trained outside it
    with torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(recipe.seed)
        net = recipe.network()
        if not path.is_file():
            _train(net, root, split, recipe, path, log)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    _LOADED[(path, recipe)] = (net.eval(), sha256_file(path))
    return _LOADED[(path, recipe)]


def _train(net: torch.nn.Module, root, split, recipe: SegmentationRecipe, path: Path, log) -> None:
    """Train ``net`` on the clean training images of ``split`` and write its state to ``path`` atomically."""
    from marbench.datasets.aapm import AAPMCTMARDataModule

    dm = AAPMCTMARDataModule(root, split=split, keys=("gt_image", "tissue_labels"), batch_size=recipe.batch_size)
    dm.setup("fit")
    if "train" not in dm.datasets:
        raise ValueError(f"{split}: the segmenter is trained on the split's 'train' part, which it lacks")
    loader = torch.utils.data.DataLoader(dm.datasets["train"], batch_size=recipe.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(recipe.seed))
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    net.train()
    for epoch in range(recipe.epochs):
        total = 0.0
        for batch in loader:
            loss = F.cross_entropy(net(recipe.inputs(batch["gt_image"])), batch["tissue_labels"][:, 0])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss) / len(loader)
        log(f"segmenter epoch {epoch + 1}/{recipe.epochs}: cross entropy {total:.4f}")
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    atomic_write(path, buffer.getvalue())


class MeanIoUMetric(SliceMetric):
    """Mean IoU per slice over the classes present in the label map or the prediction (torchmetrics
    ``mean_iou``, index input) of the segmenter applied to the restored image: ``score`` segments and scores,
    ``update`` records the per-slice means."""

    higher_is_better = True

    def __init__(self, net: torch.nn.Module, recipe: SegmentationRecipe, **kwargs):
        super().__init__(**kwargs)
        self.net, self.recipe = net, recipe

    def score(self, restored_hu: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean IoU ``(B,)`` and per-class IoU ``(B, classes)`` (NaN for a class in neither map) of restored images
        ``(B, 1, H, W)`` in HU against label maps ``(B, 1, H, W)``."""
        with torch.no_grad():
            pred = self.net(self.recipe.inputs(restored_hu)).argmax(1)
        target = labels[:, 0]
        mean = mean_iou(pred, target, num_classes=self.recipe.classes, input_format="index")
        per_class = mean_iou(pred, target, num_classes=self.recipe.classes, per_class=True, input_format="index")
        return mean, torch.where(per_class < 0, torch.full_like(per_class, float("nan")), per_class)

    def update(self, values: torch.Tensor) -> None:
        self._append(values)


class ClassIoUMetric(SliceMetric):
    """One class's IoU per slice (NaN where the class is in neither the labels nor the prediction; the
    aggregates skip those slices)."""

    higher_is_better = True

    def update(self, values: torch.Tensor) -> None:
        self._append(values)


class CleanImage(MARMethod):
    """The metal-free image itself: the segmentation reference row (the segmenter's ceiling); not registered."""

    card = MethodCard(name="clean-image", paper="reference row: the metal-free image", needs=("gt_image",),
                      trainable=False, metal="no metal (the metal-free image)")

    def restore(self, batch: dict) -> torch.Tensor:
        return batch["gt_image"].clone()
