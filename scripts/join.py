#!/usr/bin/env python
"""The table beside the images and the downstream models on its join with cached features.

example  write the example table for an image folder (--root) to --out
table    align --table with the subset (--subset, its subset.json), encode its columns (fitted on
         the training split) into --columns and write --report; every refused problem is an error
fit      one run (--settings: its spec's settings as JSON) on --columns and, unless it is
         columns-only, the cached layer in --features; writes its registry record (--record)
"""

import argparse
import json
import sys

from _cli import cli


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True)
    example = steps.add_parser("example", help="write the example table of an image folder")
    example.add_argument("--root", required=True, help="the image folder (train/<class>/*, test/<class>/*)")
    example.add_argument("--out", required=True, help="the CSV file to write")
    example.add_argument("--seed", type=int, default=0)
    table = steps.add_parser("table", help="align and encode the table for the subset")
    table.add_argument("--table", required=True, help="the CSV file")
    table.add_argument("--subset", required=True, help="the subset's subset.json")
    table.add_argument("--settings", required=True, help="data.table as JSON")
    table.add_argument("--columns", required=True, help="the encoded columns to write (.npz)")
    table.add_argument("--report", required=True, help="the report to write (.json)")
    fit = steps.add_parser("fit", help="fit one run on the join")
    fit.add_argument("--settings", required=True, help="the run's settings as JSON (tlselect.runs.join_runs)")
    fit.add_argument("--columns", required=True, help="the table job's encoded columns (.npz)")
    fit.add_argument("--features", default="", help="the cached layer's folder of {split}.npy (not for columns-only)")
    fit.add_argument("--record", required=True, help="the registry record to write")
    fit.add_argument("--run-id", required=True)
    fit.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.step == "example":
        from tlselect.data.table import write_example_table

        write_example_table(args.root, args.out, args.seed)
    elif args.step == "table":
        from tlselect.data.table import prepare

        prepare(json.loads(args.settings), args.table, args.subset, args.columns, args.report)
    else:
        from tlselect.training.join import fit_run

        fit_run(json.loads(args.settings), args.columns, args.features or None, args.record, args.run_id, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
