#!/usr/bin/env python
"""Draw one report figure from the aggregated tables (results/tables/{runs,curves}.csv)."""

import argparse
import sys
from pathlib import Path

from _cli import cli

from tlselect.report.plots import FIGURES, draw


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("figure", choices=sorted(FIGURES), help="which figure")
    parser.add_argument("--runs", required=True, help="runs.csv")
    parser.add_argument("--curves", required=True, help="curves.csv")
    parser.add_argument("--optimizations", default="", help="results/tables/optimizations.csv (speedups)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    optimizations = Path(args.optimizations) if args.optimizations else None
    draw(args.figure, Path(args.runs), Path(args.curves), Path(args.out), optimizations)
    return 0


if __name__ == "__main__":
    sys.exit(main())
