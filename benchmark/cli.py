"""The ``marbench`` command line.

``marbench simulate``, ``simulate-gsi`` (the simulated ArtifactGSI analogue), ``splits editmar``, ``list``,
``weights``, ``grid``, ``rerun``, ``verify``, ``leaderboard``; ``fit``, ``validate``, ``test`` and ``predict`` are
LightningCLI subcommands (``marbench test --config configs/bench/li.yaml``).
"""
from __future__ import annotations

import argparse
import sys

_LIGHTNING = ("fit", "validate", "test", "predict")


def _simulate(args: argparse.Namespace) -> int:
    from marbench.datasets.synthetic import generate, generate_from_clean_images

    if args.clean_images is None:
        for flag, value in (("--categories", args.categories), ("--pixel-mm", args.pixel_mm),
                            ("--crop-to-fov", args.crop_to_fov or None)):
            if value is not None:
                print(f"marbench simulate: {flag} only applies with --clean-images", file=sys.stderr)
                return 2
    try:
        if args.clean_images is None:
            manifest = generate(args.out, args.preset, seed=args.seed, progress=not args.quiet, force=args.force)
        else:
            manifest = generate_from_clean_images(args.out, args.clean_images, args.preset, seed=args.seed,
                                                  categories=args.categories, pixel_mm=args.pixel_mm,
                                                  crop_to_fov=args.crop_to_fov, progress=not args.quiet,
                                                  force=args.force)
    except (ValueError, FileNotFoundError) as e:  # bad input or a folder of other provenance: the message says
        print(f"marbench simulate: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {manifest['cases']} slices, {len(manifest['files'])} files, manifest.json written "
          f"(fingerprint {manifest['fingerprint']['sha256'][:16]})")
    return 0


def _simulate_gsi(args: argparse.Namespace) -> int:
    from marbench.datasets.gsi_analogue import generate_gsi_analogue

    try:
        manifest = generate_gsi_analogue(args.out, args.preset, seed=args.seed, limit=args.limit,
                                         progress=not args.quiet, force=args.force)
    except (ValueError, FileNotFoundError) as e:  # bad input or a folder of other provenance: the message says
        print(f"marbench simulate-gsi: {e}", file=sys.stderr)
        return 2
    if manifest is None:
        print(f"{args.out}: stopped after --limit {args.limit} new patients; run again to resume")
        return 0
    print(f"{args.out}: {sum(manifest['patients'].values())} patients ({manifest['slices']} slices), "
          f"{len(manifest['files'])} files, manifest.json written "
          f"(fingerprint {manifest['fingerprint']['sha256'][:16]})")
    return 0


def _splits_editmar(args: argparse.Namespace) -> int:
    from pathlib import Path

    from marbench.datasets.splits import make_editmar_split, read_category_csv, write_split
    from marbench.files import atomic_write

    test, train, pools = make_editmar_split(read_category_csv(args.categories), test_size=args.test_size,
                                            train_sizes=tuple(args.train_sizes), seed=args.seed)
    out = Path(args.out)
    for n, rows in train.items():
        sha = write_split(out / f"editmar_n{n}.txt", {"train": rows, "test": test},
                          f"CT-EditMAR protocol (Emirdagi et al. Sec. 3.1), N = {n}, from "
                          f"{Path(args.categories).name}, seed {args.seed}")
        print(f"{out / f'editmar_n{n}.txt'}: train {len(rows)}, test {len(test)} (sha256 {sha[:12]})")
    lines = ["# CT-EditMAR reference pools: <test case> <metal-free references: same category, other patients>"]
    lines += [f"{cid} {' '.join(refs)}" for cid, refs in pools.items()]
    atomic_write(out / "editmar_references.txt", "\n".join(lines) + "\n")
    return 0


