"""``marbench grid GRID``: a grid of rows (method configs x datasets x training seeds x protocols), run from a laptop
to a Slurm cluster, resumable.

A grid file (YAML, ``configs/grids/smoke.yaml`` is the one ``make bench`` runs) names:

- ``base``: the config every row config is merged over (``configs/bench/_base.yaml``: data, trainer, evaluator);
- ``datasets``: ``name`` (the records' dataset name), ``root`` and ``split``, and ``preset`` for a synthetic
  benchmark that the runner generates (or resumes) first;
- ``rows``: row configs (``configs/bench/<row>.yaml``), each with its training ``seeds`` (default: the grid's
  ``seeds``) and optionally its ``datasets`` (default: all) and ``weights_from``: another row whose config differs
  from this one only in the method's test-time arguments (``MARMethod.test_time_args``, e.g. the LoRA editor's
  ensemble size) and in the evaluators, so both train the same weights: the job loads that row's trained weights
  (same dataset and seed) when its job is up to date, and trains them itself otherwise (the same weights, e.g. when a
  Slurm array runs both at once);
- ``protocols`` (default: the base config's) and ``extra_seed_protocols``: the protocols that the further seeds of
  a row (all but its first) are evaluated under;
- ``work_dir`` (staging records, training checkpoints, trained weights, job markers, submitit logs) and
  ``leaderboard`` (records land in its ``results/``; its tables are rebuilt at the end);
- ``executor``: ``local`` with optional ``gpus`` (one worker per GPU, ``CUDA_VISIBLE_DEVICES``), or ``slurm``
  through submitit with a ``slurm`` section (``timeout_min``, ``gpus_per_node``, ``cpus_per_task``, ``mem_gb``,
  ``nodes``, ``tasks_per_node``; any other key goes to submitit's Slurm executor: ``partition``,
  ``array_parallelism``, ``account``, ``qos``, ``setup``...).

It expands into one **job** per dataset x row x seed: build the row (``marbench.row.build_row``), fit it if the
method is trainable (Lightning's ``last.ckpt`` after every epoch with the random states of
``marbench.resume.RandomStateCheckpoint``, and the job key it was written under: a re-run job resumes from it,
exactly, unless the key changed), save its weights, evaluate it on the test split and, for protocols that score
them, the metal sweeps. The job's evaluators write into a staging folder; only when the job has finished are its
records moved into ``results`` (each by an atomic rename) and its marker written (``<work_dir>/jobs/<job>.json``:
the job's key, every record's sha256, timings). A job is up to date when its marker has the key of the job as now
configured (row and base config bytes, dataset and split digests, seed, protocols, the package's source digest,
library versions) and its records are still the ones it wrote; the runner runs every other job. So a job killed at
any point (SIGKILL included) leaves no record behind under ``results``, and the next run re-does that job only.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from marbench.files import atomic_write, atomic_write_json, library_versions, sha256_file, source_digest

__all__ = ["Grid", "GridDataset", "GridRow", "Job", "load_grid", "job_key", "job_done", "run_job", "run_grid",
           "GridTask", "rerun", "timing_table", "SMOKE_GRID", "EXECUTORS"]

SMOKE_GRID = Path("configs/grids/smoke.yaml")
EXECUTORS = ("local", "slurm", "submitit-local", "submitit-debug")
# the submitit clusters of the executors that run through submitit (None: Slurm where sbatch is found)
_SUBMITIT_CLUSTER = {"slurm": "slurm", "submitit-local": "local", "submitit-debug": "debug"}
_GENERIC_SLURM = ("timeout_min", "gpus_per_node", "cpus_per_task", "mem_gb", "nodes", "tasks_per_node")
_LIBRARIES = ("torch", "lightning", "torchmetrics", "numpy", "scipy", "scikit-image", "lpips", "torch-fidelity")
# the suite's core (physics, evaluation, shared networks) and datasets: a change there can move any row
_SOURCE_PACKAGES = ("marbench", "marbench.datasets")
_GRID_KEYS = {"name", "base", "datasets", "rows", "seeds", "protocols", "extra_seed_protocols", "work_dir",
              "leaderboard", "executor"}


@dataclass(frozen=True)
class GridDataset:
    """A dataset of the grid: records are named ``name``; ``preset``: a synthetic preset generated into ``root``
    (``marbench.datasets.synthetic.PRESETS``, or ``marbench.datasets.gsi_analogue.PRESETS`` for the simulated
    ArtifactGSI analogue)."""

    name: str
    root: str
    split: str
    preset: str | None = None


@dataclass(frozen=True)
class GridRow:
    config: Path
    seeds: tuple[int, ...]
    datasets: tuple[str, ...]
    weights_from: Path | None = None


@dataclass(frozen=True)
class Job:
    """One dataset x row x training seed: ``protocols`` ``None`` means the config's list; ``example``: this job
    draws the row's qualitative panel (the row's first seed); ``weights_from``: the row config whose job of the same
    dataset and seed trains this job's weights (the grid file's ``weights_from``)."""

    dataset: GridDataset
    config: Path
    seed: int
    protocols: tuple[str, ...] | None
    example: bool
    weights_from: Path | None = None

    @property
    def id(self) -> str:
        return f"{self.dataset.name}__{self.config.stem}__seed{self.seed}"

    @property
    def overrides(self) -> list[str]:
        """The row's data folder and split set to the job's dataset (``build_row`` overrides)."""
        return [f"--data.init_args.root={self.dataset.root}", f"--data.init_args.split={self.dataset.split}"]


@dataclass
class Grid:
    path: Path
    name: str
    base: Path | None
    datasets: list[GridDataset]
    rows: list[GridRow]
    protocols: tuple[str, ...] | None
    extra_seed_protocols: tuple[str, ...] | None
    work_dir: Path
    leaderboard: Path
    executor: dict = field(default_factory=dict)

    @property
    def results(self) -> Path:
        """Where the records land: ``<leaderboard>/results``."""
        return self.leaderboard / "results"

    def jobs(self) -> list[Job]:
        """Every job, rows in file order, then datasets, then seeds."""
        by_name = {d.name: d for d in self.datasets}
        out = []
        for row in self.rows:
            for name in row.datasets:
                for seed in row.seeds:
                    first = seed == row.seeds[0]
                    protocols = self.protocols if first else (self.extra_seed_protocols or self.protocols)
                    out.append(Job(by_name[name], row.config, seed, protocols, first, row.weights_from))
        return out

    def job(self, job_id: str) -> Job:
        """The job named ``job_id``.

        Raises:
            KeyError: no such job (the message lists the grid's jobs).
        """
        for j in self.jobs():
            if j.id == job_id:
                return j
        raise KeyError(f"{self.path}: no job {job_id!r}; the grid's jobs: {[j.id for j in self.jobs()]}")

    def weights_source(self, job: Job) -> Job | None:
        """The job whose trained weights ``job`` takes (``weights_from``), or ``None``."""
        if job.weights_from is None:
            return None
        return self.job(f"{job.dataset.name}__{job.weights_from.stem}__seed{job.seed}")

    def marker(self, job: Job) -> Path:
        return self.work_dir / "jobs" / f"{job.id}.json"

    def staging(self, job: Job) -> Path:
        return self.work_dir / "staging" / job.id

    def checkpoints(self, job: Job) -> Path:
        """Lightning's checkpoints of a job's training (``last.ckpt``: where a re-run job resumes)."""
        return self.work_dir / "checkpoints" / job.id

    def weights(self, job: Job) -> Path:
        """The trained weights of a job (``marbench rerun`` and reviewers load them)."""
        return self.work_dir / "weights" / f"{job.id}.ckpt"


def _seed_list(value, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in value):
        raise ValueError(f"{where}: seeds must be a non-empty list of integers, found {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"{where}: seeds must be distinct, found {value!r}")
    return tuple(value)


def _names(value, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: expected a list of protocol names, found {value!r}")
    return tuple(value)


def load_grid(path: str | os.PathLike) -> Grid:
    """Read and check a grid file; relative paths in it are relative to the working directory (the repository
    root, like the configs' own paths).

    Raises:
        FileNotFoundError: the grid file or a row config is missing.
        ValueError: an unknown key, a row naming an unknown dataset, bad seeds, two rows with one config, an
            unknown executor, a ``weights_from`` row that is not another row of the grid covering this row's
            datasets and seeds, or whose training differs (each message names the file and what was expected and
            found).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid file {path} not found")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(spec) - _GRID_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; expected some of {sorted(_GRID_KEYS)}")
    datasets = []
    for i, d in enumerate(spec.get("datasets") or []):
        missing = {"name", "root", "split"} - set(d)
        if missing or set(d) - {"name", "root", "split", "preset"}:
            raise ValueError(f"{path}: datasets[{i}] needs name, root, split (and optionally preset), "
                             f"found {sorted(d)}")
        datasets.append(GridDataset(str(d["name"]), str(d["root"]), str(d["split"]), d.get("preset")))
    if not datasets:
        raise ValueError(f"{path}: no datasets")
    known = [d.name for d in datasets]
    if len(set(known)) != len(known):
        raise ValueError(f"{path}: dataset names must be distinct, found {known}")
    default_seeds = _seed_list(spec.get("seeds", [0]), f"{path}: seeds")
    rows, seen = [], set()
    for i, r in enumerate(spec.get("rows") or []):
        r = {"config": r} if isinstance(r, str) else r
        if "config" not in r or set(r) - {"config", "seeds", "datasets", "weights_from"}:
            raise ValueError(f"{path}: rows[{i}] needs config (and optionally seeds, datasets, weights_from), "
                             f"found {sorted(r)}")
        config = Path(r["config"])
        if not config.is_file():
            raise FileNotFoundError(f"{path}: rows[{i}]: config {config} not found")
        if config.stem in seen:
            raise ValueError(f"{path}: rows[{i}]: {config.stem} is listed twice")
        seen.add(config.stem)
        names = tuple(r.get("datasets") or known)
        if set(names) - set(known):
            raise ValueError(f"{path}: rows[{i}] names datasets {sorted(set(names) - set(known))}; the grid's "
                             f"datasets are {known}")
        seeds = _seed_list(r["seeds"], f"{path}: rows[{i}] ({config.stem})") if "seeds" in r else default_seeds
        rows.append(GridRow(config, seeds, names, Path(r["weights_from"]) if r.get("weights_from") else None))
    if not rows:
        raise ValueError(f"{path}: no rows")
    base = Path(spec["base"]) if spec.get("base") else None
    if base is not None and not base.is_file():
        raise FileNotFoundError(f"{path}: base config {base} not found")
    for row in rows:
        if row.weights_from is not None:
            _check_weights_from(path, row, rows, base)
    executor = spec.get("executor") or {}
    if executor.get("name", "local") not in EXECUTORS:
        raise ValueError(f"{path}: executor.name must be one of {list(EXECUTORS)}, found {executor.get('name')!r}")
    work_dir = Path(spec.get("work_dir") or f"runs/grid/{spec.get('name', path.stem)}")
    return Grid(path=path, name=str(spec.get("name", path.stem)), base=base, datasets=datasets, rows=rows,
                protocols=_names(spec.get("protocols"), f"{path}: protocols"),
                extra_seed_protocols=_names(spec.get("extra_seed_protocols"), f"{path}: extra_seed_protocols"),
                work_dir=work_dir, leaderboard=Path(spec.get("leaderboard") or "leaderboards"), executor=executor)


def _training_config(config: Path, base: Path | None) -> dict:
    """A row config without what does not touch training: the method's ``test_time_args`` and the evaluators."""
    import importlib

    import yaml

    spec = yaml.safe_load(config.read_text()) or {}
    model = spec.get("model") or {}
    module, name = _class_path(config, base).rsplit(".", 1)
    test_time = getattr(getattr(importlib.import_module(module), name), "test_time_args", ())
    if model.get("init_args"):
        model["init_args"] = {k: v for k, v in model["init_args"].items() if k not in test_time}
    # a row's callbacks replace the base's (LightningCLI replaces lists): compare the ones in effect
    trainer = spec.get("trainer") or {}
    base_trainer = ((yaml.safe_load(base.read_text()) or {}).get("trainer") or {}) if base is not None else {}
    callbacks = trainer["callbacks"] if "callbacks" in trainer else base_trainer.get("callbacks")
    trainer["callbacks"] = [cb for cb in callbacks or []
                            if not str((cb or {}).get("class_path", "")).endswith("evaluator.Evaluator")]
    spec["trainer"] = trainer
    return spec


def _differences(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))]
    return [] if a == b else [f"{where or '(whole config)'}: {a!r} vs {b!r}"]


