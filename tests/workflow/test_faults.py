"""Faults on disk (issue 16): a full disk and a file corrupted after it was written.

A write that meets a full disk (injected by ``full_disk.py``, and for real on a small tmpfs where
mounting is allowed) keeps the previous file, leaves no temporary and names the file and its
filesystem; the same command finishes once there is space. A checkpoint, resume file, decoded
split or feature file whose bytes changed (a flipped byte, a truncation) is refused when read,
named and moved aside, and the next run of the workflow computes it again with the same result.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from full_disk import patches, sitecustomize
from test_reliability import (
    crash_in_epoch_two,
    make_study,
    quiet,
    small_tensors,
    snakemake,
    snakemake_command,
    snakemake_env,
    without_timings,
)

from tlselect.core.files import CorruptFile, DiskFull, corrupt_path, load_torch, save_torch, write_json, write_text
from tlselect.core.registry import read_record
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


@pytest.mark.workflow
def test_a_training_job_whose_checkpoint_finds_the_disk_full_finishes_once_there_is_space(tmp_path, tiny_archive):
    workdir = tmp_path / "study"
    (run_id,) = make_study(workdir, tiny_archive, [{"name": "steady", "init": "scratch", "freeze": "none"}], epochs=3)
    target, log = f"results/registry/{run_id}.json", workdir / f"results/logs/train/{run_id}.log"
    hook = sitecustomize(tmp_path / "hook", part=f"/.{run_id}.pt.", free=0)  # the checkpoint's temporary file
    env = dict(snakemake_env(), PYTHONPATH=str(hook))
    full = subprocess.run(snakemake_command(workdir, target), cwd=workdir, env=env, capture_output=True, text=True)
    assert full.returncode != 0
    assert f"error: no space left on device writing results/models/{run_id}.pt (filesystem of " in log.read_text()
    models = workdir / "results/models"
    assert sorted(p.name for p in models.iterdir()) == [f"{run_id}.resume.pt", f"{run_id}.resume.pt.crc32"]
    done = len(load_torch(models / f"{run_id}.resume.pt")["curves"])

    snakemake(workdir, target)  # space freed: the same command
    record = read_record(workdir / target)
    assert record["status"] == "completed" and record["resumed_from_epoch"] == done
    settings = {**record["config"], "data": str(workdir / "results/data"), "out": str(tmp_path / "straight.pt")}
    straight = train(TrainConfig(**{**settings, "record": ""}), log=quiet)
    assert without_timings(record["curves"]) == without_timings(straight["curves"])
    assert record["metrics"] == straight["metrics"]
    assert sorted(p.name for p in models.iterdir()) == [f"{run_id}.pt", f"{run_id}.pt.crc32"]
    load_torch(models / f"{run_id}.pt")  # and it matches its checksum


# ---------------------------------------------------------------------------------------------
# Corruption on disk: every kind of file a later job reads, a flipped byte and a truncation


def flip_byte(path: Path) -> None:
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0x01
    path.write_bytes(bytes(content))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


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


def results(workdir: Path) -> dict:
    """Every record's metrics and curves (timings left out), by run id."""
    records = (read_record(p) for p in sorted((workdir / "results/registry").glob("*.json")))
    return {r["run_id"]: (r["metrics"], without_timings(r["curves"])) for r in records}


@pytest.mark.workflow
def test_the_workflow_recomputes_a_corrupted_file_and_gets_the_same_results(tmp_path, tiny_archive):
    workdir = tmp_path / "study"
    make_study(workdir, tiny_archive, [{"name": "steady", "init": "scratch", "freeze": "none"}], epochs=2)
    study = yaml.safe_load((workdir / "tiny.yaml").read_text())
    study["features"] = {"layers": ["layer1"], "inits": ["scratch"], "probe": {"epochs": 2}}
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(study))
    snakemake(workdir)  # the default target, as the README runs it
    uninterrupted = results(workdir)
    assert len(uninterrupted) == 2  # the policy and the probe

    for name, damage in [
        ("results/features/resnet18/scratch/layer1/train.npy", flip_byte),  # read by the probe
        ("results/data/train.pt", truncate),  # read by every job after the subset
    ]:
        path = workdir / name
        written = path.read_bytes()
        damage(path)
        refused = snakemake(workdir, check=False)  # the job that reads it stops, naming it
        assert refused.returncode != 0 and f"error: {name} is corrupt" in refused.stdout + refused.stderr
        assert corrupt_path(path).is_file() and not path.exists()
        snakemake(workdir)  # the same command computes it anew, and what reads it
        assert path.read_bytes() == written and not corrupt_path(path).exists()
        assert results(workdir) == uninterrupted
