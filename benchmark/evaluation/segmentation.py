"""Downstream segmentation as a MAR metric (Han et al., "Reducing CT Metal Artifacts by Learning Latent Space
Alignment with Gemstone Spectral Imaging Data", Table 2): a segmentation U-Net trained on the metal-free images
(``gt_image``) of the training split, applied to each method's restored images, scored per slice with torchmetrics'
IoU per class against the split's label maps.

Two recipes use this machinery (``SegmentationRecipe``): the default one segments the synthetic benchmark's nine
tissue classes (``tissue_labels``; the ``segmentation`` protocol), ``ARTIFACTGSI_RECIPE`` the ArtifactGSI data's
metal implant and left/right pelvis and femur (``labels``, GSI images, unlabelled pixels ignored; the
``artifactgsi-segmentation`` protocol).

The segmenter is trained once per (benchmark, split, recipe) and cached under
``$MARBENCH_CACHE/segmentation``; its sha256 goes into every record, so rows are only compared under one
segmenter. Reference rows: the uncorrected input and the clean image itself (the ``clean-image`` method, the
segmenter's ceiling).
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics.functional.segmentation import mean_iou

from marbench.converters import window
from marbench.datasets.artifactgsi import LABEL_NAMES, UNLABELLED
from marbench.files import atomic_write, cache_lock, sha256_file, split_cache_key
from marbench.networks import UNet
from marbench.physics.backends import default_cache_dir

__all__ = ["SegmentationRecipe", "ARTIFACTGSI_RECIPE", "segmenter", "segment", "iou_of_maps", "soft_dice_loss"]


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
    benchmark (chest only), so uniform crops showed it too rarely to learn it from air.

    What is segmented (the defaults are the synthetic benchmark's tissue segmenter; ``ARTIFACTGSI_RECIPE`` is the
    ArtifactGSI one):

    * ``label_key``: the batch key of the label maps, ``(1, N, N)`` int64 per item, ids ``0 .. classes - 1``
      (``class_names``); the images are always ``gt_image`` (HU).
    * ``ignore_index``: a label id that marks unlabelled pixels (ArtifactGSI: ``UNLABELLED`` = -1, a patient
      without a label volume), left out of the cross entropy, the Dice loss and the IoU; training slices without a
      labelled pixel are skipped. ``None``: every pixel is labelled.
    * ``sided_pairs``: ``(left id, right id)`` pairs of one structure on the patient's two sides (ArtifactGSI:
      pelvis and femur). A fully convolutional network on crops sees no absolute position, and a left and a right
      femoral head look alike, so the sides are not learned: training merges each pair into its left id
      (``merge_sides``) and, at inference, a pixel of the structure takes its side from its half of the image
      (``split_sides``: the patient's left is the image right, columns ``>= W / 2``; scans are centred on the
      patient). ``()``: no sided classes.

    These three fields came after the tissue segmenter's records; at their defaults they leave the segmenter's
    cache key (``_cache_key``) and its training draws as they were, so the committed ``segmentation`` records
    still verify."""

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
    label_key: str = "tissue_labels"
    ignore_index: int | None = None
    sided_pairs: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        if self.ignore_index is not None and 0 <= self.ignore_index < self.classes:
            raise ValueError(f"ignore_index {self.ignore_index} is a class id (0..{self.classes - 1}); "
                             f"use an id outside the classes, e.g. -1")
        for pair in self.sided_pairs:
            if len(pair) != 2 or not all(0 <= c < self.classes for c in pair):
                raise ValueError(f"sided_pairs: expected pairs of class ids in 0..{self.classes - 1}, found "
                                 f"{pair!r}")

    def network(self) -> torch.nn.Module:
        return UNet(len(self.windows_hu), self.classes, self.base, self.depth)

    @property
    def classes(self) -> int:
        return len(self.class_names)

    def inputs(self, hu: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` HU -> ``(B, len(windows_hu), H, W)`` network input in [0, 1]."""
        return torch.cat([window(hu, low, high) for low, high in self.windows_hu], dim=1)

    def merge_sides(self, labels: torch.Tensor) -> torch.Tensor:
        """Label maps (int64, any shape) with each ``sided_pairs`` right id replaced by its left id (training)."""
        for left, right in self.sided_pairs:
            labels = torch.where(labels == right, torch.full_like(labels, left), labels)
        return labels

    def split_sides(self, pred: torch.Tensor) -> torch.Tensor:
        """Predicted class maps ``(B, H, W)`` with each ``sided_pairs`` left id in the image's left half (columns
        ``< W / 2``, the patient's right) replaced by its right id (inference)."""
        if not self.sided_pairs:
            return pred
        image_left = torch.arange(pred.shape[-1], device=pred.device) < pred.shape[-1] / 2
        for left, right in self.sided_pairs:
            pred = torch.where((pred == left) & image_left, torch.full_like(pred, right), pred)
        return pred


ARTIFACTGSI_RECIPE = SegmentationRecipe(
    class_names=LABEL_NAMES, windows_hu=((-1000.0, 1500.0), (-150.0, 150.0), (150.0, 1500.0), (1000.0, 3000.0)),
    base=8, depth=3, steps=400, crop_px=96, batch_size=16, label_key="labels", ignore_index=UNLABELLED,
    sided_pairs=((2, 3), (4, 5)))
"""The ArtifactGSI segmenter (``artifactgsi-segmentation``): GSI images (``gt_image``) and ``labels`` of the
training split; the six classes of ``marbench.datasets.artifactgsi.LABEL_NAMES`` (background, metal implant,
left/right pelvis, left/right femur), unlabelled pixels (-1) ignored, sides from the image half; HU windows for
bone and metal: wide (-1000, 1500), soft tissue (-150, 150), bone (150, 1500), metal and dense cortex
(1000, 3000). Small (base 8, depth 3, 400 steps of 16 crops of 96 px): slices are 128-512 px, and the segmenter is a
yardstick trained once per split, not a state-of-the-art model."""

_KEYED_ONLY_WHEN_SET = ("label_key", "ignore_index", "sided_pairs")
"""Recipe fields added after the tissue segmenter's records: they enter the cache key only when they differ from
their defaults, so the tissue segmenter's key (and the records carrying its sha256) stay valid."""


def _cache_key(datamodule, recipe: SegmentationRecipe) -> str:
    settings = asdict(recipe)
    for f in fields(recipe):
        if f.name in _KEYED_ONLY_WHEN_SET and getattr(recipe, f.name) == f.default:
            del settings[f.name]
    return split_cache_key(datamodule.root, datamodule.split_sha256, recipe=settings)


_LOADED: dict[tuple, tuple[torch.nn.Module, str]] = {}


def segmenter(datamodule, recipe: SegmentationRecipe = SegmentationRecipe(),
              log=print) -> tuple[torch.nn.Module, str]:
    """The trained segmenter of a benchmark split (trained now if not cached on disk; loaded once per process)
    and its state file's sha256.

    Args:
        datamodule: a set-up datamodule of the suite's convention with ``root``, ``split_sha256`` and
            ``dataset(part, keys)`` (``AAPMCTMARDataModule``, ``ArtifactGSIDataModule``); the segmenter trains on
            the ``gt_image`` and ``recipe.label_key`` of its ``train`` part.
        recipe: the default (tissue) recipe or ``ARTIFACTGSI_RECIPE``.
    Raises:
        ValueError: the split has no training part, or (``ignore_index`` set) no labelled training slice; a label
            outside the classes. FileNotFoundError: the benchmark has no such labels (synthetic benchmark without
            tissue labels).
    """
    path = default_cache_dir() / "segmentation" / f"{_cache_key(datamodule, recipe)}.pt"
    if (path, recipe) in _LOADED:
        return _LOADED[(path, recipe)]
    # evaluation runs under inference mode; the segmenter is built and, if needed, trained outside it
    with torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(recipe.seed)
        net = recipe.network()
        with cache_lock(path):  # concurrent grid workers train it once
            if not path.is_file():
                _train(net, datamodule.dataset("train", ("gt_image", recipe.label_key)), recipe, path, log)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    _LOADED[(path, recipe)] = (net.eval(), sha256_file(path))
    return _LOADED[(path, recipe)]


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int | None = None) -> torch.Tensor:
    """``1 -`` the mean soft Dice coefficient over the classes present in ``labels`` (batch Dice, nnU-Net).

    Args:
        logits: ``(B, K, H, W)`` class scores; labels: ``(B, H, W)`` int64 class ids in ``[0, K)`` or
            ``ignore_index``; pixels labelled ``ignore_index`` count in neither the prediction nor the labels.
    Returns:
        A scalar in ``[0, 1]``: 0 when the softmax is one-hot on the labels (and 0, with a gradient of zeros, when
        every pixel is ignored).

    >>> labels = torch.tensor([[[0, 1], [1, 2]]])
    >>> round(float(soft_dice_loss(100 * F.one_hot(labels, 4).permute(0, 3, 1, 2).float(), labels)), 6)
    0.0
    """
    prob = logits.softmax(1)
    if ignore_index is not None:
        valid = labels != ignore_index
        labels = torch.where(valid, labels, torch.zeros_like(labels))
        prob = prob * valid[:, None]
    onehot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).to(prob.dtype)
    if ignore_index is not None:
        onehot = onehot * valid[:, None]
    dims = (0, 2, 3)
    present = onehot.sum(dims) > 0
    if not present.any():
        return prob.sum() * 0
    dice = (2 * (prob * onehot).sum(dims) + 1) / (prob.sum(dims) + onehot.sum(dims) + 1)
    return 1 - dice[present].mean()


def _train(net: torch.nn.Module, train_set, recipe: SegmentationRecipe, path: Path, log) -> None:
    """Train ``net`` on random crops of the clean images (``gt_image``) and ``recipe.label_key`` label maps of
    ``train_set`` and write its state to ``path`` atomically.

    With the default recipe (no ``ignore_index``, no ``sided_pairs``) the random draws and the loss are those of the
    tissue segmenter's records, value for value.

    Raises:
        ValueError: the training slices are smaller than the crop; a label id outside ``0 .. classes - 1`` (other
            than ``ignore_index``); no training slice holds a labelled pixel.
    """
    gen = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps)
    key, ignore = recipe.label_key, recipe.ignore_index
    # which training slices hold each class, for the class-balanced crops; slices without a labelled pixel are left
    # out (with no ignore_index every slice is kept, and the uniform draws below are the original ones)
    holders = [[] for _ in range(recipe.classes)]
    usable = []
    for i in range(len(train_set)):
        ids = [c for c in train_set[i][key].unique().tolist() if c != ignore]
        bad = [c for c in ids if not 0 <= c < recipe.classes]
        if bad:
            raise ValueError(f"segmenter: training slice {i} has label {bad[0]} outside 0..{recipe.classes - 1} "
                             f"({', '.join(recipe.class_names)})" + ("" if ignore is None else f" and {ignore}"))
        if not ids:
            continue
        usable.append(i)
        for c in ids:
            holders[c].append(i)
    if not usable:
        raise ValueError(f"segmenter: none of the {len(train_set)} training slices has a labelled pixel "
                         f"({key!r} is {ignore} everywhere); the split's training part needs labelled patients")
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
                c, s = None, train_set[usable[int(torch.randint(len(usable), (1,), generator=gen))]]
            n = s["gt_image"].shape[-1]
            crop = min(recipe.crop_px, n)
            if crop % 2 ** recipe.depth:
                raise ValueError(f"segmenter: crops of {crop} px do not pool {recipe.depth} times "
                                 f"(slices of {n} px)")
            if c is None:
                y, x = torch.randint(n - crop + 1, (2,), generator=gen).tolist()
            else:
                pixels = (s[key][0] == c).nonzero()
                cy, cx = pixels[int(torch.randint(len(pixels), (1,), generator=gen))].tolist()
                y, x = min(max(cy - crop // 2, 0), n - crop), min(max(cx - crop // 2, 0), n - crop)
            image.append(s["gt_image"][:, y:y + crop, x:x + crop])
            labels.append(s[key][0, y:y + crop, x:x + crop])
        image, labels = torch.stack(image), recipe.merge_sides(torch.stack(labels))
        flip = torch.rand(recipe.batch_size, generator=gen) < 0.5
        image = torch.where(flip[:, None, None, None], image.flip(-1), image)
        labels = torch.where(flip[:, None, None], labels.flip(-1), labels)
        logits = net(recipe.inputs(image))
        if ignore is None:
            loss = F.cross_entropy(logits, labels) + recipe.dice_weight * soft_dice_loss(logits, labels)
        elif (labels != ignore).any():
            loss = (F.cross_entropy(logits, labels, ignore_index=ignore)
                    + recipe.dice_weight * soft_dice_loss(logits, labels, ignore))
        else:  # every crop unlabelled (a slice labelled in part): nothing to learn from this batch
            loss = logits.sum() * 0
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
    the IoU of the class they belong to. Pixels labelled ``recipe.ignore_index`` are not scored (``iou_of_maps``).
    """
    with torch.no_grad():
        pred = recipe.split_sides(net.to(restored_hu.device)(recipe.inputs(restored_hu)).argmax(1))
    return iou_of_maps(pred, labels, recipe.classes, recipe.ignore_index)


def iou_of_maps(pred: torch.Tensor, labels: torch.Tensor, classes: int,
                ignore_index: int | None = None) -> torch.Tensor:
    """Per-class IoU ``(B, classes)`` float64 of class maps ``pred`` ``(B, H, W)`` against ``labels``
    ``(B, 1, H, W)``, NaN where the class is not in the slice's labels (``segment``).

    Pixels labelled ``ignore_index`` count in neither the intersection nor the union (they are moved, in both maps,
    to an extra class that is dropped); a slice labelled ``ignore_index`` everywhere is NaN throughout.

    >>> labels = torch.tensor([[[[0, 0], [1, 1]]]])
    >>> pred = torch.tensor([[[0, 2], [1, 1]]])  # one air pixel called class 2, absent from the labels
    >>> iou_of_maps(pred, labels, 3).tolist()
    [[0.5, 1.0, nan]]
    >>> iou_of_maps(pred, torch.tensor([[[[0, -1], [1, 1]]]]), 3, ignore_index=-1).tolist()  # that pixel unlabelled
    [[1.0, 1.0, nan]]
    """
    if ignore_index is not None:
        ignored = labels == ignore_index
        pred = torch.where(ignored[:, 0], torch.full_like(pred, classes), pred)
        labels = torch.where(ignored, torch.full_like(labels, classes), labels)
        return iou_of_maps(pred, labels, classes + 1)[:, :classes]
    per_class = mean_iou(pred, labels[:, 0], num_classes=classes, per_class=True, input_format="index")
    present = F.one_hot(labels[:, 0], classes).flatten(1, 2).any(1)
    return torch.where(present, per_class, torch.full_like(per_class, float("nan"))).double()