def _check_weights_from(path: Path, row: GridRow, rows: list[GridRow], base: Path | None) -> None:
    source = next((r for r in rows if r.config == row.weights_from), None)
    where = f"{path}: {row.config.stem}: weights_from {row.weights_from}"
    if source is None or source is row:
        raise ValueError(f"{where}: expected another row of the grid, found {[r.config.as_posix() for r in rows]}")
    if source.weights_from is not None:
        raise ValueError(f"{where}: that row takes its own weights from {source.weights_from}; name the row "
                         f"that trains")
    if set(row.seeds) - set(source.seeds) or set(row.datasets) - set(source.datasets):
        raise ValueError(f"{where}: expected its seeds and datasets to cover this row's {list(row.seeds)} on "
                         f"{list(row.datasets)}, found {list(source.seeds)} on {list(source.datasets)}")
    diff = _differences(_training_config(row.config, base), _training_config(source.config, base))
    if diff:
        raise ValueError(f"{where}: the two rows must train alike (differ only in the method's test-time "
                         f"arguments and the evaluators); they differ in {diff}")


def _sha256_or_none(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def _class_path(config: Path, base: Path | None) -> str:
    """A row's ``model.class_path``: the row config's, else the base's."""
    import yaml

    for path in (config, base):
        if path is not None and path.is_file():
            class_path = ((yaml.safe_load(path.read_text()) or {}).get("model") or {}).get("class_path")
            if class_path:
                return class_path
    raise ValueError(f"{config}: no model.class_path in the row config or the base")


def _method_source(config: Path, base: Path | None) -> dict[str, str]:
    """The source digest of a row's method: the module of its ``model.class_path`` (the row config's, else the
    base's), or its whole subpackage when it lives in one (``marbench.methods.<name>.*``)."""
    import importlib

    module = _class_path(config, base).rsplit(".", 1)[0]
    package = importlib.import_module(module).__package__ or ""
    if package not in ("", "marbench.methods") and package.startswith("marbench.methods."):
        return source_digest((package,))
    return source_digest(modules=(module,))


def job_key(grid: Grid, job: Job) -> str:
    """sha256 of everything a job's records depend on: the row and base config bytes, the dataset (name, root,
    the split file's and the data manifest's sha256), the seed, the protocols, whether it draws the panel, the
    source of the suite's core and datasets and of the row's method (``_method_source``; another method's code
    does not touch the row) and the versions of the libraries that compute the numbers."""
    parts = {
        "config": sha256_file(job.config),
        "base": _sha256_or_none(grid.base) if grid.base else None,
        "dataset": {"name": job.dataset.name, "root": job.dataset.root,
                    "split": _sha256_or_none(Path(job.dataset.split)),
                    "manifest": _sha256_or_none(Path(job.dataset.root) / "manifest.json")},
        "seed": job.seed, "protocols": job.protocols, "example": job.example,
        "code": source_digest(_SOURCE_PACKAGES), "method_code": _method_source(job.config, grid.base),
        "libraries": library_versions(_LIBRARIES, missing="absent"),
    }
    if job.weights_from is not None:  # its records depend on the source job's training
        parts["weights_from"] = job_key(grid, grid.weights_source(job))
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def job_done(grid: Grid, job: Job, key: str | None = None) -> bool:
    """Whether ``job`` is up to date: its marker holds the job's current key and every record it wrote is still
    under ``results`` with the sha256 it had."""
    marker = grid.marker(job)
    if not marker.is_file():
        return False
    try:
        done = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    if done.get("key") != (key or job_key(grid, job)):
        return False
    return all(_sha256_or_none(grid.results / name) == sha for name, sha in done.get("records", {}).items())


def _method_seconds(records: list[Path]) -> float:
    """The method's forward seconds over every evaluation run of a job (records of one run share them)."""
    per_run = {}
    for path in records:
        if path.suffix == ".json":
            r = json.loads(path.read_text())
            per_run[r["dataset"]["split"]] = r["manifest"]["timings"]["method_s"]
    return float(sum(per_run.values()))


def _build_job(grid: Grid, job: Job, out_dir: Path, protocols: list[str] | None = None):
    """The row of ``job`` built on its dataset, under ``protocols`` (default: the job's), records to ``out_dir``."""
    from marbench.row import build_row

    chosen = protocols or (list(job.protocols) if job.protocols else None)
    cli = build_row(job.config, grid.base, job.seed, example=job.example, protocols=chosen,
                    overrides=job.overrides, dataset=job.dataset.name)
    for ev in cli.evaluators():
        ev.out_dir = out_dir
    return cli


def _load_weights(model, path: Path) -> None:
    """Load a job's trained weights (``Grid.weights``: a weights-only Lightning checkpoint) into ``model``."""
    import torch

    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])


