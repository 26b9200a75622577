import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """System matrices and LI priors built by the tests go to a per-session folder, never the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MARBENCH_CACHE", str(tmp_path_factory.mktemp("marbench-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory):
    """The ``tiny`` synthetic benchmark (32 slices at 128 x 128), generated once per test session."""
    from marbench.datasets.synthetic import generate

    out = tmp_path_factory.mktemp("tiny-benchmark")
    manifest = generate(out, "tiny", seed=0, progress=False)
    return out, manifest
