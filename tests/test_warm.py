"""Warm start (tlselect.warm): a job handed to the warm process behaves as the script run in its own
process (output, exit code, metrics), a killed job takes its child with it, and it stays off where
it must."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from tlselect import warm
from tlselect.benchmarks import jobs_suite
from tlselect.registry import read_record
from tlselect.train import TrainConfig


@pytest.fixture
def warm_env(tmp_path) -> dict:
    """The environment of a workflow job with warm start on, with a warm process of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return env | {warm.ENV: "1", warm.DIR_ENV: str(tmp_path / "warm"), "TLSELECT_WARM_IDLE_S": "20"}


def served_by_warm_process(env: dict) -> bool:
    return any(path.suffix == ".sock" for path in Path(env[warm.DIR_ENV]).glob("*"))


def run_script(script: str, *args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_a_job_run_warm_gives_the_output_exit_code_and_metrics_of_a_cold_one(tmp_path, warm_env, tensor_data):
    records = {}
    for mode in ("cold", "warm"):
        env = warm_env | {warm.ENV: "1" if mode == "warm" else "0"}
        args = ["--data", str(tensor_data), "--out", f"{mode}.pt", "--record", f"{mode}.json", "--epochs", "2",
                "--batch-size", "8", "--threads", "1", "--device", "cpu", "--init", "scratch"]  # fmt: skip
        result = run_script("train.py", *args, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "epoch 2/2" in result.stdout + result.stderr  # progress reaches the job's own streams
        records[mode] = read_record(tmp_path / f"{mode}.json")
    assert served_by_warm_process(warm_env)
    losses = {mode: [curve["train_loss"] for curve in record["curves"]] for mode, record in records.items()}
    assert records["warm"]["metrics"] == records["cold"]["metrics"] and losses["warm"] == losses["cold"]
    assert len(losses["warm"]) == 2 and records["warm"]["metrics"]["test_loss"] is not None

    bad = run_script("train.py", "--no-such-flag", env=warm_env, cwd=tmp_path)
    assert bad.returncode == 2 and "unrecognized arguments: --no-such-flag" in bad.stderr


def test_killing_a_warm_job_kills_its_child_and_a_signal_ends_the_job_alike(tmp_path, warm_env):
    script = tmp_path / "sleeper.py"
    script.write_text(
        "import os, sys, time\n"
        "open(sys.argv[1], 'w').write(str(os.getpid()))\n"
        "if sys.argv[2] == 'self': os.kill(os.getpid(), 15)\n"
        "time.sleep(300)\n"
    )
    hand_over = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); from tlselect import warm; "
        f"warm.run_script_warm({str(script)!r}); raise SystemExit('not handed over')"
    )

    def start(mode: str) -> tuple[subprocess.Popen, Path]:
        pid_file = tmp_path / f"{mode}.pid"
        job = subprocess.Popen([sys.executable, "-c", hand_over, str(pid_file), mode], cwd=tmp_path, env=warm_env)
        return job, pid_file

    job, pid_file = start("sleep")
    child = wait_for_pid(pid_file, job)
    assert child != job.pid
    job.kill()
    job.wait()
    assert wait_until_gone(child), "the child outlived its killed job"

    job, pid_file = start("self")
    assert job.wait(timeout=120) == -signal.SIGTERM


def wait_for_pid(pid_file: Path, job: subprocess.Popen) -> int:
    for _ in range(1200):
        if pid_file.exists() and pid_file.read_text():
            return int(pid_file.read_text())
        assert job.poll() is None, "the job ended before its child started"
        time.sleep(0.1)
    raise AssertionError("the child never started")


def wait_until_gone(pid: int) -> bool:
    for _ in range(300):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_warm_start_is_off_in_slurm_jobs_and_unless_asked(monkeypatch):
    monkeypatch.setenv(warm.ENV, "1")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert warm.enabled()
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert not warm.enabled()
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv(warm.ENV, "0")
    assert not warm.enabled()


def test_edited_code_or_another_start_up_path_gets_another_warm_process(tmp_path, monkeypatch):
    for folder in ("tlselect", "scripts"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(warm, "REPO", tmp_path)
    before = warm.key()
    assert warm.key() == before
    path = tmp_path / "tlselect" / "a.py"
    path.write_text("x = 2\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    edited = warm.key()
    assert edited != before
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "hooks"))  # a sitecustomize there loads at start-up
    assert warm.key() != edited


def test_the_jobs_benchmark_measures_a_job_cold_and_warm(tensor_data, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    lines = []
    (row,) = jobs_suite(TrainConfig(data=str(tensor_data), init="scratch", threads=1, device="cpu"), 1, lines.append)
    assert row["suite"] == "jobs" and row["seconds"] > 0 and row["baseline_seconds"] > 0
    assert "in a fresh process" in row["note"] and any("warm job 1/1" in line for line in lines)
