"""``marbench bench``: the smoke grid on one machine.

Generates (or resumes) the synthetic benchmark, then for each row config under ``configs/bench/`` (merged over
``configs/bench/_base.yaml``) and each of its training seeds (``configs/bench/_seeds.yaml``) trains the method if
it is trainable (``seed_everything`` = the seed; the weights go to ``runs/bench/<config>__seed<seed>.ckpt``, so
that a row can be re-evaluated without retraining), evaluates it on the test split and, for protocols that score
the metal sweeps (``perceptual-indicators``), on the benchmark's sweeps (``marbench.datasets.sweeps``); its
``Evaluator`` writes one record per protocol and seed. Then it rebuilds the leaderboard, which shows the spread
over training seeds beside the per-slice intervals.
"""
from __future__ import annotations

import time
from pathlib import Path

__all__ = ["run_bench", "run_row", "rerun", "row_configs", "row_seeds", "extra_seed_protocols", "build_row",
           "evaluate_row",
           "checkpoint_path", "BENCH_CONFIGS", "BASE_CONFIG", "SEEDS_FILE", "BENCH_CHECKPOINTS"]

BENCH_CONFIGS = Path("configs/bench")
BASE_CONFIG = BENCH_CONFIGS / "_base.yaml"
SEEDS_FILE = BENCH_CONFIGS / "_seeds.yaml"
BENCH_CHECKPOINTS = Path("runs/bench")


def row_configs(configs: list[Path] | None = None) -> list[Path]:
    """The row configs to run: the given ones, or every ``configs/bench/*.yaml`` but the base.

    Raises:
        FileNotFoundError: no row config.
    """
    # files starting with "_" (the shared base, the seeds table) are not rows
    found = sorted(configs or (p for p in BENCH_CONFIGS.glob("*.yaml") if not p.name.startswith("_")))
    if not found:
        raise FileNotFoundError(f"no bench configs under {BENCH_CONFIGS}")
    return found


def _seeds_table(seeds_file: Path) -> dict:
    if not seeds_file.is_file():
        return {}
    import yaml

    return yaml.safe_load(seeds_file.read_text()) or {}


def row_seeds(cfg: Path, seeds_file: Path = SEEDS_FILE) -> list[int]:
    """The training seeds of a row: ``rows[<config stem>]`` of the seeds table, else its ``default`` (``[0]``
    without a table).

    Raises:
        ValueError: a seed list that is empty or holds a non-integer (names the file).
    """
    table = _seeds_table(seeds_file)
    seeds = (table.get("rows") or {}).get(cfg.stem, table.get("default", [0]))
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"{seeds_file}: the seeds of {cfg.stem!r} must be a non-empty list of integers, "
                         f"found {seeds!r}")
    return list(seeds)


def extra_seed_protocols(seeds_file: Path = SEEDS_FILE) -> list[str] | None:
    """The protocols that the further training seeds of a row (all but its first) are evaluated under
    (``extra_seed_protocols`` of the seeds table); ``None``: the row config's own list."""
    return _seeds_table(seeds_file).get("extra_seed_protocols")


def checkpoint_path(cfg: Path, seed: int, checkpoints: Path = BENCH_CHECKPOINTS) -> Path:
    """Where a trained row's weights go: ``<checkpoints>/<config stem>__seed<seed>.ckpt``."""
    return checkpoints / f"{cfg.stem}__seed{seed}.ckpt"


def build_row(cfg: Path, base: Path | None = BASE_CONFIG, seed: int = 0, example: bool = True,
              protocols: list[str] | None = None):
    """The LightningCLI of one row (``base`` then ``cfg`` merged, ``seed_everything`` = ``seed``), not run; every
    ``Evaluator`` of it writes records of training seed ``seed`` (and the qualitative example only if
    ``example``: one seed of a row draws the panel), under ``protocols`` if given (replacing the config's list).

    Raises:
        ValueError: the config has no marbench ``Evaluator`` callback.
    """
    from marbench.evaluation.protocols import get_protocol
    from marbench.lightning_cli import build_cli

    args = (["--config", str(base)] if base is not None and base.is_file() else []) + ["--config", str(cfg)]
    cli = build_cli(args + ["--seed_everything", str(seed)], run=False)
    if not cli.evaluators():
        raise ValueError(f"{cfg}: the config has no marbench Evaluator callback (trainer.callbacks)")
    for ev in cli.evaluators():
        ev.seed = seed
        ev.save_example = ev.save_example and example
        if protocols:
            ev.protocols = [get_protocol(p) for p in protocols]
    return cli


