"""Execution plans: how a job runs on its device, measured there rather than assumed.

A plan is the precision (float32, bfloat16 autocast, float16 autocast on CUDA), the memory format
(channels-last or not), the CPU threads, ``torch.compile`` and the evaluation batch size. What is
fastest depends on the machine: bfloat16 autocast is 1.5x faster than float32 on one CPU and 0.68x
on another. :func:`calibrate` times a few real training steps of each choice on the device the job
runs on and keeps a knob only where it measured faster than its absence (greedily, one knob at a
time, each against the plan so far), so no optimization the plan enables is slower there.

Plans are kept per device in ``<plans>/<device key>.json``: the first job on a kind of device
calibrates under a lock while the others wait, and every later job reads the file. A knob the
config pins is never measured against; it simply wins.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tlselect.core.errors import TLSelectError
from tlselect.core.files import write_json
from tlselect.training.models import StagedNet

KNOBS = ("precision", "channels_last", "threads", "compile", "eval_batch_size")
PRECISIONS = ("float32", "bfloat16", "float16")
EVAL_BATCH_SIZES = {"cpu": (256, 512, 1024), "cuda": (256, 512, 1024, 2048, 4096)}


class PlanError(TLSelectError):
    """A plan cannot be used or made; the message names the file or knob and the fix."""


@dataclass(frozen=True)
class ExecutionPlan:
    """How a job executes; none of it changes what the job computes beyond floating-point rounding."""

    precision: str = "float32"
    channels_last: bool = False
    threads: int = 0  # torch CPU threads (0: torch's default)
    compile: bool = False
    eval_batch_size: int = 1024

    def autocast(self, device: torch.device):
        """The autocast context of this precision (a no-op in float32)."""
        dtype = None if self.precision == "float32" else getattr(torch, self.precision)
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """4-D batches go channels-last when the plan says so; flat features stay as they are."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.preserve_format

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """float16 needs loss scaling; the other precisions get a disabled scaler."""
        return torch.amp.GradScaler(device.type, enabled=self.precision == "float16")


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise PlanError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)} (or auto)")
    if precision == "float16" and device.type != "cuda":
        raise PlanError("precision float16 needs a CUDA device; on a CPU use bfloat16 or float32 (or auto)")


