"""The ArtifactGSI protocols (``artifactgsi``, ``artifactgsi-segmentation``) against independent references, and the
generalised segmenter machinery (the tissue segmenter's cache key and training draws pinned)."""
import hashlib
import json
import types
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from skimage.transform import resize

from marbench.datasets.artifactgsi import LABEL_NAMES, UNLABELLED, ArtifactGSIDataModule, collate
from marbench.evaluation import segmentation, weights
from marbench.evaluation.metrics import psnr, ssim
from marbench.evaluation.perceptual import LPIPSAlex, lpips_alex
from marbench.evaluation.protocols import PROTOCOLS, ArtifactGSI, ArtifactGSISegmentation, get_protocol
from marbench.evaluation.segmentation import (
    ARTIFACTGSI_RECIPE,
    SegmentationRecipe,
    _cache_key,
    _train,
    iou_of_maps,
    segment,
    segmenter,
    soft_dice_loss,
)
from marbench.evaluation.weights import resolve
from marbench.registry import Registry

BG, METAL, L_PELVIS, R_PELVIS, L_FEMUR, R_FEMUR = range(6)


# --- registry -----------------------------------------------------------------------------------------------------


def test_both_protocols_are_registered_with_their_metrics():
    assert "artifactgsi" in PROTOCOLS and "artifactgsi-segmentation" in PROTOCOLS
    assert get_protocol("artifactgsi").metric_names == ("psnr", "ssim", "lpips")
    assert get_protocol("artifactgsi").version == "1" and get_protocol("artifactgsi-segmentation").version == "1"
    seg = get_protocol("artifactgsi-segmentation")
    assert seg.metric_names == ("miou", "iou_metal_implant", "iou_left_pelvis", "iou_right_pelvis", "iou_left_femur",
                                "iou_right_femur")
    assert seg.requires == ("labels",) and seg.recipe == ARTIFACTGSI_RECIPE
    assert ARTIFACTGSI_RECIPE.class_names == LABEL_NAMES and ARTIFACTGSI_RECIPE.ignore_index == UNLABELLED
    directions = {m.name: m.higher_is_better for m in get_protocol("artifactgsi").metrics}
    assert directions == {"psnr": True, "ssim": True, "lpips": False}
    d = get_protocol("artifactgsi").to_dict()
    assert (d["size_px"], d["level_hu"], d["width_hu"], d["lpips_net"]) == (512, 500.0, 2000.0, "alex")


# --- artifactgsi: PSNR / SSIM / LPIPS --------------------------------------------------------------------------------


