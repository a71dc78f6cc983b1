#!/usr/bin/env python
"""Replay every search method on the grid's records or on a pool table (tlselect.search.replay):
replay.csv, the anytime figure and, when asked, the goals table.

replay.csv holds one row per method, compute axis (epochs, seconds) and share of the grid's
compute (1/9, 1/5, 1/3, 1): mean regret in test-accuracy points over the seeds, its 95% interval,
and how many seeds had chosen a model by then.
"""

import argparse
import sys
from pathlib import Path

from _cli import cli

from tlselect.core.registry import read_record
from tlselect.report.plots import draw_replay
from tlselect.report.tables import write_csv
from tlselect.search import replay


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pool = parser.add_mutually_exclusive_group(required=True)
    pool.add_argument("--grid", nargs="+", help="every grid run's record")
    pool.add_argument("--pool", help="a pool table (benchmarks/pools/*.csv) instead of the grid's records")
    parser.add_argument("--eta", type=int, required=True)
    parser.add_argument("--min-epochs", type=int, required=True)
    parser.add_argument("--max-epochs", type=int, help="the grid's epochs (default with --pool: the pool's)")
    parser.add_argument("--brackets", type=int, required=True, help="Hyperband brackets")
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--q", type=int, default=4, help="TPE trials per round")
    parser.add_argument("--startup", type=int, default=8, help="TPE random trials before the model")
    parser.add_argument("--delta", type=float, default=0.1, help="GP-UCB's beta_t confidence")
    parser.add_argument("--workers", type=int, default=4, help="ASHA's simulated workers")
    parser.add_argument("--rho", type=float, default=1 / 3, help="BOHB's share of random configurations")
    parser.add_argument("--processes", type=int, default=1, help="processes the seeds' replays spread over")
    parser.add_argument("--out", required=True, help="replay.csv")
    parser.add_argument("--figure", required=True, help="the anytime figure (PNG)")
    parser.add_argument("--goals", help="also write the goals table here (tlselect.search.replay.goals)")
    args = parser.parse_args(argv)
    if args.max_epochs is None and not args.pool:
        parser.error("--max-epochs is required with --grid")
    keys = ("eta", "min_epochs", "max_epochs", "brackets", "q", "startup", "delta", "workers", "rho")
    rows = replay.read_pool(args.pool) if args.pool else replay.table([read_record(path) for path in args.grid])
    if args.max_epochs is None:
        args.max_epochs = max(len(row.val) for row in rows.values())
    settings = {k: getattr(args, k) for k in keys}
    curve, table = replay.anytime(rows, settings, args.seeds, args.processes)
    write_csv(table, args.out)
    if args.goals:
        write_csv(replay.goals(curve), args.goals)
    draw_replay(curve, Path(args.figure), f"the pool {Path(args.pool).name}" if args.pool else "the grid's records")
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
