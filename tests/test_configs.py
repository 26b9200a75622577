"""Every committed config names classes and arguments that exist (a typo would otherwise surface only in a long
``make bench`` or a GPU run). Bench rows are built as ``make bench`` builds them, merged over the shared base."""
import importlib
import inspect
from pathlib import Path

import pytest
import yaml

from marbench.datasets import artifactgsi
from marbench.datasets.batch import METADATA_KEYS
from marbench.lightning_cli import build_cli
from marbench.row import BASE_CONFIG, row_configs

ROOT = Path(__file__).parents[1]
ROWS = row_configs(ROOT / "configs" / "bench")
GSI_BASE = ROOT / "configs" / "bench" / "artifactgsi" / "_base.yaml"
GSI_ROWS = row_configs(GSI_BASE.parent)
GPU = sorted((ROOT / "configs" / "gpu").glob("*.yaml"))


def _class(path: str):
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("base, config", [(ROOT / BASE_CONFIG, c) for c in ROWS] + [(GSI_BASE, c) for c in GSI_ROWS],
                         ids=[c.name for c in ROWS] + [f"artifactgsi/{c.name}" for c in GSI_ROWS])
def test_bench_rows_build_over_the_base(base, config):
    cli = build_cli(["--config", str(base), "--config", str(config)], run=False)
    assert cli.model.card.name and len(cli.evaluators()) == 1
    # the per-slice metadata (slice id, category, anatomy, geometry, field of view; ArtifactGSI's implant type)
    # comes with every batch
    metadata = set(METADATA_KEYS) | set(artifactgsi.METADATA_KEYS)
    assert set(cli.model.card.inputs) - metadata <= set(cli.datamodule.keys), \
        f"{config.name}: the data keys miss inputs the method declares"
    if cli.model.card.trainable:
        assert set(cli.model.card.training_inputs) - metadata <= set(cli.datamodule.keys)


@pytest.mark.parametrize("config", GPU, ids=[c.name for c in GPU])
def test_gpu_config_classes_and_arguments_exist(config):
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


def test_a_config_names_a_configured_protocol_by_class_path(tmp_path):
    """The README's recipe for the real scoring set: ``AAPMClinical`` bound to the challenge's pickles."""
    (tmp_path / "c.yaml").write_text(f"""
model: {{class_path: marbench.methods.classic.LinearInterpolation}}
data:
  class_path: marbench.datasets.scoring.AAPMScoringDataModule
  init_args: {{root: {tmp_path}}}
trainer:
  callbacks:
    - class_path: marbench.evaluation.evaluator.Evaluator
      init_args:
        dataset: aapm-scoring
        protocols:
          - aapm-hu
          - class_path: marbench.evaluation.protocols.AAPMClinical
            init_args: {{reference_dir: {tmp_path / 'dicts'}}}
""")
    (evaluator,) = build_cli(["--config", str(tmp_path / "c.yaml")], run=False).evaluators()
    hu, clinical = evaluator.protocols
    assert hu.name == "aapm-hu" and clinical.name == "aapm-clinical"
    assert str(clinical.reference_dir) == str(tmp_path / "dicts")