def _list(args: argparse.Namespace) -> int:
    from marbench.evaluation.protocols import PROTOCOLS
    from marbench.method import METHODS

    methods = METHODS.items()
    width = max(len(n) for n, _ in methods)
    print("methods:")
    for name, cls in methods:
        card = cls.card
        kind = "trained" if card.trainable else "no training"
        train = f"; training also {', '.join(card.training_inputs)}" if card.training_inputs else ""
        print(f"  {name:{width}s}  {kind:11s}  inputs {', '.join(card.inputs)}{train}\n  {'':{width}s}  {card.paper}")
    print("protocols:")
    for name, p in PROTOCOLS.items():
        print(f"  {name:{width}s}  v{p.version}  {', '.join(p.metric_names)}")
    return 0


def _grid(args: argparse.Namespace) -> int:
    import time

    from marbench.grid import load_grid, run_grid, timing_table

    t = time.perf_counter()
    try:
        results = run_grid([load_grid(g) for g in args.grid], args.executor, force=args.force,
                           force_data=args.force_data, only=args.only or None)
    except (ValueError, KeyError, FileNotFoundError) as e:  # stale data, a bad grid file: the message says which
        print(f"marbench grid: {e}", file=sys.stderr)
        return 2
    print("wall seconds per job:")
    print(timing_table(results, wall_s=time.perf_counter() - t))
    return 0


