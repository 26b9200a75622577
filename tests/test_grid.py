"""The grid runner: a grid file expands into jobs, finished jobs are not re-run, a job killed with SIGKILL leaves
no record and is re-done (training resumes from Lightning's last checkpoint), submitit's executors give the same
records as the local one, and the smoke grid covers every row config and registered method."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from marbench.evaluation.records import read_record
from marbench.grid import GridTask, job_done, job_key, load_grid, run_grid
from tests.conftest import LI_ROW, UNCORRECTED_ROW, write_tiny_grid

ROOT = Path(__file__).parents[1]
# one seed each: Yu et al. Table I; DuDoCROP's Table V, Fig. 12 and Table II
ABLATION_ROWS = {"sscd_joint", "sscd_sinonet", "sscd_sinonet_fbpcons",
                 "dudocrop_image_sde", "dudocrop_image_sde_norm", "dudocrop_sino_sde", "dudocrop_sino_sde_fidelity",
                 "dudocrop_fusion", "dudocrop_no_embedding", "dudocrop_image_embedding", "dudocrop_control_embedding",
                 "dudocrop_direct_prompts",
                 # the LoRA editor's Table 1-4 rows beside its main row lora_editor (N = 128, r = 64, no references)
                 "lora_editor_multi", "lora_editor_multi_ens10", "lora_editor_grid", "lora_editor_n16",
                 "lora_editor_n32", "lora_editor_n64", "lora_editor_r16", "lora_editor_r32", "lora_editor_r128"}
# the ArtifactGSI grid: latent GSI alignment's Table 1 rows, and the comparison rows of other methods (their main
# rows, with three seeds, are in the smoke grid)
ARTIFACTGSI_SINGLE_SEED_ROWS = {"gsi_alignment_2d_vae_plain", "gsi_alignment_arvae_plain",
                                "gsi_alignment_arvae_plain_loss", "gsi_alignment_arvae_alunet",
                                "unet", "oscnet", "oscnet_plus", "adn"}
# a small U-Net trained for a few epochs of two batches: long enough to be killed mid-training
UNET_ROW = """
model:
  class_path: marbench.methods.unet.ResidualUNet
  init_args: {base: 4, depth: 2, lr: 0.001}
data:
  init_args: {keys: [ma_image, li_image, gt_image, metal_mask]}
