#!/usr/bin/env python
"""Training images per second of B runs fused into one network, of the same B runs one after another
in one process, and of one run alone, for B in 1, 2, 4 and 8, on one device.

The runs go through the trainer's own set-up (``tlselect.training.trainer.prepare``: data in memory,
model, optimizer, plan knobs as given) and its epochs: ``fit_epoch`` for a run alone or in turn,
``tlselect.training.groups.fused_epoch`` for the fused runs, each run with its own seed (init, data
order, augmentation) and learning rate. The data is random images of 10 classes, ``--steps`` batches
an epoch; each timing is one epoch after a warm-up epoch, the median of ``--repeats``. What it
prints, a Markdown table per backbone, is what the execution plan needs to choose a group size and
whether to fuse on a device. Each cell is images per wall second, and in brackets images per
second of the process's CPU time (on a CPU shared with other work the steadier figure; on a GPU
meaningless). Example: ``python benchmarks/fusion.py --device cpu --threads 2``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import _path  # noqa: F401 (the package, importable)

import torch

from tlselect.training.fusion import FusedStagedNet
from tlselect.training.groups import fused_epoch
from tlselect.training.options import TrainConfig
from tlselect.training.trainer import fit_epoch, prepare


def write_data(folder: Path, images: int, resolution: int) -> Path:
    generator = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", images), ("val", 16)):
        labels = torch.arange(n) % 10
        pixels = torch.randint(0, 256, (n, 3, resolution, resolution), dtype=torch.uint8, generator=generator)
        torch.save({"images": pixels, "labels": labels}, folder / f"{split}.pt")
    return folder


def prepared_runs(args, data: Path, backbone: str, count: int, folder: Path) -> list:
    """``count`` runs of ``backbone``, each with its own seed and learning rate."""
    runs = []
    for index in range(count):
        config = TrainConfig(data=str(data), out=str(folder / f"{backbone}-{count}-{index}.pt"), backbone=backbone,
                             resolution=args.resolution, epochs=args.repeats + 1, batch_size=args.batch_size,
                             lr=0.01 * (index + 1), seed=index, device=args.device, threads=args.threads,
                             precision="float32", channels_last=args.channels_last)  # fmt: skip
        runs.append(prepare(config, log=lambda message: None))
    return runs


def cpu_model() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{names[0]}, {len(names)} CPUs" if names else platform.processor() or platform.machine()


def clocks(device: str) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds), the device's queued work done."""
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


def timed(device: str, work, *args) -> tuple[float, float]:
    """Wall and CPU seconds of ``work(*args)``."""
    wall, cpu = clocks(device)
    work(*args)
    end_wall, end_cpu = clocks(device)
    return end_wall - wall, end_cpu - cpu


def alone_epochs(runs: list, args) -> list[tuple[float, float]]:
    """Wall and CPU seconds of each timed epoch of ``runs`` trained one after another (after a warm-up epoch)."""

    def epoch_of_each(epoch: int) -> None:
        for run in runs:
            fit_epoch(run.state, run.forward, run.batches, epoch, args.steps, run.scaler, run.device)

    return [timed(args.device, epoch_of_each, epoch) for epoch in range(args.repeats + 1)][1:]


def fused_epochs(runs: list, args) -> list[tuple[float, float]]:
    fused = FusedStagedNet(
        [run.state.model for run in runs], [torch.Generator().manual_seed(i) for i in range(len(runs))]
    )
    return [timed(args.device, fused_epoch, fused, runs, epoch, args.steps) for epoch in range(args.repeats + 1)][1:]


def rates(images: int, seconds: list[tuple[float, float]]) -> tuple[float, float]:
    """Images per wall second and per CPU second, from the median timing of each."""
    return images / statistics.median(w for w, _ in seconds), images / statistics.median(c for _, c in seconds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "mobilenet_v3_small"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8], help="group sizes B")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps an epoch")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs (after one warm-up)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False)
    args = parser.parse_args(argv)
    images = args.batch_size * args.steps
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else cpu_model()
    print(f"device: {args.device} ({device}), torch {torch.__version__}, threads {args.threads or 'default'}, "
          f"batch {args.batch_size}, {args.resolution}x{args.resolution}, {args.steps} steps an epoch, "
          f"median of {args.repeats} epochs, channels-last {args.channels_last}\n")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp) / "data", images, args.resolution)
        for backbone in args.backbones:
            one = rates(images, alone_epochs(prepared_runs(args, data, backbone, 1, Path(tmp)), args))
            print(f"### {backbone}\n")
            print("| B | one run | B runs in turn | B runs fused | fused / in turn |")
            print("|---:|---:|---:|---:|---:|")
            for size in args.sizes:
                in_turn = rates(size * images, alone_epochs(prepared_runs(args, data, backbone, size, Path(tmp)), args))
                fused = rates(size * images, fused_epochs(prepared_runs(args, data, backbone, size, Path(tmp)), args))
                cells = [f"{wall:.1f} ({cpu:.1f})" for wall, cpu in (one, in_turn, fused)]
                gain = f"{fused[0] / in_turn[0]:.2f}x ({fused[1] / in_turn[1]:.2f}x)"
                print(f"| {size} | {' | '.join(cells)} | {gain} |", flush=True)
            print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
