#!/usr/bin/env python
"""Aggregate registry records into results/tables/{runs.csv, curves.csv, summary.md}, and/or the
optimizations benchmark's JSON into results/tables/optimizations.csv."""

import argparse
import json
import sys
from pathlib import Path

import _cli  # noqa: F401  (makes the tlselect package importable)

from tlselect import report
from tlselect.atomic import atomic_path
from tlselect.registry import RegistryError, read_record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("records", nargs="*", help="registry records (JSON)")
    parser.add_argument("--out-dir", default="results/tables", help="folder for the tables")
    parser.add_argument("--source-record", default="", help="record of the source pretraining, if any")
    parser.add_argument("--optimizations", default="", help="output of scripts/benchmark.py")
    args = parser.parse_args(argv)
    if not args.records and not args.optimizations:
        parser.error("give registry records, --optimizations, or both")
    if args.optimizations:
        table = report.optimizations_table(json.loads(Path(args.optimizations).read_text()))
        with atomic_path(Path(args.out_dir) / "optimizations.csv") as tmp:
            table.to_csv(tmp, index=False)
        print(table.to_string(index=False))
    if not args.records:
        return 0
    try:
        records = report.load_records(args.records)
        source = read_record(args.source_record) if args.source_record else None
    except RegistryError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    table = report.runs_table(records)
    with atomic_path(out / "runs.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(out / "curves.csv") as tmp:
        report.curves_table(records).to_csv(tmp, index=False)
    source_seconds = source["timings"]["wall_seconds"] if source else None
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(report.summary_markdown(table, source_seconds))
    print(report.summary_markdown(table, source_seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
