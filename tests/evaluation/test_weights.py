import hashlib

import pytest

from marbench.evaluation import weights
from marbench.registry import Registry


def test_missing_file_names_it_its_source_and_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MARBENCH_WEIGHTS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"vgg16-397923af.pth, not found in {tmp_path}. Get it from "
                                                 r"https://download.pytorch.org/models/vgg16-397923af.pth"):
        weights.resolve("vgg16-lpips")


def test_hash_prefix_and_full_digest_are_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("MARBENCH_WEIGHTS", str(tmp_path))
    (tmp_path / "vgg16-397923af.pth").write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="does not match the registry"):
        weights.resolve("vgg16-lpips")
    payload = b"tiny stand-in weights"
    digest = hashlib.sha256(payload).hexdigest()
    spec = weights.WeightSpec("tiny", "tiny.pth", "tests", "none", "tests", sha256_prefix=digest[:8])
    registry = Registry("weight file", base=weights.WeightSpec)
    for name, known in [*weights.WEIGHTS.items(), ("tiny", spec)]:
        registry.register(name, known)
    monkeypatch.setattr(weights, "WEIGHTS", registry)
    (tmp_path / "tiny.pth").write_bytes(payload)
    assert weights.resolve("tiny") == (tmp_path / "tiny.pth", digest)
    states = dict((n, s) for n, _, s in weights.status())
    assert states["tiny"] == f"verified {digest[:12]}" and states["vgg16-lpips"] == "MISMATCH"
    assert states["radimagenet-resnet50"] == "missing"
    with pytest.raises(KeyError, match="unknown weight file 'alexnet'"):
        weights.resolve("alexnet")
