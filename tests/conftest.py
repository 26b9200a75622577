import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """System matrices built by the tests go to a per-session folder, never the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MARBENCH_CACHE", str(tmp_path_factory.mktemp("marbench-cache")))
    yield
    mp.undo()
