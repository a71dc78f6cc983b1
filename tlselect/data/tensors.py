"""Decoded data: a subset's images decoded once into uint8 NCHW tensors (``{split}.pt``), loaded by
every later step, split into partitions, or streamed from the image folder.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tlselect.core.files import load_torch, save_torch, write_json
from tlselect.data.folders import (
    SKIP_NOTE,
    DataError,
    UnreadableImages,
    check_non_images,
    make_subset,
    source_task_files,
)

if TYPE_CHECKING:  # torch and PIL are imported where used: config checks read archives without them
    import torch


def decode_images(root: Path, entries: list[list], size: int) -> dict[str, torch.Tensor]:
    """Decode ``[[file, label], ...]`` into ``{"images": uint8 NxCxHxW, "labels": int64 N}``.

    Every unreadable file is collected and reported at once (:class:`UnreadableImages`), with the fix.
    """
    import torch
    from PIL import Image

    images = torch.empty((len(entries), 3, size, size), dtype=torch.uint8)
    bad = []
    for i, (rel, _) in enumerate(entries):
        try:
            with Image.open(root / rel) as img:
                img = img.convert("RGB")
                if img.size != (size, size):
                    img = img.resize((size, size), Image.BILINEAR)
                images[i] = (
                    torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
                )
        except Exception as error:  # PIL raises many kinds for broken files
            bad.append((rel, type(error).__name__))
    if bad:
        listed = "; ".join(f"{rel} ({kind})" for rel, kind in bad[:10])
        listed += f"; and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise UnreadableImages(
            f"{len(bad)} unreadable image(s) under {root}: {listed}. "
            f"Remove or replace them, or set data.skip_unreadable: true to leave them out ({SKIP_NOTE}).",
            [rel for rel, _ in bad],
        )
    labels = torch.tensor([label for _, label in entries], dtype=torch.int64)
    return {"images": images, "labels": labels}


def decode_splits(
    root: Path, pick: Callable[[list[str]], dict], size: int, skip_unreadable: bool = False
) -> tuple[dict, dict[str, dict[str, torch.Tensor]], list[str]]:
    """Decode the splits that ``pick(exclude)`` chooses (a dict with ``"splits"``).

    An unreadable image is an error naming it (:class:`UnreadableImages`). With ``skip_unreadable``
    every unreadable pick is added to ``exclude`` and ``pick`` chooses again (same seed, so the
    result is deterministic), until all picks decode. Returns (choice, tensors, skipped files).
    """
    unreadable: list[str] = []
    while True:
        chosen = pick(sorted(unreadable))
        decoded, bad = {}, []
        for split, entries in chosen["splits"].items():
            try:
                decoded[split] = decode_images(root, entries, size)
            except UnreadableImages as error:
                if not skip_unreadable:
                    raise
                bad += error.files
        if not bad:
            return chosen, decoded, sorted(unreadable)
        unreadable += bad


def load_split(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images, int64 labels) of one decoded split file."""
    if not Path(path).is_file():
        raise DataError(f"decoded split {path} is missing; run the workflow's subset step first")
    data = load_torch(path, mmap=True)  # read once, by the pages used
    return data["images"], data["labels"]


def partition_split(decoded: dict, parts: int, seed: int) -> list[dict]:
    """``parts`` disjoint, class-balanced partitions of a decoded split: each class's images,
    shuffled with ``seed``, dealt round-robin (model hopper parallelism: one per worker)."""
    labels = decoded["labels"].tolist()
    order = list(range(len(labels)))
    random.Random(seed).shuffle(order)
    order.sort(key=labels.__getitem__)  # stable: shuffled within each class
    return [{k: v[order[p::parts]] for k, v in decoded.items()} for p in range(parts)]


def _print(message: str) -> None:
    print(message, flush=True)


def save_splits(out: Path, tensors: dict, skipped: list[str], log: Callable[[str], None] = _print) -> None:
    """Write each decoded split to ``out/{split}.pt``; say how many images each holds and what was skipped."""
    for split, decoded in tensors.items():
        log(f"decoded {len(decoded['labels'])} {split} images")
        save_torch(Path(out) / f"{split}.pt", decoded)
    if skipped:
        log(f"skipped {len(skipped)} unreadable or non-image file(s): {', '.join(skipped)}")


