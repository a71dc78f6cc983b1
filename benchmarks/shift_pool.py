#!/usr/bin/env python
"""SHiFT's successive halving over data on a pool of timm and torchvision models, against the full proxy.

On an image folder holding the first ``--per-class`` training images of each CIFAR-10 class (the
default subset's sizes: 500 per class, 50 of them for validation, all taken), every model of the pool
(names and patterns, expanded as the config check expands ``search.backbones``) at random init:

1. the full proxy (kNN on every training image's features) from an empty feature store: its
   winner, the images each model ran and the extraction seconds;
2. successive halving over data, seed 0, from another empty store: its winner and the images it ran;
3. seeds 1 to ``--seeds - 1`` replayed on the full store's features (the same features the
   extraction would compute): is the winner the full proxy's?
4. the folder grown by ``--append`` (10%) more images per class, the full proxy and successive
   halving re-run on the first store (only the new images are extracted) and from an empty store
   (a full re-run): extraction seconds and choices compared.

Writes a Markdown report and a CSV of every model's rows. One thread; run it under ``nice``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import _path  # noqa: F401 (the package, importable)

import numpy as np
import pandas as pd
import torch

from tlselect.core.backbones import resolve
from tlselect.core.errors import cli
from tlselect.core.files import write_text
from tlselect.data.fetch import fetch_image_folder
from tlselect.data.tensors import load_split, write_subset
from tlselect.search import shift
from tlselect.training.store import Embedder, image_hashes

POOL = [
    "resnet1[04]t", "resnet18", "mobilenetv3_small_[01]*", "mobilenet_v2", "mobilenet_v3_small",
    "efficientnet_b0", "efficientnet_lite0", "convnext_atto", "convnext_femto", "regnet[xy]_002",
    "regnet_x_400mf", "vit_tiny_patch16_224", "deit_tiny_patch16_224", "mnasnet0_5", "shufflenet_v2_x0_5",
    "ghostnet_050", "lcnet_050",
]  # fmt: skip


def image_folder(cifar: Path, out: Path, per_class: int, test_per_class: int) -> Path:
    """The first ``per_class`` training images (and ``test_per_class`` test images) of each class."""
    for split, count in (("train", per_class), ("test", test_per_class)):
        for class_dir in sorted((cifar / split).iterdir()):
            dest = out / split / class_dir.name
            dest.mkdir(parents=True, exist_ok=True)
            for path in sorted(class_dir.iterdir())[:count]:
                shutil.copy(path, dest / path.name)
    return out


class Pool:
    """The pool's embedders on one store, over one decoded subset."""

    def __init__(self, names: list[str], data: Path, store: Path, resolution: int):
        (self.train_x, self.train_y), (self.val_x, self.val_y) = (
            load_split(data / f"{split}.pt") for split in ("train", "val")
        )
        self.hashes = image_hashes(self.train_x), image_hashes(self.val_x)
        self.embedders = {n: Embedder(n, "scratch", store, resolution=resolution) for n in names}

    def features(self, model, indices):
        return self.embedders[model](self.train_x[indices], [self.hashes[0][i] for i in indices])

    def validation(self, model):
        return self.embedders[model](self.val_x, self.hashes[1]), self.val_y.numpy()

    def halving(self, seed: int) -> shift.Result:
        return shift.successive_halving(
            list(self.embedders), self.train_y.numpy(), self.features, self.validation, seed=seed
        )

    def full(self) -> shift.Result:
        return shift.full_proxy(list(self.embedders), self.train_y.numpy(), self.features, self.validation)

    def computed(self) -> int:
        return sum(e.computed for e in self.embedders.values())

    def seconds(self) -> float:
        """Inference seconds (the models' forward passes)."""
        return sum(e.seconds for e in self.embedders.values())

    def build_seconds(self) -> float:
        """Seconds building the models that had something to extract."""
        return sum(e.build_seconds for e in self.embedders.values())


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", default="../shared/data/cifar10-jpg.tar.gz")
    parser.add_argument("--work", default="/tmp/shift-pool", help="scratch folder (emptied)")
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--append", type=float, default=0.1, help="fraction of images appended per class")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--pool", nargs="+", default=POOL)
    parser.add_argument("--out", default="docs/measurements/shift-pool-cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    names = resolve(args.pool, cap=50)
    print(f"pool: {len(names)} models: {', '.join(names)}", flush=True)
    cifar = work / "cifar10"
    fetch_image_folder(cifar, args.archive)
    grown_per_class = round(args.per_class * (1 + args.append))
    data = {}
    for label, per_class in (("base", args.per_class), ("grown", grown_per_class)):
        folder = image_folder(cifar, work / f"images-{label}", per_class, 10)
        data[label] = work / f"data-{label}"
        write_subset(folder, data[label], None, per_class, args.val_per_class, 10, 32, seed=0, skip_unreadable=False)

    full_pool = Pool(names, data["base"], work / "store-full", args.resolution)
    full = full_pool.full()
    full_seconds, full_images = full_pool.seconds(), full_pool.computed()
    print(f"full proxy: {full.winner}, {full_images} images, {full_seconds:.0f} s", flush=True)
    sh_pool = Pool(names, data["base"], work / "store-sh", args.resolution)
    sh = sh_pool.halving(seed=0)
    sh_seconds, sh_images = sh_pool.seconds(), sh_pool.computed()
    print(f"halving, seed 0: {sh.winner}, {sh_images} images, {sh_seconds:.0f} s", flush=True)
    winners = [sh.winner] + [full_pool.halving(seed).winner for seed in range(1, args.seeds)]
    same = sum(w == full.winner for w in winners)

    # appended images: the first store extracts only the new ones; an empty store is the full re-run
    grown_incremental = Pool(names, data["grown"], work / "store-full", args.resolution)
    grown_full = grown_incremental.full()
    grown_sh = Pool(names, data["grown"], work / "store-sh", args.resolution).halving(seed=0)
    inc_seconds, inc_images = grown_incremental.seconds(), grown_incremental.computed()
    inc_build = grown_incremental.build_seconds()
    rerun = Pool(names, data["grown"], work / "store-grown", args.resolution)
    rerun_full = rerun.full()
    rerun_seconds, rerun_images, rerun_build = rerun.seconds(), rerun.computed(), rerun.build_seconds()
    rerun_sh = rerun.halving(seed=0)
    total = time.perf_counter() - t0

    rows = pd.DataFrame(full.rows).rename(columns={"score": "full_proxy_knn"}).drop(columns=["round", "images"])
    reached = shift.final_scores(sh)
    rows["sh_last_round"] = rows["model"].map(lambda m: reached[m][0])
    rows["sh_last_score"] = rows["model"].map(lambda m: reached[m][1])
    rows["sh_images"] = rows["model"].map(lambda m: sh_pool.embedders[m].computed)
    rows["full_images"] = rows["model"].map(lambda m: full_pool.embedders[m].computed)
    rows["full_extract_s"] = rows["model"].map(lambda m: round(full_pool.embedders[m].seconds, 2))
    rows = rows.sort_values("full_proxy_knn", ascending=False)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows.to_csv(out.with_suffix(".csv"), index=False)
    rounds = shift.schedule(len(names), 2)
    report = [
        f"# SHiFT's successive halving over data on {len(names)} models",
        "",
        f"Pool ({len(names)} models, random init, {args.resolution}x{args.resolution} input): {', '.join(names)}.",
        f"Data: the first {args.per_class} CIFAR-10 training images of each class, {args.val_per_class} of them "
        f"for validation ({len(full_pool.train_y)} training, {len(full_pool.val_y)} validation images); "
        f"kNN proxy (k = 5), eta = 2: rounds keep {[r.survivors for r in rounds]} models, which have read "
        f"{[r.chunks for r in rounds]} chunks of {shift.chunk_size(len(full_pool.train_y), rounds)} images.",
        "",
        "| | winner | images through a model | inference s | + building the models s |",
        "|---|---|---|---|---|",
        f"| full proxy (every model, every image) | {full.winner} | {full_images} | {full_seconds:.1f} "
        f"| {full_pool.build_seconds():.1f} |",
        f"| successive halving over data, seed 0 | {sh.winner} | {sh_images} ({sh_images / full_images:.1%}) "
        f"| {sh_seconds:.1f} ({sh_seconds / full_seconds:.1%}) | {sh_pool.build_seconds():.1f} |",
        f"| after appending {args.append:.0%} more images per class: full proxy, from the store | "
        f"{grown_full.winner} | {inc_images} | {inc_seconds:.1f} ({inc_seconds / rerun_seconds:.1%} of the re-run) "
        f"| {inc_build:.1f} ({(inc_seconds + inc_build) / (rerun_seconds + rerun_build):.1%} with building) |",
        f"| the same, full re-run from an empty store | {rerun_full.winner} | {rerun_images} | {rerun_seconds:.1f} "
        f"| {rerun_build:.1f} |",
        f"| successive halving on the grown data, from the stores / full re-run | {grown_sh.winner} / "
        f"{rerun_sh.winner} | | | |",
        "",
        f"Successive halving picks the full proxy's model in {same} of {args.seeds} seeds "
        f"(orders of the training images; winners: {', '.join(winners)}).",
        "",
        "| model | full proxy kNN accuracy | halving: last round | its score | images read (halving / full) "
        "| extraction s (full) |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r.model} | {r.full_proxy_knn:.3f} | {r.sh_last_round} | {r.sh_last_score:.3f} | "
            f"{r.sh_images} / {r.full_images} | {r.full_extract_s:.1f} |"
            for r in rows.itertuples()
        ),
        "",
        f"Whole harness: {total / 60:.1f} min wall, one thread ({sys.version.split()[0]}, torch {torch.__version__}).",
    ]
    write_text(out.with_suffix(".md"), "\n".join(report) + "\n")
    print("\n".join(report), flush=True)
    np.testing.assert_equal(grown_full.winner, rerun_full.winner)
    return 0


if __name__ == "__main__":
    sys.exit(main())
