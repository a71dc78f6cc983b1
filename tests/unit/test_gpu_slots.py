"""Local GPU assignment (tlselect.training.gpus), on the CPU with simulated devices ($TLSELECT_GPU_SLOTS).

Concurrent jobs get distinct GPUs (or, with N jobs per GPU, at most N share one), a job beyond the
pool waits, a killed job's GPU is reclaimed at once; the training scripts claim their GPU at
start-up. That the rules ask for one unless device is cpu: tests/workflow/test_gpu_slots_workflow.py.
"""

import os
import selectors
import shlex
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO

from tlselect.training import gpus

# A stand-in job: claims the GPUs it was given, prints what it sees, then runs until killed.
JOB = (
    "import os, sys, time; from tlselect.training.gpus import assign; "
    "assign(int(sys.argv[1]), 'auto', per_device=int(sys.argv[2])); "
    "print(os.environ['CUDA_VISIBLE_DEVICES'], flush=True); time.sleep(600)"
)


@pytest.fixture
def slots(tmp_path, monkeypatch):
    """Environment of a machine with three simulated GPUs and a private lock folder."""
    monkeypatch.setenv(gpus.SLOTS_ENV, "3")
    monkeypatch.setenv(gpus.LOCK_DIR_ENV, str(tmp_path / "locks"))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return dict(os.environ)


