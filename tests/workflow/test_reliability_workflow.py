"""Failure and recovery through snakemake, on the tiny generated archive: a training job
SIGKILLed under snakemake resumes; two training jobs run in parallel without interfering, one of them
diverges and tables, figures and notebook show it; no reader ever sees a half-written output; a bad
config stops snakemake before any job. (The same faults without snakemake: tests/unit/test_reliability.py.)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import (
    make_study,
    quiet,
    snakemake,
    snakemake_command,
    snakemake_env,
    strict_json,
    without_timings,
)

from tlselect.core.files import load_torch
from tlselect.core.registry import read_record
from tlselect.training.options import TrainConfig
from tlselect.training.trainer import train

STUDY_FIGURES = ("accuracy_vs_time", "accuracy_by_policy", "validation_curves", "accuracy_by_layer")


def train_processes(workdir: Path) -> list[int]:
    """Pids of the ``scripts/train.py`` interpreters running in ``workdir`` (read from /proc).

    A child an interpreter forks shows the same command line until it execs (torch runs
    ``ldconfig -p`` at import, ``platform.processor()`` runs ``uname -p``): more pids than jobs.
    """
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if len(argv) > 1 and argv[1].endswith(b"scripts/train.py") and os.readlink(entry / "cwd") == str(workdir):
                pids.append(int(entry.name))
        except OSError:  # gone meanwhile
            continue
    return pids


# ---------------------------------------------------------------------------------------------
# Resume: SIGKILL a real training job under snakemake, re-run, get the uninterrupted result


def test_sigkilled_training_job_resumes_through_snakemake(tmp_path, tiny_archive):
    workdir = tmp_path / "study"
    (run_id,) = make_study(workdir, tiny_archive, [{"name": "steady", "init": "scratch", "freeze": "none"}], epochs=6)
    target = f"results/registry/{run_id}.json"
    resume_file = workdir / f"results/models/{run_id}.resume.pt"

    job = subprocess.Popen(
        snakemake_command(workdir, target),
        cwd=workdir,
        env=snakemake_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: snakemake, the job's shell, python, tee
    )
    deadline = time.monotonic() + 300
    while not resume_file.is_file():  # the first epoch checkpoint: the job is mid-run
        assert job.poll() is None, "snakemake ended before the first epoch checkpoint"
        assert time.monotonic() < deadline, "no epoch checkpoint after 300 s"
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)  # like a node crash: the job and snakemake die at once
    job.wait()
    for pid in train_processes(workdir):  # belt and braces: nothing of the killed job survives
        with contextlib.suppress(ProcessLookupError):  # it may be exiting already
            os.kill(pid, signal.SIGKILL)

    done = len(load_torch(resume_file)["curves"])
    assert 1 <= done < 6
    assert not (workdir / target).exists()

    locked = snakemake(workdir, target, check=False)  # a killed snakemake leaves its lock behind
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
    snakemake(workdir, "--unlock")
    snakemake(workdir, target, "--rerun-incomplete")

    record = read_record(workdir / target)
    assert record["status"] == "completed" and record["resumed_from_epoch"] == done
    assert f"resuming after epoch {done}" in (workdir / f"results/logs/train/{run_id}.log").read_text()
    assert not resume_file.exists()  # cleaned after success
    assert record["seed"] == 0

    settings = {**record["config"], "data": str(workdir / "results/data"), "out": str(tmp_path / "straight.pt")}
    straight = train(TrainConfig(**{**settings, "record": ""}), log=quiet)
    assert straight["resumed_from_epoch"] is None
    assert without_timings(record["curves"]) == without_timings(straight["curves"])  # losses and LR schedule
    assert record["metrics"] == straight["metrics"]


# ---------------------------------------------------------------------------------------------
# Two training jobs in parallel; one of them diverges; tables, figures and notebook follow


def job_interval(workdir: Path, run_id: str) -> tuple[float, float]:
    """When the training job of ``run_id`` ran, from its Snakemake benchmark file.

    The file holds the job's wall time in seconds (``s``), and Snakemake touches it as the job ends.
    """
    path = workdir / f"results/benchmarks/train/{run_id}.tsv"
    end = path.stat().st_mtime
    return end - float(pd.read_csv(path, sep="\t")["s"].iloc[0]), end


@pytest.fixture(scope="module")
def parallel_study(tmp_path_factory, tiny_archive):
    """The whole workflow with two policies, run with --cores 2 while its outputs are watched."""
    workdir = tmp_path_factory.mktemp("parallel")
    ids = make_study(
        workdir,
        tiny_archive,
        [
            {"name": "steady", "init": "scratch", "freeze": "none"},
            {"name": "wild", "init": "scratch", "freeze": "none", "lr": 1.0e6},  # diverges
        ],
        epochs=3,
    )
    seen = {"notebook_job": 0, "notebooks": 0, "partial": []}
    job = subprocess.Popen(
        snakemake_command(workdir, "results/report/solution.html", "results/tables/summary.md"),
        cwd=workdir,
        env=snakemake_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = []
    reader = threading.Thread(target=lambda: output.extend(job.stdout), daemon=True)
    reader.start()
    notebook = workdir / "results/report/solution.ipynb"

    def look():
        if notebook.parent.is_dir() and not notebook.with_suffix(".html").exists():
            seen["notebook_job"] += 1  # the notebook job runs: Snakemake made its output folder, the HTML is not there
        records = [p for p in workdir.glob("results/registry/*.json") if not p.name.startswith(".")]  # no temporaries
        for path in [notebook, *records, workdir / "results/data/subset.json"]:
            try:
                text = path.read_text()
            except FileNotFoundError:
                continue
            try:
                content = json.loads(text)
            except json.JSONDecodeError:
                seen["partial"].append(str(path))
                continue
            if path == notebook:
                seen["notebooks"] += 1
                code = [c for c in content["cells"] if c["cell_type"] == "code"]
                if any(c.get("execution_count") is None for c in code):
                    seen["partial"].append(f"{path} (cells not yet executed)")

    while job.poll() is None:
        look()
        time.sleep(0.05)
    look()  # and once after the end, when every output is in place
    reader.join(timeout=10)
    assert job.returncode == 0, "".join(output)[-6000:]
    by_policy = {spec.name: run_id for run_id, spec in ids.items()}
    return workdir, by_policy, seen


def test_two_training_jobs_run_in_parallel_without_interfering(parallel_study):
    workdir, by_policy, _ = parallel_study
    (start_a, end_a), (start_b, end_b) = (job_interval(workdir, run_id) for run_id in by_policy.values())
    assert start_a < end_b and start_b < end_a, f"the two training jobs never ran at the same time: {by_policy}"
    for policy, run_id in by_policy.items():
        record = read_record(workdir / f"results/registry/{run_id}.json")
        assert record["run_id"] == run_id and record["name"] == policy and record["kind"] == "policy"
        checkpoint = load_torch(workdir / f"results/models/{run_id}.pt")
        assert checkpoint["run_id"] == run_id and checkpoint["status"] == record["status"]
    leftovers = [p.name for folder in ("models", "registry") for p in (workdir / "results" / folder).iterdir()]
    expected = (".pt", ".pt.crc32", ".json")  # checkpoint, its checksum, record
    assert sorted(leftovers) == sorted(f"{r}{s}" for r in by_policy.values() for s in expected)
    # and the parallel run gives exactly what a run on its own gives
    record = read_record(workdir / f"results/registry/{by_policy['steady']}.json")
    alone = dict(record["config"], data=str(workdir / "results/data"), out=str(workdir / "alone.pt"), record="")
    reference = train(TrainConfig(**alone), log=quiet)
    assert record["metrics"] == reference["metrics"]
    assert without_timings(record["curves"]) == without_timings(reference["curves"])


def test_diverged_run_is_recorded_and_shown_in_tables_figures_and_notebook(parallel_study):
    workdir, by_policy, _ = parallel_study
    record = read_record(workdir / f"results/registry/{by_policy['wild']}.json")
    assert record["status"] == "diverged" and record["metrics"]["test_accuracy"] is None
    assert (
        "the run diverged; lower the learning rate"
        in (workdir / f"results/logs/train/{by_policy['wild']}.log").read_text()
    )
    table = pd.read_csv(workdir / "results/tables/runs.csv").set_index("name")
    assert table.loc["wild", "status"] == "diverged" and not table.loc["wild", "selected"]
    assert table.loc["steady", "status"] == "completed" and table.loc["steady", "selected"]
    assert "**Diverged**: wild" in (workdir / "results/tables/summary.md").read_text()
    for figure in STUDY_FIGURES:
        assert (workdir / f"results/figures/{figure}.png").read_bytes()[:4] == b"\x89PNG"
    notebook = json.loads((workdir / "results/report/solution.ipynb").read_text())
    outputs = "".join(json.dumps(cell.get("outputs", [])) for cell in notebook["cells"])
    assert "**Diverged**: wild" in outputs and "Traceback" not in outputs


def test_no_reader_sees_a_half_written_notebook_record_or_subset(parallel_study):
    workdir, _, seen = parallel_study
    assert seen["notebook_job"] > 0, "the outputs were never watched while the notebook job ran"
    assert seen["notebooks"] > 0 and seen["partial"] == []
    assert not list((workdir / "results").rglob(".*.tmp*")) and not list((workdir / "results").rglob(".notebook.*"))
    assert (workdir / "results/report/solution.html").stat().st_size > 10_000


def test_every_json_output_is_strict_and_a_diverged_loss_is_null(parallel_study):
    workdir, by_policy, _ = parallel_study
    outputs = sorted((workdir / "results").rglob("*.json"))
    assert len(outputs) == 3  # subset.json and the two records
    for path in outputs:
        strict_json(path)  # NaN or Infinity would raise
    wild = strict_json(workdir / f"results/registry/{by_policy['wild']}.json")
    assert wild["status"] == "diverged"
    assert None in [curve[loss] for curve in wild["curves"] for loss in ("train_loss", "val_loss")]


def test_every_record_carries_the_seed(parallel_study):
    workdir, by_policy, _ = parallel_study
    subset = json.loads((workdir / "results/data/subset.json").read_text())
    for run_id in by_policy.values():
        record = read_record(workdir / f"results/registry/{run_id}.json")
        assert record["seed"] == record["config"]["seed"] == subset["seed"] == 0


def test_bad_config_stops_snakemake_before_any_job(tmp_path, tiny_archive):
    make_study(tmp_path, tiny_archive, [{"name": "steady", "init": "scratch", "freeze": "none"}])
    tiny = yaml.safe_load((tmp_path / "tiny.yaml").read_text())
    tiny["data"]["train_per_class"] = 50
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    result = snakemake(tmp_path, check=False)
    assert result.returncode != 0
    assert "invalid configuration: data.train_per_class" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "resources").exists()
