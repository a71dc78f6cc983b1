#!/usr/bin/env python
"""Many-users steps (tlselect.search.tenant_jobs), one subcommand per rule of rules/tenants.smk.

schedule  a scheduling round: which tenant's candidate each of its jobs trains
job       train an assigned job on its tenant's data (other flags go to scripts/train.py's)
tables    each tenant's runs.csv, summary.md and registry/, and the global table
figure    the global figure: every tenant's best accuracy against the compute spent on all
"""

import argparse
import json
import sys
from pathlib import Path

from _cli import cli

from tlselect.search import tenant_jobs, tenants


def schedule(args) -> int:
    trials = tenant_jobs.schedule_round(
        args.scheduler, args.round, args.slots, json.loads(args.contexts), args.assigned,
        args.records, args.out, args.seed, args.delta, args.threshold, args.patience,
    )  # fmt: skip
    print("\n".join(f"slot {t['slot']}: {t['tenant']} {t['candidate']}" for t in trials))
    return 0


def job(args, rest: list[str]) -> int:
    tenant_jobs.job(args.assigned, args.slot, args.tenant_data, args.init_weights, (args.out, args.record, args.run_id),
                    rest)  # fmt: skip
    return 0


def pairs(values: list[str]) -> list[tuple[str, str]]:
    """``name=value`` arguments as pairs."""
    return [tuple(v.split("=", 1)) for v in values]


def tables(args) -> int:
    assigned, records = {s: [] for s in args.schedulers}, {s: [] for s in args.schedulers}
    for scheduler, path in pairs(args.assigned):
        assigned[scheduler].append(path)
    for scheduler, path in pairs(args.records):
        records[scheduler].append(path)
    frame = tenant_jobs.write_tables(
        json.loads(args.contexts), assigned, records, dict(pairs(args.tenant_dirs)), args.out
    )
    last = frame[frame["job"] == frame.groupby("scheduler")["job"].transform("max")]
    print(last.to_string(index=False))
    return 0


def figure(args) -> int:
    import pandas as pd

    from tlselect.report.tenant_plots import draw_tenants

    draw_tenants(pd.read_csv(args.table), Path(args.out))
    return 0


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("schedule", help="a scheduling round's assignment file (JSON)")
    p.add_argument("--scheduler", required=True, choices=tenants.SCHEDULERS)
    p.add_argument("--round", type=int, required=True)
    p.add_argument("--slots", type=int, required=True, help="jobs of this round")
    p.add_argument("--contexts", required=True, help="JSON of tlselect.search.tenancy.contexts")
    p.add_argument("--assigned", nargs="*", default=[], help="the earlier rounds' assignment files, in order")
    p.add_argument("--records", nargs="*", default=[], help="their jobs' records, in round and slot order")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--delta", type=float, default=0.1, help="GP-UCB's beta_t confidence")
    p.add_argument("--threshold", type=float, default=0.01, help="hybrid's switch to round robin")
    p.add_argument("--patience", type=int, default=3, help="hybrid: jobs without a gain before a tenant waits")
    p.add_argument("--out", required=True)
    p.set_defaults(run=schedule)

    p = commands.add_parser("job", help="train an assigned job; other flags are scripts/train.py's", allow_abbrev=False)
    p.add_argument("--assigned", required=True)
    p.add_argument("--slot", type=int, required=True)
    p.add_argument("--tenant-data", nargs="+", type=lambda v: tuple(v.split("=", 1)), required=True,
                   metavar="TENANT=FOLDER", help="every tenant's decoded subset folder")  # fmt: skip
    p.add_argument("--init-weights", nargs=3, action="append", default=[], metavar=("INIT", "BACKBONE", "FILE"))
    p.add_argument("--out", required=True, help="the job's checkpoint")
    p.add_argument("--record", required=True, help="the job's record")
    p.add_argument("--run-id", required=True)
    p.set_defaults(run=job)

    p = commands.add_parser("tables", help="the tenants' tables and the global table")
    p.add_argument("--contexts", required=True)
    p.add_argument("--schedulers", nargs="+", required=True, choices=tenants.SCHEDULERS)
    p.add_argument("--assigned", nargs="+", action="extend", required=True, metavar="SCHEDULER=FILE",
                   help="every scheduler's assignment files, in round order")  # fmt: skip
    p.add_argument("--records", nargs="+", action="extend", required=True, metavar="SCHEDULER=FILE",
                   help="their jobs' records, in round and slot order")  # fmt: skip
    p.add_argument("--tenant-dirs", nargs="+", required=True, metavar="TENANT=FOLDER")
    p.add_argument("--out", required=True, help="the global table (CSV)")
    p.set_defaults(run=tables)

    p = commands.add_parser("figure", help="the global figure (PNG)")
    p.add_argument("--table", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(run=figure)

    args, rest = parser.parse_known_args(argv)
    if args.run is job:
        return job(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
