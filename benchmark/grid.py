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
- ``executor``: ``local``, sequential in this process, or with ``cpu_workers: N`` N worker processes of
  ``threads_per_worker`` CPU threads each (default: the cores over N), or with ``gpus`` one worker process per GPU
  (``CUDA_VISIBLE_DEVICES``); or ``slurm`` through submitit with a ``slurm`` section (``timeout_min``,
  ``gpus_per_node``, ``cpus_per_task``, ``mem_gb``, ``nodes``, ``tasks_per_node``; any other key goes to
  submitit's Slurm executor: ``partition``, ``array_parallelism``, ``account``, ``qos``, ``setup``...).

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

Workers (``cpu_workers``, ``gpus``) take the jobs in grid-file order, except that a job waits for the job whose
weights it takes (``weights_from``) and a row's further seeds wait for its first seed: the first job of a row builds
the one-off cache entries its row needs (a stand-in backbone, a pre-training stage), which other workers would
otherwise wait for (``marbench.files.cache_lock``). So a grid file lists the rows with the longest one-off work
first. On the 2-core machine two single-thread workers run ``make bench`` far faster than one process of two
threads (109 minutes on older code; the README's budget section has the measured table): much of the work (small
networks on large images, the samplers' loops) is bound by memory and per-operation overhead, not arithmetic, so
a second thread gains little where a second process doubles it.
Records carry the thread count they ran with (``torch_threads`` in the manifest): CPU kernels sum in an order that
follows it, so a trained row reproduces bit for bit under that count (``marbench verify`` sets it), and its last
bits differ under another.

Several grid files run as one (``marbench grid A B``): their jobs share the workers and each leaderboard is rebuilt
once, at the end; the first grid's ``executor`` section applies.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
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
    _worker_slots(executor, str(path))
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
            # memory-mapped: the epoch is read without reading the weights and optimiser state
            resumed_from_epoch = int(torch.load(last, map_location="cpu", weights_only=False, mmap=True)["epoch"])
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


def _submitit_executor(grid: Grid, executor: dict, name: str):
    import submitit

    ex = submitit.AutoExecutor(folder=grid.work_dir / "submitit" / "%j", cluster=_SUBMITIT_CLUSTER[name])
    slurm = dict(executor.get("slurm") or {})
    params = {k: slurm.pop(k) for k in _GENERIC_SLURM if k in slurm}
    params.update({f"slurm_{k}": v for k, v in slurm.items()})
    ex.update_parameters(name=f"marbench-{grid.name}", **params)
    return ex


def _run_submitit(grids: list[Grid], jobs: list[tuple[Grid, Job]], settings: dict, name: str,
                  log) -> dict[str, dict]:
    """One job array per grid with pending jobs, each with the resources of ``settings`` (the first grid's
    ``executor``), all submitted before waiting."""
    handles = []
    for grid in grids:
        mine = [j for g, j in jobs if g is grid]
        if not mine:
            continue
        ex = _submitit_executor(grid, settings, name)
        with ex.batch():
            mine = [(j, ex.submit(GridTask(grid.path), j.id)) for j in mine]
        log(f"submitted {len(mine)} jobs of {grid.path} through submitit ({name}): "
            f"{[h.job_id for _, h in mine][:8]}...")
        handles += mine
    return {j.id: h.result() for j, h in handles}  # raises the first failed job's error with its log's tail


def _worker_slots(executor: dict, where: str) -> list[dict[str, str]] | None:
    """The environment of each local worker process (``None``: run in this process).

    Raises:
        ValueError: ``cpu_workers`` or ``threads_per_worker`` that is not a positive integer, or both ``gpus`` and
            ``cpu_workers``.
    """
    gpus, workers = executor.get("gpus"), executor.get("cpu_workers")
    if gpus and workers:
        raise ValueError(f"{where}: executor has both gpus and cpu_workers; expected one of them")
    if gpus:
        return [{"CUDA_VISIBLE_DEVICES": str(g)} for g in gpus]
    if workers is None:
        return None
    for key in ("cpu_workers", "threads_per_worker"):
        value = executor.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: executor.{key} must be a positive integer, found {value!r}")
    threads = executor.get("threads_per_worker", max(1, (os.cpu_count() or 1) // workers))
    # OpenMP reads its count when torch loads; the worker also sets torch's own (_start_worker)
    return [{"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}] * workers


def _start_worker(slots, cwd: str, runner_pid: int) -> None:
    """Initialise a worker process: die with the runner, take one slot's environment (a GPU or a CPU thread
    count)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        # killed with the runner, SIGKILL included (Lightning catches SIGTERM): an orphan would go on writing the
        # job that the next run re-does
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != runner_pid:  # the runner died before the line above
            os._exit(1)
    slot = slots.get()
    os.environ.update(slot)
    os.chdir(cwd)
    if "OMP_NUM_THREADS" in slot:  # a CPU slot
        import torch

        torch.set_num_threads(int(slot["OMP_NUM_THREADS"]))


def _worker_job(grid_file: str, job_id: str) -> dict:
    grid = load_grid(grid_file)
    return run_job(grid, grid.job(job_id))


def _waits_for(jobs: list[tuple[Grid, Job]]) -> dict[str, set[str]]:
    """For each job, the jobs it must not run beside: the job whose weights it takes, and its row's first seed
    (which builds the row's one-off cache entries)."""
    out, firsts = {}, {}
    for grid, job in jobs:
        if id(grid) not in firsts:
            firsts[id(grid)] = {(j.config, j.dataset): j.id for j in grid.jobs() if j.example}
        after = set()
        source = grid.weights_source(job)
        if source is not None:
            after.add(source.id)
        if not job.example:
            after.add(firsts[id(grid)][job.config, job.dataset])
        out[job.id] = after
    return out


def _run_workers(jobs: list[tuple[Grid, Job]], slots: list[dict[str, str]], log) -> dict[str, dict]:
    """Run ``jobs`` on one spawned worker process per slot, in order but for the waits of ``_waits_for``; a failed
    job raises once the running ones have finished (their records land)."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = multiprocessing.get_context("spawn")  # no forked copies of this process's torch threads or CUDA state
    queue = ctx.Queue()
    for slot in slots:
        queue.put(slot)
    waits = _waits_for(jobs)
    todo, running, done = list(jobs), {}, {}
    with ProcessPoolExecutor(len(slots), mp_context=ctx, initializer=_start_worker,
                             initargs=(queue, str(Path.cwd()), os.getpid())) as pool:
        while todo or running:
            busy = {j.id for _, j in todo} | {j.id for _, j in running.values()}
            for item in [t for t in todo if not waits[t[1].id] & busy][:len(slots) - len(running)]:
                todo.remove(item)
                running[pool.submit(_worker_job, str(item[0].path), item[1].id)] = item
                log(f"{item[1].id}: started ({len(running)} of {len(slots)} workers busy)")
            if not running:
                raise ValueError(f"jobs waiting for each other: {[j.id for _, j in todo]}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                _, job = running.pop(future)
                done[job.id] = future.result()
                log(f"{job.id}: finished ({len(done)} of {len(jobs)} jobs)")
    return done


def run_grid(grids: Grid | list[Grid], executor: str | None = None, *, force: bool = False,
             force_data: bool = False, only: list[str] | None = None, leaderboard: bool = True,
             log=print) -> dict[str, dict]:
    """Generate the grids' synthetic datasets (or resume them), run every job that is not up to date through the
    executor, rebuild each leaderboard once; returns each job's marker (``{"skipped": True}`` for jobs up to
    date) and the seconds of ``simulate`` and ``leaderboard``.

    Args:
        grids: one grid, or several run as one (their jobs share the workers; the first grid's ``executor``).
        executor: ``local``, ``slurm``, ``submitit-local`` (submitit's local processes) or ``submitit-debug``
            (in this process); default the first grid's ``executor.name``, else ``local``.
        force: re-run jobs that are up to date. force_data: rebuild a dataset folder of another fingerprint.
        only: job ids (or row config stems) to run; default all.
    Raises:
        ValueError: an unknown executor or job; two grids with a job of the same id; a dataset folder of another
            fingerprint without ``force_data``; bad worker settings.
    """
    from marbench.datasets.gsi_analogue import PRESETS as GSI_PRESETS
    from marbench.datasets.gsi_analogue import generate_gsi_analogue
    from marbench.datasets.synthetic import generate
    from marbench.leaderboard import build_leaderboards

    grids = [grids] if isinstance(grids, Grid) else list(grids)
    settings = grids[0].executor
    name = executor or settings.get("name", "local")
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; expected one of {list(EXECUTORS)}")
    slots = _worker_slots(settings, str(grids[0].path)) if name == "local" else None
    t = time.perf_counter()
    for d in (d for grid in grids for d in grid.datasets):
        if d.preset in GSI_PRESETS:  # the simulated ArtifactGSI analogue
            generate_gsi_analogue(d.root, d.preset, progress=False, force=force_data)
        elif d.preset:
            generate(d.root, d.preset, force=force_data)
    data_s = time.perf_counter() - t
    jobs = [(grid, j) for grid in grids for j in grid.jobs()]
    ids = [j.id for _, j in jobs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{[str(g.path) for g in grids]}: job ids must be distinct across the grids, found "
                         f"{sorted({i for i in ids if ids.count(i) > 1})} twice")
    if only:
        jobs = [(g, j) for g, j in jobs if j.id in only or j.config.stem in only]
        if not jobs:
            raise ValueError(f"{[str(g.path) for g in grids]}: no job matches {only}")
    if force:
        for g, j in jobs:
            g.marker(j).unlink(missing_ok=True)
    pending = [(g, j) for g, j in jobs if not job_done(g, j)]
    results = {j.id: {"skipped": True} for g, j in jobs if (g, j) not in pending}
    log(f"{', '.join(str(g.path) for g in grids)}: {len(jobs)} jobs, {len(pending)} to run, "
        f"{len(jobs) - len(pending)} up to date (executor {name}"
        f"{f', {len(slots)} workers' if slots else ''}; data {data_s:.1f} s)")
    if slots:
        results.update(_run_workers(pending, slots, log))
    elif name == "local":
        results.update({j.id: run_job(g, j, log=log) for g, j in pending})
    elif pending:
        results.update(_run_submitit(grids, pending, settings, name, log))
    results["simulate"] = {"seconds": {"total": data_s}}
    if leaderboard:
        t = time.perf_counter()
        for folder in dict.fromkeys(g.leaderboard for g in grids):
            build_leaderboards(folder)
        results["leaderboard"] = {"seconds": {"total": time.perf_counter() - t}}
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


def timing_table(results: dict[str, dict], wall_s: float | None = None) -> str:
    """The runner's per-job seconds as a plain-text table (skipped jobs marked), with their sum and, given
    ``wall_s``, the wall time (less than the sum where workers ran jobs side by side)."""
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
    if wall_s is not None:
        lines.append(f"{'wall':48s} {wall_s:8.1f}")
    return "\n".join(lines)
