#!/usr/bin/env python
"""Measure the speedups of the optimizations in one run (ratios, so machine noise mostly cancels).

Suites: ``training`` (trainer vs bare loop; in-memory tensors, mixed precision, channels_last and the
device's chosen plan vs the naive ImageFolder + PIL + DataLoader fp32 path; fast vs naive accuracy)
and ``features`` (staged per-layer cache vs recomputing from pixels). Prints a table and writes it as JSON.
"""

import argparse
import sys

from _cli import cli

import torch

from tlselect.core.files import write_json
from tlselect.training import speedups
from tlselect.training.gpus import assign
from tlselect.training.options import TrainConfig


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
    result = speedups.measure(base, args.suites, args.accuracy_epochs, args.layers, args.epochs)
    print(speedups.summary(result))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
