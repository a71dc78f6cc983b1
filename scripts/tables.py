#!/usr/bin/env python
"""Aggregate registry records into the runs table, the per-epoch curves and a Markdown summary,
and/or the optimizations benchmark's JSON into its table."""

import argparse
import json
import sys
from pathlib import Path

from _cli import cli

from tlselect.core.files import atomic_path
from tlselect.core.registry import read_record
from tlselect.report import tables


def write_csv(frame, path: str) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("records", nargs="*", help="registry records (JSON)")
    parser.add_argument("--runs", default="", help="runs table to write (CSV), with the records")
    parser.add_argument("--curves", default="", help="per-epoch curves to write (CSV), with the records")
    parser.add_argument("--summary", default="", help="Markdown summary to write, with the records")
    parser.add_argument("--plans", default="", help="table of the runs' measured execution plans (CSV)")
    parser.add_argument("--source-record", default="", help="record of the source pretraining, if any")
    parser.add_argument("--optimizations", default="", help="output of scripts/speedups.py")
    parser.add_argument("--optimizations-table", default="", help="its table to write (CSV)")
    args = parser.parse_args(argv)
    if not args.records and not args.optimizations:
        parser.error("give registry records, --optimizations, or both")
    if args.records and not (args.runs and args.curves and args.summary and args.plans):
        parser.error("records need --runs, --curves, --summary and --plans")
    if args.optimizations:
        if not args.optimizations_table:
            parser.error("--optimizations needs --optimizations-table")
        table = tables.optimizations_table(json.loads(Path(args.optimizations).read_text()))
        write_csv(table, args.optimizations_table)
        print(table.to_string(index=False))
    if not args.records:
        return 0
    records = tables.load_records(args.records)
    source = read_record(args.source_record) if args.source_record else None
    table = tables.runs_table(records)
    write_csv(table, args.runs)
    write_csv(tables.curves_table(records), args.curves)
    plans = tables.plan_table([*records, *([source] if source else [])])
    write_csv(plans, args.plans)
    source_seconds = source["timings"]["wall_seconds"] if source else None
    summary = tables.summary_markdown(table, source_seconds, tables.plan_summary(plans))
    with atomic_path(args.summary) as tmp:
        tmp.write_text(summary)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
