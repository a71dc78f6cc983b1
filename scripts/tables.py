#!/usr/bin/env python
"""Aggregate registry records into the runs table, the per-epoch curves and a Markdown summary,
and/or the optimizations benchmark's JSON into its table."""

import argparse
import sys

from _cli import cli

from tlselect.report import tables


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("records", nargs="*", help="registry records (JSON)")
    parser.add_argument("--runs", default="", help="runs table to write (CSV), with the records")
    parser.add_argument("--curves", default="", help="per-epoch curves to write (CSV), with the records")
    parser.add_argument("--summary", default="", help="Markdown summary to write, with the records")
    parser.add_argument("--plans", default="", help="table of the runs' measured execution plans (CSV)")
    parser.add_argument("--source-record", default="", help="record of the source pretraining, if any")
    parser.add_argument("--refits", nargs="*", default=[], help="records of the selected run retrained on all folds")
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
        table = tables.write_optimizations_table(args.optimizations, args.optimizations_table)
        print(table.to_string(index=False))
    if args.records:
        summary = tables.write_study_tables(
            args.records, args.runs, args.curves, args.summary, args.plans, args.source_record or None, args.refits
        )
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
