"""What a new Snakemake run does with what an earlier one left behind (docs/failure-and-recovery.md).

Stale corrupt files: :func:`tlselect.core.files.verify` moves a corrupt file to ``<file>.corrupt``
and the Snakefile makes ``<file>`` a target of the next run (rule ``all``). A marker whose file no
rule makes any more (the config changed) would stop that run with a missing-rule error:
:func:`corrupt_targets` keeps the others as targets and moves those aside, under
``results/.set-aside/``, saying so.

Jobs of a dead Snakemake on SLURM: killed, Snakemake leaves its SLURM jobs running or waiting.
snakemake-executor-plugin-slurm names each job after the run (the SLURM run ID), comments it
``rule_<rule>[_wildcards_<values>]`` and runs it in Snakemake's working folder; the Snakemake inside
the job marks its outputs incomplete (``.snakemake/incomplete``) while it runs and unmarks them when
it succeeds. The next run, started while such a job still runs, would find its outputs missing or
incomplete and submit it again (two jobs writing the same files), so :func:`wait_for_slurm_jobs`
waits for them first (at parse time, before Snakemake looks at any output). Then
:func:`keep_complete_outputs` drops the incomplete mark of every output that is complete by this
workflow's own rules (every output is renamed into place whole, checksummed ones must match their
checksum), so that Snakemake keeps it instead of deleting it and running its job again.
"""

from __future__ import annotations

import base64
import glob
import os
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tlselect.core.files import checksum_path, file_digest

# ---------------------------------------------------------------------------------------------
# Stale *.corrupt markers

SET_ASIDE = Path("results/.set-aside")
CORRUPT_SUFFIX = ".corrupt"


def corrupt_markers(results: str = "results", weights: str = "resources/weights") -> list[str]:
    """Every ``<file>.corrupt`` under ``results`` (``results/.set-aside`` left out: hidden folders are)
    and ``weights``, sorted."""
    markers = glob.glob(f"{glob.escape(results)}/**/*{CORRUPT_SUFFIX}", recursive=True)
    markers += glob.glob(f"{glob.escape(weights)}/*{CORRUPT_SUFFIX}")
    return sorted(markers)


def set_aside_path(path: str | os.PathLike, root: str | os.PathLike = SET_ASIDE) -> Path:
    """Where a stale file goes: ``root/<its path under results/>``, or ``root/<its path>`` for a file elsewhere
    (``resources/weights/...``)."""
    path = Path(os.path.normpath(path))
    parts = path.parts[1:] if path.parts[:1] == ("results",) else path.parts
    return Path(root, *parts)


def corrupt_targets(
    markers: Iterable[str],
    made: Callable[[str], bool],
    *,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
    root: str | os.PathLike = SET_ASIDE,
) -> list[str]:
    """The files of ``markers`` (``<file>.corrupt``) that a rule still makes (``made(file)``): targets, to
    be computed anew. The marker of any other file, and that file's checksum sidecar, move to
    :func:`set_aside_path` (a ``dry_run`` only says it would), with one line to ``log`` each."""
    targets = []
    for marker in markers:
        if not os.path.isfile(marker):  # already moved (this function may run more than once per run)
            continue
        path = marker.removesuffix(CORRUPT_SUFFIX)
        if made(path):
            targets.append(path)
            continue
        destination = set_aside_path(marker, root)
        if dry_run:
            log(f"{marker}: no rule of this configuration makes {path} any more; a run moves it aside to {destination}")
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(marker, destination)
        sidecar = checksum_path(path)
        if sidecar.is_file():
            os.replace(sidecar, set_aside_path(sidecar, root))
        log(f"{marker}: no rule of this configuration makes {path} any more; moved it aside to {destination}")
    return targets


# ---------------------------------------------------------------------------------------------
# SLURM jobs of a dead Snakemake run in this working folder

# squeue states of a job that has not ended yet.
ACTIVE_STATES = (
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "SUSPENDED",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
)
SQUEUE_FORMAT = "%i|%T|%j|%Z|%k"  # id, state, name (the SLURM run ID), working folder, comment
POLL_SECONDS = 10


@dataclass(frozen=True)
class SlurmJob:
    id: str
    state: str
    run: str  # the SLURM run ID of the Snakemake run that submitted it (the job's name)
    workdir: str
    rule: str
    wildcards: str

    def __str__(self) -> str:
        what = f"rule {self.rule}" + (f" ({self.wildcards})" if self.wildcards else "")
        return f"SLURM job {self.id} {what}"


def parse_squeue(text: str) -> list[SlurmJob]:
    """Jobs of ``squeue -h -o SQUEUE_FORMAT`` whose comment is snakemake-executor-plugin-slurm's."""
    jobs = []
    for line in text.splitlines():
        fields = line.split("|", 4)
        if len(fields) != 5 or not fields[4].startswith("rule_"):
            continue
        job_id, state, run, workdir, comment = fields
        rule, _, wildcards = comment.removeprefix("rule_").partition("_wildcards_")
        jobs.append(SlurmJob(job_id, state.split()[0], run, workdir, rule, wildcards))
    return jobs


def squeue(*args: str) -> subprocess.CompletedProcess:
    """``squeue -h -o SQUEUE_FORMAT *args``; one that does not answer in 60 s counts as failed."""
    command = ["squeue", "-h", "-o", SQUEUE_FORMAT, *args]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(command, 1, "", "squeue did not answer in 60 s")


