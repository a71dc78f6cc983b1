"""The plan's run-group knobs (group size, fusion) and cuDNN's autotuning: measured per device like
the other knobs, kept only past the margin, read from plan files written before they existed."""

from __future__ import annotations

import copy
import dataclasses
import json
import random

import pytest
import torch
from helpers import quiet

from tlselect.report.tables import plan_summary, plan_table
from tlselect.training import plan as plan_module
from tlselect.training.fusion import FusedStagedNet
from tlselect.training.models import StagedNet
from tlselect.training.options import TrainConfig
from tlselect.training.plan import (
    ExecutionPlan,
    Workload,
    calibrate,
    device_key,
    fused_training_step,
    resolve,
    stored_plan,
    training_step,
)
from tlselect.training.trainer import prepare

CPU = torch.device("cpu")
GROUP = {"group_size", "fuse"}


class FakeGroupTrial:
    """Stands in for the plan module's trial set-ups: ``size`` runs, in turn or fused, whose seconds
    per image come from ``speed(size, fused, call)`` (call -1: the first warm step)."""

    speed, fail_at = None, 0
    made: list = []

    def __init__(self, plan, work, budget=None, size=1, fused=False):
        if FakeGroupTrial.fail_at and size >= FakeGroupTrial.fail_at:
            raise torch.OutOfMemoryError("made-up: out of memory")
        self.plan, self.work, self.size, self.fused, self.calls = plan, work, size, fused, 0
        self.warmup_seconds, self.steps = 0.0, 1
        self.probe = FakeGroupTrial.speed(size, fused, -1) * work.batch_size * size
        FakeGroupTrial.made.append((size, fused))

    def next(self) -> float:
        self.calls += 1
        return FakeGroupTrial.speed(self.size, self.fused, self.calls)


def fake_groups(monkeypatch, fused_gain: dict, load: float = 0.0, fail_at: int = 0, noise: float = 0.005):
    """Runs in turn at 400 images/s whatever their number; ``size`` runs fused ``fused_gain[size]`` times
    as fast, with half a percent of noise; ``fail_at``: groups this large run out of memory."""

    def speed(size, fused, call):
        jitter = random.Random(f"{size} {fused} {call}").uniform(-noise, noise)
        return (1 / 400) / (fused_gain.get(size, 1.0) if fused else 1.0) * (1 + jitter)

    FakeGroupTrial.speed, FakeGroupTrial.fail_at, FakeGroupTrial.made = staticmethod(speed), fail_at, []
    monkeypatch.setattr(plan_module, "Trial", FakeGroupTrial)
    monkeypatch.setattr(plan_module, "time_training", lambda trial: trial.next())
    monkeypatch.setattr(plan_module, "other_cores", lambda *samples: load)
    monkeypatch.setattr(plan_module, "QUIET_CHECK_S", 0.0)


def work_on(device: str) -> Workload:
    return Workload("resnet18", 32, 8, torch.device(device), job_steps=10)


def test_fusion_that_measured_faster_is_kept_with_the_largest_size_near_the_best(monkeypatch):
    fake_groups(monkeypatch, {2: 1.4, 4: 1.9, 8: 1.95})
    calibration = calibrate(work_on("cuda"), threads=2, log=quiet, knobs=GROUP)
    assert calibration.plan.fuse is True and calibration.plan.group_size == 8  # 1.95x: within the margin of 1.9x
    assert not calibration.refused and not calibration.fallback
    rows = [row for row in calibration.measurements if row["knob"] == "fuse"]
    assert [row["group_size"] for row in rows] == [2, 4, 8] and [row["kept"] for row in rows] == [False, False, True]
    assert all(row["gain"] > 1.3 for row in rows)
    # The study's plan table and its one-line summary name both knobs (the group size has no gain of its own).
    table = plan_table([{"plan": {"device_key": "cuda-x", "measurements": calibration.measurements}}])
    summary = plan_summary(table)
    assert "fuse=True (1.9" in summary and "group_size=8" in summary
    assert {size for size, _ in FakeGroupTrial.made} == {1, 2, 4, 8} - {1}  # B runs in turn and fused, B > 1

    fake_groups(monkeypatch, {2: 1.4, 4: 2.4, 8: 1.6})  # a peak: the size that measured best by the margin
    assert calibrate(work_on("cuda"), threads=2, log=quiet, knobs=GROUP).plan.group_size == 4


def test_fusion_that_measured_slower_is_left_out(monkeypatch):
    """On a CPU, fusion slower than the runs in turn: no fusion and one run a job (the expected CPU plan)."""
    fake_groups(monkeypatch, {2: 0.8})
    calibration = calibrate(work_on("cpu"), threads=2, log=quiet, knobs=GROUP)
    assert calibration.plan.fuse is False and calibration.plan.group_size == 1
    (row,) = [row for row in calibration.measurements if row["knob"] == "fuse"]
    assert row["group_size"] == 2 and not row["kept"] and row["gain"] < 1
    # A gain inside the margin is no gain either.
    fake_groups(monkeypatch, {2: 1.02})
    assert calibrate(work_on("cpu"), threads=2, log=quiet, knobs=GROUP).plan.fuse is False


