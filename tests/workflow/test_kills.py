"""Random kills across a whole study: killed anywhere, the study still ends with the same table.

A tiny study (subset, source pretraining, a feature chain with its probes, two policies, tables,
figures, notebook) runs once uninterrupted and once killed TLSELECT_KILLS times (default 5). Each
kill aims at a place in the study (a job of one rule starting, a training epoch, a checkpoint
being written), waits a seeded delay, then SIGKILLs Snakemake and every process of its session, as
a crash of the machine would. Each restart is the README's: ``snakemake --unlock``, then the same
command with ``--rerun-incomplete``. The killed study must end with the uninterrupted one's tables
and records (timings aside), the same files (no temporary or resume file left) and nothing left to
do. Where each kill fell is printed; TLSELECT_KILL_SEED repeats a choice of places and delays.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from helpers import kill_session, snakemake_command, start_snakemake, study_processes, tiny_study, write_study

KILLS = int(os.environ.get("TLSELECT_KILLS", "5"))
SEED = int(os.environ.get("TLSELECT_KILL_SEED") or random.randrange(10**6))
TIMINGS = ["train_seconds", "eval_seconds", "wall_seconds", "images_per_second", "resumed_from_epoch"]
LIMIT_S = 600  # one snakemake run, killed or not


@dataclass(frozen=True)
class Place:
    """Where a kill aims: when ``trigger`` happens in a run, then up to ``delay`` seconds later.

    ``trigger`` is "start" (a job of ``rules`` starts) or a glob of files a job (re)writes. The place
    is gone from a run once every job of ``rules`` it had to do has finished.
    """

    name: str
    rules: tuple[str, ...]
    trigger: str
    delay: float


PLACES = [  # in the study's order
    Place("subset", ("subset",), "start", 3),
    Place("source subset", ("source_data",), "start", 3),
    Place("source pretraining", ("pretrain_source",), "start", 6),
    Place("feature extraction", ("extract_features",), "start", 5),
    Place("training epoch", ("train",), "results/models/*.resume.pt", 0.6),  # after an epoch's checkpoint
    Place("checkpoint write", ("train", "pretrain_source"), "results/*/.*.resume.pt.*", 0),  # its temporary
    Place("probe", ("probe",), "start", 4),
    Place("aggregation", ("tables",), "start", 3),
    Place("figure", ("figure",), "start", 4),
    Place("notebook", ("notebook",), "start", 3),
]


def write_kill_study(workdir: Path, archive: Path) -> None:
    workdir.mkdir(parents=True)
    study = tiny_study(
        archive,
        source_epochs=2,
        device="cpu",
        train={"epochs": 3, "batch_size": 8},
        policies=[
            {"name": "finetune", "init": "pretrained", "freeze": "none"},
            {"name": "freeze_most", "init": "pretrained", "freeze": "layer3"},
        ],
        features={"layers": ["layer1"], "inits": ["pretrained"], "probe": {"epochs": 2}},
        speedups={"enabled": False},
        search={"enabled": False},
    )
    write_study(workdir, study)


def start(workdir: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    """Start snakemake on the study in a session of its own; its output goes to a numbered file."""
    out = workdir / f"snakemake-{len(list(workdir.glob('snakemake-*.out')))}.out"
    return start_snakemake(snakemake_command(workdir, *args), workdir, out, new_session=True), out


def finish(process: subprocess.Popen, out: Path) -> str:
    process.wait(timeout=LIMIT_S)
    assert process.returncode == 0, f"snakemake failed:\n{out.read_text()[-6000:]}"
    return out.read_text()


def jobs_to_do(output: str) -> dict[str, int] | None:
    """Jobs per rule from the run's "Job stats" table; None until the whole table is printed."""
    if "Nothing to be done" in output:
        return {}
    table = re.search(r"^Job stats:\n(.*?)^total\s+\d+$", output, re.M | re.S)
    return table and {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table.group(1), re.M)}


def running_jobs(output: str) -> list[str]:
    """The run's started and not yet finished jobs: rule[wildcards]."""
    started = {}
    for match in re.finditer(r"^(?:local)?rule (\w+):\n((?: {4}.*\n)*)", output, re.M):
        fields = dict(re.findall(r"^ {4}(\w+): (.*)$", match.group(2), re.M))
        if "jobid" in fields:
            wildcards = f"[{fields['wildcards']}]" if "wildcards" in fields else ""
            started[fields["jobid"]] = match.group(1) + wildcards
    for jobid in re.findall(r"^Finished jobid: (\d+) ", output, re.M):
        started.pop(jobid, None)
    return sorted(started.values())


def file_versions(workdir: Path, pattern: str) -> set[tuple[str, int, int]]:
    versions = set()
    for path in workdir.glob(pattern):
        try:
            stat = path.stat()
        except FileNotFoundError:  # renamed meanwhile
            continue
        versions.add((path.name, stat.st_ino, stat.st_mtime_ns))
    return versions


def wait_for(place: Place, process: subprocess.Popen, out: Path, before: set) -> str:
    """Wait until the run reaches ``place`` ("reached"), has no more of it ("gone") or ends ("ended")."""
    workdir = out.parent
    deadline = time.monotonic() + LIMIT_S
    while time.monotonic() < deadline:
        output = out.read_text()
        running = [job.split("[")[0] for job in running_jobs(output)]
        if place.trigger == "start" and set(running) & set(place.rules):
            return "reached"
        if place.trigger != "start" and file_versions(workdir, place.trigger) - before:
            return "reached"
        finished = re.findall(r"^Finished jobid: \d+ \(Rule: (\w+)\)", output, re.M)
        to_do = jobs_to_do(output)
        if to_do is not None:
            if sum(rule in place.rules for rule in finished) >= sum(to_do.get(rule, 0) for rule in place.rules):
                return "gone"
        if process.poll() is not None:
            return "ended"
        time.sleep(0.01)
    raise AssertionError(f"no sign of {place.name} after {LIMIT_S} s")


