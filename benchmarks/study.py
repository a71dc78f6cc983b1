#!/usr/bin/env python
"""The study-level benchmark: the whole transfer study as a plain script runs it and as the workflow does.

One run, one machine, side by side: the source pretraining and every policy, once by
``benchmarks/plain_study.py`` (per-image PIL decoding, DataLoader workers, float32, batch 128, SGD lr
0.05 with a cosine schedule) and once by the workflow (every run and the runs table; figures and
notebook are left out on both sides) with its defaults and the device's measured execution plan
(calibrated inside the timed run when the device has none). Both train on the same images (the
workflow's subset files) for the same epochs. Writes a Markdown table and the raw
numbers: end-to-end seconds and their ratio, each run's seconds and test accuracy, the plan, and
what bounds the ratio (the bare training step under the plan against the plain script's images/s).

    python benchmarks/study.py --archive ../shared/data/cifar10-jpg.tar.gz --out docs/measurements
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _path import REPO

import yaml

from tlselect.config import merged
from tlselect.core.errors import TLSelectError, cli
from tlselect.core.files import write_json, write_text

POLICIES = ("scratch", "finetune", "freeze_early", "freeze_most", "linear_probe")


def overlay(args) -> dict:
    """The workflow config of the benchmarked study (on top of config.yaml)."""
    return {
        "data": {"archive": str(Path(args.archive).resolve()), "classes": args.classes,
                 "train_per_class": args.train_per_class, "val_per_class": args.val_per_class,
                 "test_per_class": args.test_per_class},
        "pretrained": "source",
        "threads": args.cores,
        "source": {"classes": args.source_classes, "train_per_class": args.source_per_class,
                   "val_per_class": args.source_val_per_class, "train": {"epochs": args.source_epochs}},
        "train": {"epochs": args.epochs},
        "features": {"layers": []},
        "search": {"enabled": False},
        "speedups": {"enabled": False},
    }  # fmt: skip


def snakemake(workdir: Path, cores: int, *targets: str) -> float:
    """Run the workflow in ``workdir``; its wall seconds."""
    command = [
        sys.executable, "-m", "snakemake", *targets, "--snakefile", str(REPO / "Snakefile"), "--directory",
        str(workdir), "--cores", str(cores), "--configfile", str(REPO / "config.yaml"), str(workdir / "study.yaml"),
    ]  # fmt: skip
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    t0 = time.perf_counter()
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    if result.returncode:
        raise TLSelectError(f"the workflow failed in {workdir}:\n{result.stderr[-3000:]}")
    return time.perf_counter() - t0


def workflow_runs(workdir: Path) -> dict:
    """Seconds and accuracy of the source model and each policy, from the workflow's records."""
    runs = {}
    for path in [*sorted((workdir / "results/registry").glob("*.json")), *(workdir / "results/source").glob("*.json")]:
        record = json.loads(path.read_text())
        name = "source" if record["kind"] == "source" else record["name"]
        runs[name] = {
            "seconds": record["timings"]["wall_seconds"],
            "val_accuracy": record["metrics"]["val_accuracy"],
            "test_accuracy": record["metrics"]["test_accuracy"],
            "images_per_second": record["throughput_images_per_second"],
            "plan_seconds": record["timings"].get("plan_seconds", 0.0),
            "config": record["config"],
            "device": record["hardware"]["device"],
        }
    return runs


def bare_step_bound(config: dict, threads: int) -> float:
    """Images/s of the bare training step (random in-memory tensors) under the plan the workflow chose."""
    import torch

    from tlselect.training.options import TrainConfig
    from tlselect.training.speedups import bare_loop_images_per_second

    torch.set_num_threads(threads)
    known = {k: v for k, v in config.items() if k in TrainConfig.__dataclass_fields__}
    return bare_loop_images_per_second(TrainConfig(**{**known, "auto": "", "device": "cpu" if not
                                                      torch.cuda.is_available() else "cuda"}))  # fmt: skip