def test_on_cuda_runs_in_turn_still_group_and_a_group_out_of_memory_stops_the_ladder(monkeypatch):
    fake_groups(monkeypatch, {2: 0.9, 4: 0.9, 8: 0.9})
    plan = calibrate(work_on("cuda"), threads=2, log=quiet, knobs=GROUP).plan
    assert plan.fuse is False and plan.group_size == 8  # one start and one tuning of each shape for 8 runs
    fake_groups(monkeypatch, {2: 1.5, 4: 2.0, 8: 3.0}, fail_at=8)
    calibration = calibrate(work_on("cuda"), threads=2, log=quiet, knobs=GROUP)
    assert calibration.plan.fuse is True and calibration.plan.group_size == 4
    assert any(
        "failed" in row["note"] and row["group_size"] == 8 for row in calibration.measurements if row["knob"] == "fuse"
    )


def test_group_knobs_under_load_are_refused_to_their_defaults(monkeypatch):
    fake_groups(monkeypatch, {2: 2.0, 4: 3.0, 8: 4.0}, load=plan_module.spare_cores(2) + 1.0)
    calibration = calibrate(work_on("cuda"), threads=2, log=quiet, knobs=GROUP)
    assert calibration.refused and calibration.plan.fuse is False and calibration.plan.group_size == 1
    assert set(calibration.fallback) == GROUP


def test_a_fuse_the_plan_already_has_is_kept_while_the_group_size_is_measured(monkeypatch):
    """Fusion slower, but the plan says fuse (only the group size is measured): the fused size measured."""
    fake_groups(monkeypatch, {2: 0.8})
    start = ExecutionPlan(threads=2, fuse=True)
    calibration = calibrate(work_on("cpu"), threads=2, log=quiet, knobs={"group_size"}, start=start)
    assert calibration.plan.fuse is True and calibration.plan.group_size == 2
    start = ExecutionPlan(threads=2, fuse=False)
    assert calibrate(work_on("cpu"), threads=2, log=quiet, knobs={"group_size"}, start=start).plan.group_size == 1


def test_a_plan_file_without_the_new_knobs_loads_with_their_defaults(tmp_path, monkeypatch):
    """A plan file of an earlier version (no cudnn_benchmark, group_size, fuse) reads as it was, the
    new knobs at their defaults; asking for one of them measures that one only."""
    key = device_key(CPU, 1)
    old = {"device_key": key, "plan": {"precision": "float32", "channels_last": True, "threads": 1, "compile": False,
           "eval_batch_size": 512}, "measurements": [], "compile_measured": False}  # fmt: skip
    (tmp_path / f"{key}.json").write_text(json.dumps(old))
    chosen, note = resolve(ExecutionPlan(threads=1), {"channels_last"}, str(tmp_path), work_on("cpu"), log=quiet)
    assert chosen == ExecutionPlan(channels_last=True, threads=1) and note["source"] == "study"
    assert chosen.group_size == 1 and chosen.fuse is False and chosen.cudnn_benchmark is False
    fake_groups(monkeypatch, {2: 0.8})
    calls, real = [], plan_module.calibrate
    monkeypatch.setattr(plan_module, "calibrate", lambda *a, **k: calls.append(k["knobs"]) or real(*a, **k))
    stored = stored_plan(tmp_path, work_on("cpu"), 1, log=quiet, knobs={"channels_last", "group_size", "fuse"})
    assert calls == [{"group_size", "fuse"}]
    assert stored["plan"]["channels_last"] is True and stored["plan"]["group_size"] == 1
    written = json.loads((tmp_path / f"{key}.json").read_text())
    assert {"group_size", "fuse", "channels_last"} <= set(written["measured"]) and written["plan"]["fuse"] is False


