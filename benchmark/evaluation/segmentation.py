"""Downstream segmentation as a MAR metric (ArtifactGSI Table 2): a tissue-segmentation U-Net trained on the
clean images of the training split, applied to each method's restored images, scored per slice with
torchmetrics' mean IoU against the synthetic benchmark's tissue labels.

The segmenter is trained once per (benchmark, split, recipe) and cached under
``$MARBENCH_CACHE/segmentation``; its sha256 goes into every record, so rows are only compared under one
segmenter. Reference rows: the uncorrected input and the clean image itself (the ``clean-image`` method, the
segmenter's ceiling).
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics.functional.segmentation import mean_iou

from marbench.converters import window
from marbench.files import atomic_write, sha256_file
from marbench.networks import UNet
from marbench.physics.backends import default_cache_dir

__all__ = ["SegmentationRecipe", "segmenter", "segment"]


@dataclass(frozen=True)
class SegmentationRecipe:
    """How the segmenter is trained: a U-Net (``marbench.networks.UNet``) on clean images given as two
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
        return UNet(2, self.classes, self.base, self.depth)

    @property
    def classes(self) -> int:
        return len(self.class_names)

    def inputs(self, hu: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` HU -> ``(B, 2, H, W)`` network input."""
        return torch.cat([window(hu, *self.wide_hu), window(hu, *self.soft_tissue_hu)], dim=1)


def _cache_key(datamodule, recipe: SegmentationRecipe) -> str:
    manifest = Path(datamodule.root) / "manifest.json"
    data = sha256_file(manifest) if manifest.is_file() else str(datamodule.root)
    key = json.dumps({"data": data, "split": datamodule.split_sha256, "recipe": asdict(recipe)}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:32]


_LOADED: dict[tuple, tuple[torch.nn.Module, str]] = {}


def segmenter(datamodule, recipe: SegmentationRecipe = SegmentationRecipe(),
              log=print) -> tuple[torch.nn.Module, str]:
    """The trained segmenter of a benchmark split (trained now if not cached on disk; loaded once per process)
    and its state file's sha256.

    Args:
        datamodule: a set-up datamodule of the suite's convention with ``root``, ``split_sha256`` and
            ``dataset(part, keys)`` (``AAPMCTMARDataModule``); the segmenter trains on its ``train`` part.
    Raises:
        ValueError: the split has no training part; FileNotFoundError: the benchmark has no tissue labels.
    """
    path = default_cache_dir() / "segmentation" / f"{_cache_key(datamodule, recipe)}.pt"
    if (path, recipe) in _LOADED:
        return _LOADED[(path, recipe)]
    # evaluation runs under inference mode; the segmenter is built and, if needed, trained outside it
    with torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(recipe.seed)
        net = recipe.network()
        if not path.is_file():
            _train(net, datamodule.dataset("train", ("gt_image", "tissue_labels")), recipe, path, log)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    _LOADED[(path, recipe)] = (net.eval(), sha256_file(path))
    return _LOADED[(path, recipe)]


def _train(net: torch.nn.Module, train_set, recipe: SegmentationRecipe, path: Path, log) -> None:
    """Train ``net`` on the clean images of ``train_set`` and write its state to ``path`` atomically."""
    loader = torch.utils.data.DataLoader(train_set, batch_size=recipe.batch_size, shuffle=True,
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


def segment(net: torch.nn.Module, recipe: SegmentationRecipe, restored_hu: torch.Tensor,
            labels: torch.Tensor) -> torch.Tensor:
    """Per-class IoU ``(B, classes)`` float64 of ``net``'s segmentation of restored images ``(B, 1, H, W)`` (HU)
    against label maps ``(B, 1, H, W)`` (int64), torchmetrics ``mean_iou`` per class; NaN for a class in neither
    map (undefined there, skipped by the means)."""
    with torch.no_grad():
        pred = net.to(restored_hu.device)(recipe.inputs(restored_hu)).argmax(1)
    per_class = mean_iou(pred, labels[:, 0], num_classes=recipe.classes, per_class=True, input_format="index")
    return torch.where(per_class < 0, torch.full_like(per_class, float("nan")), per_class).double()