trainer: {max_epochs: 12, limit_train_batches: 2, limit_val_batches: 0}
"""


def _timeless(value):
    if isinstance(value, dict):
        return {k: _timeless(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_timeless(v) for v in value]
    return value


def _records(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*")) if p.is_file()}


def test_a_grid_expands_into_jobs_with_seeds_and_protocols(tiny_grid):
    path = tiny_grid({"li": LI_ROW, "unet": UNET_ROW}, seeds={"unet": "[0, 1, 2]"},
                     extra="extra_seed_protocols: [aapm-hu]")
    grid = load_grid(path)
    jobs = grid.jobs()
    assert [j.id for j in jobs] == ["tiny__li__seed0", "tiny__unet__seed0", "tiny__unet__seed1", "tiny__unet__seed2"]
    assert [j.protocols for j in jobs] == [None, None, ("aapm-hu",), ("aapm-hu",)]
    assert [j.example for j in jobs] == [True, True, False, False]
    assert grid.job("tiny__unet__seed2").seed == 2
    with pytest.raises(KeyError, match="no job 'tiny__unet__seed7'"):
        grid.job("tiny__unet__seed7")


@pytest.mark.parametrize("change, message", [
    ("colour: red", r"unknown keys \['colour'\]"),
    ("seeds: []", "seeds must be a non-empty list of integers, found \\[\\]"),
    ("seeds: [1, 1]", "seeds must be distinct"),
    ("executor: {name: kubernetes}", "executor.name must be one of"),
    ("executor: {name: local, cpu_workers: 0}", "executor.cpu_workers must be a positive integer, found 0"),
    ("executor: {name: local, cpu_workers: 2, threads_per_worker: two}",
     "executor.threads_per_worker must be a positive integer, found 'two'"),
    ("executor: {name: local, cpu_workers: 2, gpus: [0]}", "both gpus and cpu_workers"),
])
def test_a_bad_grid_file_is_refused_with_what_was_expected(tiny_grid, change, message):
    path = tiny_grid({"li": LI_ROW})
    path.write_text(path.read_text() + change + "\n")
    with pytest.raises(ValueError, match=message):
        load_grid(path)


def test_a_row_of_an_unknown_dataset_or_a_missing_config_is_refused(tiny_grid):
    path = tiny_grid({"li": LI_ROW})
    text = path.read_text()
    path.write_text(text.replace("li.yaml}", "li.yaml, datasets: [aapm]}"))
    with pytest.raises(ValueError, match=r"names datasets \['aapm'\]; the grid's datasets are \['tiny'\]"):
        load_grid(path)
    path.write_text(text.replace("li.yaml", "nope.yaml"))
    with pytest.raises(FileNotFoundError, match="config configs/bench/nope.yaml not found"):
        load_grid(path)


def test_finished_jobs_are_not_re_run_and_a_changed_row_is(tiny_grid, tmp_path):
    path = tiny_grid({"uncorrected": UNCORRECTED_ROW, "li": LI_ROW})
    grid = load_grid(path)
    first = run_grid(grid)
    assert not any(m.get("skipped") for k, m in first.items() if k != "simulate")
    records = _records(tmp_path / "board" / "results")
    assert sorted(records) == [f"tiny__{m}__{f}" for m in ("li", "uncorrected")
                               for f in ("aapm-hu__seed0.json", "editmar__seed0.json", "example.npz")]
    assert (tmp_path / "board" / "tiny__aapm-hu.md").is_file()  # the leaderboard was rebuilt
    assert all(job_done(grid, j) for j in grid.jobs())
    second = run_grid(grid)
    assert all(second[j.id] == {"skipped": True} for j in grid.jobs())
    assert _records(tmp_path / "board" / "results") == records
    # a changed row config, or a record edited by hand, makes its job out of date; the other job stays done
    li = grid.job("tiny__li__seed0")
    before = job_key(grid, li)
    (tmp_path / "configs" / "bench" / "li.yaml").write_text(LI_ROW + "# changed\n")
    assert job_key(grid, li) != before and not job_done(grid, li)
    assert job_done(grid, grid.job("tiny__uncorrected__seed0"))
    third = run_grid(grid)
    assert third["tiny__uncorrected__seed0"] == {"skipped": True} and not third["tiny__li__seed0"].get("skipped")
    record = tmp_path / "board" / "results" / "tiny__uncorrected__editmar__seed0.json"
    record.write_text(record.read_text() + " ")
    assert not job_done(grid, grid.job("tiny__uncorrected__seed0"))


def _wait_for(predicate, proc, timeout_s=300.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the grid finished (exit {proc.returncode}) before it could be killed: "
                                 f"{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the grid")
        time.sleep(0.02)


@pytest.mark.parametrize("executor", ["", "executor: {name: local, cpu_workers: 2}"], ids=["sequential", "workers"])
def test_a_grid_killed_mid_job_loses_nothing_and_re_does_only_that_job(tiny_grid, tiny_benchmark, tmp_path,
                                                                       executor):
    import psutil

    path = tiny_grid({"uncorrected": UNCORRECTED_ROW, "unet": UNET_ROW}, extra=executor)
    grid = load_grid(path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "marbench.cli", "grid", str(path)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done_marker = grid.marker(grid.job("tiny__uncorrected__seed0"))
    last = grid.checkpoints(grid.job("tiny__unet__seed0")) / "last.ckpt"
    _wait_for(lambda: done_marker.is_file() and last.is_file(), proc)
    workers = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"workers outlived the killed runner: {alive}"
    epoch = torch.load(last, weights_only=False)["epoch"]
    assert epoch < 12  # killed mid-training (max_epochs 12)
    proc.stdout.close()
    killed = _records(tmp_path / "board" / "results")
    # the finished job's records are all there, the killed job's none, and no half-written file
    assert sorted(killed) == sorted(json.loads(done_marker.read_text())["records"])
    assert not any("unet" in name or name.endswith(".tmp") for name in killed)
    assert not grid.marker(grid.job("tiny__unet__seed0")).exists()
    rerun = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert re.search(r"tiny__uncorrected__seed0 +up to date", rerun.stdout), rerun.stdout
    assert f"tiny__unet__seed0: resuming training from {last} (epoch {epoch})" in rerun.stdout
    after = _records(tmp_path / "board" / "results")
    assert {k: v for k, v in after.items() if k in killed} == killed  # the finished job was not re-run
    assert sorted(after) == sorted(killed) + ["tiny__unet__aapm-hu__seed0.json", "tiny__unet__editmar__seed0.json",
                                              "tiny__unet__example.npz"]
    assert all(job_done(grid, j) for j in grid.jobs())
    assert grid.weights(grid.job("tiny__unet__seed0")).is_file() and not last.exists()
    assert json.loads(grid.marker(grid.job("tiny__unet__seed0")).read_text())["resumed_from_epoch"] == epoch
    # the resumed training ends where an uninterrupted one does: the loader's shuffling and the random states
    # resume too (marbench.resume)
    whole = tmp_path / "uninterrupted"
    other = write_tiny_grid(whole, tiny_benchmark[0], {"unet": UNET_ROW}, extra=executor)
    subprocess.run(cmd[:-1] + [str(other)], cwd=whole, env=env, capture_output=True, text=True, check=True)
    resumed, uninterrupted = (_timeless(read_record(folder / "board" / "results" / "tiny__unet__aapm-hu__seed0.json")
                                        .metrics) for folder in (tmp_path, whole))
    assert resumed == uninterrupted


def test_a_checkpoint_left_by_another_configuration_of_the_job_is_discarded_not_resumed(tiny_grid, tmp_path):
    grid = load_grid(tiny_grid({"unet": UNET_ROW.replace("max_epochs: 12", "max_epochs: 1")}))
    job = grid.job("tiny__unet__seed0")
    stale = grid.checkpoints(job)
    stale.mkdir(parents=True)
    (stale / "last.ckpt").write_bytes(b"not a checkpoint of this configuration")
    (stale / "job_key").write_text("0" * 64)
    log = []
    done = run_grid(grid, leaderboard=False, log=log.append)
    assert f"tiny__unet__seed0: discarding {stale / 'last.ckpt'}, written under another job key" in log
    assert not any("resuming" in line for line in log)
    assert done["tiny__unet__seed0"]["seconds"]["fit"] > 0 and "resumed_from_epoch" not in done["tiny__unet__seed0"]


@pytest.mark.parametrize("executor", ["submitit-local", "submitit-debug"])
def test_submitit_executors_give_the_local_executor_s_records(tiny_grid, tmp_path, executor):
    path = tiny_grid({"uncorrected": UNCORRECTED_ROW, "li": LI_ROW})
    local = run_grid(load_grid(path), "local", leaderboard=False)
    expected = {p.name: read_record(p) for p in (tmp_path / "board" / "results").glob("*.json")}
    path.write_text(path.read_text().replace("leaderboard: board", "leaderboard: board2").replace("work_dir: work",
                                                                                             "work_dir: work2"))
    other = run_grid(load_grid(path), executor, leaderboard=False)
    got = {p.name: read_record(p) for p in (tmp_path / "board2" / "results").glob("*.json")}
    assert sorted(got) == sorted(expected) and len(got) == 4
    for name, record in got.items():  # every value but the wall times
        assert _timeless(record.metrics) == _timeless(expected[name].metrics), name
        assert _timeless(record.slices) == _timeless(expected[name].slices), name
    assert other.keys() == local.keys()
    if executor == "submitit-local":
        assert list((tmp_path / "work2" / "submitit").glob("*/*_log.out"))  # the jobs ran as submitit processes


def test_cpu_workers_give_the_sequential_runner_s_records_and_a_row_s_seeds_wait_for_its_first(tiny_grid,
                                                                                             tmp_path):
    from marbench.grid import _waits_for

    row = UNET_ROW.replace("max_epochs: 12", "max_epochs: 1")
    alike = row.replace("trainer: {", "trainer: {callbacks: [{class_path: marbench.evaluation.evaluator."
                                      "Evaluator, init_args: {protocols: [aapm-hu], dataset: tiny}}], ")
    path = tiny_grid({"li": LI_ROW, "unet": row, "b": alike}, seeds={"unet": "[0, 1]"})
    path.write_text(path.read_text().replace("b.yaml}", "b.yaml, weights_from: configs/bench/unet.yaml}"))
    grid = load_grid(path)
    assert _waits_for([(grid, j) for j in grid.jobs()]) == {
        "tiny__li__seed0": set(), "tiny__unet__seed0": set(), "tiny__unet__seed1": {"tiny__unet__seed0"},
        "tiny__b__seed0": {"tiny__unet__seed0"}}
    sequential = run_grid(grid, leaderboard=False)
    expected = {p.name: read_record(p) for p in (tmp_path / "board" / "results").glob("*.json")}
    # the workers' thread count is this process's: CPU kernels sum in an order that follows it
    threads = torch.get_num_threads()
    path.write_text(path.read_text().replace("leaderboard: board", "leaderboard: board2").replace(
        "work_dir: work", "work_dir: work2") + f"executor: {{name: local, cpu_workers: 2, threads_per_worker: "
                                               f"{threads}}}\n")
    log = []
    parallel = run_grid(load_grid(path), leaderboard=False, log=log.append)
    got = {p.name: read_record(p) for p in (tmp_path / "board2" / "results").glob("*.json")}
    assert sorted(got) == sorted(expected) and len(got) == 6
    for name, record in got.items():  # the trained rows included, every value but the wall times
        assert _timeless(record.metrics) == _timeless(expected[name].metrics), name
        assert _timeless(record.slices) == _timeless(expected[name].slices), name
        assert record.manifest["torch_threads"] == threads
    assert parallel.keys() == sequential.keys()
    assert parallel["tiny__b__seed0"]["seconds"]["fit"] == 0.0  # it waited for the U-Net's weights
    events = [line.split(" (")[0] for line in log if line.startswith("tiny__")]
    assert events[:2] == ["tiny__li__seed0: started", "tiny__unet__seed0: started"]
    for job in ("tiny__unet__seed1", "tiny__b__seed0"):  # ran after the first seed, though a worker was free
        assert events.index(f"{job}: started") > events.index("tiny__unet__seed0: finished")


def test_a_preempted_job_is_resubmitted_as_itself(tmp_path):
    task = GridTask("configs/grids/tiny.yaml", tmp_path)
    again = task.checkpoint("tiny__unet__seed0")
    assert again.args == ("tiny__unet__seed0",)
    assert again.function.grid_file == task.grid_file and again.function.cwd == task.cwd


def test_the_committed_grids_cover_every_row_config_and_registered_method(monkeypatch):
    from marbench.lightning_cli import build_cli
    from marbench.method import METHODS
    from marbench.row import row_configs

    monkeypatch.chdir(ROOT)
    classes = set()
    for grid_file, folder, single_seed in (("smoke.yaml", "configs/bench", ABLATION_ROWS),
                                           ("artifactgsi.yaml", "configs/bench/artifactgsi",
                                            ARTIFACTGSI_SINGLE_SEED_ROWS)):
        grid = load_grid(ROOT / "configs" / "grids" / grid_file)
        assert {r.config.name for r in grid.rows} == {p.name for p in row_configs(ROOT / folder)}, grid_file
        for row in grid.rows:
            cli = build_cli(["--config", str(grid.base), "--config", str(row.config)], run=False)
            classes.add(type(cli.model))
            if cli.model.card.trainable and row.config.stem not in single_seed:
                assert len(row.seeds) >= 3, f"{row.config}: a trainable main row needs three training seeds"
            # an ablation row scored under fewer protocols is still scored under each of its paper tables'
            scored = set(grid.protocols or [p.name for p in cli.evaluators()[0].protocols])
            for table in type(cli.model).paper_tables:
                if cli.model.card.name in {name for name, _ in table.rows}:
                    assert table.protocol in scored, f"{row.config}: its {table.name} table reads {table.protocol}"
    assert {cls for _, cls in METHODS.items()} <= classes


def test_rerun_re_evaluates_a_trained_job_from_its_weights_under_other_protocols(tiny_grid, tmp_path):
    from marbench.grid import rerun

    grid = load_grid(tiny_grid({"unet": UNET_ROW.replace("max_epochs: 12", "max_epochs: 1")},
                               protocols="[editmar]"))
    with pytest.raises(FileNotFoundError, match="tiny__unet__seed0.ckpt not found"):
        rerun(grid)
    run_grid(grid, leaderboard=False)
    assert not (tmp_path / "board" / "results" / "tiny__unet__aapm-hu__seed0.json").exists()
    assert rerun(grid, protocols=["aapm-hu"]) == ["tiny__unet__seed0"]
    record = read_record(tmp_path / "board" / "results" / "tiny__unet__aapm-hu__seed0.json")
    assert record.protocol["name"] == "aapm-hu" and record.method["name"] == "unet"


def test_a_row_with_weights_from_takes_the_trained_weights_of_a_row_that_trains_alike(tiny_grid, tmp_path):
    row = UNET_ROW.replace("max_epochs: 12", "max_epochs: 2")
    # the same training; another evaluator (evaluators and the method's test-time arguments do not train)
    alike = row.replace("trainer: {", "trainer: {callbacks: [{class_path: marbench.evaluation.evaluator."
                                          "Evaluator, init_args: {protocols: [aapm-hu], dataset: tiny}}], ")
    path = tiny_grid({"a": row, "b": alike})
    text = path.read_text()
    path.write_text(text.replace("b.yaml}", "b.yaml, weights_from: configs/bench/a.yaml}"))
    grid = load_grid(path)
    results = tmp_path / "board" / "results"

    def scores():  # both rows are U-Nets: their records share the method's name
        return _timeless(read_record(results / "tiny__unet__aapm-hu__seed0.json").metrics)

    first = run_grid(grid, only=["a"], leaderboard=False)
    trained = scores()
    log = []
    second = run_grid(grid, only=["b"], leaderboard=False, log=log.append)
    assert "tiny__b__seed0: the weights of tiny__a__seed0" in " ".join(log)
    assert second["tiny__b__seed0"]["seconds"]["fit"] == 0.0 and first["tiny__a__seed0"]["seconds"]["fit"] > 0.0
    weights = [grid.weights(grid.job(f"tiny__{r}__seed0")).read_bytes() for r in ("a", "b")]
    assert weights[0] == weights[1]
    assert sorted(second["tiny__b__seed0"]["records"]) == ["tiny__unet__aapm-hu__seed0.json", "tiny__unet__example.npz"]
    assert scores() == trained and trained["overall"]["psnr"]["mean"] > 0
    # the source job's key is part of b's: retraining a re-runs b
    key = job_key(grid, grid.job("tiny__b__seed0"))
    (tmp_path / "configs" / "bench" / "a.yaml").write_text(row + "# changed\n")
    assert job_key(grid, grid.job("tiny__b__seed0")) != key


@pytest.mark.parametrize("entry, message", [
    ("weights_from: configs/bench/a.yaml", r"they differ in \['model.init_args.lr: 0.002 vs 0.001'\]"),
    ("weights_from: configs/bench/c.yaml", "weights_from configs/bench/c.yaml: expected another row of the grid"),
    ("weights_from: configs/bench/a.yaml, seeds: [0, 1]",
     r"expected its seeds and datasets to cover this row's \[0, 1\]"),
])
def test_weights_from_a_row_that_trains_otherwise_or_is_not_in_the_grid_is_refused(tiny_grid, entry, message):
    path = tiny_grid({"a": UNET_ROW, "b": UNET_ROW.replace("lr: 0.001", "lr: 0.002"), "li": LI_ROW})
    path.write_text(path.read_text().replace("b.yaml}", f"b.yaml, {entry}}}"))
    with pytest.raises(ValueError, match=message):
        load_grid(path)
