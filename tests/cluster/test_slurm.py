"""The workflow on a real SLURM (scripts/setup/slurm_cluster.sh up): profiles/slurm, retries, killed jobs.

A tiny study runs once locally and once through ``snakemake --profile profiles/slurm``; every
non-local job must go through sbatch and the two tables must agree. A throwaway workflow then
checks the profile's failure handling: a job that needs more memory than its first attempt gets
is retried with twice the memory and succeeds; a job SLURM cancels leaves no output behind.

Skipped when no SLURM answers, unless TLSELECT_REQUIRE_SLURM=1 (CI), which turns that into a failure.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import PINNED_PLAN, REPO, tiny_data

pytestmark = pytest.mark.slurm

PROFILE = REPO / "profiles/slurm"
LIMIT_S = 300  # a hung run is killed (SIGKILL: on SIGTERM Snakemake waits for its running jobs)


def cluster_problem() -> str | None:
    """Why no SLURM cluster can take jobs here, or None when one can."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM is not installed (no sinfo/sbatch)"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "snakemake-executor-plugin-slurm is not installed"
    result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    states = set(result.stdout.split())
    if result.returncode != 0 or not states & {"idle", "mixed", "allocated"}:
        return f"no SLURM node takes jobs (sinfo: {result.stdout.strip() or result.stderr.strip()})"
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster():
    problem = cluster_problem()
    if problem:
        message = f"{problem}; start the test cluster with: bash scripts/setup/slurm_cluster.sh up"
        if os.environ.get("TLSELECT_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message)


def snakemake(workdir: Path, *args: str, background: bool = False):
    """Run snakemake in ``workdir`` under a hard time limit; output goes to ``workdir/snakemake.out``."""
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    command = ["timeout", "-s", "KILL", str(LIMIT_S), sys.executable, "-m", "snakemake", *args]
    with open(workdir / "snakemake.out", "w") as out:  # the child keeps its own copy of the file
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    return process if background else finish(process, workdir)


def finish(process: subprocess.Popen, workdir: Path) -> tuple[int, str]:
    try:
        returncode = process.wait(timeout=LIMIT_S + 30)
    finally:
        job_ids = slurm_job_ids((workdir / "snakemake.out").read_text())
        if job_ids:  # a killed run leaves its jobs queued: cancel them (ours only)
            subprocess.run(["scancel", *job_ids], capture_output=True)
    return returncode, (workdir / "snakemake.out").read_text()


def slurm_job_ids(output: str) -> list[str]:
    return re.findall(r"submitted with SLURM jobid (\d+)", output)


def slurm_jobs(job_ids: list[str]) -> list[dict[str, str]]:
    """What SLURM knows of these jobs (finished ones included: the test cluster keeps them an hour)."""
    assert job_ids, "no job went through sbatch"
    result = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i|%k|%T|%m"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [
        dict(zip(("id", "comment", "state", "memory"), line.split("|"), strict=True))
        for line in result.stdout.split("\n")
        if line
    ]
    return sorted(rows, key=lambda row: int(row["id"]))


def slurm_jobs_named(name: str) -> list[dict[str, str]]:
    """The jobs of one Snakemake run (its SLURM run ID is every job's name) that SLURM still lists."""
    result = subprocess.run(
        ["squeue", "-h", "-t", "all", "-n", name, "-o", "%i|%k|%T|%m"], capture_output=True, text=True
    )
    return [
        dict(zip(("id", "comment", "state", "memory"), line.split("|"), strict=True)) for line in result.stdout.split()
    ]


def rule_of(job: dict[str, str]) -> str:
    """The rule of a job, from the comment the executor gives it: rule_<name>[_wildcards_<values>]."""
    return job["comment"].removeprefix("rule_").split("_wildcards_")[0]