def write_subset(
    root: Path,
    out: Path,
    classes: list[str] | None,
    train_per_class: int,
    val_per_class: int,
    test_per_class: int,
    image_size: int,
    seed: int,
    skip_unreadable: bool = False,
    log: Callable[[str], None] = _print,
) -> dict:
    """Materialize the seeded subset (:func:`tlselect.data.folders.make_subset`) of the image folder
    ``root``: ``out/{train,val,test}.pt`` decoded at ``image_size`` and ``out/subset.json``, the
    choice with what was skipped (non-image files and unreadable images, only with
    ``skip_unreadable``; otherwise they are an error). Returns the subset.json content."""
    root, out = Path(root), Path(out)
    strays = check_non_images(root, skip_unreadable)
    chosen, tensors, unreadable = decode_splits(
        root,
        lambda exclude: make_subset(
            root, classes, train_per_class, val_per_class, test_per_class, seed, exclude
        ),
        image_size,
        skip_unreadable,
    )  # fmt: skip
    skipped = sorted(strays + unreadable)
    save_splits(out, tensors, skipped, log)
    chosen["skipped"] = {"skip_unreadable": skip_unreadable, "count": len(skipped), "files": skipped}
    write_json(out / "subset.json", chosen)
    return chosen


def write_source_task(
    root: Path,
    subset: Path,
    out: Path,
    classes: list[str] | None,
    train_per_class: int,
    val_per_class: int,
    image_size: int,
    seed: int,
    log: Callable[[str], None] = _print,
) -> dict:
    """Materialize the source task: training images of ``root`` outside the target ``subset``
    (its subset.json; :func:`tlselect.data.folders.source_task_files`), of ``classes`` (empty: the
    target's), as ``out/{train,val}.pt`` and ``out/subset.json``. It skips unreadable images when the
    target subset did (``data.skip_unreadable``). Returns the subset.json content."""
    root, out = Path(root), Path(out)
    target = load_json(Path(subset))
    classes = classes or target["classes"]
    known = target.get("skipped", {})
    skip = known.get("skip_unreadable", False)

    def pick(exclude):
        files = known.get("files", []) + exclude
        return {"splits": source_task_files(target, root, classes, train_per_class, val_per_class, seed, files)}

    chosen, tensors, skipped = decode_splits(root, pick, image_size, skip)
    save_splits(out, tensors, skipped, log)
    written = {
        "seed": seed,
        "classes": classes,
        "source": target["source"],
        "splits": chosen["splits"],
        "skipped": {"skip_unreadable": skip, "count": len(skipped), "files": skipped},
    }
    write_json(out / "subset.json", written)
    return written


def write_partitions(split: Path, outs: list[str], seed: int, log: Callable[[str], None] = _print) -> None:
    """Split one decoded split file into ``len(outs)`` class-balanced partitions (:func:`partition_split`,
    model hopper parallelism), one file each."""
    decoded = dict(zip(("images", "labels"), load_split(Path(split)), strict=True))
    for out, part in zip(outs, partition_split(decoded, len(outs), seed), strict=True):
        log(f"partition {out}: {len(part['labels'])} images")
        save_torch(out, part)


def load_json(path: Path) -> dict:
    if not Path(path).is_file():
        raise DataError(f"{path} is missing; run the workflow's subset step first")
    return json.loads(Path(path).read_text())


def image_folder_loader(subset: dict, split: str, config, generator=None):
    """The naive baseline data path: torchvision ``ImageFolder``, per-image PIL transforms, ``DataLoader``.

    Reads the subset's image files for ``split`` from the source folder; training batches are
    shuffled with ``generator`` and augmented per image (random crop with padding 4, flip).
    """
    import torch
    from torchvision import datasets, transforms

    from tlselect.training.models import IMAGENET_MEAN, IMAGENET_STD

    root = Path(subset["source"]["root"])
    wanted = {str(root / rel) for rel, _ in subset["splits"][split]}
    size = config.resolution if config.resolution else 32
    steps = [transforms.Resize((size, size))]
    training = generator is not None
    if training and config.augment:
        steps += [transforms.RandomCrop(size, padding=4), transforms.RandomHorizontalFlip()]
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    folder = root / ("test" if split == "test" else "train")
    if not folder.is_dir():
        raise DataError(f"the naive data path reads {folder}, which is missing; run the workflow's fetch step")
    dataset = datasets.ImageFolder(
        str(folder), transform=transforms.Compose(steps), is_valid_file=lambda p: p in wanted, allow_empty=True
    )
    label_of = {name: i for i, name in enumerate(subset["classes"])}
    dataset.target_transform = lambda index: label_of[dataset.classes[index]]
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size if training else config.eval_batch_size,
        shuffle=training,
        drop_last=training,
        num_workers=config.workers,
        generator=generator,
        persistent_workers=config.workers > 0,
    )