def test_the_plan_key_changes_with_the_torch_version_and_the_device(monkeypatch):
    """The per-user cache holds one plan per device key: another torch version, another device or
    another thread budget is another file, so a plan never outlives what it measured."""
    key = device_key(CPU, 2)
    assert key.startswith("cpu-") and key.endswith(f"torch{torch.__version__.split('+')[0]}")
    assert device_key(CPU, 1) != key
    monkeypatch.setattr(plan_module.torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    cuda = device_key(torch.device("cuda"), 2)
    assert cuda.startswith("cuda-nvidia-h200-torch") and cuda != key
    monkeypatch.setattr(plan_module.torch, "__version__", "9.9.0+cu999")
    assert device_key(CPU, 2) != key and device_key(CPU, 2).endswith("torch9.9.0")


def test_cudnn_autotuning_is_not_applicable_on_a_cpu(monkeypatch):
    fake_groups(monkeypatch, {})
    calibration = calibrate(work_on("cpu"), threads=2, log=quiet, knobs={"cudnn_benchmark"})
    assert calibration.plan.cudnn_benchmark is False and not calibration.refused
    (row,) = calibration.measurements
    assert row["knob"] == "cudnn_benchmark" and not row["kept"] and row["note"].startswith("not applicable")
    assert FakeGroupTrial.made == []  # nothing was timed for it


def test_cudnn_autotuning_on_cuda_is_judged_on_a_whole_job(monkeypatch):
    """Its steps 10% faster, its first step (the tuning) as long as 40 steps: over a job of 10 steps
    a loss, over one of 1,000 steps a gain."""
    fake_groups(monkeypatch, {})

    class Tuned(FakeGroupTrial):
        def __init__(self, plan, work, budget=None, size=1, fused=False):
            super().__init__(plan, work, budget, size, fused)
            self.warmup_seconds = 40 * work.batch_size / 400 if plan.cudnn_benchmark else 0.0

        def next(self) -> float:
            return super().next() / (1.1 if self.plan.cudnn_benchmark else 1.0)

    monkeypatch.setattr(plan_module, "Trial", Tuned)
    short = calibrate(work_on("cuda"), threads=2, log=quiet, knobs={"cudnn_benchmark"})
    assert short.plan.cudnn_benchmark is False
    long = calibrate(dataclasses.replace(work_on("cuda"), job_steps=1000), 2, log=quiet, knobs={"cudnn_benchmark"})
    assert long.plan.cudnn_benchmark is True


def test_the_trial_and_the_trainer_set_cudnn_autotuning_from_the_plan(monkeypatch, tensor_data, tmp_path):
    seen, real = [], plan_module.training_step

    def recording(*args):
        seen.append(torch.backends.cudnn.benchmark)
        return real(*args)

    monkeypatch.setattr(plan_module, "training_step", recording)
    before = torch.backends.cudnn.benchmark
    plan_module.Trial(ExecutionPlan(threads=1, cudnn_benchmark=True), work_on("cpu"), 0.0)
    assert seen and all(seen) and torch.backends.cudnn.benchmark == before  # set while it steps, then restored
    config = TrainConfig(data=str(tensor_data), out=str(tmp_path / "m.pt"), epochs=1, batch_size=8, device="cpu",
                         threads=1, cudnn_benchmark=True)  # fmt: skip
    torch.backends.cudnn.benchmark = True
    try:
        prepare(config, log=quiet)
        assert torch.backends.cudnn.benchmark is False  # a CPU run: no autotuning, whatever the config says
    finally:
        torch.backends.cudnn.benchmark = before


def test_the_timed_fused_step_is_the_runs_own_steps():
    """What calibration times fused is what the runs compute in turn: the same weights after a step."""
    torch.set_num_threads(1)
    plan = ExecutionPlan(threads=1)
    members = []
    for seed in range(2):
        torch.manual_seed(seed)
        members.append(StagedNet("resnet18", 10, 32).train())
    alone = copy.deepcopy(members)
    generator = torch.Generator().manual_seed(0)
    xs = [torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=generator) for _ in members]
    ys = [torch.randint(0, 10, (4,), generator=generator) for _ in members]

    def optimizers(models):
        return [torch.optim.SGD(m.parameters(), lr=0.1 * (i + 1), momentum=0.9) for i, m in enumerate(models)]

    scalers = [plan.grad_scaler(CPU) for _ in members]
    fused_training_step(FusedStagedNet(members), xs, ys, optimizers(members), plan, scalers, CPU)
    for model, x, y, optimizer in zip(alone, xs, ys, optimizers(alone), strict=True):
        training_step(model, x, y, optimizer, plan, plan.grad_scaler(CPU), CPU)
    for fused_model, own in zip(members, alone, strict=True):
        for (name, a), b in zip(fused_model.state_dict().items(), own.state_dict().values(), strict=True):
            assert torch.allclose(a.float(), b.float(), atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("size", [1, 2])
def test_a_real_group_trial_times_every_runs_images(size):
    """The real set-up (no fakes): seconds per image of all the group's runs, positive and finite."""
    torch.set_num_threads(1)
    trial = plan_module.Trial(ExecutionPlan(threads=1), dataclasses.replace(work_on("cpu"), batch_size=4), 0.0,
                               size=size, fused=size > 1)  # fmt: skip
    assert trial.size == size and len(trial.models) == size and trial.steps == 1
    assert 0 < plan_module.time_training(trial) < float("inf")
