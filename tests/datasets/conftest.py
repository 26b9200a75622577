import pytest
from marbench.datasets.synthetic import generate


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory):
    """The ``tiny`` synthetic benchmark (32 slices at 128 x 128), generated once per test session."""
    out = tmp_path_factory.mktemp("tiny-benchmark")
    manifest = generate(out, "tiny", seed=0, progress=False)
    return out, manifest
