"""Faults on disk through snakemake: a training job whose checkpoint finds the disk full
fails naming the file, and the same command finishes once there is space; a corrupted file stops the
job that reads it, and the next run of the workflow computes it again with the same result. (Each
writer and reader on its own: tests/unit/test_faults.py.)
"""

from __future__ import annotations

from pathlib import Path

import yaml
from full_disk import sitecustomize
from helpers import flip_byte, make_study, quiet, snakemake, snakemake_env, truncate, without_timings

from tlselect.core.files import corrupt_path, load_torch
from tlselect.core.registry import read_record
from tlselect.training.options import TrainConfig
from tlselect.training.trainer import train


def test_a_training_job_whose_checkpoint_finds_the_disk_full_finishes_once_there_is_space(tmp_path, tiny_archive):
    workdir = tmp_path / "study"
    (run_id,) = make_study(workdir, tiny_archive, [{"name": "steady", "init": "scratch", "freeze": "none"}], epochs=3)
    target, log = f"results/registry/{run_id}.json", workdir / f"results/logs/train/{run_id}.log"
    hook = sitecustomize(tmp_path / "hook", part=f"/.{run_id}.pt.", free=0)  # the checkpoint's temporary file
    full = snakemake(workdir, target, env=snakemake_env(PYTHONPATH=str(hook)), check=False)
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


def results(workdir: Path) -> dict:
    """Every record's metrics and curves (timings left out), by run id."""
    records = (read_record(p) for p in sorted((workdir / "results/registry").glob("*.json")))
    return {r["run_id"]: (r["metrics"], without_timings(r["curves"])) for r in records}


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
