"""One plan per machine: the same tiny study in two fresh folders gives the same table, the second
takes the plan the first measured and its decoded subset from the per-user caches
(``$TLSELECT_PLAN_CACHE`` and ``$TLSELECT_SUBSET_CACHE``, fresh folders per test: tests/conftest.py),
and measuring again takes `snakemake plan_recalibrate`."""

from __future__ import annotations

import json

import pandas as pd
from helpers import snakemake, tiny_study, write_study

# channels_last changes a run's numbers bit for bit (tlselect.training.plan.RESULT_KNOBS): measured
# here on purpose, so that only the cache keeps the two folders' tables equal. The evaluation batch is
# pinned to keep the test quick.
PLAN = {"precision": "float32", "channels_last": "auto", "threads": "all", "compile": False, "eval_batch_size": 64,
        "cudnn_benchmark": False}  # fmt: skip
POLICIES = [
    {"name": "scratch", "init": "scratch", "freeze": "none", "lr": 0.1},
    {"name": "gentle", "init": "scratch", "freeze": "none", "lr": 0.02},
]
ACCURACY = ["run_id", "val_accuracy", "best_val_accuracy", "test_accuracy"]


def run_study(workdir, archive) -> pd.DataFrame:
    write_study(
        workdir,
        tiny_study(
            archive,
            device="cpu",
            plan=PLAN,
            train={"epochs": 2, "batch_size": 8},
            policies=POLICIES,
            features={"layers": []},
            speedups={"enabled": False},
            search={"enabled": False},
        ),
    )
    snakemake(workdir, "results/tables/runs.csv")
    return pd.read_csv(workdir / "results/tables/runs.csv").sort_values("run_id").reset_index(drop=True)


def train_logs(workdir) -> str:
    return "\n".join(log.read_text() for log in sorted((workdir / "results/logs/train").glob("*.log")))


def study_plan(workdir) -> tuple[str, dict]:
    (path,) = (workdir / "results/plans").glob("*.json")
    return path.name, json.loads(path.read_text())


def test_a_fresh_folder_reuses_the_machines_plan_and_gives_the_same_table(tmp_path, tiny_archive, _plan_cache):
    first = run_study(tmp_path / "first", tiny_archive)
    assert "plan: measuring channels_last" in train_logs(tmp_path / "first")
    (cached,) = _plan_cache.glob("*.json")
    second = run_study(tmp_path / "second", tiny_archive)
    logs = train_logs(tmp_path / "second")
    assert "plan: measuring" not in logs and f"plan: using this machine's plan from {cached}" in logs
    assert study_plan(tmp_path / "first")[1]["plan"] == study_plan(tmp_path / "second")[1]["plan"]
    assert first[ACCURACY].equals(second[ACCURACY]), f"{first[ACCURACY]}\n{second[ACCURACY]}"
    # The decoded subset too: the second folder restores it from the per-user cache, unpacking nothing.
    assert "subset cache: restored" in (tmp_path / "second/results/logs/subset.log").read_text()
    assert not (tmp_path / "second/resources").exists()
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "second/results/registry").glob("*.json"))]
    assert {r["plan"]["source"] for r in records} <= {"cache", "study"}
    assert all(r["plan"]["auto"] == ["channels_last"] for r in records)
    assert all("precision" in r["plan"]["pinned"] and "threads" in r["plan"]["pinned"] for r in records)

    # Measuring again is explicit: the cache's plan is measured anew (or kept, with the reason, when the
    # machine is too busy to measure); the study that has its copy keeps it and has nothing to redo.
    name, before = study_plan(tmp_path / "second")
    cached_before = json.loads(cached.read_text())
    result = snakemake(tmp_path / "second", "plan_recalibrate", check=False)
    log = (tmp_path / "second/results/logs/plan_recalibrate.log").read_text()
    assert "recalibrating channels_last" in log, result.stdout[-3000:] + result.stderr[-3000:]
    cached_after = json.loads(cached.read_text())
    if result.returncode == 0:
        assert "stored in" in log and cached_after["calibrations"] != cached_before["calibrations"]
    else:
        assert "recalibration refused" in log
    assert study_plan(tmp_path / "second") == (name, before)
    assert "Nothing to be done" in snakemake(tmp_path / "second", "--dry-run", "results/tables/runs.csv").stdout
