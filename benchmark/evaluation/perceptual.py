"""Perceptual metrics on CT images: LPIPS (VGG16, Zhang et al., CVPR 2018, through the ``lpips`` package),
FID (InceptionV3 pool3 of torch-fidelity, Heusel et al. 2017), LPIPS-Rad and FID-Rad (RadImageNet ResNet50;
Mei et al., Radiology: AI 2022), and the perceptual indicators PI_q / PI_s (DuDoCROP Eq. 18-19).

Backbone weights come only from local files (``marbench.evaluation.weights``). With ``weights=None`` a
backbone is randomly initialised (seeded): tests use that, and records made that way are marked
``weights: random`` so the leaderboard never mixes them with real-weight records.

RadImageNet conventions (MONAI ``RadImageNetPerceptualSimilarity`` and its realism tutorial): input in [0, 1],
one channel repeated to three, RGB reordered to BGR, minus ``[0.406, 0.456, 0.485]``, layer4 features
(2048 channels). LPIPS-Rad: features unit-normalised across channels, squared difference summed over
channels, mean over space. FID-Rad: layer4 globally average-pooled to 2048-d, then the Frechet distance.
"""
from __future__ import annotations

from unittest import mock

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg

from marbench.content_cache import ContentCache

from .weights import resolve

__all__ = ["RadImageNetFeatures", "InceptionFeatures", "lpips_rad", "layer4_distance", "LPIPSVGG", "LPIPSAlex",
           "lpips_alex", "frechet_distance",
           "frechet_distance_of_features", "perceptual_indicator", "Backbones", "backbones"]


class RadImageNetFeatures(nn.Module):
    """RadImageNet ResNet50 trunk: ``(B, 1, H, W)`` images in [0, 1] -> layer4 ``(B, 2048, H/32, W/32)``
    (``layer4``) or pooled ``(B, 2048)`` (``forward``, the FID-Rad features).

    Args:
        weights: a ``weights`` registry name (``radimagenet-resnet50``) or ``None`` for a seeded random init.

    Raises:
        FileNotFoundError / ValueError: as ``weights.resolve`` for a missing or mismatching file.
    """

    num_features = 2048
    BGR_MEAN = (0.406, 0.456, 0.485)

    def __init__(self, weights: str | None = "radimagenet-resnet50", seed: int = 0):
        super().__init__()
        import torchvision

        torch.manual_seed(seed)
        net = torchvision.models.resnet50(weights=None)
        self.trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                                   net.layer4)
        self.weights_sha256 = None
        if weights is not None:
            path, self.weights_sha256 = resolve(weights)
            state = torch.load(path, map_location="cpu", weights_only=True)
            names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
            mapped = {f"{names.index(k.split('.')[0])}.{k.split('.', 1)[1]}": v for k, v in state.items()
                      if k.split(".")[0] in names}
            self.trunk.load_state_dict(mapped, strict=True)
        self.register_buffer("mean", torch.tensor(self.BGR_MEAN).view(1, 3, 1, 1))
        self.eval()

    def layer4(self, x: torch.Tensor) -> torch.Tensor:
        rgb = x.repeat(1, 3, 1, 1)
        bgr = rgb.flip(1)
        return self.trunk(bgr - self.mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(x).mean(dim=(2, 3))

    def reference_layer4(self, x: torch.Tensor) -> torch.Tensor:
        """``layer4`` of reference images, from this process's cache of reference features (``_references``)."""
        return torch.cat(_references(self.layer4, x))


class InceptionFeatures(nn.Module):
    """FID's InceptionV3 (torch-fidelity ``inception-v3-compat``, the TF-FID network): ``(B, 1, H, W)`` images in
    [0, 1] -> pool3 features ``(B, 2048)``. Grey is repeated to RGB and quantised to 8 bits, as FID expects;
    torch-fidelity resizes to 299 x 299 as TensorFlow 1 did.

    Args:
        weights: a ``weights`` registry name (``inception-v3-fid``) or ``None``: seeded He-normal convolutions
            (PyTorch's default init fades to ~1e-8 over Inception's depth; torch-fidelity's own weight loading,
            which would download, is bypassed).
    Raises:
        FileNotFoundError / ValueError: as ``weights.resolve``.
    """

    num_features = 2048

    def __init__(self, weights: str | None = "inception-v3-fid", seed: int = 0):
        super().__init__()
        from torch_fidelity import feature_extractor_inceptionv3 as tfi

        self.weights_sha256 = None
        if weights is not None:
            path, self.weights_sha256 = resolve(weights)
            self.net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                       feature_extractor_weights_path=str(path))
        else:
            torch.manual_seed(seed)
            with mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: {}), \
                    mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
                self.net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
            for m in self.net.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = torch.round(x.clamp(0, 1) * 255).to(torch.uint8).repeat(1, 3, 1, 1)
        return self.net(rgb)[0]


