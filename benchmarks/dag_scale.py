#!/usr/bin/env python
"""How `snakemake -n` grows with the model search's pool: wall time, peak memory and jobs per pool size.

For each size (default 100, 1,000 and 10,000 candidates) it writes a study overlay with the search
on and a pool of that size (2 backbones x 5 (init, freeze) pairs x that many learning rates / 10)
into a temporary folder, runs ``snakemake -n`` there on this workflow (no data and no archive are
needed for a dry run) and prints one row per size as a Markdown table. The first row is Snakemake's
own start (``snakemake -n`` of a one-rule workflow: imports and executor plugins) for comparison.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _path  # noqa: F401 (the package, importable)

import yaml

from tlselect.core.errors import cli
from tlselect.core.files import write_text

REPO = Path(__file__).resolve().parent.parent


def overlay(candidates: int, group_size: int = 1) -> dict:
    """A search pool of exactly ``candidates`` (a multiple of 10): 10 (backbone, init, freeze) per learning
    rate; the grid's candidates of one shape train ``group_size`` to a job (``run_groups.size``)."""
    if candidates % 10:
        raise SystemExit(f"pool sizes must be multiples of 10, not {candidates}")
    lrs = [round(0.0001 * (i + 1), 6) for i in range(candidates // 10)]
    return {
        "run_groups": {"size": group_size, "fuse": False},
        "search": {
            "enabled": True,
            "backbones": ["resnet18", "mobilenet_v3_small"],
            "inits": ["imagenet", "source", "scratch"],  # scratch is never frozen: 2 + 2 + 1 per backbone
            "freezes": ["none", "early"],
            "lrs": lrs,
            "resolutions": [32],
        },
    }


def dry_run(workdir: Path, candidates: int, repo: Path = REPO, group_size: int = 1) -> dict:
    """Wall and CPU seconds, peak RSS (MB), jobs of ``snakemake -n`` for ``candidates`` (0: a one-rule workflow)."""
    command = [sys.executable, "-m", "snakemake", "-n", "--directory", str(workdir)]
    if candidates:
        write_text(workdir / "scale.yaml", yaml.safe_dump(overlay(candidates, group_size)))
        command += ["--snakefile", str(repo / "Snakefile"), "--configfile", str(repo / "config.yaml")]
        command += [str(workdir / "scale.yaml")]
    else:
        write_text(workdir / "Snakefile", 'rule all:\n    shell: "true"\n')
        command += ["--snakefile", str(workdir / "Snakefile"), "--forceall"]
    with open(workdir / "dry-run.log", "w") as log:
        start = time.monotonic()
        process = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own peak memory
        wall = time.monotonic() - start
    text = (workdir / "dry-run.log").read_text()
    if status:
        raise SystemExit(f"snakemake -n failed for {candidates} candidates:\n{text[-3000:]}")
    jobs = re.search(r"^total\s+(\d+)", text, flags=re.M)
    cpu = usage.ru_utime + usage.ru_stime  # on a shared machine less noisy than the wall time
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "jobs": int(jobs.group(1)) if jobs else None,
    }


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000], help="candidates per pool")
    parser.add_argument("--repo", type=Path, default=REPO, help="the workflow to measure (another checkout of it)")
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[1], help="run_groups.size values to plan with")
    args = parser.parse_args(argv)
    print("| candidates | run_groups.size | jobs | `snakemake -n` wall s | CPU s | peak RSS MB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for size, group_size in [(0, 1), *((s, g) for s in args.sizes for g in args.group_sizes)]:
        with tempfile.TemporaryDirectory(prefix=f"dag-scale-{size}-") as folder:
            row = dry_run(Path(folder), size, args.repo.resolve(), group_size)
        name = f"{size:,}" if size else "Snakemake's start (one-rule workflow)"
        print(
            f"| {name} | {group_size} | {row['jobs']:,} | {row['wall_s']:.1f} | {row['cpu_s']:.1f} | "
            f"{row['peak_rss_mb']:.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