def run_job(grid: Grid, job: Job, log=print) -> dict:
    """Run one job (see the module docstring) unless it is up to date; returns its marker (``{"key", "records",
    "seconds"}``), or ``{"skipped": True}``.

    Raises:
        ValueError: the row config has no marbench Evaluator.
    """
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from marbench.resume import RandomStateCheckpoint
    from marbench.row import evaluate_row

    key = job_key(grid, job)
    if job_done(grid, job, key):
        log(f"{job.id}: up to date")
        return {"skipped": True}
    t0 = time.perf_counter()
    staging = grid.staging(job)
    shutil.rmtree(staging, ignore_errors=True)  # records of an interrupted run of this job
    cli = _build_job(grid, job, staging)
    fit_s, resumed_from_epoch = 0.0, None
    source = grid.weights_source(job)
    if cli.model.card.trainable and source is not None and job_done(grid, source) and grid.weights(source).is_file():
        log(f"{job.id}: the weights of {source.id} (the same training; the rows differ in test-time arguments)")
        _load_weights(cli.model, grid.weights(source))
        grid.weights(job).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(grid.weights(source), grid.weights(job))
    elif cli.model.card.trainable:
        ckpt_dir = grid.checkpoints(job)
        # the configs switch Lightning's own checkpointing off; the runner adds the one it resumes from, written
        # over at every epoch's end (save_last with save_top_k=0 writes last.ckpt only when training ends)
        cli.trainer.callbacks.append(RandomStateCheckpoint())  # carried by the checkpoint: an exact resume
        cli.trainer.callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1,
                                                     every_n_epochs=1, save_on_train_epoch_end=True,
                                                     enable_version_counter=False))
        last, owner = ckpt_dir / "last.ckpt", ckpt_dir / "job_key"
        if last.is_file() and (not owner.is_file() or owner.read_text() != key):
            # a checkpoint of this job id under another configuration, code or data: never resume from it
            log(f"{job.id}: discarding {last}, written under another job key")
            shutil.rmtree(ckpt_dir)
        if last.is_file():
            resumed_from_epoch = int(torch.load(last, map_location="cpu", weights_only=False)["epoch"])
            log(f"{job.id}: resuming training from {last} (epoch {resumed_from_epoch})")
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(owner, key)
        t = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(last) if last.is_file() else None)
        fit_s = time.perf_counter() - t
        cli.trainer.callbacks = [cb for cb in cli.trainer.callbacks
                                 if not isinstance(cb, (ModelCheckpoint, RandomStateCheckpoint))]
        grid.weights(job).parent.mkdir(parents=True, exist_ok=True)
        cli.trainer.save_checkpoint(grid.weights(job), weights_only=True)
    t = time.perf_counter()
    evaluate_row(cli)
    test_s = time.perf_counter() - t
    if cli.trainer.global_rank != 0:
        return {"key": key, "records": {}, "seconds": {}}
    staged = sorted(p for p in staging.glob("*") if p.is_file())
    method_s = _method_seconds(staged)
    records = {}
    grid.results.mkdir(parents=True, exist_ok=True)
    for p in staged:
        records[p.name] = sha256_file(p)
        os.replace(p, grid.results / p.name)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(grid.checkpoints(job), ignore_errors=True)
    seconds = {"fit": fit_s, "test": test_s, "method_forward": method_s,
               "evaluator_overhead": max(test_s - method_s, 0.0), "total": time.perf_counter() - t0}
    marker = {"job": job.id, "key": key, "records": records, "seconds": seconds}
    if resumed_from_epoch is not None:  # for reviewers: resumed trainings are exact, but say where one resumed
        marker["resumed_from_epoch"] = resumed_from_epoch
    atomic_write_json(grid.marker(job), marker)
    log(f"{job.id}: {len(records)} files in {seconds['total']:.1f} s (fit {fit_s:.1f} s, evaluation "
        f"{test_s:.1f} s of which the method's forward passes {method_s:.1f} s)")
    return marker


