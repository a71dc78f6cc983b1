#!/usr/bin/env python
"""When model hopper parallelism pays: simulated makespan and bytes moved, MOP against task parallelism.

Writes a markdown table and the same rows as CSV (tlselect.search.mop.compare), one row per data set size.
Defaults: 16 configurations (4 batch sizes, whose epochs cost 1, 1.25, 1.5 and 2 times the base
epoch, x 4 learning rates), 8 workers, 10 epochs, ResNet18 checkpoints of 45 MB, a base epoch of
10 s per GB of data on one worker, 10 Gbit/s (1.25 GB/s) links.
"""

import argparse
import csv
import sys
from pathlib import Path

import _path  # noqa: F401 (the package, importable)

from tlselect.core.errors import cli
from tlselect.core.files import write_text
from tlselect.search.mop import compare

HEADER = (
    "| data | stored per worker: task / MOP | makespan h: task / MOP randomized / MOP Latin square "
    "| GB moved: task copies / task remote reads / MOP hops | MOP hops / task copies |\n|---|---|---|---|---|\n"
)


def markdown_row(r: dict) -> str:
    size = f"{r['data_gb']:g} GB" if r["data_gb"] < 1000 else f"{r['data_gb'] / 1000:g} TB"
    return (
        f"| {size} | {r['task_stored_gb_per_worker']:g} / {r['mop_stored_gb_per_worker']:g} GB "
        f"| {r['task_hours']:.2f} / {r['mop_randomized_hours']:.2f} / {r['mop_latin_square_hours']:.2f} "
        f"| {r['task_copies_gb']:,.0f} / {r['task_remote_reads_gb']:,.0f} / {r['mop_hops_gb']:,.1f} "
        f"| {r['mop_hops_gb'] / r['task_copies_gb']:.3g} |\n"
    )


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-gb", type=float, nargs="+", default=[1, 10, 100, 1000], help="data set sizes")
    parser.add_argument("--cost-factors", type=float, nargs="+", default=[1, 1.25, 1.5, 2] * 4, help="per model")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--model-mb", type=float, default=45.0, help="checkpoint size (ResNet18: 45 MB)")
    parser.add_argument("--seconds-per-gb", type=float, default=10.0, help="base epoch time per GB, one worker")
    parser.add_argument("--gbit-s", type=float, default=10.0, help="network bandwidth per worker, Gbit/s")
    parser.add_argument("--seed", type=int, default=0, help="seed of the randomized MOP scheduler")
    parser.add_argument("--out", default="docs/measurements/mop-when-it-pays.md", help="markdown; CSV beside it")
    args = parser.parse_args(argv)
    rows = [
        compare(
            args.cost_factors,
            args.workers,
            args.epochs,
            gb,
            args.model_mb / 1000,
            args.seconds_per_gb,
            args.gbit_s / 8,
            args.seed,
        )
        for gb in args.data_gb
    ]
    out = Path(args.out)
    setting = (
        f"{len(args.cost_factors)} models (epoch cost factors {', '.join(f'{f:g}' for f in args.cost_factors)}), "
        f"{args.workers} workers, {args.epochs} epochs, {args.model_mb:g} MB checkpoints, "
        f"{args.seconds_per_gb:g} s per GB for a base epoch on one worker, {args.gbit_s:g} Gbit/s per worker, "
        f"randomized scheduler seed {args.seed}"
    )
    text = f"# When model hopper parallelism pays (simulated)\n\n`python benchmarks/mop_table.py`: {setting}.\n\n"
    write_text(out, text + HEADER + "".join(markdown_row(r) for r in rows))
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