def device_key(device: torch.device, threads: int) -> str:
    """A file-name-safe key of the device kind (and, on a CPU, the thread budget) and the torch version."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_model() + f" {os.cpu_count()}cpu {threads or torch.get_num_threads()}t"
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-").lower()
    return f"{device.type}-{slug}-torch{torch.__version__.split('+')[0]}"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Workload:
    """What calibration times: the study's backbone, input size and batch, on the job's device."""

    backbone: str
    resolution: int
    batch_size: int
    device: torch.device
    job_steps: int = 200  # optimizer steps of a typical job: what compile time is spread over
    eval_batch_sizes: tuple[int, ...] = ()  # evaluation batch sizes to try (empty: EVAL_BATCH_SIZES)

    def eval_candidates(self) -> tuple[int, ...]:
        return self.eval_batch_sizes or EVAL_BATCH_SIZES.get(self.device.type, EVAL_BATCH_SIZES["cpu"])


def training_step(model: nn.Module, x, y, optimizer, plan: ExecutionPlan, scaler, device) -> None:
    """One optimizer step as the trainer takes it (forward under the plan's autocast, backward, step)."""
    with plan.autocast(device):
        logits = model(plan.prepare(x))
    loss = nn.functional.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


@contextlib.contextmanager
def _threads(plan: ExecutionPlan):
    """Run a block with the plan's torch threads (when it sets them), then restore the previous count."""
    previous = torch.get_num_threads()
    if plan.threads:
        torch.set_num_threads(plan.threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Trial:
    """A model, optimizer and batch set up for one plan; ``seconds_per_image()`` times its steps."""

    def __init__(self, plan: ExecutionPlan, work: Workload):
        self.plan, self.work = plan, work
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (work.batch_size, 3, 32, 32), dtype=torch.uint8, generator=generator)
        self.y = torch.randint(0, 10, (work.batch_size,), generator=generator)
        self.x, self.y = self.x.to(work.device), self.y.to(work.device)
        torch.manual_seed(0)
        model = StagedNet(work.backbone, 10, work.resolution).to(work.device, memory_format=plan.memory_format())
        self.model = model.train()
        self.forward = torch.compile(model) if plan.compile else model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.scaler = plan.grad_scaler(work.device)
        self.warmup_seconds = self._run(2)  # first steps: allocator, cuDNN autotuning, compilation

    def _run(self, steps: int) -> float:
        with _threads(self.plan):
            _sync(self.work.device)
            t0 = time.perf_counter()
            for _ in range(steps):
                training_step(self.forward, self.x, self.y, self.optimizer, self.plan, self.scaler, self.work.device)
            _sync(self.work.device)
            return time.perf_counter() - t0

    def seconds_per_image(self, budget: float) -> float:
        """Seconds per training image over at least ``budget`` seconds (and at least 2 steps)."""
        probe = self._run(1)
        steps = max(2, min(200, int(budget / max(probe, 1e-4))))
        return self._run(steps) / (steps * self.work.batch_size)


def compare(plan: ExecutionPlan, trial: ExecutionPlan, work: Workload, budget: float, rounds: int = 2):
    """(seconds per image of ``plan``, of ``trial``, compile seconds of ``trial``): interleaved, best of rounds."""
    runs = [_Trial(plan, work), _Trial(trial, work)]
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        best = [min(b, r.seconds_per_image(budget)) for b, r in zip(best, runs, strict=True)]
    return best[0], best[1], runs[1].warmup_seconds


@torch.no_grad()
def eval_seconds_per_image(plan: ExecutionPlan, work: Workload, rounds: int = 2) -> dict[int, float]:
    """Seconds per image of inference at each candidate evaluation batch size (one batch each, best of rounds)."""
    model = StagedNet(work.backbone, 10, work.resolution).to(work.device, memory_format=plan.memory_format()).eval()
    sizes = work.eval_candidates()
    x = torch.randint(0, 256, (max(sizes), 3, 32, 32), dtype=torch.uint8).to(work.device)
    best = dict.fromkeys(sizes, float("inf"))
    with _threads(plan), plan.autocast(work.device):
        model(plan.prepare(x[: min(sizes)]))  # warm-up
        for _ in range(rounds):
            for size in sizes:
                _sync(work.device)
                t0 = time.perf_counter()
                model(plan.prepare(x[:size]))
                _sync(work.device)
                best[size] = min(best[size], (time.perf_counter() - t0) / size)
    return best


def candidates(work: Workload, threads: int, measure_compile: bool) -> list[tuple[str, list]]:
    """Knobs to try, each with its options, in the order calibration decides them."""
    cuda = work.device.type == "cuda"
    options = [("precision", ["bfloat16", "float16"] if cuda else ["bfloat16"]), ("channels_last", [True])]
    if not cuda and threads >= 2:
        options.append(("threads", [threads // 2]))
    if measure_compile:
        options.append(("compile", [True]))
    return options


def calibrate(work: Workload, threads: int = 0, measure_compile: bool = False, budget: float = 1.0, log=print):
    """Measure the device and choose a plan; returns ``(plan, measurements)``.

    Greedy: starting from float32, contiguous, all ``threads``, eager, each knob's options are timed
    against the plan chosen so far (interleaved, best of two) and one is kept only if it was faster.
    ``torch.compile`` is judged on a whole job (``work.job_steps`` steps plus its compile time). The
    evaluation batch size is the fastest of the workload's candidates for inference under the plan.
    """
    plan = ExecutionPlan(threads=threads)
    measurements = []
    for knob, options in candidates(work, threads, measure_compile):
        for option in options:
            trial = dataclasses.replace(plan, **{knob: option})
            try:
                base_s, trial_s, warmup_s = compare(plan, trial, work, budget)
            except Exception as error:  # torch.compile (or a precision) fails on some backends
                log(f"plan: {knob}={option} failed, left out: {type(error).__name__}: {str(error)[:200]}")
                measurements.append({"knob": knob, "value": option, "against": getattr(plan, knob), "gain": None,
                                     "note": f"failed: {type(error).__name__}"})  # fmt: skip
                continue
            if knob == "compile":
                steps = work.job_steps * work.batch_size
                gain = (steps * base_s) / (steps * trial_s + warmup_s)
                note = f"compile {warmup_s:.1f}s over {work.job_steps} steps; steady {base_s / trial_s:.2f}x"
            else:
                gain, note = base_s / trial_s, ""
            kept = gain > 1.0
            measurements.append(
                {"knob": knob, "value": option, "against": getattr(plan, knob), "gain": round(gain, 3),
                 "images_per_second": round(1 / trial_s, 1), "baseline_images_per_second": round(1 / base_s, 1),
                 "kept": kept, "note": note}
            )  # fmt: skip
            log(f"plan: {knob}={option} vs {getattr(plan, knob)}: {gain:.2f}x -> {'kept' if kept else 'left out'}")
            if kept:
                plan = trial
    speeds = eval_seconds_per_image(plan, work)
    fastest = min(speeds, key=speeds.get)
    plan = dataclasses.replace(plan, eval_batch_size=fastest)
    smallest = min(speeds)
    measurements.append(
        {"knob": "eval_batch_size", "value": fastest, "against": smallest,
         "gain": round(speeds[smallest] / speeds[fastest], 3), "images_per_second": round(1 / speeds[fastest], 1),
         "baseline_images_per_second": round(1 / speeds[smallest], 1), "kept": fastest != smallest,
         "note": "inference images/s per batch size: "
         + ", ".join(f"{b}: {1 / s:.0f}" for b, s in speeds.items())}
    )  # fmt: skip
    log(f"plan: evaluation batch {fastest} ({1 / speeds[fastest]:.0f} images/s)")
    return plan, measurements


# ---------------------------------------------------------------------------------------------
# Stored plans


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, however the job ends
        yield


def stored_plan(plans: str | Path, work: Workload, threads: int, measure_compile: bool, log=print) -> dict:
    """The plan file of this device under ``plans``, calibrating it first if there is none."""
    key = device_key(work.device, threads)
    path = Path(plans) / f"{key}.json"
    if not path.is_file():
        log(f"plan: no plan for this device yet ({key}); calibrating (other jobs wait) ...")
        with _locked(path.with_suffix(".lock")):
            if not path.is_file():  # another job may have written it while this one waited
                t0 = time.perf_counter()
                plan, measurements = calibrate(work, threads, measure_compile, log=log)
                write_json(
                    path,
                    {"device_key": key, "device": str(work.device), "plan": dataclasses.asdict(plan),
                     "measurements": measurements, "compile_measured": measure_compile,
                     "calibrated_on": {"backbone": work.backbone, "resolution": work.resolution,
                                       "batch_size": work.batch_size},
                     "seconds": round(time.perf_counter() - t0, 1)},
                )  # fmt: skip
    try:
        stored = json.loads(path.read_text())
        ExecutionPlan(**stored["plan"])
    except (ValueError, KeyError, TypeError) as error:
        raise PlanError(f"{path} is not a readable plan ({error}); delete it and the next job re-calibrates") from None
    stored["file"] = str(path)
    return stored


def resolve(pinned: ExecutionPlan, auto: set[str], plans: str, work: Workload, log=print) -> tuple[ExecutionPlan, dict]:
    """The plan a job runs with: ``pinned``'s knobs, except those in ``auto``, which the device's plan sets.

    Returns the plan and a note for the record (the plan file and the knobs it set).
    """
    unknown = auto - set(KNOBS)
    if unknown:
        raise PlanError(f"unknown plan knob(s) {', '.join(sorted(unknown))}; the knobs are {', '.join(KNOBS)}")
    if not auto:
        return pinned, {"file": None, "auto": []}
    if not plans:
        raise PlanError("knobs set to auto need a plans folder (--plans DIR), where measured plans are kept")
    stored = stored_plan(plans, work, pinned.threads, "compile" in auto, log)
    measured = stored["plan"]
    if "compile" in auto and not stored["compile_measured"]:
        log(f"plan: {stored['file']} was calibrated without torch.compile; delete it to measure compile too")
    chosen = dataclasses.replace(pinned, **{k: measured[k] for k in auto})
    note = {"file": stored["file"], "device_key": stored["device_key"], "auto": sorted(auto)}
    return chosen, note | {"measurements": stored["measurements"]}
