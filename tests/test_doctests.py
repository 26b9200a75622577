"""The ``>>>`` examples of the public modules run as tests (imported under their installed ``marbench`` names)."""
import doctest
import importlib

import pytest

MODULES = [
    "marbench.registry",
    "marbench.networks",
    "marbench.converters",
    "marbench.content_cache",
    "marbench.physics.ctphysics",
    "marbench.physics.geometry",
    "marbench.physics.fbp",
    "marbench.evaluation.metrics",
    "marbench.evaluation.protocols",
    "marbench.evaluation.clinical",
    "marbench.evaluation.safe_pickle",
    "marbench.evaluation.segmentation",
    "marbench.datasets.sweeps",
    "marbench.verify",
    "marbench.methods.dudocrop.captions",
]


@pytest.mark.parametrize("name", MODULES)
def test_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no >>> example"
    assert result.failed == 0
