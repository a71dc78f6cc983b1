#!/usr/bin/env python
"""A ground-truth candidate pool for the search replay: every candidate trained to the grid's epochs.

The pool is the product of backbones x inits x freeze depths x learning rates x weight decays on
a few CIFAR-10 classes, each candidate trained with a constant learning rate (SGD, Nesterov
momentum 0.9, no augmentation) for ``--epochs`` epochs, its validation accuracy after every
epoch, its test accuracy at the end and its CPU seconds per epoch (training + validation, one
thread) recorded. The source init is a model this harness pretrains on the other classes, as the
workflow's source rule does. A frozen prefix's outputs are computed once per (backbone, init,
depth) and reused by all of its candidates; each candidate's first epoch is charged the seconds
that computing them took for its training and validation images, as a run of its own would pay.

The result is a pool table (:func:`tlselect.search.replay.read_pool`), what ``snakemake
replay_benchmark`` replays. Finished candidates are kept in ``--work`` (one JSON each), so a killed
run resumes where it stopped. Not part of the workflow: a measurement harness.
"""

import argparse
import json
import multiprocessing
import random
import sys
import time
from pathlib import Path

import _path  # noqa: F401 (the package, importable)

import torch
from torch import nn

from tlselect.core.errors import cli
from tlselect.core.files import load_torch, save_torch, write_json
from tlselect.core.settings import freeze_stage
from tlselect.data.fetch import extract_archive
from tlselect.data.tensors import decode_images
from tlselect.report.tables import write_csv
from tlselect.search.replay import Candidate, pool_frame
from tlselect.training.loop import augment_batch, augment_draws, memory_batches
from tlselect.training.models import StagedNet, load_backbone_weights

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def images(root: Path, split: str, classes: list[str], per_class: list[int], seed: int) -> list[dict]:
    """Disjoint class-balanced parts of ``split`` (``per_class[i]`` images of each class in part i), seeded."""
    parts = [[] for _ in per_class]
    for label, name in enumerate(classes):
        files = sorted(f"{split}/{name}/{p.name}" for p in (root / split / name).iterdir())
        random.Random(f"{seed}-{split}-{name}").shuffle(files)
        start = 0
        for part, count in zip(parts, per_class, strict=True):
            part += [[f, label] for f in files[start : start + count]]
            start += count
    return [decode_images(root, part, 32) for part in parts]


def step_epoch(net, start, data, optimizer, generator, batch_size, augment=False) -> bool:
    """One epoch of SGD on ``data`` (stage ``start`` onwards); False when the loss became non-finite."""
    net.train()
    for x, y in memory_batches(data["images"], data["labels"], batch_size, generator, augment=augment):
        loss = nn.functional.cross_entropy(net(x, start, None), y)
        if not torch.isfinite(loss):
            return False
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return True


@torch.inference_mode()
def accuracy(net, start, data) -> float:
    net.eval()
    hits = sum(
        (net(x, start, None).argmax(1) == y).sum().item()
        for x, y in memory_batches(data["images"], data["labels"], 500)
    )
    return hits / len(data["labels"])


@torch.inference_mode()
def prefix(net, stop, data) -> dict:
    net.eval()
    outputs = [net(x, 0, stop) for x, _ in memory_batches(data["images"], data["labels"], 500)]
    return {"images": torch.cat(outputs), "labels": data["labels"]}


