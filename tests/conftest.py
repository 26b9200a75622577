from pathlib import Path

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


@pytest.fixture(scope="session")
def gsi_tiny(tmp_path_factory):
    """The ``gsi-tiny`` simulated ArtifactGSI analogue (4 patients x 3 slices at 128 x 128), generated once per test
    session: ``(root, manifest)``."""
    from marbench.datasets.gsi_analogue import generate_gsi_analogue

    out = tmp_path_factory.mktemp("gsi-tiny")
    return out, generate_gsi_analogue(out, "gsi-tiny", seed=0, progress=False)


def write_tiny_grid(folder: Path, benchmark: Path, rows: dict[str, str], protocols: str = "[aapm-hu, editmar]",
                    seeds: dict | None = None, extra: str = "") -> Path:
    """Write a grid on the tiny benchmark into ``folder`` (which the grid's relative paths assume as the working
    directory): ``configs/bench/_base.yaml``, each row config (``{stem: yaml text}``, training ``seeds`` per stem)
    and ``configs/grids/tiny.yaml`` (records to ``board/results/``, tables to ``board/``, work under ``work/``); returns
    the grid file's path."""
    configs = folder / "configs" / "bench"
    configs.mkdir(parents=True, exist_ok=True)
    (configs / "_base.yaml").write_text(f"""
seed_everything: 0
data:
  class_path: marbench.datasets.aapm.AAPMCTMARDataModule
  init_args:
    root: {benchmark}
    split: {benchmark / 'split.txt'}
    anatomy: [body]
    keys: [ma_image, gt_image, metal_mask]
    batch_size: 2
trainer:
  accelerator: cpu
  deterministic: true
  logger: false
  enable_progress_bar: false
  enable_checkpointing: false
  enable_model_summary: false
  callbacks:
    - class_path: marbench.evaluation.evaluator.Evaluator
      init_args: {{protocols: {protocols}, dataset: tiny, out_dir: board/results}}
""")
    lines = []
    for stem, text in rows.items():
        (configs / f"{stem}.yaml").write_text(text)
        s = (seeds or {}).get(stem)
        lines.append(f"  - {{config: configs/bench/{stem}.yaml" + (f", seeds: {s}}}" if s else "}"))
    grids = folder / "configs" / "grids"
    grids.mkdir(parents=True, exist_ok=True)
    path = grids / "tiny.yaml"
    path.write_text(f"""
name: tiny
base: configs/bench/_base.yaml
datasets:
  - {{name: tiny, root: {benchmark}, split: {benchmark / 'split.txt'}}}
rows:
{chr(10).join(lines)}
work_dir: work
leaderboard: board
{extra}
""")
    return path


@pytest.fixture
def tiny_grid(tiny_benchmark, tmp_path, monkeypatch):
    """``write_tiny_grid`` into ``tmp_path``, made the working directory: ``tiny_grid(rows, protocols=...,
    seeds=..., extra=...)`` returns the grid file's path."""
    out, _ = tiny_benchmark
    monkeypatch.chdir(tmp_path)

    def make(rows: dict[str, str], **kwargs) -> Path:
        return write_tiny_grid(tmp_path, out, rows, **kwargs)

    return make


LI_ROW = """
model: {class_path: marbench.methods.classic.LinearInterpolation}
data:
  init_args: {keys: [ma_image, gt_image, metal_mask, li_image]}
"""
UNCORRECTED_ROW = "model: {class_path: marbench.methods.classic.Uncorrected}\n"
