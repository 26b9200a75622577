"""``marbench bench`` rows: a row config merged over the shared base, evaluated on the test split and the sweeps."""
import pytest

from marbench.bench import rerun, row_configs, run_row
from marbench.evaluation.records import read_record


@pytest.fixture
def grid(tiny_benchmark, tmp_path, monkeypatch):
    out, _ = tiny_benchmark
    configs = tmp_path / "configs" / "bench"
    configs.mkdir(parents=True)
    (configs / "_base.yaml").write_text(f"""
seed_everything: 0
data:
  class_path: marbench.datasets.aapm.AAPMCTMARDataModule
  init_args: {{root: {out}, split: {out / 'split.txt'}, anatomy: [body], keys: [ma_image, gt_image, metal_mask]}}
trainer:
  accelerator: cpu
  logger: false
  enable_progress_bar: false
  enable_checkpointing: false
  callbacks:
    - class_path: marbench.evaluation.evaluator.Evaluator
      init_args: {{protocols: [editmar, perceptual-indicators], dataset: tiny, out_dir: {tmp_path / 'results'}}}
""")
    (configs / "li.yaml").write_text("""
model: {class_path: marbench.methods.classic.LinearInterpolation}
data:
  init_args: {keys: [ma_image, gt_image, metal_mask, li_image]}
""")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_row_is_evaluated_on_the_split_and_on_the_sweeps(grid):
    (cfg,) = row_configs()
    assert cfg.name == "li.yaml"  # the base is not a row
    assert run_row(cfg) > 0
    editmar = read_record(grid / "results" / "tiny__li__editmar__seed0.json")
    indicators = read_record(grid / "results" / "tiny__li__perceptual-indicators__seed0.json")
    assert editmar.dataset["split"].endswith("split.txt") and indicators.dataset["split"].endswith("sweeps")
    assert editmar.manifest["config"]["model"]["class_path"].endswith("LinearInterpolation")
    assert {s["category"] for s in indicators.slices} == {"quantity", "size"}
    assert rerun(protocols=["aapm-hu"]) == ["li__seed0"]
    assert read_record(grid / "results" / "tiny__li__aapm-hu__seed0.json").protocol["name"] == "aapm-hu"


def test_a_config_without_an_evaluator_is_refused(grid):
    cfg = grid / "configs" / "bench" / "li.yaml"
    cfg.write_text(cfg.read_text() + "trainer:\n  callbacks: []\n")
    with pytest.raises(ValueError, match="li.yaml: the config has no marbench Evaluator"):
        run_row(cfg)


def test_rows_train_with_the_seeds_of_the_seeds_table(grid):
    from marbench.bench import SEEDS_FILE, build_row, extra_seed_protocols, row_seeds

    (cfg,) = row_configs()
    assert row_seeds(cfg) == [0]  # no table: one seed
    (grid / SEEDS_FILE).write_text("default: [0]\nrows:\n  li: [3, 4]\nextra_seed_protocols: [aapm-hu]\n")
    assert row_seeds(cfg) == [3, 4] and row_seeds(cfg.with_name("other.yaml")) == [0]
    assert extra_seed_protocols() == ["aapm-hu"]
    cli = build_row(cfg, grid / "configs" / "bench" / "_base.yaml", seed=4, example=False, protocols=["aapm-hu"])
    (ev,) = cli.evaluators()
    assert ev.seed == 4 and not ev.save_example and cli.config["seed_everything"] == 4
    assert [p.name for p in ev.protocols] == ["aapm-hu"]
    (grid / SEEDS_FILE).write_text("rows:\n  li: []\n")
    with pytest.raises(ValueError, match="non-empty list of integers, found \\[\\]"):
        row_seeds(cfg)
