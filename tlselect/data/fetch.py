"""Fetching the image folder: torchvision's CIFAR-10 download, or a local archive unpacked safely.

The source data is always an image folder ``<root>/{train,test}/<class>/<image>``.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tarfile
import tempfile
import urllib.request
import zipfile
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from tlselect.data.folders import IMAGE_SUFFIXES, SPLITS, DataError, scan_image_folder

if TYPE_CHECKING:  # torch and PIL are imported where used: config checks read archives without them
    pass


OFFLINE_HINT = (
    "Without a network, either set data.archive in the config to a local image-folder archive "
    "(.tar, .tar.gz or .zip holding train/<class>/* and test/<class>/*), e.g. "
    "--config 'data={archive: /path/to/cifar10-jpg.tar.gz}', or put the image folder itself at "
    "resources/<data.name>/ (train/<class>/*, test/<class>/*) before running the workflow."
)


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


def _print(message: str) -> None:
    print(message, flush=True)


def fetch_image_folder(dest: Path, archive: Path | None = None, log=_print) -> dict[str, int]:
    """Create the image folder ``dest``: extract ``archive`` (:func:`extract_archive`), or without one
    download CIFAR-10 (:func:`fetch_cifar10`); say what it holds. Returns the images per split."""
    dest = Path(dest)
    if archive:
        log(f"extracting {archive} into {dest}")
        extract_archive(Path(archive), dest)
    else:
        log(f"downloading CIFAR-10 with torchvision into {dest}")
        fetch_cifar10(dest)
    layout = scan_image_folder(dest)
    counts = {split: sum(len(f) for f in classes.values()) for split, classes in layout.items()}
    log(f"image folder ready: {len(layout['train'])} classes, {counts}")
    return counts


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
    return {
        split: {c: len(files) for c, files in classes.items()} for split, classes in archive_images(archive).items()
    }


def archive_images(archive: Path) -> dict[str, dict[str, list[str]]]:
    """``{split: {class: [image path inside the image folder, e.g. train/cat/0001.jpg]}}`` of an archive."""
    stat = Path(archive).stat()
    return _archive_images(str(Path(archive).resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=4)
def _archive_images(archive: str, size: int, mtime_ns: int) -> dict[str, dict[str, list[str]]]:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = [info.filename for info in zf.infolist() if not info.is_dir()]
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            names = [member.name for member in tf if member.isfile()]
    else:
        raise DataError(f"data.archive {archive} is neither a tar nor a zip archive")
    by_root: dict[tuple, dict[str, dict[str, list[str]]]] = {}
    for name in names:
        parts = PurePosixPath(name).parts
        for depth in (0, 1):
            if len(parts) == depth + 3 and parts[depth] in SPLITS and Path(parts[-1]).suffix.lower() in IMAGE_SUFFIXES:
                files = by_root.setdefault(parts[:depth], {split: {} for split in SPLITS})[parts[depth]]
                files.setdefault(parts[depth + 1], []).append("/".join(parts[depth:]))
    roots = sorted(root for root, files in by_root.items() if files["train"])
    return by_root[roots[0]] if roots else {split: {} for split in SPLITS}
