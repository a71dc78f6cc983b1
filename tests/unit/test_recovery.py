"""What a run does with what an earlier one left (tlselect.core.recovery): stale ``*.corrupt`` markers
are moved aside, Snakemake's incomplete marks of outputs written whole are dropped, and the SLURM jobs
of a dead run in the same folder are found and waited for. Through Snakemake:
tests/workflow/test_recovery_workflow.py and tests/cluster/test_slurm.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import MethodType, SimpleNamespace

import pytest
import torch
from snakemake.persistence.file import FilePersistence

from tlselect.core import recovery
from tlselect.core.files import checksum_path, save_torch, write_json


def test_set_aside_keeps_the_path_under_results():
    assert recovery.set_aside_path("results/models/a.pt.corrupt") == Path("results/.set-aside/models/a.pt.corrupt")
    assert recovery.set_aside_path("resources/weights/w.pth.corrupt") == Path(
        "results/.set-aside/resources/weights/w.pth.corrupt"
    )


def test_stale_corrupt_markers_are_moved_aside_and_the_others_stay_targets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("results/models/kept.pt", "results/models/gone.pt", "resources/weights/gone.pth"):
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{name}.corrupt").write_text("damaged")
        checksum_path(name).write_text("00000000  x\n")
    Path("results/.set-aside/models").mkdir(parents=True)
    Path("results/.set-aside/models/old.pt.corrupt").write_text("set aside before")  # never found again
    markers = recovery.corrupt_markers()
    gone = ["resources/weights/gone.pth.corrupt", "results/models/gone.pt.corrupt"]
    assert markers == [*gone, "results/models/kept.pt.corrupt"]

    lines = []
    made = {"results/models/kept.pt"}.__contains__
    assert recovery.corrupt_targets(markers, made, dry_run=True, log=lines.append) == ["results/models/kept.pt"]
    assert all(Path(marker).is_file() for marker in markers) and len(lines) == 2  # a dry run moves nothing
    assert "results/models/gone.pt.corrupt: no rule of this configuration makes results/models/gone.pt any more; " \
        "a run moves it aside to results/.set-aside/models/gone.pt.corrupt" in lines  # fmt: skip

    lines.clear()
    assert recovery.corrupt_targets(markers, made, log=lines.append) == ["results/models/kept.pt"]
    assert lines == [
        "resources/weights/gone.pth.corrupt: no rule of this configuration makes resources/weights/gone.pth any "
        "more; moved it aside to results/.set-aside/resources/weights/gone.pth.corrupt",
        "results/models/gone.pt.corrupt: no rule of this configuration makes results/models/gone.pt any more; "
        "moved it aside to results/.set-aside/models/gone.pt.corrupt",
    ]
    assert Path("results/.set-aside/models/gone.pt.corrupt").read_text() == "damaged"
    assert Path("results/.set-aside/models/gone.pt.crc32").is_file()  # the checksum it failed goes with it
    assert not Path("results/models/gone.pt.crc32").exists()
    assert Path("results/models/kept.pt.corrupt").is_file() and Path("results/models/kept.pt.crc32").is_file()
    assert recovery.corrupt_markers() == ["results/models/kept.pt.corrupt"]
    assert recovery.corrupt_targets(markers, made, log=lines.append) == ["results/models/kept.pt"]  # idempotent


def mark_incomplete(folder: Path, path: str) -> Path:
    """Snakemake's own incomplete mark of ``path`` (its file persistence backend's naming)."""
    persistence = SimpleNamespace(_max_len=None)  # what of a FilePersistence its naming needs
    persistence._fetch_max_len = MethodType(FilePersistence._fetch_max_len, persistence)
    mark = Path(FilePersistence._record_path(persistence, str(folder), path))
    mark.parent.mkdir(parents=True, exist_ok=True)
    mark.write_text('{"external_jobid": null}')
    return mark


def test_incomplete_marks_are_read_as_snakemake_writes_them(tmp_path):
    folder = tmp_path / "incomplete"
    folder.mkdir()
    long = "results/search/" + "x/" * 150 + "slot0.pt"  # its mark is split into folders of @-pieces
    marks = {path: mark_incomplete(folder, path) for path in ("results/models/a.pt", long)}
    (folder / "migration_underway").write_text("")  # Snakemake's own flag: no mark
    assert recovery.marked_incomplete(folder) == marks
    assert marks[long].parent != folder


def test_only_outputs_written_whole_lose_their_incomplete_mark(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = Path(".snakemake/incomplete")
    folder.mkdir(parents=True)
    save_torch("results/models/whole.pt", {"w": torch.ones(3)})
    save_torch("results/models/damaged.pt", {"w": torch.ones(3)})
    Path("results/models/damaged.pt").write_bytes(b"truncated")
    write_json("results/registry/whole.json", {"status": "completed"})
    Path("results/data").mkdir(parents=True)  # a folder output is never taken as whole
    complete = ["results/models/whole.pt", "results/registry/whole.json", "results/search/" + "y/" * 150 + "r.json"]
    write_json(complete[2], {})
    incomplete = ["results/models/damaged.pt", "results/models/missing.pt", "results/data"]
    marks = {path: mark_incomplete(folder, path) for path in complete + incomplete}

    lines = []
    assert recovery.keep_complete_outputs(folder, log=lines.append) == sorted(complete)
    assert sorted(recovery.marked_incomplete(folder)) == sorted(incomplete)
    assert not marks[complete[2]].parent.exists()  # the long name's @-folders went with its mark
    assert lines == [f"kept 3 output(s) an interrupted job wrote whole (marked incomplete): {' '.join(complete)}"]
    assert recovery.keep_complete_outputs(folder, log=lines.append) == [] and len(lines) == 1


# ---------------------------------------------------------------------------------------------
# SLURM jobs of a dead run, with squeue played by a script of answers


def squeue_line(job_id, state, workdir, comment, run="run-1"):
    return f"{job_id}|{state}|{run}|{workdir}|{comment}"


class FakeSqueue:
    """Answers squeue calls in turn: a list of (returncode, stdout, stderr); records the arguments."""

    def __init__(self, *answers):
        self.answers, self.calls = list(answers), []

    def __call__(self, *args):
        self.calls.append(args)
        returncode, stdout, stderr = self.answers.pop(0)
        return subprocess.CompletedProcess(["squeue", *args], returncode, stdout, stderr)


def test_the_jobs_of_this_folder_that_snakemake_submitted_are_found(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "9")  # Snakemake running inside a SLURM job: never waits for itself
    other = tmp_path / "other"
    listing = "\n".join([
        squeue_line(1, "RUNNING", tmp_path, "rule_train_wildcards_finetune-resnet18-source-a2"),
        squeue_line(2, "PENDING", tmp_path, "rule_tables"),
        squeue_line(3, "RUNNING", other, "rule_train_wildcards_x"),  # another folder
        squeue_line(4, "RUNNING", tmp_path, "my own batch job"),  # not submitted by Snakemake
        squeue_line(5, "RUNNING", tmp_path, "rule_other_workflow_rule"),  # no rule of this workflow
        squeue_line(9, "RUNNING", tmp_path, "rule_tables"),  # the job this runs in
    ])  # fmt: skip
    query = FakeSqueue((0, listing, ""))
    jobs = recovery.active_slurm_jobs(tmp_path, ["train", "tables"], query)
    assert [(job.id, job.state, job.rule, job.wildcards, job.run) for job in jobs] == [
        ("1", "RUNNING", "train", "finetune-resnet18-source-a2", "run-1"),
        ("2", "PENDING", "tables", "", "run-1"),
    ]
    assert str(jobs[0]) == "SLURM job 1 rule train (finetune-resnet18-source-a2)"
    args = query.calls[0]
    assert args[args.index("-t") + 1].split(",")[:3] == ["PENDING", "CONFIGURING", "RUNNING"]
    assert recovery.active_slurm_jobs(tmp_path, ["train"], FakeSqueue((1, "", "slurm_load_jobs error"))) is None


def test_waiting_for_the_jobs_of_a_dead_run_says_what_and_ends_when_they_have(tmp_path):
    first = "\n".join([
        squeue_line(1, "RUNNING", tmp_path, "rule_train_wildcards_a"),
        squeue_line(2, "PENDING", tmp_path, "rule_probe_wildcards_b"),
    ])  # fmt: skip
    both_running = "\n".join([
        squeue_line(1, "RUNNING", tmp_path, "rule_train_wildcards_a"),
        squeue_line(2, "RUNNING", tmp_path, "rule_probe_wildcards_b"),
    ])  # fmt: skip
    one_done = both_running.replace("1|RUNNING", "1|COMPLETED")
    query = FakeSqueue(
        (0, first, ""),
        (1, "", "slurm_load_jobs error: Socket timed out"),  # SLURM busy: ask again
        (0, both_running, ""),
        (0, one_done, ""),
        (1, "", "slurm_load_jobs error: Invalid job id specified"),  # aged out of SLURM's memory: ended
    )
    lines, sleeps = [], []
    jobs = recovery.wait_for_slurm_jobs(
        tmp_path, ["train", "probe"], log=lines.append, poll_seconds=7, query=query, sleep=sleeps.append
    )
    assert [job.id for job in jobs] == ["1", "2"] and sleeps == [7] * 4
    assert lines[0].startswith(
        "2 SLURM job(s) that an earlier Snakemake run of this folder submitted (SLURM run ID run-1) are still "
        "pending or running: waiting for them instead of submitting them again"
    )
    assert "`scancel --name run-1` stops the jobs" in lines[0]
    assert lines[1:] == [
        "  SLURM job 1 rule train (a): RUNNING",
        "  SLURM job 2 rule probe (b): PENDING",
        "squeue failed; asking again",
        "  SLURM job 2 rule probe (b): RUNNING",
        "  SLURM job 1 rule train (a): COMPLETED (1 still pending or running)",
        "  SLURM job 2 rule probe (b): ended (0 still pending or running)",
        "the earlier run's SLURM jobs have ended (after 0 s of waiting)",
    ]
    assert query.calls[2] == ("-t", "all", "-j", "1,2") and query.calls[4] == ("-t", "all", "-j", "2")


@pytest.mark.parametrize("answer", [(0, "", ""), (1, "", "slurm_load_jobs error: Unable to contact slurm controller")])
def test_no_jobs_or_no_slurm_means_no_wait(tmp_path, answer):
    lines = []
    assert recovery.wait_for_slurm_jobs(tmp_path, ["train"], log=lines.append, query=FakeSqueue(answer)) == []
    assert lines == ([] if answer[0] == 0 else [
        "could not ask SLURM (squeue) for jobs of an earlier run still running here: not waiting for any"
    ])  # fmt: skip