def evaluate_row(cli) -> None:
    """Evaluate a built row on the test split, then on the metal sweeps if a protocol scores them."""
    from marbench.datasets.sweeps import SweepDataModule

    cli.attach_config()
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    if any(p.data == "sweeps" for ev in cli.evaluators() for p in ev.protocols):
        dm = cli.datamodule
        keys = tuple(dict.fromkeys([*dm.keys, "gt_image", "metal_mask"]))
        sweeps = SweepDataModule(dm.root, keys=keys, batch_size=dm.batch_size)
        cli.trainer.test(cli.model, datamodule=sweeps, verbose=False)


def run_row(cfg: Path, base: Path | None = BASE_CONFIG, checkpoints: Path = BENCH_CHECKPOINTS,
            seed: int = 0, example: bool = True, protocols: list[str] | None = None) -> float:
    """Train (if trainable, with ``seed``; weights to ``checkpoint_path``) and evaluate one row (under
    ``protocols`` if given, else the config's); returns seconds."""
    t = time.perf_counter()
    cli = build_row(cfg, base, seed, example, protocols)
    if cli.model.card.trainable:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        checkpoints.mkdir(parents=True, exist_ok=True)
        cli.trainer.save_checkpoint(checkpoint_path(cfg, seed, checkpoints), weights_only=True)
    evaluate_row(cli)
    return time.perf_counter() - t


def run_bench(configs: list[Path] | None = None, data_root: str = "data/smoke", preset: str = "smoke",
              leaderboard_root: str = "leaderboards", force_data: bool = False) -> dict[str, float]:
    """Run the grid; returns wall seconds per step.

    Args:
        force_data: rebuild ``data_root`` if it was generated by other code or settings (else that is an error:
            stale data never feeds a record).
    Raises:
        FileNotFoundError: no config found.
        ValueError: ``data_root`` holds a benchmark of another fingerprint and ``force_data`` is false.
    """
    from marbench.datasets.synthetic import generate
    from marbench.leaderboard import build_leaderboards

    rows = row_configs(configs)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    generate(data_root, preset, force=force_data)
    timings["simulate"] = time.perf_counter() - t
    for cfg in rows:
        seeds = row_seeds(cfg)
        for seed in seeds:
            first = seed == seeds[0]
            timings[f"{cfg.stem}__seed{seed}"] = run_row(cfg, seed=seed, example=first,
                                                         protocols=None if first else extra_seed_protocols())
    t = time.perf_counter()
    build_leaderboards(leaderboard_root)
    timings["leaderboard"] = time.perf_counter() - t
    return timings


def rerun(configs: list[Path] | None = None, protocols: list[str] | None = None) -> list[str]:
    """Re-evaluate rows already run by ``run_bench`` without retraining (trained methods load
    ``runs/bench/<config>__seed<seed>.ckpt``, every seed of the row), under ``protocols`` (replacing the config's
    list) if given; returns the rows run (``<config>__seed<seed>``).

    Raises:
        FileNotFoundError: a trainable method's checkpoint is missing.
    """
    import torch


    done = []
    for cfg in row_configs(configs):
        seeds = row_seeds(cfg)
        for seed in seeds:
            first = seed == seeds[0]
            cli = build_row(cfg, BASE_CONFIG, seed, example=first,
                            protocols=protocols or (None if first else extra_seed_protocols()))
            if cli.model.card.trainable:
                ckpt = checkpoint_path(cfg, seed)
                if not ckpt.is_file():
                    raise FileNotFoundError(f"{ckpt} not found: run `marbench bench {cfg}` first")
                cli.model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
            evaluate_row(cli)
            done.append(f"{cfg.stem}__seed{seed}")
    return done
