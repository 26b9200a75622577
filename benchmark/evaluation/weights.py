"""Registry of the feature-backbone weight files the perceptual metrics need; nothing is downloaded.

Files are read from ``$MARBENCH_WEIGHTS`` (default ``~/.cache/marbench/weights``) and verified: by their full
sha256 where the registry knows it, else by the hash prefix that torchvision-style names carry
(``vgg16-397923af.pth``: the first hex digits of the file's sha256). A missing or mismatching file stops with an
error naming the file, where to get it and where to put it. Every result record lists the sha256 of each
weight file used.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from marbench.files import sha256_file
from marbench.registry import Registry

__all__ = ["WeightSpec", "WEIGHTS", "weights_dir", "resolve", "status"]


@dataclass(frozen=True)
class WeightSpec:
    name: str
    filename: str
    source: str
    license: str
    used_for: str
    sha256: str | None = None  # full digest where known
    sha256_prefix: str | None = None  # the digest prefix carried in the file name

    def verify(self, digest: str) -> bool:
        if self.sha256:
            return digest == self.sha256
        return self.sha256_prefix is not None and digest.startswith(self.sha256_prefix)


WEIGHTS: Registry[WeightSpec] = Registry("weight file", base=WeightSpec)
for _spec in (
    WeightSpec("inception-v3-fid", "weights-inception-2015-12-05-6726825d.pth",
               "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth", "Apache-2.0 (torch-fidelity), TF Inception weights",
               "FID (InceptionV3 pool3, 2048-d)", sha256_prefix="6726825d"),
    WeightSpec("vgg16-lpips", "vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth",
               "BSD-3-Clause (torchvision)", "LPIPS v0.1 backbone (linear heads ship with the lpips package)",
               sha256_prefix="397923af"),
    WeightSpec("alexnet-lpips", "alexnet-owt-7be5be79.pth",
               "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "BSD-3-Clause (torchvision)",
               "LPIPS v0.1 AlexNet backbone of the artifactgsi protocol (linear heads ship with the lpips package)",
               sha256_prefix="7be5be79"),
    WeightSpec("radimagenet-resnet50", "RadImageNet-ResNet50_notop.pth",
               "PyTorch conversion of RadImageNet-ResNet50-notop.h5 (https://github.com/BMEII-AI/RadImageNet)",
               "RadImageNet terms of use", "FID-Rad and LPIPS-Rad (ResNet50 layer4, 2048 channels)"),
):
    WEIGHTS.register(_spec.name, _spec)


def weights_dir() -> Path:
    """``$MARBENCH_WEIGHTS`` or ``~/.cache/marbench/weights``."""
    return Path(os.environ.get("MARBENCH_WEIGHTS", Path.home() / ".cache" / "marbench" / "weights"))


def resolve(name: str) -> tuple[Path, str]:
    """Path and sha256 of the verified weight file ``name``.

    Raises:
        KeyError: unknown weight name.
        FileNotFoundError: the file is missing (names it, its source and the folder to put it in).
        ValueError: the file's sha256 does not match the registry.
    """
    spec = WEIGHTS.get(name)
    path = weights_dir() / spec.filename
    if not path.is_file():
        raise FileNotFoundError(f"{spec.used_for} needs {spec.filename}, not found in {weights_dir()}. Get it from "
                                f"{spec.source} and put it there (or set MARBENCH_WEIGHTS to its folder).")
    digest = sha256_file(path)
    if not spec.verify(digest):
        expected = spec.sha256 or f"a digest starting {spec.sha256_prefix}"
        raise ValueError(f"{path}: sha256 {digest} does not match the registry ({expected}); the file is damaged "
                         f"or another version. Get it from {spec.source}.")
    return path, digest


def status() -> list[tuple[str, str, str]]:
    """``(name, filename, state)`` for every registered file: ``verified <sha256[:12]>``, ``missing`` or
    ``MISMATCH``."""
    out = []
    for name, spec in WEIGHTS.items():
        try:
            _, digest = resolve(name)
            out.append((name, spec.filename, f"verified {digest[:12]}"))
        except FileNotFoundError:
            out.append((name, spec.filename, "missing"))
        except ValueError:
            out.append((name, spec.filename, "MISMATCH"))
    return out
