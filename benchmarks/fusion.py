#!/usr/bin/env python
"""Training images per second of B runs fused into one network, of the same B runs one after another
in one process, and of one run alone, for B in 1, 2, 4 and 8, on one device.

The runs are the execution plan's own timing set-ups (``tlselect.training.plan.Trial``: B models
of the backbone, each with its own init, batch of random images and learning rate; one optimizer
step each in turn, or one fused step, ``plan.fused_training_step``, as the run groups take it),
so this table is what the plan's calibration of ``group_size`` and ``fuse`` measures, at more
sizes and without its margins. Each timing is ``--steps`` steps after the set-up's warm-up steps;
in turn and fused alternate, and a cell is the median of ``--repeats``. Each cell is images of
all the B runs per wall second, and in brackets per second of the process's CPU time (on a CPU
shared with other work the steadier figure; on a GPU meaningless). Example:
``python benchmarks/fusion.py --device cpu --threads 2``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import _path  # noqa: F401 (the package, importable)

import torch

from tlselect.training.plan import ExecutionPlan, Trial, Workload


def cpu_model() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{names[0]}, {len(names)} CPUs" if names else platform.processor() or platform.machine()


def timed(trial: Trial, steps: int) -> tuple[float, float]:
    """Wall and CPU seconds per image of ``steps`` steps of ``trial`` (all its runs' images)."""
    cpu = time.process_time()
    wall = trial.run(steps)
    images = steps * trial.work.batch_size * trial.size
    return wall / images, (time.process_time() - cpu) / images


def rates(timings: list[tuple[float, float]]) -> tuple[float, float]:
    """Images per wall second and per CPU second, from the median timing of each."""
    return 1 / statistics.median(w for w, _ in timings), 1 / statistics.median(c for _, c in timings)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "mobilenet_v3_small"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8], help="group sizes B")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps a timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings of each (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False)
    args = parser.parse_args(argv)
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else cpu_model()
    plan = ExecutionPlan(channels_last=args.channels_last, threads=args.threads, cudnn_benchmark=args.device == "cuda")
    print(f"device: {args.device} ({device}), torch {torch.__version__}, threads {args.threads or 'default'}, "
          f"batch {args.batch_size}, {args.resolution}x{args.resolution}, {args.steps} steps a timing, "
          f"median of {args.repeats}, channels-last {args.channels_last}\n")  # fmt: skip
    for backbone in args.backbones:
        work = Workload(backbone, args.resolution, args.batch_size, torch.device(args.device))
        alone = Trial(plan, work, 0.0)
        one = rates([timed(alone, args.steps) for _ in range(args.repeats)])
        print(f"### {backbone}\n")
        print("| B | one run | B runs in turn | B runs fused | fused / in turn |")
        print("|---:|---:|---:|---:|---:|")
        for size in args.sizes:
            trials = (Trial(plan, work, 0.0, size=size), Trial(plan, work, 0.0, size=size, fused=size > 1))
            timings = ([], [])
            for repeat in range(args.repeats):  # in turn and fused alternate, so that drift hits both
                for i in (0, 1) if repeat % 2 == 0 else (1, 0):
                    timings[i].append(timed(trials[i], args.steps))
            in_turn, fused = rates(timings[0]), rates(timings[1])
            cells = [f"{wall:.1f} ({cpu:.1f})" for wall, cpu in (one, in_turn, fused)]
            gain = f"{fused[0] / in_turn[0]:.2f}x ({fused[1] / in_turn[1]:.2f}x)"
            print(f"| {size} | {' | '.join(cells)} | {gain} |", flush=True)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