def study_args(workdir: Path) -> list[str]:
    return [
        "results/tables/runs.csv", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
        "--configfile", str(REPO / "config.yaml"), str(workdir / "tiny.yaml"),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def studies(tmp_path_factory, tiny_archive):
    """The same tiny study (device cpu, one thread per job, seed 0) run through SLURM and locally."""
    # One policy and one probe: at most two jobs are ready at once, as many as the test node has CPUs.
    policies = yaml.safe_load((REPO / "config.yaml").read_text())["policies"]
    policies = [policy for policy in policies if policy["name"] == "finetune"]
    tiny = {
        "data": tiny_data(tiny_archive),
        "pretrained": "source",
        "device": "cpu",
        "threads": 1,
        "source": {"train_per_class": 4, "val_per_class": 1, "train": {"epochs": 1}},
        "train": {"epochs": 2, "batch_size": 8},
        "plan": PINNED_PLAN,
        "policies": policies,
        "features": {"layers": ["stem"], "inits": ["scratch"], "probe": {"epochs": 2}},
    }  # fmt: skip
    workdirs = {}
    for name in ("slurm", "local"):
        workdirs[name] = tmp_path_factory.mktemp(f"study-{name}")
        (workdirs[name] / "tiny.yaml").write_text(yaml.safe_dump(tiny))

    start = time.monotonic()
    # the README's command; pretrain_source also asks SLURM for the (fake) GPU, as on a GPU partition
    slurm = snakemake(
        workdirs["slurm"], *study_args(workdirs["slurm"]), "--profile", str(PROFILE),
        "--set-resources", "pretrain_source:gpu=1", background=True,
    )  # fmt: skip
    local_rc, local_out = snakemake(workdirs["local"], *study_args(workdirs["local"]), "--cores", "2")
    slurm_rc, slurm_out = finish(slurm, workdirs["slurm"])
    print(f"local and SLURM studies took {time.monotonic() - start:.0f}s")
    assert local_rc == 0, f"local run failed:\n{local_out[-5000:]}"
    assert slurm_rc == 0, f"SLURM run failed (rc {slurm_rc}):\n{slurm_out[-8000:]}"
    return {"slurm": (workdirs["slurm"], slurm_out), "local": (workdirs["local"], local_out)}


def test_study_jobs_go_through_sbatch(studies):
    workdir, output = studies["slurm"]
    assert f"Using profiles {PROFILE} and workflow specific profile {REPO / 'profiles/default'}" in output
    jobs = slurm_jobs(slurm_job_ids(output))
    rules = {rule_of(job) for job in jobs}
    assert rules == {"subset", "source_data", "pretrain_source", "train", "extract_features", "probe", "tables"}
    assert all(job["state"] == "COMPLETED" for job in jobs), jobs
    assert "fetch_data" not in rules and "localrule fetch_data:" in output  # a download rule runs here
    pretrain = next(job["id"] for job in jobs if rule_of(job) == "pretrain_source")
    details = subprocess.run(["scontrol", "show", "job", pretrain], capture_output=True, text=True).stdout
    assert "gpu:1" in details  # set-resources gpu reached sbatch (--gpus=1) ...
    # ... and the job was told (device cpu keeps it on the CPU, so the numbers stay comparable)
    assert re.search(r"--run-id source-resnet18 .*--gpus 1 ", output)
    train = next(job for job in jobs if rule_of(job) == "train")
    assert train["memory"] == "4000M"  # mem_mb (4000 * attempt) became sbatch --mem


def assert_same_tables(workdir: Path, reference: Path) -> None:
    tables = {folder: pd.read_csv(folder / "results/tables/runs.csv") for folder in (workdir, reference)}
    metrics = ["run_id", "name", "init", "freeze", "status", "trainable_params", "val_accuracy", "test_accuracy"]
    assert sorted(tables[workdir]["name"]) == ["finetune", "probe_stem"]
    pd.testing.assert_frame_equal(tables[workdir][metrics], tables[reference][metrics])
    curves = {folder: pd.read_csv(folder / "results/tables/curves.csv") for folder in (workdir, reference)}
    losses = ["run_id", *(c for c in curves[reference].columns if "loss" in c or "accuracy" in c)]
    pd.testing.assert_frame_equal(curves[workdir][losses], curves[reference][losses])


def test_slurm_table_equals_local_table(studies):
    assert_same_tables(studies["slurm"][0], studies["local"][0])


def test_killed_snakemake_cancelled_jobs_and_the_same_command_give_the_same_table(studies, tmp_path):
    # The README's recovery: cancel the dead run's jobs, unlock, run the same command again.
    shutil.copy(studies["local"][0] / "tiny.yaml", tmp_path)
    whole_node = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True).stdout.split()[0]
    # feature extraction takes the whole node, so it and the source subset cannot run at once: one waits
    extract = f"extract_features:cpus_per_task={whole_node}"
    command = [*study_args(tmp_path), "--profile", str(PROFILE), "--set-resources", extract]
    run = snakemake(tmp_path, *command, background=True)
    deadline = time.monotonic() + LIMIT_S
    jobs = []
    while {"RUNNING", "PENDING"} - {job["state"] for job in jobs}:
        assert run.poll() is None, (
            f"the run ended before it had jobs running and queued:\n{finish(run, tmp_path)[1][-5000:]}"
        )
        assert time.monotonic() < deadline, "never a job running and another queued"
        time.sleep(0.2)
        run_id = re.search(r"SLURM run ID: (\S+)", (tmp_path / "snakemake.out").read_text())
        jobs = slurm_jobs_named(run_id.group(1)) if run_id else []
    os.killpg(run.pid, signal.SIGKILL)  # snakemake (under timeout, in timeout's process group) dies; its jobs do not
    run.wait()
    in_flight = [job for job in slurm_jobs_named(run_id.group(1)) if job["state"] in ("RUNNING", "PENDING")]
    assert in_flight, "the killed run's jobs were gone before they could be cancelled"
    subprocess.run(["scancel", "--name", run_id.group(1)], check=True)
    killed_output = (tmp_path / "snakemake.out").read_text()

    returncode, output = snakemake(tmp_path, *command, "--unlock")
    assert returncode == 0, output
    returncode, output = snakemake(tmp_path, *command)
    assert returncode == 0, output[-8000:]
    print(f"in flight when snakemake was killed: {[(rule_of(job), job['state']) for job in in_flight]}")
    resubmitted = {rule_of(job) for job in slurm_jobs(slurm_job_ids(output))}
    assert {rule_of(job) for job in in_flight} <= resubmitted
    assert not set(slurm_job_ids(output)) & set(slurm_job_ids(killed_output))
    assert_same_tables(tmp_path, studies["local"][0])


