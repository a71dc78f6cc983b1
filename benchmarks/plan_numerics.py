#!/usr/bin/env python
"""Which execution-plan knobs change a run's results: the same run (seed, data, recipe) trained with
one knob changed at a time, against the float32, contiguous, all-threads run.

Prints, per variant, the final validation and test accuracy, the test loss, the largest difference
of any weight from the reference run's, and whether the test predictions are the same. The data is
a learnable toy task (random images whose first channel encodes the class, 4 classes, 256 training
images); three epochs at batch 64, SGD lr 0.01. Example: ``python benchmarks/plan_numerics.py``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import _path  # noqa: F401 (the package, importable)

import torch

from tlselect.training.options import TrainConfig
from tlselect.training.trainer import train

VARIANTS = {
    "reference (2 threads, contiguous, eval batch 1024)": {},
    "1 thread": {"threads": 1},
    "channels-last": {"channels_last": True},
    "evaluation batch 16": {"eval_batch_size": 16},
}


def write_data(folder: Path) -> Path:
    generator = torch.Generator().manual_seed(1)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 256), ("val", 64), ("test", 64)):
        labels = torch.arange(n) % 4
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
        images[:, 0] = (labels[:, None, None] * 60).to(torch.uint8)
        torch.save({"images": images, "labels": labels}, folder / f"{split}.pt")
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp) / "data")
        results = {}
        for name, change in VARIANTS.items():
            settings = {"threads": 2, "channels_last": False, "eval_batch_size": 1024} | change
            config = TrainConfig(data=str(data), out=f"{tmp}/{len(results)}.pt", epochs=args.epochs, batch_size=64,
                                 lr=0.01, device="cpu", seed=0, **settings)  # fmt: skip
            record = train(config, log=lambda message: None)
            results[name] = (record["metrics"], torch.load(config.out, weights_only=True))
        _, reference = next(iter(results.values()))
        print("| variant | val accuracy | test accuracy | test loss | largest weight difference | same predictions |")
        print("|---|---:|---:|---:|---:|---|")
        for name, (metrics, checkpoint) in results.items():
            weights = checkpoint["model"]
            diff = max((weights[k].double() - reference["model"][k].double()).abs().max().item()
                       for k in weights if weights[k].is_floating_point())  # fmt: skip
            same = torch.equal(checkpoint["test_predictions"], reference["test_predictions"])
            print(f"| {name} | {metrics['val_accuracy']:.4f} | {metrics['test_accuracy']:.4f} | "
                  f"{metrics['test_loss']:.6f} | {diff:.3g} | {'yes' if same else 'no'} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
