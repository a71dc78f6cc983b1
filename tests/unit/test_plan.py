"""Execution plans: calibration keeps only what measured faster, plans are stored per device, pins win."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from tlselect.config import plan_flags
from tlselect.training import plan as plan_module
from tlselect.training.options import TrainConfig
from tlselect.training.plan import ExecutionPlan, PlanError, Workload, calibrate, resolve, stored_plan
from tlselect.training.trainer import train

CPU = torch.device("cpu")
WORK = Workload("resnet18", 32, 8, CPU, job_steps=10, eval_batch_sizes=(8, 16))


class FakeClock:
    """The plan module's ``time``: ``perf_counter()`` moves by ``tick`` per reading and by what
    :meth:`advance` adds, nothing else, so that calibration measures exactly the steps' set costs
    however busy the machine is. Powers of two keep every sum exact."""

    def __init__(self, tick: float = 2**-10):
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def __getattr__(self, name):  # anything else of the time module, unchanged
        return getattr(time, name)


def slowed(knob: str, value, clock: FakeClock, seconds: float = 2**-3, step: float = 2**-4):
    """A training step that takes ``step`` seconds on ``clock``, and ``seconds`` more whenever the
    plan has ``knob`` set to ``value``."""
    real = plan_module.training_step

    def training_step(model, x, y, optimizer, plan, scaler, device):
        real(model, x, y, optimizer, plan, scaler, device)
        clock.advance(step + (seconds if getattr(plan, knob) == value else 0.0))

    return training_step


@pytest.mark.parametrize("slow_value", [True, False])
def test_calibration_keeps_a_knob_only_when_it_measured_faster(monkeypatch, slow_value):
    """With channels-last made slower on purpose it is left out; with its absence made slower, kept."""
    clock = FakeClock()
    monkeypatch.setattr(plan_module, "time", clock)
    monkeypatch.setattr(plan_module, "training_step", slowed("channels_last", slow_value, clock))
    monkeypatch.setattr(plan_module, "other_cores", lambda *samples: 0.0)  # no load: see test_plan_robust.py
    knobs = {"channels_last", "eval_batch_size"}  # bfloat16 steps take seconds on some CPUs
    plan, measurements = calibrate(WORK, threads=1, budget=0.2, log=lambda m: None, knobs=knobs)
    assert plan.channels_last is (not slow_value)
    row = next(m for m in measurements if m["knob"] == "channels_last")
    assert row["kept"] is (not slow_value)
    assert (row["gain"] > 1.0) is (not slow_value)
    # Whatever the plan keeps measured faster than its absence (a knob that costs the same is left out).
    assert all(m["gain"] > 1.0 for m in measurements if m["kept"])
    assert plan.eval_batch_size in (8, 16)


def test_the_plan_is_calibrated_once_per_device_and_then_read(monkeypatch, tmp_path):
    calls = []
    real = plan_module.calibrate
    changed = threading.Condition()
    at_lock = []  # one entry per job that reached the plan file's lock

    def flock(handle, operation):
        with changed:
            at_lock.append(operation)
            changed.notify_all()
        return fcntl.flock(handle, operation)

    def counting(*args, **kwargs):
        with changed:
            calls.append(1)
            changed.notify_all()
            # Calibrate only once the other job waits for the lock this one holds (it found no plan
            # file): then it must read this one's plan. A second call here is the failure.
            assert changed.wait_for(lambda: len(at_lock) == 2 or len(calls) == 2, timeout=300)
        return real(*args, **kwargs)

    monkeypatch.setattr(plan_module, "fcntl", SimpleNamespace(**{**vars(fcntl), "flock": flock}))
    monkeypatch.setattr(plan_module, "calibrate", counting)
    work = dataclasses.replace(WORK)
    results = []

    def job():
        results.append(stored_plan(tmp_path, work, 1, False, log=lambda m: None))

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(at_lock) == 2, "the jobs did not both wait for the plan file's lock"
    assert len(calls) == 1, "two jobs on one device calibrated twice"
    assert results[0]["plan"] == results[1]["plan"]
    (plan_file,) = tmp_path.glob("*.json")
    assert plan_file.name.startswith("cpu-") and "torch" in plan_file.name
    stored_plan(tmp_path, work, 1, False, log=lambda m: None)
    assert len(calls) == 1, "a stored plan was measured again"


def test_pinned_knobs_win_and_auto_ones_come_from_the_stored_plan(tmp_path):
    key = plan_module.device_key(CPU, 1)
    measured = ExecutionPlan(precision="bfloat16", channels_last=True, threads=1, eval_batch_size=512)
    (tmp_path / f"{key}.json").write_text(
        json.dumps({"device_key": key, "plan": dataclasses.asdict(measured), "measurements": [],
                    "compile_measured": False})
    )  # fmt: skip
    pinned = ExecutionPlan(precision="float32", channels_last=False, threads=1, eval_batch_size=64)
    chosen, note = resolve(pinned, {"channels_last", "eval_batch_size"}, str(tmp_path), WORK, log=lambda m: None)
    assert chosen == ExecutionPlan(precision="float32", channels_last=True, threads=1, eval_batch_size=512)
    assert note["auto"] == ["channels_last", "eval_batch_size"] and note["file"].endswith(f"{key}.json")
    assert resolve(pinned, set(), "", WORK)[0] == pinned  # nothing auto: no plan needed
    with pytest.raises(PlanError, match="unknown plan knob"):
        resolve(pinned, {"amp"}, str(tmp_path), WORK)
    with pytest.raises(PlanError, match="plans folder"):
        resolve(pinned, {"precision"}, "", WORK)
    (tmp_path / f"{key}.json").write_text("{not json")
    with pytest.raises(PlanError, match="delete it"):
        resolve(pinned, {"precision"}, str(tmp_path), WORK)


def test_plan_flags_pass_pinned_knobs_and_name_the_auto_ones():
    auto = {"precision": "auto", "channels_last": "auto", "threads": "auto", "compile": False, "eval_batch_size": 0,
            "cudnn_benchmark": "auto"}  # fmt: skip
    flags = "--no-compile --auto precision,channels_last,threads,cudnn_benchmark,eval_batch_size"
    assert plan_flags({"plan": auto}) == flags
    # The run groups' size and fusion, when auto, are measured by the plan too (and pinned ones are not).
    groups = {"plan": auto, "run_groups": {"size": "auto", "fuse": "auto"}}
    assert plan_flags(groups) == flags + ",group_size,fuse"
    assert plan_flags(groups | {"run_groups": {"size": 4, "fuse": False}}) == flags
    pinned = {"precision": "bfloat16", "channels_last": True, "threads": "all", "compile": "auto",
              "eval_batch_size": 512, "cudnn_benchmark": False}  # fmt: skip
    assert plan_flags({"plan": pinned}) == (
        "--precision bfloat16 --channels-last --no-cudnn-benchmark --eval-batch-size 512 --auto compile"
    )


def test_a_run_records_the_plan_it_used(tensor_data, tmp_path):
    config = TrainConfig(
        data=str(tensor_data), out=str(tmp_path / "m.pt"), epochs=1, batch_size=8, device="cpu", threads=1,
        plans=str(tmp_path / "plans"), auto="precision,eval_batch_size", channels_last=False,
    )  # fmt: skip
    key = plan_module.device_key(CPU, 1)
    stored = ExecutionPlan(precision="bfloat16", threads=1, eval_batch_size=256)
    (tmp_path / "plans").mkdir()
    (tmp_path / "plans" / f"{key}.json").write_text(
        json.dumps({"device_key": key, "plan": dataclasses.asdict(stored), "measurements": [{"knob": "precision"}],
                    "compile_measured": False})
    )  # fmt: skip
    record = train(config, log=lambda m: None)
    assert record["config"]["precision"] == "bfloat16" and record["config"]["eval_batch_size"] == 256
    assert record["config"]["channels_last"] is False  # pinned
    assert record["plan"]["auto"] == ["eval_batch_size", "precision"]
    assert record["plan"]["measurements"] == [{"knob": "precision"}]


def test_float16_on_a_cpu_is_refused_with_the_fix(tensor_data, tmp_path):
    config = TrainConfig(data=str(tensor_data), out=str(tmp_path / "m.pt"), precision="float16", device="cpu")
    with pytest.raises(PlanError, match="float16 needs a CUDA device"):
        train(config, log=lambda m: None)
