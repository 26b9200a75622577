import json

from marbench.cli import main


def test_list_prints_methods_with_papers_and_protocols(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "nmar" in out and "Meyer" in out and "inputs ma_image" in out and "training also gt_image" in out
    assert "perceptual-indicators" in out and "pi_q" in out


def test_lightning_test_subcommand_writes_a_record_with_the_resolved_config(tiny_benchmark, tmp_path):
    out, _ = tiny_benchmark
    cfg = tmp_path / "li.yaml"
    cfg.write_text(f"""
seed_everything: 0
model:
  class_path: marbench.methods.classic.LinearInterpolation
data:
  class_path: marbench.datasets.aapm.AAPMCTMARDataModule
  init_args:
    {{root: {out}, split: {out / 'split.txt'}, anatomy: [body], keys: [ma_image, gt_image, metal_mask, li_image]}}
trainer:
  accelerator: cpu
  logger: false
  enable_progress_bar: false
  callbacks:
    - class_path: marbench.evaluation.evaluator.Evaluator
      init_args: {{protocols: [editmar], dataset: tiny, out_dir: {tmp_path / 'results'}}}
""")
    assert main(["test", "--config", str(cfg)]) == 0
    record = json.loads((tmp_path / "results" / "tiny__li__editmar__seed0.json").read_text())
    assert record["manifest"]["config"]["data"]["init_args"]["anatomy"] == ["body"]
    assert record["metrics"]["overall"]["psnr"]["mean"] > 20
