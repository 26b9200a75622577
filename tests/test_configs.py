"""Every committed config names classes and arguments that exist (a typo would otherwise surface only in a long
``make bench`` or a GPU run)."""
import importlib
import inspect
from pathlib import Path

import pytest
import yaml

CONFIGS = sorted(Path(__file__).parents[1].glob("configs/*/*.yaml"))


def _class(path: str):
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("config", CONFIGS, ids=[f"{c.parent.name}/{c.name}" for c in CONFIGS])
def test_config_classes_and_arguments_exist(config):
    cfg = yaml.safe_load(config.read_text())
    model = _class(cfg["model"]["class_path"])(**cfg["model"].get("init_args", {}))
    assert model.card.name
    data_cls = _class(cfg["data"]["class_path"])
    unknown = set(cfg["data"].get("init_args", {})) - set(inspect.signature(data_cls).parameters)
    assert not unknown, f"{config}: {data_cls.__name__} has no arguments {sorted(unknown)}"
    for callback in cfg["trainer"].get("callbacks", []):
        cls = _class(callback["class_path"])
        unknown = set(callback.get("init_args", {})) - set(inspect.signature(cls).parameters)
        assert not unknown, f"{config}: {cls.__name__} has no arguments {sorted(unknown)}"