def pretrain_source(backbone: str, data: dict, classes: int, epochs: int, out: Path, seed: int) -> None:
    """The source model: ``backbone`` trained from scratch on the source classes (cosine lr, crops and flips)."""
    torch.manual_seed(seed)
    net = StagedNet(backbone, classes)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * (len(data["labels"]) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        for x, y in memory_batches(data["images"], data["labels"], 64, generator):
            shifts, flips = augment_draws(generator, len(y))
            loss = nn.functional.cross_entropy(net(augment_batch(x, shifts, flips)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    save_torch(out, net.net.state_dict())


def candidate_name(backbone, init, depth, lr, weight_decay) -> str:
    return f"{backbone}-{init}-{depth}-lr{lr:g}-wd{weight_decay:g}"


def train_candidate(job: dict) -> dict | None:
    """Train one candidate (``job``: its parameters and the work folder); its row as a dict (None when
    another run of this harness on the same work folder has finished it meanwhile)."""
    torch.set_num_threads(1)
    work, p = Path(job["work"]), job["params"]
    if (work / "candidates" / f"{job['name']}.json").exists():
        return None
    arm = f"{p['backbone']}-{p['init']}-{p['freeze']}"
    splits = load_torch(work / "arms" / f"{arm}.pt")
    torch.manual_seed(job["seed"])
    net = StagedNet(p["backbone"], job["classes"])
    if p["init"] == "source":
        load_backbone_weights(net, load_torch(work / "source" / f"{p['backbone']}.pt"), "source")
    start = 0
    if p["freeze"] != "none":
        net.freeze_through(freeze_stage(p["backbone"], p["freeze"]))
        start = net.frozen_stop()
    trainable = [q for q in net.parameters() if q.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=p["lr"], momentum=0.9, nesterov=True, weight_decay=p["weight_decay"])
    generator = torch.Generator().manual_seed(job["seed"])
    val, seconds, test, diverged = [], [], None, False
    for epoch in range(job["epochs"]):
        began = time.process_time()
        if not diverged:
            diverged = not step_epoch(net, start, splits["train"], optimizer, generator, p["batch_size"])
        val.append(None if diverged else accuracy(net, start, splits["val"]))
        seconds.append(time.process_time() - began + (splits["prefix_seconds"] if epoch == 0 else 0.0))
    if not diverged:
        test = accuracy(net, start, splits["test"])
    return {"name": job["name"], "params": p, "val": val, "seconds": seconds, "test": test}


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, required=True, help="the CIFAR-10 image-folder archive")
    parser.add_argument("--out", type=Path, required=True, help="the pool table (CSV)")
    parser.add_argument(
        "--work", type=Path, required=True, help="folder for the data, source models and finished candidates"
    )
    parser.add_argument("--classes", nargs="+", default=["deer", "horse"], help="the target task's classes")
    parser.add_argument("--train-per-class", type=int, default=50)
    parser.add_argument("--val-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=500, help="of the test split's 1,000")
    parser.add_argument(
        "--source-per-class", type=int, default=250, help="source pretraining: images of each other class"
    )
    parser.add_argument("--source-epochs", type=int, default=4)
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "mobilenet_v3_small"])
    parser.add_argument("--inits", nargs="+", default=["scratch", "source"])
    parser.add_argument("--freezes", nargs="+", default=["none", "most"])
    parser.add_argument("--lrs", nargs="+", type=float, default=[0.002, 0.005, 0.01, 0.02, 0.05, 0.1])
    parser.add_argument("--weight-decays", nargs="+", type=float, default=[1e-5, 1e-3, 3e-2])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3, help="the grid's epochs (max_epochs of the replay)")
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--reverse",
        action="store_true",
        help="train the most expensive candidates first (a second run on the same --work meets the first halfway)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    began = time.time()
    root = args.work / "cifar10-jpg"
    if not (root / "train").is_dir():
        extract_archive(args.archive, root)
    target = [CLASSES.index(c) for c in args.classes]
    source_classes = [c for c in CLASSES if c not in args.classes]
    # Source models, then each arm's inputs (a frozen prefix's outputs computed once, its seconds measured).
    for backbone in args.backbones:
        path = args.work / "source" / f"{backbone}.pt"
        if "source" in args.inits and not path.exists():
            (data,) = images(root, "train", source_classes, [args.source_per_class], args.seed)
            tick = time.process_time()
            pretrain_source(backbone, data, len(source_classes), args.source_epochs, path, args.seed)
            print(f"source {backbone}: {time.process_time() - tick:.0f} CPU s", flush=True)
    train, val = images(root, "train", args.classes, [args.train_per_class, args.val_per_class], args.seed)
    (test,) = images(root, "test", args.classes, [args.test_per_class], args.seed)
    arms = [
        (b, i, d) for b in args.backbones for i in args.inits for d in (args.freezes if i != "scratch" else ["none"])
    ]
    for backbone, init, depth in arms:
        path = args.work / "arms" / f"{backbone}-{init}-{depth}.pt"
        if path.exists():
            continue
        splits = {"train": train, "val": val, "test": test, "prefix_seconds": 0.0}
        if depth != "none":
            net = StagedNet(backbone, len(args.classes))
            load_backbone_weights(net, load_torch(args.work / "source" / f"{backbone}.pt"), "source")
            net.freeze_through(freeze_stage(backbone, depth))
            tick = time.process_time()
            splits["train"], splits["val"] = prefix(net, net.frozen_stop(), train), prefix(net, net.frozen_stop(), val)
            splits["prefix_seconds"] = time.process_time() - tick
            splits["test"] = prefix(net, net.frozen_stop(), test)
        save_torch(path, splits)
    jobs = []
    for backbone, init, depth in arms:
        for lr in args.lrs:
            for weight_decay in args.weight_decays:
                params = {"backbone": backbone, "init": init, "freeze": depth, "lr": lr, "resolution": 32,
                          "weight_decay": weight_decay, "label_smoothing": 0.0,
                          "batch_size": args.batch_size}  # fmt: skip
                name = candidate_name(backbone, init, depth, lr, weight_decay)
                jobs.append({"name": name, "params": params, "work": str(args.work), "classes": len(target),
                             "epochs": args.epochs, "seed": args.seed})  # fmt: skip
    done_dir = args.work / "candidates"
    todo = [j for j in jobs if not (done_dir / f"{j['name']}.json").exists()]
    todo.sort(
        key=lambda j: (j["params"]["freeze"] == "none", j["params"]["backbone"] == "resnet18"), reverse=args.reverse
    )
    print(f"{len(jobs)} candidates, {len(todo)} to train", flush=True)
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for i, row in enumerate(pool.imap_unordered(train_candidate, todo), 1):
            if row is None:
                continue
            write_json(done_dir / f"{row['name']}.json", row)
            print(f"[{i}/{len(todo)}] {row['name']}: val {row['val'][-1]} test {row['test']} "
                  f"{sum(row['seconds']):.1f} CPU s ({time.time() - began:.0f} s since start)", flush=True)  # fmt: skip
    missing = [j["name"] for j in jobs if not (done_dir / f"{j['name']}.json").exists()]
    if missing:
        print(f"{len(missing)} candidates are still training in another run; it writes {args.out}", flush=True)
        return 0
    rows = {}
    for job in jobs:
        row = json.loads((done_dir / f"{job['name']}.json").read_text())
        rows[row["name"]] = Candidate(row["name"], row["params"], tuple(row["val"]), tuple(row["seconds"]), row["test"])
    write_csv(pool_frame(rows), args.out)
    print(f"wrote {args.out}: {len(rows)} candidates in {time.time() - began:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
