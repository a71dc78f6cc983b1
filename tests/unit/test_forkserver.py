"""The fork server (tlselect.training.forkserver): a job handed to the fork server behaves as the script run in its own
process (output, exit code, metrics), a killed job takes its child with it, and it stays off where
it must."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO

from tlselect.core.registry import read_record
from tlselect.training import forkserver
from tlselect.training.options import TrainConfig
from tlselect.training.speedups import jobs_suite


@pytest.fixture
def server_env(tmp_path) -> dict:
    """The environment of a workflow job with the fork server on, with a fork server of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return env | {
        forkserver.ENV: "1",
        forkserver.DIR_ENV: str(tmp_path / "forked"),
        "TLSELECT_FORK_SERVER_IDLE_S": "20",
    }


def served_by_fork_server(env: dict) -> bool:
    return any(path.suffix == ".sock" for path in Path(env[forkserver.DIR_ENV]).glob("*"))


def run_script(script: str, *args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_a_job_run_in_the_fork_server_gives_the_output_exit_code_and_metrics_of_a_cold_one(
    tmp_path, server_env, tensor_data
):
    records = {}
    for mode in ("cold", "forked"):
        env = server_env | {forkserver.ENV: "1" if mode == "forked" else "0"}
        args = ["--data", str(tensor_data), "--out", f"{mode}.pt", "--record", f"{mode}.json", "--epochs", "2",
                "--batch-size", "8", "--threads", "1", "--device", "cpu", "--init", "scratch"]  # fmt: skip
        result = run_script("train.py", *args, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "epoch 2/2" in result.stdout + result.stderr  # progress reaches the job's own streams
        records[mode] = read_record(tmp_path / f"{mode}.json")
    assert served_by_fork_server(server_env)
    losses = {mode: [curve["train_loss"] for curve in record["curves"]] for mode, record in records.items()}
    assert records["forked"]["metrics"] == records["cold"]["metrics"] and losses["forked"] == losses["cold"]
    assert len(losses["forked"]) == 2 and records["forked"]["metrics"]["test_loss"] is not None

    bad = run_script("train.py", "--no-such-flag", env=server_env, cwd=tmp_path)
    assert bad.returncode == 2 and "unrecognized arguments: --no-such-flag" in bad.stderr


def test_killing_a_forked_job_kills_its_child_and_a_signal_ends_the_job_alike(tmp_path, server_env):
    script = tmp_path / "sleeper.py"
    script.write_text(
        "import os, sys, time\n"
        "open(sys.argv[1], 'w').write(str(os.getpid()))\n"
        "if sys.argv[2] == 'self': os.kill(os.getpid(), 15)\n"
        "time.sleep(300)\n"
    )
    hand_over = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); from tlselect.training import forkserver; "
        f"forkserver.run_in_fork_server({str(script)!r}); raise SystemExit('not handed over')"
    )

    def start(mode: str) -> tuple[subprocess.Popen, Path]:
        pid_file = tmp_path / f"{mode}.pid"
        job = subprocess.Popen([sys.executable, "-c", hand_over, str(pid_file), mode], cwd=tmp_path, env=server_env)
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


def test_fork_server_is_off_in_slurm_jobs_and_unless_asked(monkeypatch):
    monkeypatch.setenv(forkserver.ENV, "1")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert forkserver.enabled()
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert not forkserver.enabled()
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv(forkserver.ENV, "0")
    assert not forkserver.enabled()


def test_edited_code_or_another_start_up_path_gets_another_fork_server(tmp_path, monkeypatch):
    for folder in ("tlselect", "scripts"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(forkserver, "REPO", tmp_path)
    before = forkserver.key()
    assert forkserver.key() == before
    path = tmp_path / "tlselect" / "a.py"
    path.write_text("x = 2\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    edited = forkserver.key()
    assert edited != before
    nested = tmp_path / "tlselect" / "training" / "b.py"  # a module of a subpackage
    nested.parent.mkdir()
    nested.write_text("y = 1\n")
    with_subpackage = forkserver.key()
    assert with_subpackage != edited
    nested.write_text("y = 22\n")
    assert forkserver.key() != with_subpackage
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "hooks"))  # a sitecustomize there loads at start-up
    assert forkserver.key() != with_subpackage


def test_the_jobs_benchmark_measures_a_job_fresh_and_forked(tensor_data, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    lines = []
    (row,) = jobs_suite(TrainConfig(data=str(tensor_data), init="scratch", threads=1, device="cpu"), 1, lines.append)
    assert row["suite"] == "jobs" and row["seconds"] > 0 and row["baseline_seconds"] > 0
    assert "in a fresh process" in row["note"] and any("forked job 1/1" in line for line in lines)