def _rerun(args: argparse.Namespace) -> int:
    from marbench.grid import load_grid, rerun

    protocols = [p for p in (args.protocols or "").split(",") if p]
    done = rerun(load_grid(args.grid), args.only or None, protocols or None)
    print(f"records written for {', '.join(done)}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from marbench.verify import main as verify

    return verify(args.records, data_root=args.data, check_files=not args.no_file_check,
                  only_failures=args.failures_only)


def _leaderboard(args: argparse.Namespace) -> int:
    from marbench.leaderboard import build_leaderboards, check_leaderboards

    if args.check:
        problems = check_leaderboards(args.root)
        for p in problems:
            print(p, file=sys.stderr)
        print("leaderboard tables: " + ("out of date" if problems else "match the committed records"))
        return 1 if problems else 0
    written = build_leaderboards(args.root, figures=not args.tables_only)
    print(f"{len(written)} files written under {args.root}")
    return 0


def _weights(args: argparse.Namespace) -> int:
    from marbench.evaluation.weights import status, weights_dir

    print(f"weight files in {weights_dir()} (set MARBENCH_WEIGHTS to change):")
    for name, filename, state in status():
        print(f"  {name:22s} {filename:45s} {state}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="marbench", description="Benchmark suite for CT metal artifact reduction",
                                     epilog="fit | validate | test | predict --config FILE: LightningCLI subcommands")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="generate (or resume) the synthetic AAPM-like benchmark, or one "
                                          "simulated on your own clean CT images (--clean-images)")
    sim.add_argument("--preset", default="smoke", choices=["tiny", "smoke", "aapm"])
    sim.add_argument("--out", required=True, help="output folder (AAPM CT-MAR release layout)")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--quiet", action="store_true", help="no progress bar")
    sim.add_argument("--force", action="store_true",
                     help="OUT was made by other code, settings or inputs: delete its generated content and rebuild")
    sim.add_argument("--clean-images", metavar="PATH",
                     help="folder (or file) of clean CT: DICOM series, NIfTI volumes or AAPM *_512x512x1.raw slices")
    sim.add_argument("--categories", metavar="CSV",
                     help="with --clean-images: rows file_or_slice,category choosing the implants (default: "
                          "AAPM fractal shapes inside the body, body FOV)")
    sim.add_argument("--pixel-mm", type=float, default=None,
                     help="with --clean-images: pixel size of raw slices (default: AAPM body FOV, 400 mm / width)")
    sim.add_argument("--crop-to-fov", action="store_true",
                     help="with --clean-images: crop bodies larger than the FOV instead of refusing them "
                          "(recorded in the manifest)")
    sim.set_defaults(func=_simulate)
    gsi = sub.add_parser("simulate-gsi", help="generate (or resume) the simulated ArtifactGSI analogue (patient "
                                              "folders of NIfTI volumes, read by marbench.datasets.artifactgsi)")
    gsi.add_argument("--preset", default="gsi-smoke", choices=["gsi-tiny", "gsi-smoke", "gsi"])
    gsi.add_argument("--out", required=True, help="output folder (ArtifactGSI patient-folder layout)")
    gsi.add_argument("--seed", type=int, default=0)
    gsi.add_argument("--limit", type=int, default=None, metavar="N",
                     help="stop after simulating N new patients (run again to resume)")
    gsi.add_argument("--quiet", action="store_true", help="no progress bar")
    gsi.add_argument("--force", action="store_true",
                     help="OUT was made by other code or settings: delete its generated content and rebuild")
    gsi.set_defaults(func=_simulate_gsi)
    splits = sub.add_parser("splits", help="write split files").add_subparsers(dest="protocol", required=True)
    editmar = splits.add_parser("editmar", help="CT-EditMAR test / train-N / reference-pool split")
    editmar.add_argument("--categories", required=True, help="CSV with columns case_id,category[,patient]")
    editmar.add_argument("--out", required=True, help="folder for editmar_n*.txt and editmar_references.txt")
    editmar.add_argument("--test-size", type=int, default=1000)
    editmar.add_argument("--train-sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    editmar.add_argument("--seed", type=int, default=0)
    editmar.set_defaults(func=_splits_editmar)
    sub.add_parser("list", help="registered methods (papers, inputs) and protocols").set_defaults(func=_list)
    sub.add_parser("weights", help="feature-backbone weight files: present and verified?").set_defaults(func=_weights)
    gr = sub.add_parser("grid", help="run the jobs of grid files that have no up-to-date record (resumable), then "
                                      "rebuild the leaderboard (make bench: the smoke and ArtifactGSI grids)")
    gr.add_argument("grid", nargs="+", help="grid files (YAML), e.g. configs/grids/smoke.yaml; several run as one")
    gr.add_argument("--executor", choices=["local", "slurm", "submitit-local", "submitit-debug"],
                    help="default: the grid's executor.name, else local")
    gr.add_argument("--only", nargs="+", metavar="JOB", help="job ids or row config stems to run")
    gr.add_argument("--force", action="store_true", help="re-run jobs even if up to date")
    gr.add_argument("--force-data", action="store_true",
                    help="rebuild a synthetic dataset folder generated by other code or settings")
    gr.set_defaults(func=_grid)
    rr = sub.add_parser("rerun", help="re-evaluate a grid's trained jobs from their saved weights, without training")
    rr.add_argument("grid", help="grid file (YAML)")
    rr.add_argument("--only", nargs="+", metavar="JOB", help="job ids or row config stems (default: all)")
    rr.add_argument("--protocols", help="comma-separated protocols to evaluate (default: the job's list)")
    rr.set_defaults(func=_rerun)
    vf = sub.add_parser("verify", help="re-run the rows of result records and compare every value with the record")
    vf.add_argument("records", nargs="+", help="result records (leaderboards/results/*.json)")
    vf.add_argument("--data", help="data folder to run on instead of the records' data.init_args.root")
    vf.add_argument("--no-file-check", action="store_true",
                    help="check only manifest.json's sha256, not every file it lists")
    vf.add_argument("--failures-only", action="store_true", help="print only the values that disagree")
    vf.set_defaults(func=_verify)
    lb = sub.add_parser("leaderboard", help="rebuild leaderboards/ from leaderboards/results/*.json")
    lb.add_argument("--root", default="leaderboards")
    lb.add_argument("--tables-only", action="store_true", help="tables only (no figures)")
    lb.add_argument("--check", action="store_true", help="exit 1 if the committed tables differ from the records")
    lb.set_defaults(func=_leaderboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _LIGHTNING:
        from marbench.lightning_cli import build_cli

        build_cli(argv)
        return 0
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