def active_slurm_jobs(workdir: str | os.PathLike, rules: Iterable[str], query=squeue) -> list[SlurmJob] | None:
    """This user's SLURM jobs, not yet ended, that a Snakemake run of ``workdir`` submitted for one of
    ``rules`` (the job this code runs in, if any, left out). None when squeue fails."""
    result = query("-u", str(os.getuid()), "-t", ",".join(ACTIVE_STATES))
    if result.returncode != 0:
        return None
    here, rules, own = os.path.realpath(workdir), set(rules), os.environ.get("SLURM_JOB_ID")
    return [
        job
        for job in parse_squeue(result.stdout)
        if job.rule in rules and job.id != own and os.path.realpath(job.workdir) == here
    ]


def job_states(job_ids: Iterable[str], query=squeue) -> dict[str, str] | None:
    """``{id: state}`` of the jobs SLURM still lists (ended ones too, while it keeps them); None when squeue fails."""
    result = query("-t", "all", "-j", ",".join(job_ids))
    if result.returncode != 0:
        # every id unknown to SLURM any more (ended long ago) is an error too
        return {} if "Invalid job id" in result.stderr else None
    return {job.id: job.state for job in parse_squeue(result.stdout)}


def wait_for_slurm_jobs(
    workdir: str | os.PathLike,
    rules: Iterable[str],
    *,
    log: Callable[[str], None] = print,
    poll_seconds: float = POLL_SECONDS,
    query=squeue,
    sleep=time.sleep,
) -> list[SlurmJob]:
    """Wait until no SLURM job an earlier Snakemake run of ``workdir`` submitted is pending or running
    (:func:`active_slurm_jobs`), saying what it waits for and as each ends; return those jobs."""
    jobs = active_slurm_jobs(workdir, rules, query)
    if jobs is None:
        log("could not ask SLURM (squeue) for jobs of an earlier run still running here: not waiting for any")
        return []
    if not jobs:
        return []
    runs = sorted({job.run for job in jobs})
    log(
        f"{len(jobs)} SLURM job(s) that an earlier Snakemake run of this folder submitted (SLURM run ID "
        f"{', '.join(runs)}) are still pending or running: waiting for them instead of submitting them again, "
        "then using what they wrote. Ctrl-C stops waiting (the jobs go on); "
        + " and ".join(f"`scancel --name {run}`" for run in runs)
        + " stops the jobs."
    )
    for job in jobs:
        log(f"  {job}: {job.state}")
    left = {job.id: job for job in jobs}
    started = time.monotonic()
    while left:
        sleep(poll_seconds)
        states = job_states(left, query)
        if states is None:
            log("squeue failed; asking again")
            continue
        for job_id, job in list(left.items()):
            state = states.get(job_id, "ended")
            if state in ACTIVE_STATES:
                if state != job.state:
                    left[job_id] = job = SlurmJob(**{**job.__dict__, "state": state})
                    log(f"  {job}: {state}")
                continue
            del left[job_id]
            log(f"  {job}: {state} ({len(left)} still pending or running)")
    log(f"the earlier run's SLURM jobs have ended (after {time.monotonic() - started:.0f} s of waiting)")
    return jobs


# ---------------------------------------------------------------------------------------------
# Snakemake's incomplete marks (.snakemake/incomplete, its file persistence backend)


def marked_incomplete(folder: str | os.PathLike = ".snakemake/incomplete") -> dict[str, Path]:
    """``{output path: mark file}`` of Snakemake's incomplete marks: a file per output named by the
    URL-safe base64 of its path, split into folders of ``@``-prefixed pieces where the name is too
    long (snakemake.persistence.file.FilePersistence._record_path)."""
    marks = {}
    for path, _, names in os.walk(folder):
        for name in names:
            mark = Path(path, name)
            pieces = mark.relative_to(folder).parts
            if any(not piece.startswith("@") for piece in pieces[:-1]):
                continue
            encoded = "".join(piece.removeprefix("@") for piece in pieces[:-1]) + pieces[-1]
            try:
                marks[base64.urlsafe_b64decode(encoded).decode()] = mark
            except ValueError:  # not a mark (e.g. "migration_underway")
                continue
    return marks


def is_complete(path: str | os.PathLike) -> bool:
    """Whether an output of this workflow is complete: a file (every output is renamed into place whole,
    tlselect.core.files) matching its checksum where it has one. A folder is never taken as complete."""
    path = Path(path)
    if not path.is_file() or path.is_symlink():
        return False
    sidecar = checksum_path(path)
    return not sidecar.is_file() or file_digest(path) == sidecar.read_text().split(" ")[0]


def keep_complete_outputs(
    folder: str | os.PathLike = ".snakemake/incomplete", *, log: Callable[[str], None] = print
) -> list[str]:
    """Drop Snakemake's incomplete mark of every output that :func:`is_complete` (the rest stay marked,
    so a run with --rerun-incomplete deletes them and runs their jobs again); return those outputs."""
    kept = []
    for path, mark in sorted(marked_incomplete(folder).items()):
        if is_complete(path):
            mark.unlink(missing_ok=True)
            for parent in mark.parents:  # the folders of a long name's pieces, once empty
                if parent == Path(folder) or not parent.name.startswith("@") or any(parent.iterdir()):
                    break
                parent.rmdir()
            kept.append(path)
    if kept:
        log(f"kept {len(kept)} output(s) an interrupted job wrote whole (marked incomplete): {' '.join(kept)}")
    return kept
