"""Recorded learning curves of several small tasks for the multi-tenant replay (docs/many-users.md).

Each task is a disjoint set of CIFAR-10 classes read from the offline image-folder archive. Every
candidate of a task's pool is a probe trained on fixed features of the images: a feature set (the
candidate's ``init``: 8x8 colour pixels, or a seeded random 5x5 convolution layer with ReLU, of
64 filters pooled to 2x2 or 128 filters pooled to 4x4), a head (its ``backbone``: linear or a
128-unit MLP), a learning rate and a weight decay, trained with SGD (momentum 0.9, batch 64,
constant rate) for ``--epochs`` epochs, one thread. Two task sets (``--tasks``): ``similar``, four
pools of 48 candidates, two searching well-behaved learning rates, two a wide range whose largest
diverge; ``mixed``, users at different stages: two easy pairs of classes with 12 sound candidates
each and two hard tasks (cat/dog, and four classes) with 72 candidates over a wide range of rates.

Writes one row per candidate and epoch in the tabular pool format of the search replay
(:func:`tlselect.search.tenants.read_pools`): task, candidate, its parameters, epoch, validation
accuracy, seconds of that epoch (training and evaluation) and the final test accuracy.

    nice -n 19 python benchmarks/tenant_curves.py --archive ../shared/data/cifar10-jpg.tar.gz \
        --out docs/measurements/tenant-curves-cpu.csv
    nice -n 19 python benchmarks/tenant_curves.py --archive ../shared/data/cifar10-jpg.tar.gz --tasks mixed \
        --out docs/measurements/tenant-curves-mixed-cpu.csv
"""

from __future__ import annotations

import argparse
import io
import itertools
import math
import tarfile
import time
from pathlib import Path

import _path  # noqa: F401

import numpy as np
import pandas as pd
import torch
from PIL import Image

FEATURES = ("pixels", "randconv", "randconv_wide")
HEADS = ("linear", "mlp128")
WEIGHT_DECAYS = (1e-4, 1e-1)
WIDE_LRS = (0.0003, 0.003, 0.03, 0.3, 1.0, 3.0)
# Task sets, each of disjoint class sets: {name: (classes, features, heads, learning rates, weight decays)}.
TASK_SETS = {
    # four pools of the same size and structure (48 candidates each)
    "similar": {
        "animals_easy": (("airplane", "frog"), FEATURES, HEADS, (0.003, 0.01, 0.03, 0.1), WEIGHT_DECAYS),
        "pets": (("cat", "dog"), FEATURES, HEADS, (0.001, 0.03, 1.0, 3.0), WEIGHT_DECAYS),
        "vehicles": (("automobile", "truck", "ship"), FEATURES, HEADS, (0.003, 0.01, 0.03, 0.1), WEIGHT_DECAYS),
        "wildlife": (("bird", "deer", "horse"), FEATURES, HEADS, (0.0003, 0.01, 1.0, 3.0), WEIGHT_DECAYS),
    },
    # users at different stages: two easy pairs with small pools of sound settings (12 candidates, any
    # of them close to the best) and two hard tasks with large pools (72 candidates) over a wide range
    # of learning rates, the largest of which diverge
    "mixed": {
        "planes_frogs": (("airplane", "frog"), FEATURES[:2], HEADS[:1], (0.01, 0.03, 0.1), (1e-4, 1e-2)),
        "ships_horses": (("ship", "horse"), FEATURES[:2], HEADS[:1], (0.01, 0.03, 0.1), (1e-4, 1e-2)),
        "cats_dogs": (("cat", "dog"), FEATURES, HEADS, WIDE_LRS, WEIGHT_DECAYS),
        "road_and_field": (("automobile", "bird", "deer", "truck"), FEATURES, HEADS, WIDE_LRS, WEIGHT_DECAYS),
    },
}


def read_images(archive: Path, classes: set[str], train: int, test: int) -> dict[str, dict[str, list[np.ndarray]]]:
    """``{split: {class: [HxWx3 uint8]}}``: the first ``train`` (``test``) images of each class, by file name."""
    members = {"train": {}, "test": {}}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if member.isfile() and len(parts) >= 3 and parts[-3] in members and parts[-2] in classes:
                members[parts[-3]].setdefault(parts[-2], []).append(member)
        out = {}
        for split, limit in (("train", train), ("test", test)):
            out[split] = {}
            for name, found in members[split].items():
                chosen = sorted(found, key=lambda m: m.name)[:limit]
                out[split][name] = [
                    np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")) for m in chosen
                ]
    return out


