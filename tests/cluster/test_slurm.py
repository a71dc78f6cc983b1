"""The workflow on a real SLURM (scripts/setup/slurm_cluster.sh up): profiles/slurm, retries, killed jobs.

A tiny study runs once locally and once through ``snakemake --profile profiles/slurm``; every
non-local job must go through sbatch and the two tables must agree. A throwaway workflow then
checks the profile's failure handling: a job that needs more memory than its first attempt gets
is retried with twice the memory and succeeds; a job SLURM cancels leaves no output behind. A
Snakemake killed on SLURM is recovered from both ways: its jobs cancelled, or left to finish, when
the same command waits for them and keeps what they wrote instead of submitting them again.

Skipped when no SLURM answers, unless TLSELECT_REQUIRE_SLURM=1 (CI), which turns that into a failure.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import REPO, default_config, snakemake_command, start_snakemake, tiny_study, write_study

PROFILE = REPO / "profiles/slurm"
STUDY_TARGET = "results/tables/runs.csv"  # the study's table, of the repository's workflow on config.yaml and tiny.yaml
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


def snakemake_under_limit(workdir: Path, *args: str, background: bool = False, cores: int | None = None, **how):
    """Run snakemake in ``workdir`` (``cores``, ``how``: see helpers.snakemake_command; no --cores by
    default, the profile sets the jobs) under a hard time limit; output goes to ``workdir/snakemake.out``."""
    command = ["timeout", "-s", "KILL", str(LIMIT_S), *snakemake_command(workdir, *args, cores=cores, **how)]
    process = start_snakemake(command, workdir, workdir / "snakemake.out")
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


@pytest.fixture(scope="module")
def studies(tmp_path_factory, tiny_archive):
    """The same tiny study (device cpu, one thread per job, seed 0) run through SLURM and locally."""
    # One policy and one probe: at most two jobs are ready at once, as many as the test node has CPUs.
    policies = [policy for policy in default_config(validated=False)["policies"] if policy["name"] == "finetune"]
    tiny = tiny_study(
        tiny_archive,
        source_epochs=1,
        device="cpu",
        train={"epochs": 2, "batch_size": 8},
        policies=policies,
        features={"layers": ["stem"], "inits": ["scratch"], "probe": {"epochs": 2}},
    )
    workdirs = {}
    for name in ("slurm", "local"):
        workdirs[name] = tmp_path_factory.mktemp(f"study-{name}")
        write_study(workdirs[name], tiny)

    start = time.monotonic()
    # the README's command; pretrain_source also asks SLURM for the (fake) GPU, as on a GPU partition
    slurm = snakemake_under_limit(
        workdirs["slurm"], STUDY_TARGET, "--profile", str(PROFILE), "--set-resources", "pretrain_source:gpu=1",
        background=True,
    )  # fmt: skip
    local_rc, local_out = snakemake_under_limit(workdirs["local"], STUDY_TARGET, cores=2)
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
    # A download rule runs here when it runs at all (with an archive the decoding steps read it themselves).
    assert "fetch_data" not in rules and ("fetch_data:" not in output or "localrule fetch_data:" in output)
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
    command = [STUDY_TARGET, "--profile", str(PROFILE), "--set-resources", extract]
    run = snakemake_under_limit(tmp_path, *command, background=True)
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

    returncode, output = snakemake_under_limit(tmp_path, *command, "--unlock")
    assert returncode == 0, output
    returncode, output = snakemake_under_limit(tmp_path, *command)
    assert returncode == 0, output[-8000:]
    print(f"in flight when snakemake was killed: {[(rule_of(job), job['state']) for job in in_flight]}")
    resubmitted = {rule_of(job) for job in slurm_jobs(slurm_job_ids(output))}
    assert {rule_of(job) for job in in_flight} <= resubmitted
    assert not set(slurm_job_ids(output)) & set(slurm_job_ids(killed_output))
    assert_same_tables(tmp_path, studies["local"][0])


STUDY_RULES = {"subset", "source_data", "pretrain_source", "train", "extract_features", "probe", "tables"}


def test_killed_snakemake_whose_jobs_go_on_the_same_command_waits_for_them_and_keeps_their_results(
    tmp_path, tiny_archive
):
    # Snakemake dies (SIGKILL) while its SLURM jobs run and nobody cancels them: they finish. The same
    # command (after --unlock) waits for those still running and keeps what they wrote: each of the
    # study's jobs is submitted once over both runs.
    policies = [policy for policy in default_config(validated=False)["policies"] if policy["name"] == "finetune"]
    study = tiny_study(
        tiny_archive,
        source_epochs=1,
        device="cpu",
        train={"epochs": 30, "batch_size": 8},  # the policy's job outlasts the kill, the unlock and the restart
        policies=policies,
        features={"layers": ["stem"], "inits": ["scratch"], "probe": {"epochs": 2}},
    )
    write_study(tmp_path, study)
    command = [STUDY_TARGET, "--profile", str(PROFILE)]
    run = snakemake_under_limit(tmp_path, *command, background=True)
    deadline = time.monotonic() + LIMIT_S
    train = None
    while train is None:
        assert run.poll() is None, f"the run ended before its training job ran:\n{finish(run, tmp_path)[1][-5000:]}"
        assert time.monotonic() < deadline, "the policy's training job never ran"
        time.sleep(0.2)
        run_id = re.search(r"SLURM run ID: (\S+)", (tmp_path / "snakemake.out").read_text())
        jobs = slurm_jobs_named(run_id.group(1)) if run_id else []
        train = next((job for job in jobs if rule_of(job) == "train" and job["state"] == "RUNNING"), None)
    os.killpg(run.pid, signal.SIGKILL)  # snakemake dies; its jobs go on (nothing cancels them)
    run.wait()
    killed_output = (tmp_path / "snakemake.out").read_text()
    in_flight = [job for job in slurm_jobs_named(run_id.group(1)) if job["state"] in ("RUNNING", "PENDING")]
    assert train["id"] in {job["id"] for job in in_flight}, "the training job ended before snakemake was killed"

    returncode, output = snakemake_under_limit(tmp_path, *command, "--unlock")
    assert returncode == 0, output
    assert "still pending or running" not in output  # --unlock finds the lock and waits for nothing
    rerun = snakemake_under_limit(tmp_path, *command, background=True)
    # Once the wait is over, the policy's checkpoint and record are those the killed run's job wrote.
    run_id_of_policy = train["comment"].split("_wildcards_")[1]
    checkpoint = tmp_path / f"results/models/{run_id_of_policy}.pt"
    record = tmp_path / f"results/registry/{run_id_of_policy}.json"
    while "the earlier run's SLURM jobs have ended" not in (tmp_path / "snakemake.out").read_text():
        assert rerun.poll() is None, f"the run did not wait for the killed run's jobs:\n{finish(rerun, tmp_path)[1]}"
        time.sleep(0.2)
    written = (checkpoint.stat().st_ino, checkpoint.stat().st_mtime_ns, record.read_bytes())
    returncode, output = finish(rerun, tmp_path)
    assert returncode == 0, output[-8000:]

    print(f"in flight when snakemake was killed: {[(rule_of(job), job['state']) for job in in_flight]}")
    # The training job outlasts the restart, so the rerun waits for it by name; a shorter job in flight
    # at the kill (a probe) may end before the rerun looks, and then it is neither waited for nor
    # submitted again (asserted below).
    assert f"SLURM job {train['id']} rule train" in output
    assert {job["state"] for job in slurm_jobs([job["id"] for job in in_flight])} == {"COMPLETED"}
    submitted = slurm_jobs(slurm_job_ids(killed_output)) + slurm_jobs(slurm_job_ids(output))
    comments = [job["comment"] for job in submitted]  # rule and wildcards: one per job of the DAG
    assert len(comments) == len(set(comments)), f"a job was submitted twice: {sorted(comments)}"
    assert {rule_of(job) for job in submitted} == STUDY_RULES
    assert not {job["comment"] for job in in_flight} & {job["comment"] for job in slurm_jobs(slurm_job_ids(output))}
    assert (checkpoint.stat().st_ino, checkpoint.stat().st_mtime_ns, record.read_bytes()) == written
    assert json.loads(record.read_text())["resumed_from_epoch"] is None  # trained once, in the killed run's job
    assert "finetune" in pd.read_csv(tmp_path / STUDY_TARGET)["name"].tolist()


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
    run = snakemake_under_limit(  # the throwaway workflow of tmp_path, not the repository's
        tmp_path, "--profile", str(PROFILE), "--keep-going", background=True, snakefile=None, configfiles=()
    )
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


def test_a_tenants_study_runs_through_sbatch_and_a_rerun_does_nothing(tmp_path, tiny_archive):
    """Two tiny tenants, one GREEDY round of two jobs: the rounds, jobs and tables go through sbatch."""
    tiny = tiny_study(
        tiny_archive,
        device="cpu",
        features={"layers": []},
        speedups={"enabled": False},
        train={"epochs": 1, "batch_size": 8},
        search={"backbones": ["resnet18"], "inits": ["scratch"], "freezes": ["none"], "lrs": [0.05, 0.1],
                "max_epochs": 1},
        tenants={"studies": [{"name": "pets", "data": {"classes": ["cat", "dog"]}}, {"name": "rest"}], "jobs": 2,
                 "q": 2, "schedulers": ["greedy"]},
    )  # fmt: skip
    write_study(tmp_path, tiny)
    returncode, output = snakemake_under_limit(tmp_path, "tenants", "--profile", str(PROFILE))
    assert returncode == 0, output[-8000:]
    jobs = slurm_jobs(slurm_job_ids(output))
    assert {rule_of(job) for job in jobs} == {"tenant_subset", "tenant_schedule", "tenant_job", "tenant_tables",
                                              "tenant_figure"}  # fmt: skip
    assert all(job["state"] == "COMPLETED" for job in jobs), jobs
    assert "localrule tenant_fetch_data:" in output
    table = pd.read_csv(tmp_path / "results/tables/tenants.csv")
    assert set(table["scheduler"]) == {"greedy"} and table["job"].nunique() == 2
    for tenant in ("pets", "rest"):
        assert (tmp_path / f"results/tenants/{tenant}/summary.md").is_file()
    returncode, output = snakemake_under_limit(tmp_path, "tenants", "--profile", str(PROFILE), "--dry-run")
    assert returncode == 0 and "Nothing to be done" in output
