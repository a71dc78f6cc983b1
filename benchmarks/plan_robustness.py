#!/usr/bin/env python
"""The execution plan a study's first training job chooses, in fresh folders, quiet or beside load.

Each folder gets the same decoded data (random images, 10 classes) and runs one training job of
one epoch the way the workflow runs its first: ``scripts/train.py`` of ``--repo`` (this checkout,
or an older one in a git worktree) with the study's plan flags and a plans folder of its own, so
it calibrates. With ``--load N``, N ``yes > /dev/null`` processes run beside the job. Each folder
gets a per-user plan cache of its own (``$TLSELECT_PLAN_CACHE``), so every folder measures, unless
``--shared-cache``, where the folders share one as the studies of one user on one machine do.

With ``--wait-quiet S``, each folder first waits (up to S seconds) until the rest of the machine
keeps fewer than ``--quiet-below`` cores busy, so that the load is the one asked for. Prints a
Markdown table (folder, load, background load, the plan chosen, refused or not, plan seconds) and
writes the rows as JSON with ``--out``. Example, from the repository root::

    python benchmarks/plan_robustness.py --folders 5 --load 2 \\
        --flags "--no-compile --auto precision,channels_last,threads,eval_batch_size"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FLAGS = "--precision float32 --no-channels-last --no-compile --auto eval_batch_size"


def write_data(folder: Path, train: int = 256, classes: int = 10) -> Path:
    generator = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("val", 64), ("test", 64)):
        labels = torch.arange(n) % classes
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
        torch.save({"images": images, "labels": labels}, folder / f"{split}.pt")
    return folder


def busy_seconds() -> float:
    """Busy CPU seconds of every CPU (user, nice, system, irq, softirq, steal) from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:9]
    ticks = [int(v) for v in fields]
    return (ticks[0] + ticks[1] + ticks[2] + sum(ticks[5:8])) / os.sysconf("SC_CLK_TCK")


def background_cores(seconds: float = 2.0) -> float:
    """Cores kept busy by everything else on the machine, sampled over ``seconds`` before a job."""
    start = busy_seconds()
    time.sleep(seconds)
    return round((busy_seconds() - start) / seconds, 2)


def run_folder(args, index: int, root: Path, data: Path, cache: Path) -> dict:
    folder = root / f"folder{index}"
    folder.mkdir()
    background, waited = background_cores(), 0.0
    while background > args.quiet_below and waited < args.wait_quiet:  # other work on the machine: wait it out
        time.sleep(8.0)
        waited += 10.0
        background = background_cores()
    loaders = [subprocess.Popen("yes > /dev/null", shell=True, start_new_session=True) for _ in range(args.load)]
    command = [sys.executable, str(Path(args.repo) / "scripts/train.py"), "--data", str(data), "--out", "m.pt",
               "--record", "r.json", "--run-id", f"folder{index}", "--epochs", "1", "--batch-size",
               str(args.batch_size), "--device", "cpu", "--threads", str(args.threads), "--plans", "results/plans",
               *shlex.split(args.flags)]  # fmt: skip
    env = dict(os.environ, TLSELECT_PLAN_CACHE=str(cache), TLSELECT_FORK_SERVER="0")
    t0 = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=args.timeout)
        returncode, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as expired:
        returncode, output = "timeout", str(expired.stdout or "")
    finally:
        for loader in loaders:
            os.killpg(loader.pid, signal.SIGKILL)
            loader.wait()
    wall = time.perf_counter() - t0
    (folder / "train.log").write_text(output)
    if args.logs:
        keep = Path(args.logs) / f"{re.sub(r'[^A-Za-z0-9]+', '-', args.label).strip('-')}-folder{index}"
        keep.mkdir(parents=True, exist_ok=True)
        (keep / "train.log").write_text(output)
        for plan_file in (folder / "results/plans").glob("*.json"):
            shutil.copy(plan_file, keep / plan_file.name)
    row = {"folder": index, "load": args.load, "background_cores": background, "returncode": returncode,
           "wall_seconds": round(wall, 1)}  # fmt: skip
    if returncode == 0:
        record = json.loads((folder / "r.json").read_text())
        row |= {k: record["config"][k] for k in ("precision", "channels_last", "threads", "eval_batch_size")}
        row["plan_seconds"] = round(record["timings"]["plan_seconds"], 1)
        plan = record.get("plan") or {}
        row |= {"source": plan.get("source", "calibrated"), "refused": plan.get("refused"),
                "fallback": sorted(plan.get("fallback") or {})}  # fmt: skip
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=str(REPO), help="the checkout whose scripts/train.py runs")
    parser.add_argument("--folders", type=int, default=5)
    parser.add_argument("--load", type=int, default=0, help="`yes > /dev/null` processes beside each job")
    parser.add_argument("--flags", default=DEFAULT_FLAGS, help="the study's plan flags (tlselect.config.plan_flags)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shared-cache", action="store_true", help="one plan cache for every folder")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to this long for a quiet machine")
    parser.add_argument("--quiet-below", type=float, default=0.2, help="background cores that count as quiet")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", default="", help="append the rows to this JSON file")
    parser.add_argument("--logs", default="", help="keep each folder's job log and plan file under this folder")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="plan-robustness-") as tmp:
        root = Path(tmp)
        data = write_data(root / "data")
        for index in range(1, args.folders + 1):
            cache = root / "cache" if args.shared_cache else root / f"cache{index}"
            row = {"label": args.label} | run_folder(args, index, root, data, cache)
            rows.append(row)
            print(json.dumps(row), flush=True)
    columns = ["label", "folder", "load", "background_cores", "precision", "channels_last", "threads",
               "eval_batch_size", "refused", "plan_seconds", "wall_seconds"]  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) if c != "refused" else ("yes" if row.get(c) else "no")
                                for c in columns) + " |")  # fmt: skip
    if args.out:
        out = Path(args.out)
        previous = json.loads(out.read_text()) if out.is_file() else []
        out.write_text(json.dumps(previous + rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