def layer4_distance(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """LPIPS-Rad ``(B,)`` from two layer4 feature maps ``(B, 2048, h, w)``: unit-normalised across channels,
    squared difference summed over channels, mean over space."""
    f1, f2 = F.normalize(f1, dim=1, eps=1e-10), F.normalize(f2, dim=1, eps=1e-10)
    return ((f1 - f2) ** 2).sum(1).mean(dim=(1, 2))


def lpips_rad(features: RadImageNetFeatures, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """LPIPS-Rad per slice ``(B,)`` of ``(B, 1, H, W)`` images in [0, 1] (see the module docstring)."""
    return layer4_distance(features.layer4(pred), features.layer4(target))


class LPIPSVGG(nn.Module):
    """LPIPS v0.1 with the VGG16 backbone: the ``lpips`` package's network and linear heads, its VGG16 trunk
    loaded from the local torchvision file ``vgg16-397923af.pth`` (``weights=None``: seeded random trunk).

    ``forward(pred, target)`` takes ``(B, 1, H, W)`` grayscale images in [0, 1] (already windowed by the
    protocol), repeats them to three channels, maps to [-1, 1] and returns LPIPS per slice ``(B,)``.
    """

    _NET = "vgg"  # the lpips package's network name
    _SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # torchvision feature indices of its five slices

    def __init__(self, weights: str | None = "vgg16-lpips", seed: int = 0):
        super().__init__()
        import lpips

        torch.manual_seed(seed)
        self.model = lpips.LPIPS(net=self._NET, version="0.1", pretrained=True, pnet_rand=True, verbose=False)
        self.weights_sha256 = None
        if weights is not None:
            path, self.weights_sha256 = resolve(weights)
            state = torch.load(path, map_location="cpu", weights_only=True)
            mapped = {}
            for s, (lo, hi) in enumerate(self._SLICES, start=1):
                for i in range(lo, hi):
                    for p in ("weight", "bias"):
                        if f"features.{i}.{p}" in state:
                            mapped[f"slice{s}.{i}.{p}"] = state[f"features.{i}.{p}"]
            self.model.net.load_state_dict(mapped, strict=True)
        self.eval()

    def normalized_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five trunk feature maps of ``(B, 1, H, W)`` images in [0, 1], unit-normalised across channels (the
        ``lpips`` package's steps: grey to three channels, [-1, 1], its scaling layer, ``normalize_tensor``)."""
        import lpips

        outs = self.model.net(self.model.scaling_layer(x.repeat(1, 3, 1, 1) * 2 - 1))
        return [lpips.normalize_tensor(o) for o in outs]

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """LPIPS per slice ``(B,)``: ``lpips.LPIPS.forward`` (v0.1, linear heads, spatial mean), with the target's
        features from this process's cache of reference features (``_references``)."""
        from lpips.lpips import spatial_average

        fp = self.normalized_features(pred)
        ft = [torch.cat(layer) for layer in zip(*_references(self.normalized_features, target), strict=True)]
        val = sum(spatial_average(self.model.lins[k]((fp[k] - ft[k]) ** 2), keepdim=True) for k in range(len(fp)))
        return val.flatten()


def _pick_weights(name: str, weights: str) -> str | None:
    """The weights registry ``name`` a backbone loads under a weights mode, or None for its seeded random trunk:
    ``"local"`` always ``name`` (``weights.resolve`` then raises for a missing file), ``"random"`` always None,
    ``"auto"`` ``name`` when its file is present, else None.

    Raises:
        ValueError: unknown ``weights``.
    """
    if weights not in ("auto", "local", "random"):
        raise ValueError(f"weights must be 'auto', 'local' or 'random', found {weights!r}")
    if weights == "random":
        return None
    if weights == "auto":
        try:
            resolve(name)
        except FileNotFoundError:
            return None
    return name


class LPIPSAlex(LPIPSVGG):
    """LPIPS v0.1 with the AlexNet backbone (the ``lpips`` package's default network): the package's network and
    linear heads (``lpips/weights/v0.1/alex.pth``, shipped with it), the AlexNet trunk loaded from the local
    torchvision file ``alexnet-owt-7be5be79.pth`` (``weights`` registry ``alexnet-lpips``; ``weights=None``: seeded
    random trunk). Nothing is downloaded.

    Everything else is ``perceptual.LPIPSVGG``'s: ``forward(pred, target)`` takes ``(B, 1, H, W)`` images in [0, 1],
    repeats them to three channels, maps them to [-1, 1] and returns LPIPS per slice ``(B,)``, the target's
    features from the process's reference cache.

    Raises:
        FileNotFoundError / ValueError: as ``weights.resolve`` for a missing or mismatching file.
    """

    _NET = "alex"
    _SLICES = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))  # lpips.pretrained_networks.alexnet's slices

    def __init__(self, weights: str | None = "alexnet-lpips", seed: int = 0):
        super().__init__(weights, seed)


_LPIPS_ALEX: dict[str, LPIPSAlex] = {}


def lpips_alex(weights: str = "auto") -> LPIPSAlex:
    """The process-wide ``LPIPSAlex`` for a weights mode: ``"local"`` (the file must be present), ``"random"``
    (seeded random trunk) or ``"auto"`` (the file when present, else random), as ``perceptual.Backbones``.

    Raises:
        ValueError: unknown ``weights``; FileNotFoundError / ValueError (``local``): as ``weights.resolve``.
    """
    if weights not in _LPIPS_ALEX:
        _LPIPS_ALEX[weights] = LPIPSAlex(_pick_weights("alexnet-lpips", weights))
    return _LPIPS_ALEX[weights]


_REFERENCES = ContentCache(max_items=96)


def _references(fn, x: torch.Tensor) -> list:
    """``[fn(x[i:i + 1]) for i in range(B)]`` for reference (metal-free) images ``(B, 1, H, W)``, each from this
    process's cache when the slice was seen with ``fn``.

    The references are the same for every row of a grid, and so are their features: a grid worker computes them
    once instead of once per row (the perceptual protocols' cost on the CPU is the backbones). Features are
    computed one slice at a time, cached or not, so that a value never depends on what ran before it.
    """
    return _REFERENCES(x, lambda xs: [fn(xs[i:i + 1]) for i in range(xs.shape[0])],
                       namespace=(id(getattr(fn, "__self__", fn)), fn.__name__, str(x.device)))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance of two Gaussians ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (Heusel et al. 2017)."""
    covmean, _ = linalg.sqrtm(sigma1 @ sigma2, disp=False)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_of_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets ``(n1, D)`` and ``(n2, D)`` (sample means and
    unbiased covariances), exactly as ``frechet_distance`` but through the small ``n1 x n2`` problem.

    With ``A_i`` the centred features, ``S_i = A_i^T A_i / (n_i - 1)``; the non-zero eigenvalues of ``S1 S2`` are
    the squared singular values of ``B = A1 A2^T / sqrt((n1 - 1)(n2 - 1))``, so ``tr((S1 S2)^(1/2))`` is the sum of
    the singular values of ``B``: no ``D x D`` matrix square root (2048-d features, a few hundred slices).
    """
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    a1, a2 = f1 - f1.mean(0), f2 - f2.mean(0)
    n1, n2 = len(f1), len(f2)
    tr1 = (a1**2).sum() / (n1 - 1)
    tr2 = (a2**2).sum() / (n2 - 1)
    cross = np.linalg.svd(a1 @ a2.T / np.sqrt((n1 - 1) * (n2 - 1)), compute_uv=False).sum()
    return float(((f1.mean(0) - f2.mean(0)) ** 2).sum() + tr1 + tr2 - 2 * cross)


def perceptual_indicator(levels: list[list[tuple[float, float]]]) -> float:
    """PI_q or PI_s (DuDoCROP Eq. 18-19) from per-slice sweeps.

    Args:
        levels: one list per base slice, ordered by increasing metal quantity (PI_q) or size (PI_s), of
            ``(x, LP)`` with ``x`` the number of metal objects (PI_q) or the largest metal area (PI_s, mm^2)
            and ``LP`` the level's local-plus-global LPIPS (Eq. 18: mean local LPIPS over the objects plus
            the global LPIPS).
    Returns:
        The mean over slices and consecutive levels of ``(LP_j - LP_{j-1}) / (x_j - x_{j-1})``; lower is better.
    Raises:
        ValueError: a slice with fewer than two levels or a level that does not increase ``x``.
    """
    slopes = []
    for i, sweep in enumerate(levels):
        if len(sweep) < 2:
            raise ValueError(f"sweep {i}: expected at least two levels, found {len(sweep)}")
        for (x0, lp0), (x1, lp1) in zip(sweep[:-1], sweep[1:], strict=True):
            if not x1 > x0:
                raise ValueError(f"sweep {i}: levels must increase in metal quantity/size, found {x0} then {x1}")
            slopes.append((lp1 - lp0) / (x1 - x0))
    return float(np.mean(slopes))


class Backbones(nn.Module):
    """The feature backbones of the ``perceptual`` protocol, each from its local weight file or random.

    Args:
        weights: ``"local"`` (every file must be present), ``"random"`` (all seeded random) or ``"auto"`` (each
            backbone whose file is present uses it, the others are random).
    Raises:
        ValueError: unknown ``weights``; FileNotFoundError / ValueError (``local``): as ``weights.resolve``.
    """

    REGISTRY = {"lpips": "vgg16-lpips", "inception": "inception-v3-fid", "radimagenet": "radimagenet-resnet50"}

    def __init__(self, weights: str = "auto"):
        super().__init__()
        self.lpips = LPIPSVGG(_pick_weights(self.REGISTRY["lpips"], weights))
        self.inception = InceptionFeatures(_pick_weights(self.REGISTRY["inception"], weights))
        self.radimagenet = RadImageNetFeatures(_pick_weights(self.REGISTRY["radimagenet"], weights))
        # channels-last weights make oneDNN's convolutions write channels-last features: on one CPU thread a
        # 256 x 256 slice took 1.16 times less time through VGG16 and 1.25 through InceptionV3 (the same features
        # to 3e-6 relative); the protocols' cost on the CPU is these backbones
        self.to(memory_format=torch.channels_last)

    def weights_sha256(self) -> dict[str, str]:
        """Registry name -> sha256 of the file used, or ``"random"``."""
        return {reg: getattr(self, attr).weights_sha256 or "random" for attr, reg in self.REGISTRY.items()}


_BACKBONES: dict[str, Backbones] = {}


def backbones(weights: str = "auto") -> Backbones:
    """The process-wide ``Backbones`` for a weights mode (built once: every method of a run reuses them)."""
    if weights not in _BACKBONES:
        _BACKBONES[weights] = Backbones(weights)
    return _BACKBONES[weights]