class GridTask:
    """A job as a picklable callable for submitit: ``GridTask(grid_file)(job_id)``. On preemption or timeout
    submitit calls ``checkpoint``, which resubmits the same job: it resumes from Lightning's ``last.ckpt``."""

    def __init__(self, grid_file: str | os.PathLike, cwd: str | os.PathLike | None = None):
        self.grid_file, self.cwd = str(grid_file), str(cwd or Path.cwd())

    def __call__(self, job_id: str) -> dict:
        os.chdir(self.cwd)  # the grid's paths are relative to the repository root
        grid = load_grid(self.grid_file)
        return run_job(grid, grid.job(job_id))

    def checkpoint(self, job_id: str):
        import submitit

        return submitit.helpers.DelayedSubmission(GridTask(self.grid_file, self.cwd), job_id)


def _submitit_executor(grid: Grid, name: str):
    import submitit

    ex = submitit.AutoExecutor(folder=grid.work_dir / "submitit" / "%j", cluster=_SUBMITIT_CLUSTER[name])
    slurm = dict(grid.executor.get("slurm") or {})
    params = {k: slurm.pop(k) for k in _GENERIC_SLURM if k in slurm}
    params.update({f"slurm_{k}": v for k, v in slurm.items()})
    ex.update_parameters(name=f"marbench-{grid.name}", **params)
    return ex


