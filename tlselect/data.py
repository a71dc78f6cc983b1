"""Image data: fetch (torchvision download or a local archive), reproducible subsets, uint8 tensors.

The source data is always an image folder ``<root>/{train,test}/<class>/<image>``. A subset is a
seeded, stratified choice of files from it (``subset.json``); it is decoded once into uint8 NCHW
tensors (``{split}.pt``) that every later step reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import stat
import subprocess
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Collection
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from tlselect.atomic import load_torch
from tlselect.errors import TLSelectError

if TYPE_CHECKING:  # torch and PIL are imported where used: config checks read archives without them
    import torch

SPLITS = ("train", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"}
OFFLINE_HINT = (
    "Without a network, either set data.archive in the config to a local image-folder archive "
    "(.tar, .tar.gz or .zip holding train/<class>/* and test/<class>/*), e.g. "
    "--config 'data={archive: /path/to/cifar10-jpg.tar.gz}', or put the image folder itself at "
    "resources/<data.name>/ (train/<class>/*, test/<class>/*) before running the workflow."
)


SKIP_NOTE = "subset.json lists what was skipped"


class DataError(TLSelectError):
    """The image data is missing, unreadable or inconsistent; the message names the fix."""


class UnreadableImages(DataError):
    """Image files that do not decode; ``files`` lists them (relative to the image folder)."""

    def __init__(self, message: str, files: list[str]):
        super().__init__(message)
        self.files = files


# ---------------------------------------------------------------------------------------------
# Fetching


def fetch_cifar10(dest: Path, timeout: float = 20.0, connect_timeout: float = 5.0) -> None:
    """Download CIFAR-10 with torchvision and write it as an image folder (PNG) at ``dest``.

    Without a network this fails within ``connect_timeout`` seconds, naming the offline options:
    torchvision alone would retry each URL (https, then http), waiting ``timeout`` every time.
    """
    import torchvision
    from PIL import Image

    url = urlparse(torchvision.datasets.CIFAR10.url)
    hop = urlparse(urllib.request.getproxies().get(url.scheme) or url.geturl())  # a proxy, if one is set
    try:
        port = hop.port or (443 if hop.scheme == "https" else 80)
        socket.create_connection((hop.hostname, port), timeout=connect_timeout).close()
    except OSError as error:
        raise DataError(
            f"cannot reach {hop.hostname} to download CIFAR-10 ({type(error).__name__}: {error}). {OFFLINE_HINT}"
        ) from error
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            try:
                sets = {s: torchvision.datasets.CIFAR10(tmp, train=s == "train", download=True) for s in SPLITS}
            except Exception as error:  # URLError, timeouts, DNS failures: all mean "no data"
                raise DataError(
                    f"downloading CIFAR-10 failed ({type(error).__name__}: {error}). {OFFLINE_HINT}"
                ) from error
            staging = Path(tmp) / "folder"
            for split, dataset in sets.items():
                for index, (array, label) in enumerate(zip(dataset.data, dataset.targets, strict=True)):
                    out = staging / split / dataset.classes[label] / f"{index:05d}.png"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(array).save(out)
            _move_into_place(staging, dest)
    finally:
        socket.setdefaulttimeout(previous)


def extract_archive(archive: Path, dest: Path) -> None:
    """Extract an image-folder archive (.tar, .tar.gz, .tgz, .zip) so that ``dest/train`` exists."""
    if not archive.is_file():
        raise DataError(f"data.archive {archive} does not exist. {OFFLINE_HINT}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)
        elif tarfile.is_tarfile(archive):
            if not _system_tar(archive, Path(tmp)):
                with tarfile.open(archive) as tf:
                    tf.extractall(tmp, filter="data")
        else:
            raise DataError(f"data.archive {archive} is neither a tar nor a zip archive")
        candidates = [Path(tmp), *sorted(p for p in Path(tmp).iterdir() if p.is_dir())]
        root = next((c for c in candidates if (c / "train").is_dir()), None)
        if root is None:
            raise DataError(
                f"archive {archive} holds no train/ folder at its top level or one level down; "
                "expected train/<class>/* and test/<class>/*"
            )
        _move_into_place(root, dest)


def _system_tar(archive: Path, into: Path) -> bool:
    """Extract with the system's tar; False (and ``into`` emptied) where there is none, it fails, or
    it left anything but plain folders and files: then tarfile's "data" filter decides.

    tar unpacks CIFAR-10's 60,000 images about twice as fast (4.8 against 10.4 s on 2 cores). GNU and
    BSD tar skip absolute and ``..`` member names themselves.
    """
    tar = shutil.which("tar")
    if tar:
        done = subprocess.run(
            [tar, "-xf", str(archive), "-C", str(into), "--no-same-owner", "--no-same-permissions"],
            capture_output=True,
        )
        if done.returncode == 0 and _only_folders_and_files(into):
            return True
        for entry in into.iterdir():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    return False


def _only_folders_and_files(root: Path) -> bool:
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            mode = os.lstat(os.path.join(folder, name)).st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                return False
    return True


def _move_into_place(staging: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.move(str(staging), str(dest))


def archive_image_counts(archive: Path) -> dict[str, dict[str, int]]:
    """``{split: {class: images}}`` of an image-folder archive, from its member list (nothing extracted).

    Finds train/ and test/ where :func:`extract_archive` does: at the top level or one folder down.
    Listing the 60,000-image CIFAR-10 .tar.gz takes about 1.5 s, so results are cached per file version.
    """
    stat = Path(archive).stat()
    return _archive_image_counts(str(Path(archive).resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=4)
def _archive_image_counts(archive: str, size: int, mtime_ns: int) -> dict[str, dict[str, int]]:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = [info.filename for info in zf.infolist() if not info.is_dir()]
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            names = [member.name for member in tf if member.isfile()]
    else:
        raise DataError(f"data.archive {archive} is neither a tar nor a zip archive")
    by_root: dict[tuple, dict[str, dict[str, int]]] = {}
    for name in names:
        parts = PurePosixPath(name).parts
        for depth in (0, 1):
            if len(parts) == depth + 3 and parts[depth] in SPLITS and Path(parts[-1]).suffix.lower() in IMAGE_SUFFIXES:
                counts = by_root.setdefault(parts[:depth], {split: {} for split in SPLITS})[parts[depth]]
                counts[parts[depth + 1]] = counts.get(parts[depth + 1], 0) + 1
    roots = sorted(root for root, counts in by_root.items() if counts["train"])
    return by_root[roots[0]] if roots else {split: {} for split in SPLITS}


# ---------------------------------------------------------------------------------------------
# Scanning and subsets


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


# ---------------------------------------------------------------------------------------------
# Decoding and loading


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

    from tlselect.models import IMAGENET_MEAN, IMAGENET_STD

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
