"""Every global scheduler of the many-users workflow replayed on recorded learning curves (docs/many-users.md).

Reads a pool table (``benchmarks/tenant_curves.py``'s output), replays each scheduler with every
tenant's strategy for ``--seeds`` seeds until the seconds spent reach ``--budget`` of all pools'
seconds (:func:`tlselect.search.tenants.replay_table`), and writes the anytime table (mean global
regret with its 95% interval per scheduler and share of the compute, ``replay.csv``'s columns), the
summary (each scheduler's regret at the budget and its compute to reach round robin's) and the figure.

    python benchmarks/tenant_replay.py --pools docs/measurements/tenant-curves-cpu.csv --seeds 200 \
        --budget 0.25 --processes 4 --out docs/measurements/tenant-replay-cpu.csv \
        --summary docs/measurements/tenant-replay-summary-cpu.csv --figure docs/measurements/tenant-replay-cpu.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _path  # noqa: F401

import numpy as np

from tlselect.report.tables import write_csv
from tlselect.report.tenant_plots import draw_replay
from tlselect.search import tenants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pools", required=True, help="pool table (CSV; benchmarks/tenant_curves.py)")
    parser.add_argument("--schedulers", nargs="+", default=list(tenants.SCHEDULERS), choices=tenants.SCHEDULERS)
    parser.add_argument("--strategy", default="cost_gp_ucb", choices=tenants.STRATEGIES)
    parser.add_argument("--budget", type=float, default=0.25, help="share of all pools' seconds each scheduler spends")
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--delta", type=float, default=0.1, help="GP-UCB's beta_t confidence")
    parser.add_argument("--threshold", type=float, default=0.01, help="hybrid's switch to round robin")
    parser.add_argument("--patience", type=int, default=3, help="hybrid: jobs without a gain before a tenant waits")
    parser.add_argument("--arms", default="types", choices=tenants.ARMS, help="what each tenant's GP sees")
    parser.add_argument("--processes", type=int, default=1, help="replay in this many processes")
    parser.add_argument("--out", required=True, help="the anytime table (CSV, replay.csv's columns)")
    parser.add_argument("--summary", required=True, help="per scheduler: final regret, compute to round robin's")
    parser.add_argument("--figure", required=True, help="the figure (PNG)")
    args = parser.parse_args()
    pools = tenants.read_pools(args.pools)
    shares = sorted({*np.linspace(args.budget / 40, args.budget, 40), args.budget / 4, args.budget / 2})
    curve, summary = tenants.replay_table(
        pools, args.schedulers, args.strategy, args.budget, args.seeds, shares, args.delta, args.threshold,
        args.patience, processes=args.processes, arms=args.arms,
    )  # fmt: skip
    write_csv(curve, args.out)
    write_csv(summary, args.summary)
    draw_replay(curve, summary, Path(args.figure))
    print(summary.to_string(index=False))


if __name__ == "__main__":
    main()