def kill_study(process: subprocess.Popen, workdir: Path) -> list[str]:
    """SIGKILL snakemake and all its jobs at once; return what those processes were doing."""
    doing = study_processes(process.pid, workdir)
    kill_session(process, workdir)
    return sorted({label for argv in doing.values() if (label := what(argv))})


def what(argv: list[str]) -> str | None:
    """A job process's work in a few words (None for snakemake itself, shells and tee)."""
    names = [os.path.basename(arg) for arg in argv]
    script = next((i for i, name in enumerate(names) if name.endswith(".py")), None)
    if script is not None and names[script] != "snakemake":
        rest = argv[script + 1 :]
        detail = rest[rest.index("--run-id") + 1] if "--run-id" in rest else (rest[:1] or [""])[0]
        return f"{names[script]} {detail}" if detail and "/" not in detail and detail[0] != "-" else names[script]
    for name, label in (("papermill", "papermill"), ("nbconvert", "nbconvert"), ("ipykernel", "kernel")):
        if any(name in arg for arg in names[:3]):
            return label
    return f"mv {names[-1]}" if names[:1] == ["mv"] else None


def leftovers(workdir: Path) -> list[str]:
    """Temporaries under results/: hidden files and folders."""
    return sorted(str(path.relative_to(workdir)) for path in (workdir / "results").rglob(".*"))


STORE = "results/cache/features"  # the content-keyed feature store: its shards follow the chunks a job got to


def files(workdir: Path) -> list[str]:
    """Every file under results/, hidden ones included; the feature store as the set of images it holds
    (a killed extraction keeps the shards it wrote, so the shards differ, not what they hold)."""
    listed = sorted(str(path.relative_to(workdir)) for path in (workdir / "results").rglob("*") if path.is_file())
    held = {
        f"{Path(name).parent}: {line}"
        for name in listed
        if name.startswith(STORE) and name.endswith(".hashes")
        for line in (workdir / name).read_text().split()
    }
    return [name for name in listed if not name.startswith(STORE)] + sorted(held)


def comparable(workdir: Path) -> dict:
    """The study's tables and records without timings."""
    tables = {}
    for name in ("runs.csv", "curves.csv"):
        table = pd.read_csv(workdir / "results/tables" / name).drop(columns=TIMINGS, errors="ignore")
        tables[name] = table.sort_values("run_id", kind="stable").reset_index(drop=True)
    records = {}
    for path in sorted([*workdir.glob("results/registry/*.json"), *workdir.glob("results/source/*.json")]):
        record = json.loads(path.read_text())
        curves = [{k: v for k, v in epoch.items() if k not in TIMINGS} for epoch in record["curves"]]
        records[path.name] = {"status": record["status"], "metrics": record["metrics"], "curves": curves}
    return {"tables": tables, "records": records}


def test_study_killed_at_random_moments_ends_with_the_uninterrupted_table(tmp_path, tiny_archive, capsys):
    rng = random.Random(SEED)
    picks = rng.sample(range(len(PLACES)), min(KILLS, len(PLACES)))
    picks += rng.choices(range(len(PLACES)), k=KILLS - len(picks))
    targets = [(PLACES[i], rng.uniform(0, PLACES[i].delay)) for i in sorted(picks)]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    write_kill_study(straight, tiny_archive)
    write_kill_study(killed, tiny_archive)
    with capsys.disabled():
        print(f"\nkilling the study {KILLS} times, TLSELECT_KILL_SEED={SEED}")
    began = time.monotonic()
    reference = start(straight)  # the uninterrupted study runs alongside

    kills, skipped, args = [], [], ()
    while len(kills) < KILLS:
        before = {place.trigger: file_versions(killed, place.trigger) for place in PLACES}
        temporaries = set(leftovers(killed))
        process, out = start(killed, *args)
        while True:
            place, delay = targets[0] if targets else (PLACES[-1], rng.uniform(0, PLACES[-1].delay))
            outcome = wait_for(place, process, out, before.get(place.trigger, set()))
            if outcome != "gone" or not targets:
                break
            skipped.append(place.name)
            targets = targets[1:]
        assert outcome == "reached", (
            f"the study ended with {KILLS - len(kills)} kills to go:\n{out.read_text()[-3000:]}"
        )
        time.sleep(delay)
        jobs = running_jobs(out.read_text())
        processes = kill_study(process, killed)
        cut = sorted(set(leftovers(killed)) - temporaries)
        kills.append({"place": place.name, "delay": delay, "jobs": jobs, "processes": processes, "cut": cut})
        targets = targets[1:]
        finish(*start(killed, "--unlock"))
        args = ("--rerun-incomplete",)
    finish(*start(killed, *args))
    finish(*reference)
    took = time.monotonic() - began

    with capsys.disabled():
        print(f"{KILLS} kills in {took:.0f} s; places gone before their turn: {skipped}")
        for number, kill in enumerate(kills, 1):
            print(
                f"  {number:2d}. {kill['place']} +{kill['delay']:.2f} s: jobs {kill['jobs']}, processes "
                f"{kill['processes']}, temporaries left {kill['cut']}"
            )
        print(f"  left at the end: {leftovers(killed)}")

    assert "Nothing to be done" in finish(*start(killed, "--dry-run"))
    assert files(killed) == files(straight)  # no temporary, resume file or half-written output left
    got, expected = comparable(killed), comparable(straight)
    for name, table in expected["tables"].items():
        pd.testing.assert_frame_equal(got["tables"][name], table)
    assert got["records"] == expected["records"]