def _pair(n, seed=0):
    """A smooth phantom-like target (HU) and a prediction with streak-like errors, ``(1, 1, n, n)`` float32."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
    body = ((xx / 0.8) ** 2 + (yy / 0.6) ** 2 < 1).float()
    bone = (((xx - 0.3) / 0.15) ** 2 + (yy / 0.2) ** 2 < 1).float()
    metal = (((xx + 0.3) / 0.06) ** 2 + (yy / 0.06) ** 2 < 1).float()
    target = -1000 + body * (1040 + 20 * torch.randn(n, n, generator=g)) + bone * 800 + metal * 2500
    streaks = 300 * torch.sin(12 * torch.atan2(yy, xx + 0.3)) * torch.exp(-((xx + 0.3) ** 2 + yy**2) / 0.2)
    pred = target + body * streaks + 30 * torch.randn(n, n, generator=g)
    return pred[None, None].float(), target[None, None].float()


def _windowed(x: np.ndarray) -> np.ndarray:
    return np.clip((x - (500 - 1000)) / 2000, 0, 1)


@pytest.mark.parametrize("n", [128, 640])
def test_psnr_and_ssim_equal_scikit_image_on_the_resized_windowed_images(n):
    pred, target = _pair(n)
    scores = ArtifactGSI(weights="random").score(pred, {"gt_image": target})

    def reference_resize(x):  # independent of torch: scikit-image up, PIL (antialiased bilinear) down
        a = x[0, 0].double().numpy()
        if n < 512:
            return resize(a, (512, 512), order=1, mode="edge", anti_aliasing=False, preserve_range=True)
        return np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize((512, 512), Image.BILINEAR),
                          np.float64)

    p, t = _windowed(reference_resize(pred)), _windowed(reference_resize(target))
    assert float(scores["psnr"][0]) == pytest.approx(peak_signal_noise_ratio(t, p, data_range=1.0), abs=1e-3)
    assert float(scores["ssim"][0]) == pytest.approx(
        structural_similarity(t, p, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0),
        abs=1e-4)


def test_display_resizes_with_torch_then_windows_and_leaves_512_alone():
    proto = ArtifactGSI(weights="random")
    pred, _ = _pair(256)
    expected = F.interpolate(pred, size=(512, 512), mode="bilinear", align_corners=False).sub(-500).div(2000)
    torch.testing.assert_close(proto.display(pred), expected.clamp(0, 1))
    big, _ = _pair(768)
    expected = F.interpolate(big, size=(512, 512), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(proto.display(big), ((expected + 500) / 2000).clamp(0, 1))
    native, _ = _pair(512)
    assert torch.equal(proto.display(native), ((native + 500) / 2000).clamp(0, 1))  # no resampling at 512
    # the window: L500/W2000 is [-500, 1500] HU, clipped (metal saturates)
    levels = torch.zeros(1, 1, 512, 512)
    levels[..., :5] = torch.tensor([-1000.0, -500.0, 500.0, 1500.0, 3000.0])
    assert proto.display(levels)[0, 0, 0, :5].tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert proto.window_hu == (-500.0, 1500.0)


def test_a_128_px_slice_is_scored_at_512_not_at_its_own_size():
    pred, target = _pair(128, seed=1)
    scores = ArtifactGSI(weights="random").score(pred, {"gt_image": target})
    p, t = ((pred + 500) / 2000).clamp(0, 1), ((target + 500) / 2000).clamp(0, 1)
    assert abs(float(scores["psnr"][0]) - float(psnr(p, t, 1.0)[0])) > 0.05
    assert abs(float(scores["ssim"][0]) - float(ssim(p, t, 1.0)[0])) > 1e-3


def test_an_identical_prediction_scores_psnr_inf_ssim_1_lpips_0():
    _, target = _pair(128)
    batch = torch.cat([target, target + 100])
    scores = ArtifactGSI(weights="random").score(batch.clone(), {"gt_image": batch})
    assert torch.isinf(scores["psnr"]).all() and (scores["psnr"] > 0).all()  # metrics.psnr: 10 log10(1 / 0), no cap
    torch.testing.assert_close(scores["ssim"], torch.ones(2, dtype=torch.float64))
    assert float(scores["lpips"].abs().max()) < 1e-6
    assert all(v.shape == (2,) and v.dtype == torch.float64 for v in scores.values())


def test_lpips_equals_the_lpips_package_on_the_same_tensors():
    import lpips

    proto = ArtifactGSI(weights="random")
    pred, target = _pair(128, seed=2)
    ref = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False).eval()
    ref.net.load_state_dict(lpips_alex("random").model.net.state_dict())  # the same (seeded random) trunk
    p, t = proto.display(pred), proto.display(target)
    with torch.no_grad():
        expected = ref(p.repeat(1, 3, 1, 1) * 2 - 1, t.repeat(1, 3, 1, 1) * 2 - 1).flatten().double()
    got = proto.score(pred, {"gt_image": target})["lpips"]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert float(got[0]) > 1e-3
    assert proto.weights_sha256() == {"alexnet-lpips": "random"}  # a record made so says so


def _lpips_package_with_trunk(trunk):
    """``lpips.LPIPS`` (AlexNet v0.1, the package's linear heads) with a torchvision AlexNet's features as trunk."""
    import lpips

    ref = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False).eval()
    layers = {name: module for s in range(1, 6) for name, module in getattr(ref.net, f"slice{s}").named_children()}
    for k, layer in enumerate(trunk.features[:12]):  # the package's slices hold torchvision's features by index
        layers[str(k)].load_state_dict(layer.state_dict())
    return ref


def _check_against_the_package(net, ref, seed):
    proto = ArtifactGSI(weights="random")
    pred, target = _pair(128, seed=seed)
    p, t = proto.display(pred), proto.display(target)
    with torch.no_grad():
        expected = ref(p.repeat(1, 3, 1, 1) * 2 - 1, t.repeat(1, 3, 1, 1) * 2 - 1).flatten()
        torch.testing.assert_close(net(p, t), expected, rtol=0, atol=1e-5)


def test_the_alexnet_trunk_file_is_loaded_into_the_lpips_slices(tmp_path, monkeypatch):
    """The loading path of the real weights, on a random torchvision AlexNet saved as the weight file."""
    import torchvision

    torch.manual_seed(7)
    trunk = torchvision.models.alexnet(weights=None)
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(trunk.state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    registry = Registry("weight file", base=weights.WeightSpec)
    for name, spec in weights.WEIGHTS.items():
        registry.register(name, replace(spec, sha256=digest) if name == "alexnet-lpips" else spec)
    monkeypatch.setattr(weights, "WEIGHTS", registry)
    monkeypatch.setenv("MARBENCH_WEIGHTS", str(tmp_path))
    net = LPIPSAlex("alexnet-lpips")
    assert net.weights_sha256 == digest
    _check_against_the_package(net, _lpips_package_with_trunk(trunk), seed=4)


def test_lpips_with_the_real_alexnet_weights_equals_the_lpips_package():
    try:
        path, digest = resolve("alexnet-lpips")
    except FileNotFoundError as e:
        pytest.skip(f"AlexNet weights absent: {e}")
    import torchvision

    trunk = torchvision.models.alexnet(weights=None)
    trunk.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    _check_against_the_package(lpips_alex("local"), _lpips_package_with_trunk(trunk), seed=3)
    assert ArtifactGSI(weights="local").weights_sha256() == {"alexnet-lpips": digest}


def test_bad_conventions_are_refused():
    with pytest.raises(ValueError, match="lpips_net"):
        ArtifactGSI(lpips_net="squeeze")
    with pytest.raises(ValueError, match="weights must be"):
        lpips_alex("somewhere")


# --- artifactgsi-segmentation: IoU per structure ---------------------------------------------------------------------


class _Fixed(torch.nn.Module):
    """A stand-in segmenter answering a fixed class map ``(B, H, W)`` whatever the image."""

    def __init__(self, pred):
        super().__init__()
        self.pred = pred

    def forward(self, x):
        return 10.0 * F.one_hot(self.pred, 6).permute(0, 3, 1, 2).float()


def _scored(pred, labels, monkeypatch):
    proto = ArtifactGSISegmentation()
    monkeypatch.setattr(ArtifactGSISegmentation, "_segmenter", lambda self: (_Fixed(pred), "0" * 64))
    return proto.score(torch.zeros(labels.shape), {"labels": labels})


def _label_map():
    """16 x 16: metal, left/right pelvis, left femur; no right femur (the patient's left on the image right)."""
    m = torch.zeros(16, 16, dtype=torch.int64)
    m[6:10, 6:10] = METAL
    m[0:4, 10:16] = L_PELVIS
    m[0:4, 0:6] = R_PELVIS
    m[12:16, 11:16] = L_FEMUR
    return m


def test_per_structure_iou_against_hand_computed_cases(monkeypatch):
    labels = _label_map()
    perfect = _scored(labels[None], labels[None, None], monkeypatch)
    for s in ("metal_implant", "left_pelvis", "right_pelvis", "left_femur"):
        assert float(perfect[f"iou_{s}"][0]) == 1.0
    assert np.isnan(float(perfect["iou_right_femur"][0]))  # absent from labels and prediction: not scored 0
    assert float(perfect["miou"][0]) == 1.0

    # the left pelvis (24 px) called right pelvis: left 0, right 24 / 48
    swapped = labels.clone()
    swapped[labels == L_PELVIS] = R_PELVIS
    got = _scored(swapped[None], labels[None, None], monkeypatch)
    assert float(got["iou_left_pelvis"][0]) == 0.0 and float(got["iou_right_pelvis"][0]) == 0.5
    assert float(got["iou_metal_implant"][0]) == 1.0 and float(got["iou_left_femur"][0]) == 1.0
    assert float(got["miou"][0]) == pytest.approx(0.625)  # (1 + 0 + 0.5 + 1) / 4

    # half the metal predicted as background: 8 of 16 pixels -> 8 / 16
    half = labels.clone()
    half[6:8, 6:10] = BG
    assert float(_scored(half[None], labels[None, None], monkeypatch)["iou_metal_implant"][0]) == 0.5

    # a structure absent from the labels but predicted in a few pixels is not scored (segmentation v3's rule) ...
    stray = labels.clone()
    stray[8, 14] = R_FEMUR
    got = _scored(stray[None], labels[None, None], monkeypatch)
    assert np.isnan(float(got["iou_right_femur"][0])) and float(got["miou"][0]) == 1.0


def test_unlabelled_pixels_and_slices_are_not_scored(monkeypatch):
    labels = _label_map()
    partly = labels.clone()
    partly[10:16, 8:16] = UNLABELLED
    pred = labels.clone()
    pred[10:16, 8:16] = METAL  # wrong only where nothing is labelled
    unlabelled = torch.full_like(labels, UNLABELLED)
    got = _scored(torch.stack([pred, pred]), torch.stack([partly, unlabelled])[:, None], monkeypatch)
    assert float(got["iou_metal_implant"][0]) == 1.0 and float(got["miou"][0]) == 1.0
    assert all(np.isnan(float(v[1])) for v in got.values())  # a patient without labels: NaN, skipped by the means
    # the same through iou_of_maps, against a numpy computation over the labelled pixels only
    g = torch.Generator().manual_seed(0)
    lab = torch.randint(-1, 6, (3, 1, 12, 12), generator=g)
    guess = torch.randint(0, 6, (3, 12, 12), generator=g)
    out = iou_of_maps(guess, lab, 6, ignore_index=-1).numpy()
    for b in range(3):
        valid = lab[b, 0].numpy() >= 0
        for k in range(6):
            truth, pk = (lab[b, 0].numpy() == k) & valid, (guess[b].numpy() == k) & valid
            expected = (truth & pk).sum() / (truth | pk).sum() if truth.any() else np.nan
            np.testing.assert_allclose(out[b, k], expected, atol=1e-6)


def test_soft_dice_loss_ignores_unlabelled_pixels():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 6, 4, 8, generator=g)
    labels = torch.randint(0, 6, (1, 4, 8), generator=g)
    partly = labels.clone()
    partly[:, :, 4:] = UNLABELLED
    expected = soft_dice_loss(logits[..., :4], labels[..., :4])
    torch.testing.assert_close(soft_dice_loss(logits, partly, ignore_index=UNLABELLED), expected)
    nothing = soft_dice_loss(logits.requires_grad_(), torch.full_like(labels, UNLABELLED), ignore_index=UNLABELLED)
    assert float(nothing) == 0.0
    nothing.backward()
    assert float(logits.grad.abs().max()) == 0.0


def test_recipe_fields_are_checked_and_sides_come_from_the_image_half():
    with pytest.raises(ValueError, match="ignore_index 0 is a class id"):
        SegmentationRecipe(ignore_index=0)
    with pytest.raises(ValueError, match="sided_pairs"):
        SegmentationRecipe(sided_pairs=((1, 9),))
    labels = torch.tensor([[UNLABELLED, BG, METAL, L_PELVIS, R_PELVIS, L_FEMUR, R_FEMUR]])
    assert ARTIFACTGSI_RECIPE.merge_sides(labels).tolist() == [[UNLABELLED, BG, METAL, L_PELVIS, L_PELVIS, L_FEMUR,
                                                                 L_FEMUR]]
    assert torch.equal(SegmentationRecipe().merge_sides(labels), labels)
    # the patient's left is the image right: a merged class in columns < W / 2 becomes the right structure
    pred = torch.tensor([[[L_PELVIS, L_FEMUR, METAL, L_PELVIS, L_FEMUR, BG]]])
    assert ARTIFACTGSI_RECIPE.split_sides(pred).tolist() == [[[R_PELVIS, R_FEMUR, METAL, L_PELVIS, L_FEMUR, BG]]]
    assert torch.equal(SegmentationRecipe().split_sides(pred), pred)


# --- the segmenter on a tiny synthetic ArtifactGSI-like set ----------------------------------------------------------


def _synthetic_slice(n, dy, dx, scale, rng):
    """Disc/ellipse phantom of the pelvis: soft tissue body, pelvis and femur heads both sides, a metal rod at the
    midline; returns ``(gt_image (1, n, n) HU, labels (1, n, n) int64)``."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    cy, cx = n / 2 + dy, n / 2 + dx

    def ellipse(y, x, ry, rx):
        return ((yy - cy - y * scale) / (ry * scale)) ** 2 + ((xx - cx - x * scale) / (rx * scale)) ** 2 < 1

    hu = np.full((n, n), -1000.0)
    labels = np.zeros((n, n), np.int64)
    hu[ellipse(0, 0, 22, 29)] = 40.0
    # image column < centre is the patient's right (radiological view): right structures on the image's left
    for side, pelvis, femur in ((-1, R_PELVIS, R_FEMUR), (1, L_PELVIS, L_FEMUR)):
        p, f = ellipse(-9, 14 * side, 6, 9), ellipse(9, 15 * side, 5, 5)
        hu[p], labels[p] = 450.0, pelvis
        hu[f], labels[f] = 1100.0, femur
    metal = ellipse(16, 0, 3, 4)  # a fixation rod at the midline, behind the femur heads
    hu[metal], labels[metal] = 3000.0, METAL
    hu += rng.normal(0, 15, (n, n))
    return torch.from_numpy(hu).float()[None], torch.from_numpy(labels)[None]


class _Slices(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class _FakeDataModule:
    """``root``, ``split_sha256`` and ``dataset(part, keys)``: what ``segmenter`` reads of a datamodule."""

    def __init__(self, root, items, split="f0" * 32):
        self.root, self.split_sha256, self._items = root, split, items

    def dataset(self, part, keys):
        if part != "train":
            raise ValueError(f"no part {part!r}")
        return _Slices([{k: it[k] for k in keys} for it in self._items])


SMALL = replace(ARTIFACTGSI_RECIPE, steps=120, crop_px=48, batch_size=8)  # whole 48 px slices


def _synthetic_set(n_slices=5, n=48):
    rng = np.random.default_rng(0)
    items = []
    for i in range(n_slices):
        image, labels = _synthetic_slice(n, rng.integers(-3, 4), rng.integers(-3, 4), rng.uniform(0.9, 1.05), rng)
        if i == 1:
            labels[:, :, :6] = UNLABELLED  # a slice labelled in part
        items.append({"gt_image": image, "labels": labels})
    image, _ = _synthetic_slice(n, 0, 0, 1.0, rng)
    items.append({"gt_image": image, "labels": torch.full((1, n, n), UNLABELLED)})  # a patient without labels
    return items


def test_the_artifactgsi_segmenter_learns_its_training_set_through_the_protocol(tmp_path):
    items = _synthetic_set()
    dm = _FakeDataModule(tmp_path, items)
    proto = ArtifactGSISegmentation(recipe=SMALL).bind(dm)
    labelled = [it for it in items if (it["labels"] != UNLABELLED).any()]
    batch = collate(labelled)
    scores = proto.score(batch["gt_image"], batch)
    assert float(scores["miou"].mean()) > 0.8, {k: v.tolist() for k, v in scores.items()}
    for s in ("metal_implant", "left_pelvis", "right_pelvis", "left_femur", "right_femur"):
        assert float(scores[f"iou_{s}"].mean()) > 0.6, s
    net, digest = segmenter(dm, SMALL)
    assert proto.weights_sha256() == {"segmenter": digest} and len(digest) == 64
    path = segmentation.default_cache_dir() / "segmentation" / f"{_cache_key(dm, SMALL)}.pt"
    assert path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == digest
    # a flipped slice swaps the sides of the segmentation: left/right come from the anatomy, not the flip
    swapped = batch["labels"].flip(-1).clone()
    for left, right in SMALL.sided_pairs:
        swapped[batch["labels"].flip(-1) == left], swapped[batch["labels"].flip(-1) == right] = right, left
    flipped = segment(net, SMALL, batch["gt_image"].flip(-1), swapped)
    assert float(torch.nanmean(flipped[:, 1:], dim=1).mean()) > 0.8


def test_training_without_a_labelled_slice_says_so(tmp_path):
    items = [{"gt_image": torch.zeros(1, 32, 32), "labels": torch.full((1, 32, 32), UNLABELLED)}]
    with pytest.raises(ValueError, match="none of the 1 training slices has a labelled pixel"):
        _train(SMALL.network(), items, SMALL, tmp_path / "x.pt", print)
    items = [{"gt_image": torch.zeros(1, 32, 32), "labels": torch.full((1, 32, 32), 7)}]
    with pytest.raises(ValueError, match="label 7 outside 0..5"):
        _train(SMALL.network(), items, SMALL, tmp_path / "x.pt", print)


def test_the_protocol_reads_a_real_artifactgsi_root(tmp_path):
    """``labels`` and ``gt_image`` as ``ArtifactGSIDataModule`` serves them feed both protocols."""
    rng = np.random.default_rng(3)
    root = tmp_path / "artifactgsi"
    for pid in ("p0", "p1", "p2"):
        folder = root / pid
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text(json.dumps({"implant": "hip_prosthesis"}))
        slices = [_synthetic_slice(48, 0, 0, 1.0, rng) for _ in range(2)]
        # the reader's image[r, c] = volume[c, r, z]
        gsi = np.stack([s[0][0].numpy().T for s in slices], -1)
        labels = np.stack([s[1][0].numpy().T for s in slices], -1).astype(np.float32)
        for name, vol in (("ordinary", gsi + 50), ("gsi", gsi), ("labels", labels)):
            nib.save(nib.Nifti1Image(vol.astype(np.float32), np.eye(4)), folder / f"{name}.nii.gz")
    (root / "split.txt").write_text("train p0\ntrain p1\ntest p2\n")
    dm = ArtifactGSIDataModule(root, keys=("ma_image", "gt_image", "labels"), batch_size=2)
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    image = ArtifactGSI(weights="random").score(batch["ma_image"], batch)
    assert image["psnr"].shape == (2,) and (image["psnr"] > 20).all()  # +50 HU everywhere, 2000 HU range
    fake = types.SimpleNamespace(root=dm.root, split_sha256=getattr(dm, "split_sha256", "11" * 32),
                                 dataset=dm.dataset)
    proto = ArtifactGSISegmentation(recipe=replace(SMALL, steps=4)).bind(fake)
    seg = proto.score(batch["gt_image"], batch)
    assert seg["miou"].shape == (2,) and ((seg["miou"] >= 0) & (seg["miou"] <= 1)).all()


# --- the tissue segmenter is unchanged -------------------------------------------------------------------------------

# Written down from the code before the ArtifactGSI generalisation (commit 0a6021c): the committed segmentation
# records carry the segmenter's sha256, so its cache key and training must not move.
TISSUE_KEYS = {"default": "f8ac64973d982832aad56633f085ba4e", "tests": "8b8501fd340106515bdc76b24e2a0309",
               "no-manifest": "132e0cc24b50baee952b9ddda6d07df5"}
TISSUE_DRAWS = "ca075b8c576b8adee291beb32828ff1743b7053232b3124c817b15950e099f55"


def test_the_tissue_segmenter_cache_key_is_unchanged(tmp_path):
    root = tmp_path / "bench"
    root.mkdir()
    (root / "manifest.json").write_text('{"benchmark": "fixed", "slices": 3}\n')
    dm = types.SimpleNamespace(root=root, split_sha256="ab" * 32)
    assert _cache_key(dm, SegmentationRecipe()) == TISSUE_KEYS["default"]
    tests_recipe = SegmentationRecipe(base=8, depth=3, steps=40, crop_px=64, batch_size=8)  # test_segmentation's
    assert _cache_key(dm, tests_recipe) == TISSUE_KEYS["tests"]
    bare = types.SimpleNamespace(root="/nonexistent/bench", split_sha256="cd" * 32)
    assert _cache_key(bare, SegmentationRecipe()) == TISSUE_KEYS["no-manifest"]
    # the new fields enter the key when they are set
    assert _cache_key(dm, ARTIFACTGSI_RECIPE) != _cache_key(dm, replace(ARTIFACTGSI_RECIPE, ignore_index=None))
    assert _cache_key(dm, SegmentationRecipe(sided_pairs=((1, 2),))) != TISSUE_KEYS["default"]


def test_the_tissue_segmenter_training_draws_are_unchanged(tmp_path):
    """The crops, flips and class-balanced picks the default recipe feeds the network, pinned by a hash of the
    network inputs (elementwise arithmetic only: the same on every machine)."""
    g = torch.Generator().manual_seed(5)
    items = []
    for i in range(4):
        lab = torch.randint(0, 9, (1, 32, 32), generator=g)
        lab[:, :8] = 0
        lab[:, 8:12] = i
        items.append({"gt_image": lab.float() * 150 - 1000 + torch.arange(32.0).view(1, 1, 32),
                      "tissue_labels": lab})
    seen = hashlib.sha256()

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 9, 1)

        def forward(self, x):
            seen.update(x.numpy().tobytes())
            return self.conv(x)

    recipe = SegmentationRecipe(steps=7, crop_px=16, batch_size=5, depth=2)
    _train(Probe(), items, recipe, tmp_path / "probe.pt", lambda *a: None)
    assert seen.hexdigest() == TISSUE_DRAWS