def table(plain: dict, flow: dict, plain_wall: float, flow_wall: float) -> str:
    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    lines = [
        "| run | plain seconds | workflow seconds | speedup | plain test acc | workflow test acc | difference |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("source", *POLICIES):
        p, w = plain.get(name), flow.get(name)
        if not (p and w):
            continue
        diff = None if p["test_accuracy"] is None else (w["test_accuracy"] - p["test_accuracy"]) * 100
        lines.append(
            f"| {name} | {p['seconds']:.1f} | {w['seconds']:.1f} | {p['seconds'] / w['seconds']:.2f}x | "
            f"{fmt(p['test_accuracy'], '.3f')} | {fmt(w['test_accuracy'], '.3f')} | {fmt(diff, '+.1f')} |"
        )
    lines.append(
        f"| **whole study, end to end** | **{plain_wall:.1f}** | **{flow_wall:.1f}** | "
        f"**{plain_wall / flow_wall:.2f}x** | | | |"
    )
    return "\n".join(lines)


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", required=True, help="image-folder archive (e.g. the offline CIFAR-10 copy)")
    parser.add_argument("--out", required=True, help="folder for study-benchmark-<device>.md and .json")
    parser.add_argument("--device-label", default="", help="name in the output files (default: cpu or cuda)")
    parser.add_argument("--workdir", default="", help="where both studies run (default: a temporary folder)")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="cores of the workflow and threads")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the plain script")
    parser.add_argument("--source-classes", nargs="+", default=["airplane", "automobile", "bird", "cat", "deer"])
    parser.add_argument("--classes", nargs="+", default=["dog", "frog", "horse", "ship", "truck"])
    parser.add_argument("--source-per-class", type=int, default=5000, help="source training images per class")
    parser.add_argument("--source-val-per-class", type=int, default=100)
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--source-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--plain-batch-size", type=int, default=128, help="the plain script's batch size")
    parser.add_argument("--overlay", default="", help="YAML merged over the benchmark's workflow config")
    args = parser.parse_args(argv)
    if not Path(args.archive).is_file():
        raise TLSelectError(f"--archive {args.archive} does not exist; give an image-folder archive")
    with tempfile.TemporaryDirectory(prefix="study-benchmark-") as tmp:
        workdir = Path(args.workdir or tmp).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        extra = yaml.safe_load(Path(args.overlay).read_text()) if args.overlay else {}
        config = merged(overlay(args), extra or {})
        write_text(workdir / "study.yaml", yaml.safe_dump(config))
        print("preparing: extracting the archive (not timed) ...", flush=True)
        snakemake(workdir, 1, f"resources/{config['data'].get('name', 'cifar10')}")
        print("the workflow: the whole study with its defaults and the measured plan ...", flush=True)
        flow_wall = snakemake(workdir, args.cores, "results/tables/runs.csv")
        flow = workflow_runs(workdir)
        print(f"  {flow_wall:.1f}s", flush=True)
        print("the plain script: the same study, the same images and epochs ...", flush=True)
        plain_out = workdir / "plain.json"
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, str(REPO / "benchmarks/plain_study.py"),
             "--source-subset", "results/source/data/subset.json", "--subset", "results/data/subset.json",
             "--out", str(plain_out), "--source-epochs", str(args.source_epochs), "--epochs", str(args.epochs),
             "--workers", str(args.workers), "--batch-size", str(args.plain_batch_size),
             "--threads", str(args.cores)],
            cwd=workdir, check=True,
        )  # fmt: skip
        plain_wall = time.perf_counter() - t0
        plain = json.loads(plain_out.read_text())
        plans = (workdir / "results/tables/plans.csv").read_text()
    source_images = (args.source_per_class - args.source_val_per_class) * len(args.source_classes)
    plain_ips = source_images * args.source_epochs / plain["source"]["seconds"]
    bare = bare_step_bound(flow["source"]["config"], args.cores)
    label = args.device_label or flow["source"]["device"].split(":")[0]
    plan = {k: flow["source"]["config"][k] for k in ("precision", "channels_last", "threads", "eval_batch_size")}
    report = [
        f"# Study-level benchmark ({label})",
        "",
        f"Source: {source_images} images x {args.source_epochs} epochs; target: {args.train_per_class} per class "
        f"({args.val_per_class} for validation), {args.test_per_class} test per class, {args.epochs} epochs; "
        f"{args.cores} cores. Workflow plan: {plan}; calibration took "
        f"{max(r['plan_seconds'] for r in flow.values()):.1f}s of the workflow's time.",
        "",
        table(plain, flow, plain_wall, flow_wall),
        "",
        f"Bound: the bare training step under the chosen plan runs {bare:.0f} images/s, the plain script's "
        f"source pretraining {plain_ips:.0f} images/s: {bare / plain_ips:.2f}x is the most the training steps "
        "alone can gain on this machine.",
        "",
        "Measured plan (results/tables/plans.csv):",
        "",
        "```",
        plans.strip(),
        "```",
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / f"study-benchmark-{label}.md", "\n".join(report) + "\n")
    write_json(
        out / f"study-benchmark-{label}.json",
        {"plain": plain, "workflow": flow, "plain_wall_seconds": plain_wall, "workflow_wall_seconds": flow_wall,
         "speedup": plain_wall / flow_wall, "bare_step_images_per_second": bare,
         "plain_images_per_second": plain_ips, "settings": vars(args)},
    )  # fmt: skip
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
