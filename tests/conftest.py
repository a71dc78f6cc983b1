"""Shared fixtures (tiny image-folder archives, decoded tensors, the default config, the tiny study
run end to end) and the tiers' marks. Shared functions and constants live in ``helpers.py``."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import REPO, default_config, snakemake, tiny_study, write_image_folder, write_study

sys.path.insert(0, str(REPO))

# The per-user plan cache (tlselect.training.plan.plan_cache_dir): never the user's own. A folder for
# the whole session (module-scoped fixtures, the snakemake runs they start), and a fresh one per test
# (_plan_cache below), so that no test finds a plan another one measured.
os.environ["TLSELECT_PLAN_CACHE"] = tempfile.mkdtemp(prefix="tlselect-plan-cache-")
atexit.register(shutil.rmtree, os.environ["TLSELECT_PLAN_CACHE"], True)
# The per-user subset cache (tlselect.data.subset_cache) likewise: never the user's, fresh per test.
os.environ["TLSELECT_SUBSET_CACHE"] = tempfile.mkdtemp(prefix="tlselect-subset-cache-")
atexit.register(shutil.rmtree, os.environ["TLSELECT_SUBSET_CACHE"], True)

# ---------------------------------------------------------------------------------------------
# Tiers: each test's marks come from its folder (and, under cluster/, its file), so that
# `pytest tests/unit` and `pytest -m "not workflow and not slurm and not browser"` select the same tests.

TESTS = Path(__file__).resolve().parent
TIER_MARKS = {
    "unit": (),
    "workflow": ("workflow",),
    "cluster/test_slurm.py": ("slurm",),
    "cluster/test_report_browser.py": ("browser",),
}


def tier_marks(path: Path) -> tuple[str, ...]:
    """The marks of the tests in ``path``: those of its file's entry in TIER_MARKS, else of its folder's."""
    relative = path.resolve().relative_to(TESTS)
    for key in (relative.as_posix(), relative.parts[0]):
        if key in TIER_MARKS:
            return TIER_MARKS[key]
    raise pytest.UsageError(
        f"tests/{relative}: not in a tier; put it under tests/unit/ or tests/workflow/, or name it in "
        "TIER_MARKS in tests/conftest.py"
    )


def pytest_collection_modifyitems(config, items):
    tiers = {name for marks in TIER_MARKS.values() for name in marks}
    for item in items:
        marks = tier_marks(item.path)
        stray = {mark.name for mark in item.iter_markers()} & tiers - set(marks)
        if stray:
            raise pytest.UsageError(f"{item.nodeid}: marked {sorted(stray)} by hand; tiers are marked by folder")
        for name in marks:
            item.add_marker(getattr(pytest.mark, name))


# ---------------------------------------------------------------------------------------------
# Data


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


@pytest.fixture
def config() -> dict:
    """The repository's config.yaml as written (no schema defaults filled in), a fresh copy per test."""
    return default_config(validated=False)


# ---------------------------------------------------------------------------------------------
# The tiny study, run end to end (workflow and browser tiers)


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_archive) -> Path:
    """The working folder of a tiny study run by snakemake: every policy, the source model, probes of
    two layers from two inits, the speedups benchmark, the plan measured (not pinned)."""
    workdir = tmp_path_factory.mktemp("study")
    overlay = tiny_study(
        tiny_archive,
        source_epochs=1,
        plan=None,
        features={"layers": ["layer2", "layer4"], "inits": ["pretrained", "scratch"], "probe": {"epochs": 2}},
        speedups={"enabled": True, "epochs": 1, "accuracy_epochs": 1},
        search={"enabled": False},  # off by default; tests/workflow/test_search_workflow.py runs it
    )
    write_study(workdir, overlay)
    snakemake(workdir)
    return workdir


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _plan_cache(tmp_path_factory, monkeypatch) -> Path:
    """A fresh, empty per-user plan cache for each test (``$TLSELECT_PLAN_CACHE``)."""
    folder = tmp_path_factory.mktemp("plan-cache")
    monkeypatch.setenv("TLSELECT_PLAN_CACHE", str(folder))
    return folder


@pytest.fixture(autouse=True)
def _subset_cache(tmp_path_factory, monkeypatch) -> Path:
    """A fresh, empty per-user subset cache for each test (``$TLSELECT_SUBSET_CACHE``)."""
    folder = tmp_path_factory.mktemp("subset-cache")
    monkeypatch.setenv("TLSELECT_SUBSET_CACHE", str(folder))
    return folder
