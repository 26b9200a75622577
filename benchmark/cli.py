"""The ``marbench`` command line."""
from __future__ import annotations

import argparse
import sys


def _simulate(args: argparse.Namespace) -> int:
    from marbench.datasets.synthetic import generate

    manifest = generate(args.out, args.preset, seed=args.seed, progress=not args.quiet)
    print(f"{args.out}: {manifest['cases']} slices, {len(manifest['files'])} files, manifest.json written")
    return 0


def _splits_editmar(args: argparse.Namespace) -> int:
    from pathlib import Path

    from marbench.datasets.aapm_format import _atomic_write
    from marbench.datasets.splits import make_editmar_split, read_category_csv, write_split

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
    _atomic_write(out / "editmar_references.txt", ("\n".join(lines) + "\n").encode())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="marbench", description="Benchmark suite for CT metal artifact reduction")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="generate (or resume) the synthetic AAPM-like benchmark")
    sim.add_argument("--preset", default="smoke", choices=["tiny", "smoke", "aapm"])
    sim.add_argument("--out", required=True, help="output folder (AAPM CT-MAR release layout)")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--quiet", action="store_true", help="no progress bar")
    sim.set_defaults(func=_simulate)
    splits = sub.add_parser("splits", help="write split files").add_subparsers(dest="protocol", required=True)
    editmar = splits.add_parser("editmar", help="CT-EditMAR test / train-N / reference-pool split")
    editmar.add_argument("--categories", required=True, help="CSV with columns case_id,category[,patient]")
    editmar.add_argument("--out", required=True, help="folder for editmar.txt and editmar_references.txt")
    editmar.add_argument("--test-size", type=int, default=1000)
    editmar.add_argument("--train-sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    editmar.add_argument("--seed", type=int, default=0)
    editmar.set_defaults(func=_splits_editmar)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
