#!/usr/bin/env python
"""Aggregate registry records into the runs table, the per-epoch curves and a Markdown summary,
and/or the optimizations benchmark's JSON into its table."""

import argparse
import json
import sys
from pathlib import Path

from _cli import cli

from tlselect import report
from tlselect.atomic import atomic_path
from tlselect.registry import read_record


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
    parser.add_argument("--optimizations", default="", help="output of scripts/benchmark.py")
    parser.add_argument("--optimizations-table", default="", help="its table to write (CSV)")
    args = parser.parse_args(argv)
    if not args.records and not args.optimizations:
        parser.error("give registry records, --optimizations, or both")
    if args.records and not (args.runs and args.curves and args.summary and args.plans):
        parser.error("records need --runs, --curves, --summary and --plans")
    if args.optimizations:
        if not args.optimizations_table:
            parser.error("--optimizations needs --optimizations-table")
        table = report.optimizations_table(json.loads(Path(args.optimizations).read_text()))
        write_csv(table, args.optimizations_table)
        print(table.to_string(index=False))
    if not args.records:
        return 0
    records = report.load_records(args.records)
    source = read_record(args.source_record) if args.source_record else None
    table = report.runs_table(records)
    write_csv(table, args.runs)
    write_csv(report.curves_table(records), args.curves)
    plans = report.plan_table([*records, *([source] if source else [])])
    write_csv(plans, args.plans)
    source_seconds = source["timings"]["wall_seconds"] if source else None
    summary = report.summary_markdown(table, source_seconds, report.plan_summary(plans))
    with atomic_path(args.summary) as tmp:
        tmp.write_text(summary)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