def start_job(env, count=1, per_device=1):
    return subprocess.Popen(
        [sys.executable, "-c", JOB, str(count), str(per_device)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def first_line(process, timeout):
    """The job's first stdout line (the devices it got), or None if it prints none in ``timeout`` s."""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            return None
    return process.stdout.readline().strip()


def gpu_message(process, timeout):
    """The job's first ``gpus:`` line on stderr (it claimed GPUs, or waits for them), or None after ``timeout`` s."""
    text, fd, deadline = "", process.stderr.fileno(), time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while selector.select(max(0.0, deadline - time.monotonic())):
            chunk = os.read(fd, 4096).decode()  # raw reads: no buffered line is left unseen by select
            if not chunk:
                return None
            text += chunk
            lines = [line for line in text.split("\n")[:-1] if line.startswith("gpus:")]
            if lines:
                return lines[0]
    return None


@pytest.fixture
def jobs():
    started = []
    yield started
    for process in started:
        process.kill()
        process.wait()


def test_parallel_jobs_get_distinct_gpus_and_a_killed_jobs_gpu_is_reclaimed(slots, jobs):
    jobs.extend(start_job(slots) for _ in range(3))
    seen = [first_line(job, 30) for job in jobs]
    assert sorted(seen) == ["0", "1", "2"]

    waiting = start_job(slots)
    jobs.append(waiting)
    message = gpu_message(waiting, 30)  # all three GPUs are held: the fourth job says it waits ...
    assert message is not None and message.startswith("gpus: waiting for 1 free GPU(s)"), message
    assert first_line(waiting, 0) is None  # ... and got none

    victim = jobs[1]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert first_line(waiting, 15) == seen[1]  # the kernel dropped the killed job's lock


def test_with_two_jobs_per_gpu_jobs_spread_then_share_and_never_three_on_one(slots, jobs, monkeypatch):
    slots[gpus.SLOTS_ENV] = "2"
    seen = []
    for _ in range(4):  # one at a time: the claim order is deterministic
        jobs.append(start_job(slots, 1, per_device=2))
        seen.append(first_line(jobs[-1], 30))
    assert seen == ["0", "1", "0", "1"]  # every GPU once before any twice

    waiting = start_job(slots, 1, per_device=2)
    jobs.append(waiting)
    message = gpu_message(waiting, 30)  # both slots of both GPUs are held: a fifth job waits
    assert message is not None and message.startswith("gpus: waiting for 1 free GPU(s)"), message
    assert "GPU 1 slot 1: pid" in message
    assert first_line(waiting, 0) is None

    jobs[3].send_signal(signal.SIGKILL)  # held GPU 1's second slot
    jobs[3].wait()
    assert first_line(waiting, 15) == "1"

    monkeypatch.setenv(gpus.SLOTS_ENV, "2")
    with pytest.raises(gpus.GPUError, match="no 1 free GPU"):
        gpus.claim(1, timeout=0.3, poll=0.1, log=lambda message: None, per_device=2)
    with pytest.raises(gpus.GPUError, match="at least 1"):
        gpus.claim(1, per_device=0)


def test_a_job_with_two_gpus_gets_two_free_ones(slots, jobs):
    jobs.append(start_job(slots, 1))
    assert first_line(jobs[0], 30) == "0"
    jobs.append(start_job(slots, 2))
    assert first_line(jobs[1], 30) == "1,2"


def test_claim_gives_up_after_its_timeout(slots, jobs, tmp_path):
    jobs.append(start_job(slots, 3))
    assert first_line(jobs[0], 30) == "0,1,2"
    with pytest.raises(gpus.GPUError, match="no 1 free GPU"):
        gpus.claim(1, timeout=0.5, poll=0.1, log=lambda message: None)
    with pytest.raises(gpus.GPUError, match="asks for 4 GPU"):
        gpus.claim(4)


def test_gpu_zero_hides_every_gpu_and_cuda_then_fails_clearly(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert gpus.assign(0, "auto") == [] and os.environ["CUDA_VISIBLE_DEVICES"] == ""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(gpus.GPUError, match="given no GPU"):
        gpus.assign(0, "cuda")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert gpus.assign(None, "auto") == [] and os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"  # run by hand


def test_a_machine_without_gpus_runs_gpu_jobs_on_the_cpu(monkeypatch):
    monkeypatch.setenv(gpus.SLOTS_ENV, "0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpus.assign(1, "auto", log=lambda message: None) == []
    with pytest.raises(gpus.GPUError, match="no GPU"):
        gpus.assign(1, "cuda")


def test_pool_and_lock_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(gpus.SLOTS_ENV, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1a2b, 3,-1,4")  # CUDA stops at an invalid entry
    assert gpus.device_pool() == ["GPU-1a2b", "3"]
    monkeypatch.delenv(gpus.LOCK_DIR_ENV, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "42")  # SLURM chose this job's GPUs: its locks are its own
    assert gpus.lock_dir().name == f"tlselect-gpu-slots-{os.getuid()}-slurm-job-42"


def test_training_script_claims_a_free_gpu_before_it_starts(slots, jobs, tensor_data, tmp_path):
    jobs.append(start_job(slots, 1))
    assert first_line(jobs[0], 30) == "0"
    command = [
        sys.executable, str(REPO / "scripts/train.py"), "--data", str(tensor_data), "--out", str(tmp_path / "m.pt"),
        "--epochs", "1", "--batch-size", "32", "--threads", "1", "--device", "auto", "--gpus", "1",
    ]  # fmt: skip
    result = subprocess.run(command, env=slots, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "gpus: claimed GPU 1 of 0,1,2" in result.stderr
    assert (tmp_path / "m.pt").is_file()


def test_extraction_script_refuses_cuda_without_a_gpu(tmp_path):
    command = [
        sys.executable, str(REPO / "scripts/extract_features.py"), "--inputs", str(tmp_path), "--layer", "stem",
        "--out", str(tmp_path / "features"), "--device", "cuda", "--gpus", "0",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "given no GPU" in result.stderr


def test_gpu_study_script_prints_one_study_per_jobs_per_gpu_setting(tmp_path):
    """benchmarks/gpu_study.sh --dry-run: the study it would run per setting, nothing run or written."""
    script = str(REPO / "benchmarks/gpu_study.sh")
    command = ["bash", script, "--dry-run", str(tmp_path / "a.tar.gz"), str(tmp_path / "o")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    studies = [shlex.split(line[2:]) for line in result.stdout.splitlines() if " -m snakemake " in line]
    assert len(studies) == 4 and not (tmp_path / "o").exists()
    for n, study in zip((1, 2, 4, 8), studies, strict=True):
        assert f"gpu={n}" in study and f"gpu_jobs_per_device={n}" in study and "search={enabled: true}" in study
        assert f"data={{archive: {tmp_path / 'a.tar.gz'}}}" in study
        assert study[study.index("--directory") + 1] == str(tmp_path / f"o/work/j{n}")
