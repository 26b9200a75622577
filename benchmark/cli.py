"""The ``marbench`` command line."""
from __future__ import annotations

import argparse
import sys


def _simulate(args: argparse.Namespace) -> int:
    from marbench.datasets.synthetic import generate

    manifest = generate(args.out, args.preset, seed=args.seed, progress=not args.quiet)
    print(f"{args.out}: {manifest['cases']} slices, {len(manifest['files'])} files, manifest.json written")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
