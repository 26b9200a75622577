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

__all__ = ["SegmentationRecipe", "segmenter", "segment", "iou_of_maps", "soft_dice_loss"]


@dataclass(frozen=True)
class SegmentationRecipe:
    """How the segmenter is trained: a U-Net (``marbench.networks.UNet``) on clean images given as four HU
    windows mapped to [0, 1] (wide; lung; soft tissue, which separates fat, muscle and organ; bone), with the loss
    of nnU-Net (Isensee et al., "nnU-Net: a self-configuring method for deep learning-based biomedical image
    segmentation", Nature Methods 2021): cross entropy plus the soft Dice loss over the classes present in the
    batch, which keeps the small classes (bone, CSF) from being traded for the large ones (air: a pure cross-entropy
    segmenter never predicts them). ``steps`` Adam steps with a one-cycle learning rate on random
    ``crop_px`` x ``crop_px`` crops of the training slices with random left-right flips (the classes are
    symmetric), fixed seed; inference on whole slices (the network is fully convolutional).

    A share ``class_balanced`` of the crops is centred on a pixel of a class drawn uniformly from those in the
    training split (nnU-Net's foreground oversampling, here over every class): lung is in few slices of the
    benchmark (chest only), so uniform crops showed it too rarely to learn it from air."""

    class_names: tuple[str, ...] = ("air", "lung", "fat", "muscle", "organ", "cancellous_bone", "cortical_bone",
                                    "brain", "csf")  # label ids of datasets.synthetic.tissues
    windows_hu: tuple[tuple[float, float], ...] = ((-1000.0, 1500.0), (-1000.0, -400.0), (-150.0, 150.0),
                                                  (150.0, 1500.0))
    base: int = 8
    depth: int = 4
    steps: int = 800
    crop_px: int = 128
    batch_size: int = 16
    lr: float = 5e-3
    dice_weight: float = 1.0
    class_balanced: float = 0.5
    seed: int = 0

    def network(self) -> torch.nn.Module:
        return UNet(len(self.windows_hu), self.classes, self.base, self.depth)

    @property
    def classes(self) -> int:
        return len(self.class_names)

    def inputs(self, hu: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` HU -> ``(B, len(windows_hu), H, W)`` network input in [0, 1]."""
        return torch.cat([window(hu, low, high) for low, high in self.windows_hu], dim=1)


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


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``1 -`` the mean soft Dice coefficient over the classes present in ``labels`` (batch Dice, nnU-Net).

    Args:
        logits: ``(B, K, H, W)`` class scores; labels: ``(B, H, W)`` int64 class ids in ``[0, K)``.
    Returns:
        A scalar in ``[0, 1]``: 0 when the softmax is one-hot on the labels.

    >>> labels = torch.tensor([[[0, 1], [1, 2]]])
    >>> round(float(soft_dice_loss(100 * F.one_hot(labels, 4).permute(0, 3, 1, 2).float(), labels)), 6)
    0.0
    """
    prob = logits.softmax(1)
    onehot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).to(prob.dtype)
    dims = (0, 2, 3)
    present = onehot.sum(dims) > 0
    dice = (2 * (prob * onehot).sum(dims) + 1) / (prob.sum(dims) + onehot.sum(dims) + 1)
    return 1 - dice[present].mean()


def _train(net: torch.nn.Module, train_set, recipe: SegmentationRecipe, path: Path, log) -> None:
    """Train ``net`` on random crops of the clean images of ``train_set`` and write its state to ``path``
    atomically.

    Raises:
        ValueError: the training slices are smaller than the crop.
    """
    gen = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps)
    # which training slices hold each class, for the class-balanced crops
    holders = [[] for _ in range(recipe.classes)]
    for i in range(len(train_set)):
        for c in train_set[i]["tissue_labels"].unique().tolist():
            holders[c].append(i)
    present = [c for c in range(recipe.classes) if holders[c]]
    net.train()
    total, every = 0.0, max(recipe.steps // 10, 1)
    for step in range(recipe.steps):
        balanced = (torch.rand(recipe.batch_size, generator=gen) < recipe.class_balanced).tolist()
        image, labels = [], []
        for centred in balanced:
            if centred:
                c = present[int(torch.randint(len(present), (1,), generator=gen))]
                s = train_set[holders[c][int(torch.randint(len(holders[c]), (1,), generator=gen))]]
            else:
                c, s = None, train_set[int(torch.randint(len(train_set), (1,), generator=gen))]
            n = s["gt_image"].shape[-1]
            crop = min(recipe.crop_px, n)
            if crop % 2 ** recipe.depth:
                raise ValueError(f"segmenter: crops of {crop} px do not pool {recipe.depth} times "
                                 f"(slices of {n} px)")
            if c is None:
                y, x = torch.randint(n - crop + 1, (2,), generator=gen).tolist()
            else:
                pixels = (s["tissue_labels"][0] == c).nonzero()
                cy, cx = pixels[int(torch.randint(len(pixels), (1,), generator=gen))].tolist()
                y, x = min(max(cy - crop // 2, 0), n - crop), min(max(cx - crop // 2, 0), n - crop)
            image.append(s["gt_image"][:, y:y + crop, x:x + crop])
            labels.append(s["tissue_labels"][0, y:y + crop, x:x + crop])
        image, labels = torch.stack(image), torch.stack(labels)
        flip = torch.rand(recipe.batch_size, generator=gen) < 0.5
        image = torch.where(flip[:, None, None, None], image.flip(-1), image)
        labels = torch.where(flip[:, None, None], labels.flip(-1), labels)
        logits = net(recipe.inputs(image))
        loss = F.cross_entropy(logits, labels) + recipe.dice_weight * soft_dice_loss(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        total += float(loss.detach())
        if (step + 1) % every == 0:
            log(f"segmenter step {step + 1}/{recipe.steps}: cross entropy + Dice {total / every:.4f}")
            total = 0.0
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    atomic_write(path, buffer.getvalue())


def segment(net: torch.nn.Module, recipe: SegmentationRecipe, restored_hu: torch.Tensor,
            labels: torch.Tensor) -> torch.Tensor:
    """Per-class IoU ``(B, classes)`` float64 of ``net``'s segmentation of restored images ``(B, 1, H, W)`` (HU)
    against label maps ``(B, 1, H, W)`` (int64), torchmetrics ``mean_iou`` per class; NaN for a class absent from
    the slice's label map (skipped by the means), as MONAI's ``compute_iou(..., ignore_empty=True)``: a slice
    without lung says nothing of how well lung is segmented, and pixels wrongly given a class there still lower
    the IoU of the class they belong to.
    """
    with torch.no_grad():
        pred = net.to(restored_hu.device)(recipe.inputs(restored_hu)).argmax(1)
    return iou_of_maps(pred, labels, recipe.classes)


def iou_of_maps(pred: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Per-class IoU ``(B, classes)`` float64 of class maps ``pred`` ``(B, H, W)`` against ``labels``
    ``(B, 1, H, W)``, NaN where the class is not in the slice's labels (``segment``).

    >>> labels = torch.tensor([[[[0, 0], [1, 1]]]])
    >>> pred = torch.tensor([[[0, 2], [1, 1]]])  # one air pixel called class 2, absent from the labels
    >>> iou_of_maps(pred, labels, 3).tolist()
    [[0.5, 1.0, nan]]
    """
    per_class = mean_iou(pred, labels[:, 0], num_classes=classes, per_class=True, input_format="index")
    present = F.one_hot(labels[:, 0], classes).flatten(1, 2).any(1)
    return torch.where(present, per_class, torch.full_like(per_class, float("nan"))).double()
