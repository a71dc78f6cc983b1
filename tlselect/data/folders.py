"""Image folders and reproducible subsets: scanning ``<root>/{train,test}/<class>/<image>``, checking
for unreadable or non-image files, the seeded stratified choice of files (``subset.json``) and the
stratified folds of cross-validation.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

from tlselect.core.errors import TLSelectError

if TYPE_CHECKING:  # torch and PIL are imported where used: config checks read archives without them
    pass


SPLITS = ("train", "test")


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"}


SKIP_NOTE = "subset.json lists what was skipped"


class DataError(TLSelectError):
    """The image data is missing, unreadable or inconsistent; the message names the fix."""


class UnreadableImages(DataError):
    """Image files that do not decode; ``files`` lists them (relative to the image folder)."""

    def __init__(self, message: str, files: list[str]):
        super().__init__(message)
        self.files = files


def non_image_files(root: Path) -> list[str]:
    """Entries of the split and class folders that are not image files, relative to ``root``."""
    root = Path(root)
    found = []
    for split in SPLITS:
        for entry in (root / split).iterdir() if (root / split).is_dir() else ():
            if entry.is_dir():
                found += [p for p in entry.iterdir() if not (p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)]
            else:
                found.append(entry)  # a file outside any class folder
    return sorted(str(p.relative_to(root)) for p in found)


def scan_image_folder(root: Path) -> dict[str, dict[str, list[str]]]:
    """``{split: {class: sorted relative file paths}}``, checked for a usable layout."""
    root = Path(root)
    layout: dict[str, dict[str, list[str]]] = {}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(f"{split_dir} is missing: an image folder needs train/<class>/* and test/<class>/*")
        classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
        if not classes:
            raise DataError(f"{split_dir} holds no class folders; expected {split_dir}/<class>/<image>")
        layout[split] = {
            c: sorted(str(p.relative_to(root)) for p in (split_dir / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            for c in classes
        }
        empty = [c for c, files in layout[split].items() if not files]
        if empty:
            raise DataError(
                f"class folders without images in {split_dir}: {', '.join(empty)}; add images or remove the folders"
            )
    if list(layout["train"]) != list(layout["test"]):
        only_train = sorted(set(layout["train"]) - set(layout["test"]))
        only_test = sorted(set(layout["test"]) - set(layout["train"]))
        raise DataError(
            f"class folders differ between {root}/train and {root}/test: only in train {only_train}, "
            f"only in test {only_test}; every class needs a folder in both splits: rename or remove the odd ones"
        )
    return layout


def checksum_files(root: Path, files: list[str]) -> str:
    """SHA-256 over the relative paths and contents of ``files`` (in the given order)."""
    digest = hashlib.sha256()
    for rel in files:
        digest.update(rel.encode() + b"\0")
        digest.update((root / rel).read_bytes())
    return digest.hexdigest()


def make_subset(
    root: Path,
    classes: list[str] | None,
    train_per_class: int,
    val_per_class: int,
    test_per_class: int,
    seed: int,
    exclude: Collection[str] = (),
) -> dict:
    """A seeded, stratified subset: per class, ``train_per_class`` files from train/ (of which
    ``val_per_class`` become the validation split) and ``test_per_class`` files from test/.

    ``classes`` restricts the task (``None``: every class in the folder, in sorted order; a
    CIFAR-10 folder sorts in its label order). Files in ``exclude`` (unreadable ones being skipped)
    are never picked. The result is JSON-ready and byte-stable.
    """
    layout = scan_image_folder(root)
    excluded = set(exclude)
    available = list(layout["train"])
    classes = list(classes) if classes else available
    unknown = [c for c in classes if c not in available]
    if unknown:
        raise DataError(f"data.classes names classes not in {root}: {unknown}; available: {available}")
    rng = random.Random(seed)
    chosen: dict[str, list[list]] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(classes):
        wanted = {"train": train_per_class, "test": test_per_class}
        picked = {}
        for split, count in wanted.items():
            files = [f for f in layout[split][name] if f not in excluded]
            if count > len(files):
                raise DataError(
                    f"class {name!r} has {len(files)} images in {split}/ but the subset asks for {count}; "
                    "lower data.train_per_class or data.test_per_class"
                )
            picked[split] = sorted(rng.sample(files, count))
        shuffled = picked["train"][:]
        rng.shuffle(shuffled)
        chosen["val"] += [[f, label] for f in sorted(shuffled[:val_per_class])]
        chosen["train"] += [[f, label] for f in sorted(shuffled[val_per_class:])]
        chosen["test"] += [[f, label] for f in picked["test"]]
    all_files = [f for split in SPLITS for c in available for f in layout[split][c]]
    return {
        "seed": seed,
        "classes": classes,
        "sizes": {"train_per_class": train_per_class, "val_per_class": val_per_class, "test_per_class": test_per_class},
        "source": {"root": str(root), "files": len(all_files), "sha256": checksum_files(root, all_files)},
        "splits": chosen,
    }


def stratified_folds(labels: list[int], k: int, seed: int) -> list[int]:
    """The fold (1..k) of each image: per class, its images in a seeded random order dealt out to
    the folds in turn, so the folds are disjoint, cover every image, and each holds every class in
    proportion (class sizes differ by at most one image between folds)."""
    rng = random.Random(seed)
    folds = [0] * len(labels)
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(members)
        for turn, index in enumerate(members):
            folds[index] = turn % k + 1
    return folds


def source_task_files(
    subset: dict,
    root: Path,
    classes: list[str],
    per_class: int,
    val_per_class: int,
    seed: int,
    exclude: Collection[str] = (),
):
    """Train-split files outside the target subset, for pretraining a source model (disjoint images).

    ``per_class`` files per class, of which ``val_per_class`` become the source validation split;
    files in ``exclude`` (unreadable ones being skipped) are never picked.

    Returns ``{"train": [[file, label]...], "val": [...]}`` with labels indexing ``classes``.
    """
    layout = scan_image_folder(root)
    used = {f for split in ("train", "val") for f, _ in subset["splits"][split]} | set(exclude)
    rng = random.Random(seed + 1)
    out: dict[str, list[list]] = {"train": [], "val": []}
    for label, name in enumerate(classes):
        if name not in layout["train"]:
            raise DataError(f"source.classes names {name!r}, which is not a class in {root}/train")
        free = [f for f in layout["train"][name] if f not in used]
        need = per_class
        if need > len(free):
            raise DataError(
                f"class {name!r} has only {len(free)} training images outside the target subset; "
                f"the source task asks for {need}: lower source.train_per_class or source.val_per_class"
            )
        picked = rng.sample(free, need)
        out["val"] += [[f, label] for f in sorted(picked[:val_per_class])]
        out["train"] += [[f, label] for f in sorted(picked[val_per_class:])]
    return out


def check_non_images(root: Path, skip_unreadable: bool = False) -> list[str]:
    """The folder's non-image files (:func:`non_image_files`): an error naming them, unless skipped."""
    strays = non_image_files(root)
    if strays and not skip_unreadable:
        listed = ", ".join(strays[:10]) + (f" and {len(strays) - 10} more" if len(strays) > 10 else "")
        raise DataError(
            f"{len(strays)} non-image file(s) in the image folder {root}: {listed}. Image files end in "
            f"{', '.join(sorted(IMAGE_SUFFIXES))}; remove the others, or set data.skip_unreadable: true to "
            f"leave them out ({SKIP_NOTE})."
        )
    return strays