def features(images: np.ndarray, kind: str) -> np.ndarray:
    """Fixed features of ``N x 32 x 32 x 3`` uint8 images: 8x8 colour pixels, or a seeded random conv layer."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        if kind == "pixels":
            out = torch.nn.functional.adaptive_avg_pool2d(x, 8)
        else:  # randconv: 64 filters pooled to 2x2; randconv_wide: 128 filters pooled to 4x4
            wide = kind == "randconv_wide"
            conv = torch.nn.Conv2d(3, 128 if wide else 64, 5)
            torch.manual_seed(0)
            torch.nn.init.normal_(conv.weight, std=0.2)
            torch.nn.init.zeros_(conv.bias)
            out = torch.nn.functional.adaptive_avg_pool2d(torch.relu(conv(x)), 4 if wide else 2)
    return out.flatten(1).numpy()


def train_probe(data, head: str, lr: float, weight_decay: float, epochs: int, seed: int):
    """Per-epoch validation accuracy (None once diverged) and seconds, and the final test accuracy."""
    (xtr, ytr), (xva, yva), (xte, yte) = data
    torch.manual_seed(seed)
    classes, dims = int(ytr.max()) + 1, xtr.shape[1]
    model = (
        torch.nn.Linear(dims, classes)
        if head == "linear"
        else torch.nn.Sequential(torch.nn.Linear(dims, 128), torch.nn.ReLU(), torch.nn.Linear(128, classes))
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    val, seconds, diverged = [], [], False
    for _ in range(epochs):
        start = time.perf_counter()
        for batch in torch.randperm(len(xtr)).split(64):
            loss = torch.nn.functional.cross_entropy(model(xtr[batch]), ytr[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            logits = model(xva)
        diverged = diverged or not torch.isfinite(logits).all() or not math.isfinite(loss.item())
        val.append(None if diverged else float((logits.argmax(1) == yva).float().mean()))
        seconds.append(time.perf_counter() - start)
    with torch.no_grad():
        test = None if diverged else float((model(xte).argmax(1) == yte).float().mean())
    return val, seconds, test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--train-per-class", type=int, default=1000, help="training images per class (a quarter: val)")
    parser.add_argument("--test-per-class", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--tasks", choices=sorted(TASK_SETS), default="similar", help="the set of tasks and pools")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tasks = TASK_SETS[args.tasks]
    classes = {c for names, *_ in tasks.values() for c in names}
    images = read_images(args.archive, classes, args.train_per_class, args.test_per_class)
    rows, started = [], time.perf_counter()
    for task, (names, kinds, heads, lrs, weight_decays) in tasks.items():
        val_count = args.train_per_class // 4
        split = {"train": ([], []), "val": ([], []), "test": ([], [])}
        for label, name in enumerate(names):
            for part, imgs in (
                ("train", images["train"][name][val_count:]),
                ("val", images["train"][name][:val_count]),
                ("test", images["test"][name]),
            ):
                split[part][0].extend(imgs)
                split[part][1].extend([label] * len(imgs))
        for kind in kinds:
            arrays = {part: features(np.stack(x), kind) for part, (x, _) in split.items()}
            mean, std = arrays["train"].mean(0), arrays["train"].std(0) + 1e-6
            data = [
                (torch.from_numpy((arrays[p] - mean) / std), torch.tensor(split[p][1]))
                for p in ("train", "val", "test")
            ]
            for head, lr, wd in itertools.product(heads, lrs, weight_decays):
                params = {"backbone": head, "init": kind, "freeze": "none", "lr": lr, "resolution": 32,
                          "weight_decay": wd, "label_smoothing": 0.0, "batch_size": 64}  # fmt: skip
                candidate = f"{task}-{head}-{kind}-lr{lr:g}-wd{wd:g}"
                val, seconds, test = train_probe(data, head, lr, wd, args.epochs, seed=len(rows))
                for epoch, (v, s) in enumerate(zip(val, seconds, strict=True), 1):
                    rows.append({"task": task, "candidate": candidate, **params, "epoch": epoch,
                                 "val_accuracy": v, "seconds": round(s, 5), "test_accuracy": test})  # fmt: skip
            print(f"{task} {kind}: done after {time.perf_counter() - started:.0f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(args.out, index=False)
    print(f"{len(rows)} rows written to {args.out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
