"""Shared fixtures: tiny image-folder archives and decoded tensors the tests generate themselves."""

from __future__ import annotations

import json
import os
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLASSES = ("cat", "dog", "frog")
# Workflow tests pin the execution plan (no calibration per test); tests/test_workflow.py's study measures it.
PINNED_PLAN = {"precision": "float32", "channels_last": False, "threads": "all", "compile": False,
               "eval_batch_size": 64}  # fmt: skip


def write_image_folder(root: Path, classes=CLASSES, train: int = 12, test: int = 6, size: int = 32) -> Path:
    """An image folder whose classes differ in mean colour (learnable), JPEG and PNG mixed."""
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", train), ("test", test)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = torch.zeros(3, size, size)
                base[label % 3] = 160
                noise = torch.randint(0, 90, (3, size, size), generator=generator)
                pixels = (base + noise).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
                suffix = ".png" if i % 2 else ".jpg"
                Image.fromarray(pixels).save(folder / f"{i:04d}{suffix}")
    return root


def tiny_data(archive: Path) -> dict:
    """The ``data`` block of a tiny study over :func:`tiny_archive` (8 train, 2 val, 4 test per class)."""
    return {"archive": str(archive), "name": "tiny", "train_per_class": 8, "val_per_class": 2, "test_per_class": 4}


def strict_json(path: Path):
    """Parse a JSON file as strict parsers do: NaN and Infinity are errors, not numbers."""

    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return json.loads(Path(path).read_text(), parse_constant=refuse)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "images")


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory) -> Path:
    """A .tar.gz holding tiny-dataset/{train,test}/<class>/*, like the offline CIFAR-10 archive."""
    base = tmp_path_factory.mktemp("archive")
    write_image_folder(base / "tiny-dataset")
    archive = base / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(base / "tiny-dataset", arcname="tiny-dataset")
    return archive


@pytest.fixture
def tensor_data(tmp_path) -> Path:
    """Decoded split files of random images (4 classes) for trainer tests."""
    generator = torch.Generator().manual_seed(1)
    out = tmp_path / "data"
    out.mkdir()
    for split, n in (("train", 96), ("val", 32), ("test", 32)):
        labels = torch.arange(n) % 4
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
        images[:, 0] = (labels[:, None, None] * 60).to(torch.uint8)  # a learnable signal
        torch.save({"images": images, "labels": labels}, out / f"{split}.pt")
    return out


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