NEEDS_MEMORY = '''"""Stand-in for a job that needs more memory than its first attempt gets.

The test cluster has no cgroups, so SLURM does not enforce --mem; the job enforces what SLURM
granted it (scontrol) on itself, as a cgroup would, then maps the memory it needs.
"""
import mmap, os, re, resource, subprocess, sys

need_mb, out = int(sys.argv[1]), sys.argv[2]
job = subprocess.run(["scontrol", "show", "job", os.environ["SLURM_JOB_ID"]], capture_output=True, text=True).stdout
granted_mb = int(re.search(r"MinMemoryNode=(\\d+)M", job).group(1))
print(f"SLURM granted {granted_mb} MB; this job needs {need_mb} MB", flush=True)
resource.setrlimit(resource.RLIMIT_AS, (granted_mb * 2**20, granted_mb * 2**20))
mmap.mmap(-1, need_mb * 2**20)
open(out, "w").write(f"{granted_mb}\\n")
'''

FAILING_WORKFLOW = """
rule all:
    input:
        "trained.txt",
        "killed.txt",


# Memory as the study's training rules ask for it (rules/common.smk): 4000 MB times the attempt.
rule train:
    output:
        "trained.txt",
    resources:
        mem_mb=lambda wildcards, attempt: 4000 * attempt,
    shell:
        "python needs_memory.py 6000 {output}"


# Writes its output at once (not atomically), then runs until SLURM cancels it.
rule killed:
    output:
        "killed.txt",
    retries: 0
    shell:
        "echo $SLURM_JOB_ID > {output}; sleep 600"
"""


def test_failed_job_is_retried_with_more_memory_and_a_cancelled_job_leaves_no_output(tmp_path):
    (tmp_path / "Snakefile").write_text(FAILING_WORKFLOW)
    (tmp_path / "needs_memory.py").write_text(NEEDS_MEMORY)
    run = snakemake(tmp_path, "--profile", str(PROFILE), "--keep-going", background=True)
    killed = tmp_path / "killed.txt"
    deadline = time.monotonic() + 120
    while not (killed.is_file() and killed.read_text().strip()) and run.poll() is None:
        assert time.monotonic() < deadline, "the job to cancel never started"
        time.sleep(0.5)
    assert run.poll() is None, f"the run ended before its job could be cancelled:\n{finish(run, tmp_path)[1][-5000:]}"
    subprocess.run(["scancel", killed.read_text().strip()], check=True)
    returncode, output = finish(run, tmp_path)

    assert returncode == 1 and "Error in rule killed" in output  # the cancelled job failed the run ...
    assert not killed.exists()  # ... and Snakemake removed the output it had begun
    jobs = slurm_jobs(slurm_job_ids(output))
    trains = [job for job in jobs if rule_of(job) == "train"]
    assert [(job["memory"], job["state"]) for job in trains] == [("4000M", "FAILED"), ("8000M", "COMPLETED")]
    assert [job["state"] for job in jobs if rule_of(job) == "killed"] == ["CANCELLED"]  # retries: 0
    assert (tmp_path / "trained.txt").read_text().strip() == "8000"
    first_log = tmp_path / f".snakemake/slurm_logs/rule_train/{trains[0]['id']}.log"
    assert "SLURM granted 4000 MB; this job needs 6000 MB" in first_log.read_text()
