#!/usr/bin/env python
"""Measure the speedups of the optimizations in one run (ratios, so machine noise mostly cancels).

Suites: ``training`` (trainer vs bare loop; in-memory tensors, mixed precision, channels_last and the
device's chosen plan vs the naive ImageFolder + PIL + DataLoader fp32 path; fast vs naive accuracy)
and ``features`` (staged per-layer cache vs recomputing from pixels). Prints a table and writes it as JSON.
"""

import argparse
import sys
import time

from _cli import cli

import torch

from tlselect.core.files import write_json
from tlselect.training.gpus import assign
from tlselect.training.loop import resolve_device
from tlselect.training.options import TrainConfig
from tlselect.training.speedups import features_suite, jobs_suite, training_suite
from tlselect.training.trainer import hardware, versions


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="decoded subset folder (with subset.json)")
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument(
        "--suites", nargs="+", choices=["training", "features", "jobs"], default=["training", "features"]
    )
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the feature-suite plans")
    parser.add_argument("--accuracy-epochs", type=int, default=8, help="epochs of the fast-vs-naive check (0: skip)")
    parser.add_argument("--layers", nargs="+", default=["layer1", "layer2", "layer3", "layer4"])
    parser.add_argument("--init", default="scratch", help="init of the measured runs (see train.py --init)")
    parser.add_argument("--weights", default="", help="the init's weights file (source model, ImageNet weights)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--gpus", type=int, default=None, help="GPUs given to this job, claimed before CUDA starts (0: hide all)"
    )
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the naive path")
    parser.add_argument("--plans", default="", help="folder of measured execution plans (tlselect.training.plan)")
    parser.add_argument("--auto", default="", help="plan knobs the device's plan sets (see train.py --auto)")
    args = parser.parse_args(argv)
    assign(args.gpus, args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = TrainConfig(
        data=args.data,
        init=args.init,
        weights=args.weights,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_epochs=1,
        device=args.device,
        threads=args.threads,
        workers=args.workers,
        compile=args.compile,
        plans=args.plans,
        auto=args.auto,
    )
    start = time.perf_counter()
    rows = []
    if "training" in args.suites:
        rows += training_suite(base, args.accuracy_epochs)
    if "features" in args.suites:
        rows += features_suite(base, args.layers, args.epochs)
    if "jobs" in args.suites:
        rows += jobs_suite(base)
    device = resolve_device(args.device)
    print(f"\nOptimizations on {hardware().get('cuda_device', hardware()['processor'] or 'CPU')} ({device}):")
    for r in rows:
        goal = "" if r["goal"] is None else f"  goal >= {r['goal']} {'met' if r['meets_goal'] else 'NOT met'}"
        print(f"  {r['speedup']:6.2f}x  {r['optimization']}  (vs {r['baseline']}){goal}")
        if r["note"]:
            print(f"           {r['note']}")
    write_json(
        args.out,
        {"rows": rows, "device": str(device), "hardware": hardware(), "versions": versions(),
         "seconds": time.perf_counter() - start},
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
