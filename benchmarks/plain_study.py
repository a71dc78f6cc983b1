#!/usr/bin/env python
"""The transfer study as a plain PyTorch script runs it: the baseline of the study-level benchmark.

Per-image PIL decoding and transforms, a DataLoader with worker processes, float32, batch 128,
SGD (lr 0.05, momentum 0.9, weight decay 5e-4) with a cosine schedule: the usual small-data
settings. It pretrains the source model, then trains each policy from it (scratch, fine-tune,
freeze the stem and layer1, freeze through layer3, train only the head), validating every epoch,
on the images the workflow's subset files name, on the GPU when there is one, and writes each
run's seconds and accuracy as JSON.
It shares no code with the workflow's trainer on purpose: it is what the workflow is compared to.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import _path  # noqa: F401 (the package, importable)

import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms

from tlselect.core.errors import cli
from tlselect.core.files import write_json

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Policy: (init, parameter-name prefixes that stay frozen).
POLICIES = {
    "scratch": ("scratch", ()),
    "finetune": ("source", ()),
    "freeze_early": ("source", ("conv1", "bn1", "layer1")),
    "freeze_most": ("source", ("conv1", "bn1", "layer1", "layer2", "layer3")),
    "linear_probe": ("source", ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")),
}


class FileList(torch.utils.data.Dataset):
    """Images named by a subset file's split: decoded with PIL and transformed one by one."""

    def __init__(self, root: Path, items: list, transform):
        self.items = [(root / rel, label) for rel, label in items]
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        path, label = self.items[index]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), label


def loaders(subset_file: Path, batch_size: int, workers: int) -> dict:
    subset = json.loads(subset_file.read_text())
    root = Path(subset["source"]["root"])  # relative to the workflow's folder, the working directory
    train = transforms.Compose(
        [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
         transforms.Normalize(MEAN, STD)]
    )  # fmt: skip
    plain = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    out = {}
    for split, items in subset["splits"].items():
        training = split == "train"
        out[split] = torch.utils.data.DataLoader(
            FileList(root, items, train if training else plain),
            batch_size=batch_size if training else 512,
            shuffle=training,
            drop_last=training,
            num_workers=workers,
            persistent_workers=workers > 0,
        )
    return out, len(subset["classes"])


@torch.no_grad()
def accuracy(model, loader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(DEVICE), y.to(DEVICE)
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return correct / total


def run(name, model, data, epochs, lr, frozen=()) -> dict:
    start = time.perf_counter()
    model.to(DEVICE)
    for param_name, param in model.named_parameters():
        param.requires_grad = not param_name.startswith(frozen)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * len(data["train"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    val = []
    for epoch in range(epochs):
        model.train()
        for x, y in data["train"]:
            x, y = x.to(DEVICE), y.to(DEVICE)
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        val.append(accuracy(model, data["val"]))
        print(f"[{name}] epoch {epoch + 1}/{epochs} val_acc {val[-1]:.4f} ({time.perf_counter() - start:.0f}s)")
    test = accuracy(model, data["test"]) if "test" in data else None
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(f"[{name}] val_acc {val[-1]:.4f} test_acc {test} in {seconds:.1f}s", flush=True)
    return {"seconds": seconds, "val_accuracy": val[-1], "test_accuracy": test, "val_curve": val}


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source-subset", required=True, help="the source task's subset.json")
    parser.add_argument("--subset", required=True, help="the target task's subset.json")
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--source-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="seed of the inits, shuffling and augmentation")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    wall = time.perf_counter()
    results, weights = {}, {}
    if any(POLICIES[name][0] == "source" for name in args.policies):
        source_data, source_classes = loaders(Path(args.source_subset), args.batch_size, args.workers)
        source_model = torchvision.models.resnet18(num_classes=source_classes)
        results["source"] = run("source", source_model, source_data, args.source_epochs, args.lr)
        weights = {k: v for k, v in source_model.state_dict().items() if not k.startswith("fc.")}
    data, classes = loaders(Path(args.subset), args.batch_size, args.workers)
    for name in args.policies:
        init, frozen = POLICIES[name]
        torch.manual_seed(args.seed)
        model = torchvision.models.resnet18(num_classes=classes)
        if init == "source":
            model.load_state_dict(weights, strict=False)
        results[name] = run(name, model, data, args.epochs, args.lr, frozen)
    results["total_seconds"] = time.perf_counter() - wall
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