def _run_submitit(grid: Grid, jobs: list[Job], name: str, log) -> list[dict]:
    ex = _submitit_executor(grid, name)
    with ex.batch():
        handles = [ex.submit(GridTask(grid.path), job.id) for job in jobs]
    log(f"submitted {len(handles)} jobs through submitit ({name}): {[h.job_id for h in handles][:8]}...")
    return [h.result() for h in handles]  # raises the first failed job's error with its log's tail


def _run_gpu_workers(grid: Grid, jobs: list[Job], gpus: list, log) -> list[dict]:
    """One worker process per GPU (``CUDA_VISIBLE_DEVICES``), each taking the next job when it is free."""
    free: queue.Queue = queue.Queue()
    for g in gpus:
        free.put(str(g))

    def work(job: Job) -> dict:
        gpu = free.get()
        try:
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
            cmd = [sys.executable, "-m", "marbench.cli", "grid", str(grid.path), "--job", job.id]
            log(f"{job.id}: on GPU {gpu}")
            subprocess.run(cmd, env=env, check=True)
        finally:
            free.put(gpu)
        return json.loads(grid.marker(job).read_text())

    with ThreadPoolExecutor(len(gpus)) as pool:
        return list(pool.map(work, jobs))


def run_grid(grid: Grid, executor: str | None = None, *, force: bool = False, force_data: bool = False,
             only: list[str] | None = None, leaderboard: bool = True, log=print) -> dict[str, dict]:
    """Generate the grid's synthetic datasets (or resume them), run every job that is not up to date through the
    executor, rebuild the leaderboard; returns each job's marker (``{"skipped": True}`` for jobs up to date).

    Args:
        executor: ``local``, ``slurm``, ``submitit-local`` (submitit's local processes) or ``submitit-debug``
            (in this process); default the grid's ``executor.name``, else ``local``.
        force: re-run jobs that are up to date. force_data: rebuild a dataset folder of another fingerprint.
        only: job ids (or row config stems) to run; default all.
    Raises:
        ValueError: an unknown executor or job; a dataset folder of another fingerprint without ``force_data``.
    """
    from marbench.datasets.gsi_analogue import PRESETS as GSI_PRESETS
    from marbench.datasets.gsi_analogue import generate_gsi_analogue
    from marbench.datasets.synthetic import generate
    from marbench.leaderboard import build_leaderboards

    name = executor or grid.executor.get("name", "local")
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; expected one of {list(EXECUTORS)}")
    t = time.perf_counter()
    for d in grid.datasets:
        if d.preset in GSI_PRESETS:  # the simulated ArtifactGSI analogue
            generate_gsi_analogue(d.root, d.preset, progress=False, force=force_data)
        elif d.preset:
            generate(d.root, d.preset, force=force_data)
    data_s = time.perf_counter() - t
    jobs = grid.jobs()
    if only:
        jobs = [j for j in jobs if j.id in only or j.config.stem in only]
        if not jobs:
            raise ValueError(f"{grid.path}: no job matches {only}")
    if force:
        for j in jobs:
            grid.marker(j).unlink(missing_ok=True)
    pending = [j for j in jobs if not job_done(grid, j)]
    results = {j.id: {"skipped": True} for j in jobs if j not in pending}
    log(f"{grid.path}: {len(jobs)} jobs, {len(pending)} to run, {len(jobs) - len(pending)} up to date "
        f"(executor {name}; data {data_s:.1f} s)")
    if name == "local" and grid.executor.get("gpus"):
        done = _run_gpu_workers(grid, pending, list(grid.executor["gpus"]), log)
    elif name == "local":
        done = [run_job(grid, j, log=log) for j in pending]
    else:
        done = _run_submitit(grid, pending, name, log)
    results.update({j.id: m for j, m in zip(pending, done, strict=True)})
    if leaderboard:
        build_leaderboards(grid.leaderboard)
    results["simulate"] = {"seconds": {"total": data_s}}
    return results


