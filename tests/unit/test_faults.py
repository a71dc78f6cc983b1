"""Faults on disk: a full disk and a file corrupted after it was written.

A write that meets a full disk (injected by ``full_disk.py``, and for real on a small tmpfs where
mounting is allowed) keeps the previous file, leaves no temporary and names the file and its
filesystem. A checkpoint, resume file, decoded split or feature file whose bytes changed (a flipped
byte, a truncation) is refused when read, named and moved aside, and is computed anew. A write
removes the temporaries that killed writers of its target left. The same through snakemake (the
command finishes once there is space, the workflow recomputes a corrupted file with the same
result): tests/workflow/test_faults_workflow.py.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import subprocess
from pathlib import Path

import pytest
import torch
from full_disk import patches
from helpers import crash_in_epoch_two, flip_byte, quiet, small_tensors, truncate, without_timings

from tlselect.core.files import CorruptFile, DiskFull, corrupt_path, load_torch, save_torch, write_json, write_text
from tlselect.data import tensors
from tlselect.training.features import extract_range, load_features, open_features
from tlselect.training.models import StagedNet, load_state_dict_file
from tlselect.training.options import TrainConfig, resume_path
from tlselect.training.trainer import train

# ---------------------------------------------------------------------------------------------
# A full disk: one writer of each kind, small then large


def images(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))


def write_features(path: Path, n: int) -> None:
    """Layer1 activations of ``n`` images (8 KiB each as float16), as the feature cache writes them."""
    torch.manual_seed(0)
    model = StagedNet("resnet18", 3, 32)
    extract_range(model, images(n), 0, model.stage_index("layer1") + 1, path)


WRITERS = {  # kind: (file name, write(path, size)), size 1 small, 64 larger than the full disk's 256 KiB
    "json": ("record.json", lambda path, size: write_json(path, {"text": "x" * 8192 * size})),
    "text": ("summary.md", lambda path, size: write_text(path, "x" * 8192 * size)),
    "torch": ("model.pt", lambda path, size: save_torch(path, {"w": torch.ones(2048 * size)})),
    "npy": ("train.npy", lambda path, size: write_features(path, size)),
}


def check_full_disk_keeps_the_old_file(folder: Path, kind: str, fill=lambda: None) -> None:
    """Write a small file of ``kind``, ``fill`` the disk, fail to write a large one: nothing changed."""
    name, write = WRITERS[kind]
    target = folder / name
    write(target, 1)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    fill()
    with pytest.raises(DiskFull) as error:
        write(target, 64)
    message = str(error.value)
    assert f"no space left on device writing {target} (filesystem of " in message
    assert "MiB free" in message and "run the same command again" in message
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # old file (and checksum), no temporary


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_a_full_disk_keeps_the_previous_file_and_names_the_disk(tmp_path, monkeypatch, kind):
    def fill():
        for target, attribute, value in patches(str(tmp_path), free=4096):
            monkeypatch.setattr(target, attribute, value)

    check_full_disk_keeps_the_old_file(tmp_path, kind, fill)


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (needs root, as in CI); skipped where mounting is not permitted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    gc.collect()  # the failed writer's memory map, held by the caught error's frames, keeps the mount busy
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_a_real_full_filesystem_keeps_the_previous_file_and_names_it(small_disk, kind):
    check_full_disk_keeps_the_old_file(small_disk, kind)


# ---------------------------------------------------------------------------------------------
# Corruption on disk: every kind of file a later job reads, a flipped byte and a truncation


def checkpoint(path: Path):
    torch.manual_seed(0)
    save_torch(path, {"model": StagedNet("resnet18", 3, 32).net.state_dict(), "run_id": "r"})
    return load_torch


def decoded_split(path: Path):
    save_torch(path, {"images": images(16), "labels": torch.arange(16) % 3})
    return tensors.load_split


def feature_file(path: Path):
    write_features(path, 4)
    return open_features


def probe_features(path: Path):
    write_features(path, 4)
    return load_features


def source_weights(path: Path):
    checkpoint(path)
    return load_state_dict_file


FILES = {  # kind: (file name, write(path) -> the function a job reads it with)
    "checkpoint": ("results/models/run.pt", checkpoint),
    "resume file": ("results/models/run.resume.pt", checkpoint),
    "decoded split": ("results/data/train.pt", decoded_split),
    "data partition": ("results/mop/partitions/p0.pt", decoded_split),
    "feature file": ("results/features/resnet18/scratch/layer1/train.npy", feature_file),
    "probe input": ("results/features/resnet18/scratch/layer4/val.npy", probe_features),
    "weights file": ("results/source/resnet18-source.pt", source_weights),
}


@pytest.mark.parametrize("damage", [flip_byte, truncate], ids=["flipped-byte", "truncated"])
@pytest.mark.parametrize("kind", list(FILES))
def test_a_corrupted_file_is_detected_when_read_named_and_moved_aside(tmp_path, kind, damage):
    name, write = FILES[kind]
    path = tmp_path / name
    read = write(path)
    read(path)  # intact: it reads
    damage(path)
    damaged = path.read_bytes()
    with pytest.raises(CorruptFile, match="is corrupt: its content no longer matches the checksum") as error:
        read(path)
    assert str(path) in str(error.value) and f"Moved it to {path}.corrupt" in str(error.value)
    assert not path.exists() and corrupt_path(path).read_bytes() == damaged  # never read again; kept to inspect
    write(path)  # computed anew: the corrupt copy goes
    assert not corrupt_path(path).exists()
    read(path)


def test_a_file_without_a_checksum_is_read_unchecked(tmp_path):
    folder = small_tensors(tmp_path / "data")  # torch.save by hand: no sidecar
    assert tensors.load_split(folder / "train.pt")[0].shape == (24, 3, 32, 32)


@pytest.mark.parametrize("damage", [flip_byte, truncate], ids=["flipped-byte", "truncated"])
def test_a_corrupt_resume_file_is_ignored_and_the_run_starts_again(tmp_path, damage):
    cfg = TrainConfig(
        data=str(small_tensors(tmp_path / "data")), out=str(tmp_path / "killed/m.pt"), epochs=2, batch_size=8,
        device="cpu", seed=3,
    )  # fmt: skip

    crash_in_epoch_two(cfg)
    damage(resume_path(cfg))
    messages = []
    record = train(cfg, log=messages.append)
    straight = train(dataclasses.replace(cfg, out=str(tmp_path / "straight/m.pt")), log=quiet)
    warning = f"warning: {resume_path(cfg)} no longer matches its checksum; deleted it, starting over"
    assert any(warning in message for message in messages)
    assert record["resumed_from_epoch"] is None
    assert without_timings(record["curves"]) == without_timings(straight["curves"])
    assert record["metrics"] == straight["metrics"]


# ---------------------------------------------------------------------------------------------
# Killed writers: the temporaries they left are removed by the next write of their target


def test_a_write_removes_the_temporaries_killed_writers_of_its_target_left(tmp_path):
    target, other = tmp_path / "run.resume.pt", tmp_path / "run.pt"
    for stale in (".run.resume.pt.k1ll3d.tmp.pt", ".run.pt.k1ll3d.tmp.pt"):
        (tmp_path / stale).write_bytes(b"half a checkpoint")
    write_text(target, "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.pt.k1ll3d.tmp.pt", "run.resume.pt"]
    write_text(other, "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt", "run.resume.pt"]