def rerun(grid: Grid, only: list[str] | None = None, protocols: list[str] | None = None, log=print) -> list[str]:
    """Re-evaluate jobs that have run, without retraining (trainable rows load ``Grid.weights``), under
    ``protocols`` (replacing the job's) if given, writing straight into ``results``; returns the job ids.

    Raises:
        FileNotFoundError: a trainable row's weights are missing (run the grid first).
    """

    from marbench.row import evaluate_row

    done = []
    for job in grid.jobs():
        if only and job.id not in only and job.config.stem not in only:
            continue
        cli = _build_job(grid, job, grid.results, protocols)
        if cli.model.card.trainable:
            weights = grid.weights(job)
            if not weights.is_file():
                raise FileNotFoundError(f"{weights} not found: run `marbench grid {grid.path}` first")
            _load_weights(cli.model, weights)
        log(f"{job.id}: re-evaluating")
        evaluate_row(cli)
        done.append(job.id)
    return done


def timing_table(results: dict[str, dict]) -> str:
    """The runner's per-job seconds as a plain-text table (skipped jobs marked), with the total."""
    lines = [f"{'job':48s} {'total':>8s} {'fit':>8s} {'test':>8s} {'forward':>8s} {'overhead':>8s}"]
    total = 0.0
    for job_id, m in results.items():
        if m.get("skipped"):
            lines.append(f"{job_id:48s} {'up to date':>8s}")
            continue
        s = m["seconds"]
        total += s["total"]
        lines.append(f"{job_id:48s} {s['total']:8.1f} " + " ".join(
            f"{s.get(k, 0.0):8.1f}" for k in ("fit", "test", "method_forward", "evaluator_overhead")))
    lines.append(f"{'total':48s} {total:8.1f}")
    return "\n".join(lines)
