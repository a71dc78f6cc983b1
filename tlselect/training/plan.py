"""Execution plans: how a job runs on its device, measured there rather than assumed.

A plan is the precision (float32, bfloat16 autocast, float16 autocast on CUDA), the memory format
(channels-last or not), the CPU threads, ``torch.compile`` and the evaluation batch size. What is
fastest depends on the machine: bfloat16 autocast is 1.5x faster than float32 on one CPU and 0.68x
on another. Four of the knobs also change what a run computes (:data:`RESULT_KNOBS`): precision
rounds every product to fewer bits, and channels-last, the thread count and compilation change the
order of the floating-point sums in the convolutions, which a run's training then amplifies into
other weights and accuracies. The workflow pins those by default and measures them only when a
config asks (``auto``); the evaluation batch size changes no result on a CPU and is measured.
cuDNN's autotuning (``cudnn_benchmark``, CUDA only) is judged on a whole job, its first step's
tuning included. Two knobs say how the workflow lays out its jobs: ``group_size`` (runs one job
trains) and ``fuse`` (runs of one shape fused into one network, ``tlselect.training.fusion``),
measured as B runs fused against the same B runs one after another (:func:`_calibrate_group`).

:func:`calibrate` times real training steps of each choice on the device the job runs on, one knob
at a time against the plan chosen so far, in interleaved rounds repeated until the per-round
ratio's spread (its interquartile range) is small, or the verdict settled beyond it, or a time cap
is reached. A knob is kept only
where its median gain clears a margin larger than that spread (and at least :data:`MIN_MARGIN`).
A calibration under load is refused (other processes busy on the job's cores, the baseline far
from a quick re-measure or from the device's known rate): its knobs fall back to the defaults
(float32, all threads, no channels-last), never to an extreme choice made on noisy evidence.

Plans live in a per-user cache, one file per device key (:func:`plan_cache_dir`), so a fresh study
folder on the same machine reuses the plan; each study keeps a copy in its plans folder
(``results/plans``), and that copy wins once written, so a plan never changes under a running
study. Measuring again is explicit (``recalibrate``; the workflow's ``plan_recalibrate`` target).
A knob the config pins is never measured against; it simply wins.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import json
import math
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tlselect.core.errors import TLSelectError
from tlselect.core.files import write_json
from tlselect.training.fusion import FusedStagedNet, fused_step
from tlselect.training.models import StagedNet

# Knobs of a run (its TrainConfig has each), and knobs of how the workflow lays out its jobs: how
# many runs one job trains (group_size) and whether runs of one shape train fused (fuse), which the
# workflow reads from the plan file when it builds its jobs.
RUN_KNOBS = ("precision", "channels_last", "threads", "compile", "eval_batch_size", "cudnn_benchmark")
GROUP_KNOBS = ("group_size", "fuse")
KNOBS = RUN_KNOBS + GROUP_KNOBS
# Knobs whose choice changes what a run computes (bit for bit, and from there its trajectory):
# chosen automatically only where the config says auto, and then once per machine (the cache).
RESULT_KNOBS = ("precision", "channels_last", "threads", "compile")
PRECISIONS = ("float32", "bfloat16", "float16")
EVAL_BATCH_SIZES = {"cpu": (256, 512, 1024), "cuda": (256, 512, 1024, 2048, 4096)}
GROUP_SIZES = {"cpu": (1, 2), "cuda": (1, 2, 4, 8)}  # the group sizes calibration tries
# Knobs measured when no list is given (compile only when asked: it takes minutes on a CPU).
MEASURABLE = ("precision", "channels_last", "threads", "eval_batch_size")
# Knobs whose first step costs what later ones save (compilation, cuDNN's autotuning of each shape):
# judged on a whole job, its first step included.
WHOLE_JOB_KNOBS = ("compile", "cudnn_benchmark")

# Calibration's rules.
BUDGET_S = 0.4  # seconds of training steps per timing (at least 2 steps; 1 when a step takes longer)
MIN_ROUNDS = 5  # interleaved rounds per knob before the spread may stop them
MAX_ROUNDS = 30
KNOB_CAP_S = 30.0  # a knob's rounds stop here, spread small or not
EVAL_CAP_S = 10.0  # the evaluation batch's (a choice that changes no result)
GROUP_CAP_S = {"cpu": 6.0, "cuda": 24.0}  # the group sizes' rounds, all sizes together
TARGET_SPREAD = 0.02  # rounds stop once the per-round gains' interquartile range is this small
MAX_SPREAD = 0.10  # wider than this when the rounds stop: the knob is refused (stays at its default)
MIN_MARGIN = 0.05  # a knob is kept only if its gain exceeds 1 + max(MIN_MARGIN, spread)
# The evaluation batch leaves its default only for a larger gain: it changes no result, and on a CPU
# its gains (a few percent either way) differ more between processes than within one.
EVAL_MIN_MARGIN = 0.20
QUIET_CHECK_S = 0.5  # the load is sampled this long before anything is measured
LOAD_TOLERANCE = 0.25  # cores other processes may keep busy beyond those the job leaves free
SCREEN_RATIO = 2.0  # a choice this many times slower than the baseline in its first warm step: left out at once
PRESCREEN_BATCH, PRESCREEN_RATIO = 4, 4.0  # first, one step at a small batch (bfloat16 can take 30x longer)
DRIFT_LIMIT = 1.3  # the baseline's images/s at the start against a quick re-measure at the end
KNOWN_RATE_LIMIT = 0.6  # the baseline below this fraction of the rate this device measured before
CACHE_ENV = "TLSELECT_PLAN_CACHE"  # the per-user cache's folder (default: $XDG_CACHE_HOME/tlselect/plans)


class PlanError(TLSelectError):
    """A plan cannot be used or made; the message names the file or knob and the fix."""


@dataclass(frozen=True)
class ExecutionPlan:
    """How a job executes. Precision, channels-last, threads and compile change floating-point results
    (:data:`RESULT_KNOBS`); the evaluation batch size does not on a CPU. Plan files written before a
    knob existed load with its default."""

    precision: str = "float32"
    channels_last: bool = False
    threads: int = 0  # torch CPU threads (0: torch's default)
    compile: bool = False
    eval_batch_size: int = 1024
    cudnn_benchmark: bool = False  # cuDNN autotuning (torch.backends.cudnn.benchmark); nothing on a CPU
    group_size: int = 1  # runs one training job trains (the workflow's run groups)
    fuse: bool = False  # runs of one shape in a group train as one fused network

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

    def eval_default(self) -> int:
        """The evaluation batch of a plan without measurements (and of a refused calibration)."""
        sizes = self.eval_candidates()
        default = ExecutionPlan.eval_batch_size
        return default if default in sizes else min(sizes)


def default_plan(work: Workload, threads: int) -> ExecutionPlan:
    """The plan of a calibration that measured nothing: float32, contiguous, all threads, eager."""
    return ExecutionPlan(threads=threads, eval_batch_size=work.eval_default())


def training_step(model: nn.Module, x, y, optimizer, plan: ExecutionPlan, scaler, device) -> None:
    """One optimizer step as the trainer takes it (forward under the plan's autocast, backward, step)."""
    with plan.autocast(device):
        logits = model(plan.prepare(x))
    loss = nn.functional.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def fused_training_step(fused: FusedStagedNet, xs, ys, optimizers, plan: ExecutionPlan, scalers, device) -> None:
    """One optimizer step of B runs fused, as ``tlselect.training.groups.fused_epoch`` takes it: the
    runs' batches stacked along the channels, one forward and one backward, each run's own loss and
    optimizer step."""
    fused_step(fused, plan.prepare(torch.cat(xs, 1)), ys, optimizers, scalers, plan.autocast(device), [0.0] * len(ys))


@contextlib.contextmanager
def _applied(plan: ExecutionPlan):
    """Run a block with the plan's torch threads (when it sets them) and cuDNN autotuning, then
    restore both."""
    previous, autotuning = torch.get_num_threads(), torch.backends.cudnn.benchmark
    if plan.threads:
        torch.set_num_threads(plan.threads)
    torch.backends.cudnn.benchmark = plan.cudnn_benchmark
    try:
        yield
    finally:
        torch.set_num_threads(previous)
        torch.backends.cudnn.benchmark = autotuning


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trial:
    """``size`` runs (models, optimizers, batches; each its own init, batch and learning rate) set up
    for one plan, stepping one after another or, ``fused``, as one fused network; :func:`time_training`
    times their steps. One run (the default) is what the knobs other than the group's are timed on."""

    def __init__(self, plan: ExecutionPlan, work: Workload, budget: float, size: int = 1, fused: bool = False):
        self.plan, self.work, self.size = plan, work, size
        generator, device = torch.Generator().manual_seed(0), work.device
        self.xs, self.ys, self.models = [], [], []
        for index in range(size):
            x = torch.randint(0, 256, (work.batch_size, 3, 32, 32), dtype=torch.uint8, generator=generator)
            self.xs.append(x.to(device))
            self.ys.append(torch.randint(0, 10, (work.batch_size,), generator=generator).to(device))
            torch.manual_seed(index)
            model = StagedNet(work.backbone, 10, work.resolution).to(device, memory_format=plan.memory_format())
            self.models.append(model.train())
        self.forwards = [torch.compile(model) if plan.compile else model for model in self.models]
        self.optimizers = [torch.optim.SGD(m.parameters(), lr=0.01 * (i + 1), momentum=0.9)
                           for i, m in enumerate(self.models)]  # fmt: skip
        self.scalers = [plan.grad_scaler(device) for _ in self.models]
        self.fused = FusedStagedNet(self.models) if fused else None
        self.warmup_seconds = self.run(1)  # the first step: allocator, cuDNN autotuning, compilation
        self.probe = max(self.run(1), 1e-4)  # a warm step
        self.steps = 1 if self.probe > budget else max(2, min(200, int(budget / self.probe)))

    def run(self, steps: int) -> float:
        device = self.work.device
        with _applied(self.plan):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                if self.fused is not None:
                    fused_training_step(self.fused, self.xs, self.ys, self.optimizers, self.plan, self.scalers, device)
                    continue
                for forward, x, y, optimizer, scaler in zip(self.forwards, self.xs, self.ys, self.optimizers,
                                                            self.scalers, strict=True):  # fmt: skip
                    training_step(forward, x, y, optimizer, self.plan, scaler, device)
            _sync(device)
            return time.perf_counter() - t0


def time_training(trial: Trial) -> float:
    """One timing: seconds per training image (of all its runs) of ``trial`` over its steps."""
    return trial.run(trial.steps) / (trial.steps * trial.work.batch_size * trial.size)


class _EvalTrial:
    """A model in evaluation mode and a batch of the largest candidate size, for one plan."""

    def __init__(self, plan: ExecutionPlan, work: Workload):
        self.plan, self.work = plan, work
        torch.manual_seed(0)
        model = StagedNet(work.backbone, 10, work.resolution).to(work.device, memory_format=plan.memory_format())
        self.model = model.eval()
        sizes = work.eval_candidates()
        self.x = torch.randint(0, 256, (max(sizes), 3, 32, 32), dtype=torch.uint8).to(work.device)
        for size in sizes:  # warm-up of every shape
            self.run(size)

    @torch.no_grad()
    def run(self, size: int) -> float:
        with _applied(self.plan), self.plan.autocast(self.work.device):
            _sync(self.work.device)
            t0 = time.perf_counter()
            self.model(self.plan.prepare(self.x[:size]))
            _sync(self.work.device)
            return time.perf_counter() - t0


def time_eval(trial: _EvalTrial, size: int) -> float:
    """One timing: seconds per image of inference at evaluation batch ``size`` (one batch)."""
    return trial.run(size) / size


# The load beside a calibration: busy CPU time of the CPUs this process may run on, less its own.


def load_sample() -> tuple[float, float, float] | None:
    """(wall seconds, busy seconds of this process's CPUs, this process's CPU seconds); None without /proc/stat."""
    try:
        cpus = os.sched_getaffinity(0)
        text = Path("/proc/stat").read_text()
    except (OSError, AttributeError):
        return None
    busy = 0
    for line in text.splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks = [int(v) for v in values[:8]]
            busy += ticks[0] + ticks[1] + ticks[2] + sum(ticks[5:8])  # user nice system irq softirq steal
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), time.process_time()


def other_cores(start: tuple | None, end: tuple | None) -> float | None:
    """Cores that other processes (and the hypervisor, as steal) kept busy between two samples."""
    if start is None or end is None or end[0] - start[0] < 0.05:  # a window too short for the CPU's ticks
        return None
    return max(0.0, ((end[1] - start[1]) - (end[2] - start[2])) / (end[0] - start[0]))


def spare_cores(threads: int) -> float:
    """Cores of this process's CPUs that a job of ``threads`` threads leaves to other work."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(0.0, cpus - (threads or torch.get_num_threads()))


@dataclass
class Rounds:
    """Per-round timings of a baseline and a trial (seconds per image) and the load beside each round."""

    base: list[float] = field(default_factory=list)
    trial: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)
    gains: list[float] = field(default_factory=list)
    screened: bool = False  # left out on its first warm step, without rounds (SCREEN_RATIO)

    def add(self, base: float, trial: float, load: float | None, gain: float | None = None) -> None:
        self.base.append(base)
        self.trial.append(trial)
        if load is not None:
            self.load.append(load)
        self.gains.append(base / trial if gain is None else gain)

    def __len__(self) -> int:
        return len(self.gains)

    @property
    def gain(self) -> float:
        return statistics.median(self.gains)

    @property
    def spread(self) -> float:
        """Interquartile range of the per-round gains, relative to their median (inf under 3 rounds)."""
        return spread(self.gains)

    @property
    def other_load(self) -> float | None:
        return statistics.median(self.load) if self.load else None


def spread(values: list[float]) -> float:
    if len(values) < 3:
        return math.inf
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q3 - q1) / statistics.median(values)


def _enough(rounds: Rounds, started: float, cap: float, spare: float, last_round: float = 0.0,
            floor: float = MIN_MARGIN) -> bool:  # fmt: skip
    """Whether a knob's rounds may stop: after MIN_ROUNDS, the spread small or the verdict settled
    (:func:`settled`); load seen (after two); or the cap reached (or about to be overrun by half)."""
    n, elapsed = len(rounds), time.perf_counter() - started
    if n >= MAX_ROUNDS or elapsed >= cap or elapsed + last_round > 1.5 * cap:
        return True
    if n >= 2 and _loaded(rounds.other_load, spare):
        return True
    return n >= MIN_ROUNDS and (rounds.spread <= TARGET_SPREAD or settled(rounds, floor))


def settled(rounds: Rounds, floor: float = MIN_MARGIN) -> bool:
    """Whether more rounds could still change a knob's verdict: its median gain is more than two
    standard errors (of a median, the spread read as a normal's interquartile range) away from the
    line it must clear, ``1 + max(floor, spread)``. A spread above MAX_SPREAD never settles."""
    spread = rounds.spread
    if spread > MAX_SPREAD:
        return False
    sigma = spread * rounds.gain / 1.349
    error = 1.2533 * sigma / math.sqrt(len(rounds))
    return abs(rounds.gain - (1 + max(floor, spread))) > 2 * error


def _loaded(load: float | None, spare: float) -> bool:
    return load is not None and load > spare + LOAD_TOLERANCE


def measure_pair(plan: ExecutionPlan, trial: ExecutionPlan, work: Workload, budget: float, cap: float,
                 spare: float, compile_gain=None, group: int = 1) -> tuple[Rounds, Trial, Trial]:  # fmt: skip
    """Interleaved rounds of ``plan`` and ``trial`` (order alternating), until :func:`_enough`; the
    cap counts from before their set-up (warm-up steps, compilation), whose load counts as a round's.
    ``group`` > 1: ``group`` runs of ``plan`` one after another against the same runs of ``trial`` fused."""
    started, last_round, sample = time.perf_counter(), 0.0, load_sample()
    rounds = Rounds()

    def pair(on: Workload, seconds: float) -> tuple[Trial, Trial]:
        if group == 1:
            return Trial(plan, on, seconds), Trial(trial, on, seconds)
        return Trial(plan, on, seconds, size=group), Trial(trial, on, seconds, size=group, fused=True)

    if compile_gain is None and work.batch_size > PRESCREEN_BATCH:  # a far slower choice costs little to spot
        small = dataclasses.replace(work, batch_size=PRESCREEN_BATCH)
        runs = pair(small, 0.0)
        if runs[1].probe > PRESCREEN_RATIO * runs[0].probe:
            rounds.add(runs[0].probe / small.batch_size, runs[1].probe / small.batch_size, None)
            rounds.screened = True
            return rounds, runs[0], runs[1]
    runs = pair(work, budget)
    setup_load = other_cores(sample, load_sample())
    if setup_load is not None:
        rounds.load.append(setup_load)
    if compile_gain is None and runs[1].probe > SCREEN_RATIO * runs[0].probe:  # far slower: no rounds needed
        rounds.add(runs[0].probe / work.batch_size, runs[1].probe / work.batch_size, None)
        rounds.screened = True
        return rounds, runs[0], runs[1]
    while not _enough(rounds, started, cap, spare, last_round):
        sample, round_started = load_sample(), time.perf_counter()
        times = [0.0, 0.0]
        for i in (0, 1) if len(rounds) % 2 == 0 else (1, 0):
            times[i] = time_training(runs[i])
        gain = compile_gain(times[0], times[1], runs[1].warmup_seconds) if compile_gain else None
        rounds.add(times[0], times[1], other_cores(sample, load_sample()), gain)
        last_round = time.perf_counter() - round_started
    return rounds, runs[0], runs[1]


def measure_eval(plan: ExecutionPlan, work: Workload, baseline: int, cap: float, spare: float) -> dict[int, Rounds]:
    """Interleaved rounds of inference at each candidate evaluation batch against ``baseline``."""
    started, last_round, sample = time.perf_counter(), 0.0, load_sample()
    trial = _EvalTrial(plan, work)
    setup_load = other_cores(sample, load_sample())
    others = [size for size in work.eval_candidates() if size != baseline]
    rounds = {size: Rounds(load=[] if setup_load is None else [setup_load]) for size in others}
    while others and not all(_enough(r, started, cap, spare, last_round, EVAL_MIN_MARGIN) for r in rounds.values()):
        sample, round_started = load_sample(), time.perf_counter()
        order = [baseline, *others] if len(rounds[others[0]]) % 2 == 0 else [*others, baseline]
        times = {size: time_eval(trial, size) for size in order}
        load = other_cores(sample, load_sample())
        for size in others:
            rounds[size].add(times[baseline], times[size], load)
        last_round = time.perf_counter() - round_started
    return rounds


def candidates(work: Workload, threads: int, measure_compile: bool) -> list[tuple[str, list]]:
    """Knobs to try, each with its options, in the order calibration decides them."""
    cuda = work.device.type == "cuda"
    options = [("precision", ["bfloat16", "float16"] if cuda else ["bfloat16"]), ("channels_last", [True])]
    if not cuda and threads >= 2:
        options.append(("threads", [threads // 2]))
    if cuda:
        options.append(("cudnn_benchmark", [True]))
    if measure_compile:
        options.append(("compile", [True]))
    return options


@dataclass
class Calibration:
    """What :func:`calibrate` found. Unpacks as ``plan, measurements``."""

    plan: ExecutionPlan
    measurements: list[dict]
    knobs: list[str]  # the knobs this calibration decided (measured, or fallen back to the default)
    refused: str | None = None  # why the whole calibration was refused (its knobs took the defaults)
    fallback: dict[str, str] = field(default_factory=dict)  # knob: why it took its default
    load: float | None = None  # median cores other processes kept busy while it measured
    baseline: dict[str, float] = field(default_factory=dict)  # images/s of the default plan: training, inference
    seconds: float = 0.0

    def __iter__(self):
        return iter((self.plan, self.measurements))


def _row(knob, value, against, rounds: Rounds | None, kept, note="", margin=None) -> dict:
    row = {"knob": knob, "value": value, "against": against, "gain": None, "kept": kept, "note": note}
    if rounds is not None and len(rounds):
        row |= {
            "gain": round(rounds.gain, 3),
            "images_per_second": round(1 / statistics.median(rounds.trial), 1),
            "baseline_images_per_second": round(1 / statistics.median(rounds.base), 1),
            "rounds": len(rounds),
            "spread": round(rounds.spread, 3) if math.isfinite(rounds.spread) else None,
            "margin": None if margin is None else round(margin, 3),
            "other_load": None if rounds.other_load is None else round(rounds.other_load, 2),
        }
    return row


def calibrate(work: Workload, threads: int = 0, measure_compile: bool = False, budget: float = BUDGET_S, log=print,
              knobs=None, start: ExecutionPlan | None = None, known_rate: dict | None = None,
              cap: float = KNOB_CAP_S) -> Calibration:  # fmt: skip
    """Measure the device and choose a plan for ``knobs`` (default :data:`MEASURABLE`, plus compile
    with ``measure_compile``), starting from ``start`` (default: float32, contiguous, all ``threads``,
    eager); returns a :class:`Calibration` (``plan, measurements = calibrate(...)``).

    Greedy, one knob at a time against the plan so far, in interleaved rounds (:func:`measure_pair`).
    A knob is kept only if its median gain exceeds ``1 + max(MIN_MARGIN, spread)``; one whose spread
    stays above :data:`MAX_SPREAD` is refused and keeps its default. ``torch.compile`` is judged on a
    whole job (``work.job_steps`` steps plus its compile time). The evaluation batch size is the one
    that beats the default's inference speed by the same margin. The whole calibration is refused,
    every knob in ``knobs`` taking its default, when other processes keep more cores busy than the
    job leaves free, when the baseline's images/s at the start and at a re-measure at the end differ
    by more than :data:`DRIFT_LIMIT`, or when it falls below :data:`KNOWN_RATE_LIMIT` of ``known_rate``
    (the images/s this device measured before, ``{"training": ..., "inference": ...}``).
    """
    t0 = time.perf_counter()
    knobs = set(MEASURABLE) | ({"compile"} if measure_compile else set()) if knobs is None else set(knobs)
    defaults = default_plan(work, threads)
    plan = start or defaults
    spare = spare_cores(threads)
    result = Calibration(plan, [], sorted(knobs))
    loads, first = [], None

    def refuse(reason: str) -> None:
        result.refused = result.refused or reason

    before = load_sample()  # busy before anything is measured: refused at once, at no cost
    time.sleep(QUIET_CHECK_S)
    load = other_cores(before, load_sample())
    if _loaded(load, spare):
        loads.append(load)
        refuse(f"other processes kept {load:.2f} cores busy beside this job's {threads or torch.get_num_threads()} "
               f"threads ({spare:.0f} spare) before it started")  # fmt: skip

    for knob, options in candidates(work, threads, "compile" in knobs):
        if knob not in knobs or result.refused:
            continue
        for option in options:
            trial = dataclasses.replace(plan, **{knob: option})
            compile_gain = None
            if knob in WHOLE_JOB_KNOBS:
                images = work.job_steps * work.batch_size

                def compile_gain(base_s, trial_s, warmup_s, images=images):
                    return (images * base_s) / (images * trial_s + warmup_s)

            if result.refused:
                break
            try:
                rounds, base_run, trial_run = measure_pair(plan, trial, work, budget, cap, spare, compile_gain)
            except Exception as error:  # torch.compile (or a precision) fails on some backends
                log(f"plan: {knob}={option} failed, left out: {type(error).__name__}: {str(error)[:200]}")
                result.measurements.append(_row(knob, option, getattr(plan, knob), None, False,
                                                f"failed: {type(error).__name__}"))  # fmt: skip
                continue
            loads += rounds.load
            if _loaded(rounds.other_load, spare):
                refuse(f"other processes kept {rounds.other_load:.2f} cores busy beside this job's "
                       f"{threads or torch.get_num_threads()} threads ({spare:.0f} spare)")  # fmt: skip
            if not len(rounds):  # its set-up alone took the cap
                reason = result.refused or f"no round within the {cap:.0f}s cap"
                result.fallback.setdefault(knob, reason)
                result.measurements.append(_row(knob, option, getattr(plan, knob), None, False, f"refused: {reason}"))
                log(f"plan: {knob}={option}: left out ({reason})")
                continue
            if first is None and not rounds.screened:
                first = (base_run, statistics.median(rounds.base))
                rate = 1 / first[1]
                result.baseline["training"] = round(rate, 1)
                if known_rate and known_rate.get("training") and rate < KNOWN_RATE_LIMIT * known_rate["training"]:
                    refuse(f"the baseline ran {rate:.1f} images/s, under {KNOWN_RATE_LIMIT:.0%} of the "
                           f"{known_rate['training']:.1f} this device measured before")  # fmt: skip
            margin = max(MIN_MARGIN, rounds.spread)
            note = f"median of {len(rounds)} rounds, spread {rounds.spread:.3f}"
            if knob in WHOLE_JOB_KNOBS:
                note += f"; first step {trial_run.warmup_seconds:.1f}s over {work.job_steps} steps"
            kept = False
            if result.refused:
                note = f"refused: {result.refused}"
            elif rounds.screened:
                note = f"{1 / rounds.gain:.1f}x slower in its first warm step: left out without rounds"
            elif rounds.spread > MAX_SPREAD:
                result.fallback[knob] = f"spread {rounds.spread:.3f} over {len(rounds)} rounds, above {MAX_SPREAD}"
                note = f"refused: {result.fallback[knob]}"
            else:
                kept = rounds.gain > 1 + margin
            result.measurements.append(_row(knob, option, getattr(plan, knob), rounds, kept, note, margin))
            log(f"plan: {knob}={option} vs {getattr(plan, knob)}: {rounds.gain:.2f}x over {len(rounds)} rounds "
                f"(spread {rounds.spread:.3f}, margin {margin:.3f}) -> {'kept' if kept else 'left out'}"
                + (f" ({note})" if note.startswith("refused") else ""))  # fmt: skip
            if kept:
                plan = trial
    if "cudnn_benchmark" in knobs and work.device.type != "cuda":
        result.measurements.append(_row("cudnn_benchmark", True, False, None, False, "not applicable: no cuDNN on "
                                        f"{work.device.type}"))  # fmt: skip
    if knobs & set(GROUP_KNOBS) and not result.refused:
        plan = _calibrate_group(plan, work, budget, spare, result, knobs, loads, log)
    if first is not None and not result.refused:  # a quick re-measure of the baseline: did the load change?
        again = statistics.median(time_training(first[0]) for _ in range(3))
        drift = max(again, first[1]) / min(again, first[1])
        if drift > DRIFT_LIMIT:
            refuse(f"the baseline ran {1 / first[1]:.1f} images/s while measuring and {1 / again:.1f} in a "
                   f"re-measure at the end ({drift:.2f}x apart)")  # fmt: skip
    if "eval_batch_size" in knobs and not result.refused:
        plan = _calibrate_eval(plan, work, min(cap, EVAL_CAP_S), spare, result, known_rate, loads, log)
    if result.refused:
        plan = dataclasses.replace(plan, **{k: getattr(defaults, k) for k in knobs})
        for knob in knobs:
            result.fallback[knob] = f"calibration refused: {result.refused}"
        for row in result.measurements:
            row["kept"] = False
        log(f"plan: WARNING: calibration refused ({result.refused}); {', '.join(sorted(knobs))} take the "
            "defaults (float32, no channels-last, all threads, no compile, one run a job, no fusion); "
            "measure again on a quiet machine with `snakemake plan_recalibrate`")  # fmt: skip
    result.plan, result.load = plan, round(statistics.median(loads), 2) if loads else None
    result.seconds = round(time.perf_counter() - t0, 1)
    return result


def _calibrate_group(plan, work, budget, spare, result: Calibration, knobs: set, loads, log) -> ExecutionPlan:
    """``fuse`` and ``group_size``: B runs fused against the same B runs one after another (a training
    step each, in interleaved rounds) for each B of :data:`GROUP_SIZES` past one, within
    :data:`GROUP_CAP_S` all together. Fusion is kept where it beats the runs in turn by the margin.
    The group size: with fusion, the largest size whose gain is within the margin of the best one's;
    without it, runs in turn step at one run's speed whatever the size, and the size only amortizes
    what a job pays once (starting Python, torch and CUDA, cuDNN's autotuning of each shape), which
    steps cannot show: on CUDA, where that start costs seconds against epochs of a fraction of one,
    the largest size measured; on a CPU one run a job."""
    sizes = [size for size in GROUP_SIZES.get(work.device.type, GROUP_SIZES["cpu"]) if size > 1]
    cap = GROUP_CAP_S.get(work.device.type, GROUP_CAP_S["cpu"]) / len(sizes)
    eager = dataclasses.replace(plan, compile=False)  # compiled runs never fuse (tlselect.training.groups)
    gains, measured = {}, []  # measured: the sizes that could be set up (not out of memory)
    for size in sizes:
        try:
            rounds, _, _ = measure_pair(eager, eager, work, budget, cap, spare, group=size)
        except Exception as error:  # a larger group out of the device's memory: the larger ones too
            log(f"plan: {size} runs fused failed, larger groups left out: {type(error).__name__}: {str(error)[:200]}")
            failed = _row("fuse", True, False, None, False, f"{size} runs: failed: {type(error).__name__}")
            result.measurements.append(failed | {"group_size": size})
            break
        loads += rounds.load
        if _loaded(rounds.other_load, spare):
            result.refused = result.refused or (
                f"other processes kept {rounds.other_load:.2f} cores busy beside {size} runs ({spare:.0f} spare)"
            )
            return plan
        margin = max(MIN_MARGIN, rounds.spread)
        if len(rounds) < 3 and not rounds.screened:
            note = f"no verdict: {len(rounds)} round(s) within the {cap:.0f}s cap"
        elif rounds.screened:
            note = f"{1 / rounds.gain:.1f}x slower in its first warm step: left out without rounds"
        elif rounds.spread > MAX_SPREAD:
            note = f"refused: spread {rounds.spread:.3f} over {len(rounds)} rounds, above {MAX_SPREAD}"
        else:
            note = f"{size} runs fused against in turn, median of {len(rounds)} rounds, spread {rounds.spread:.3f}"
            gains[size] = (rounds.gain, margin)
        measured.append(size)
        result.measurements.append(_row("fuse", True, False, rounds, False, note, margin) | {"group_size": size})
        log(f"plan: {size} runs fused vs in turn: {note}" + (f", {rounds.gain:.2f}x" if len(rounds) else ""))
    faster = {size: gain for size, (gain, margin) in gains.items() if gain > 1 + margin}
    fuse = bool(faster) if "fuse" in knobs else plan.fuse
    if "fuse" in knobs and not gains:
        result.fallback["fuse"] = "no group size measured within the cap"
    group_size = plan.group_size
    if "group_size" in knobs:
        pool = {size: gains[size] for size in faster} or gains
        if fuse and pool:
            best = max(gain for gain, _ in pool.values())
            group_size = max(size for size, (gain, margin) in pool.items() if gain * (1 + margin) >= best)
        elif fuse:
            group_size = 1
        else:
            group_size = max(measured, default=1) if work.device.type == "cuda" else 1
        why = (
            "fused, the largest size within the margin of the best"
            if fuse
            else (
                "runs in turn: the largest size set up, for the start each job pays"
                if group_size > 1
                else "runs in turn"
            )
        )
        result.measurements.append(_row("group_size", group_size, 1, None, group_size > 1, why))
    for row in result.measurements:  # the fused rounds of the size chosen are the fusion kept
        if row["knob"] == "fuse" and "group_size" in row:
            row["kept"] = fuse and row["group_size"] == group_size and row["group_size"] in faster
    log(f"plan: group size {group_size}, fuse {fuse}")
    return dataclasses.replace(plan, group_size=group_size, fuse=fuse)


def _calibrate_eval(plan, work, cap, spare, result: Calibration, known_rate, loads, log) -> ExecutionPlan:
    """The evaluation batch: the default, unless another candidate is faster by the margin."""
    baseline = work.eval_default()
    measured = measure_eval(plan, work, baseline, cap, spare)
    if not measured:
        return dataclasses.replace(plan, eval_batch_size=baseline)
    some = next(iter(measured.values()))
    loads += some.load
    if not len(some):
        if _loaded(some.other_load, spare):
            result.refused = result.refused or f"other processes kept {some.other_load:.2f} cores busy"
        result.fallback["eval_batch_size"] = result.refused or f"no round within the {cap:.0f}s cap"
        return dataclasses.replace(plan, eval_batch_size=baseline)
    rate = 1 / statistics.median(some.base)
    result.baseline["inference"] = round(rate, 1)
    if known_rate and known_rate.get("inference") and rate < KNOWN_RATE_LIMIT * known_rate["inference"]:
        result.refused = f"inference ran {rate:.0f} images/s, under {KNOWN_RATE_LIMIT:.0%} of the " + (
            f"{known_rate['inference']:.0f} this device measured before"
        )
    if _loaded(some.other_load, spare):
        result.refused = result.refused or f"other processes kept {some.other_load:.2f} cores busy ({spare:.0f} spare)"
    best, best_gain = baseline, 1.0
    for size, rounds in measured.items():
        margin = max(EVAL_MIN_MARGIN, rounds.spread)
        clears = not result.refused and rounds.spread <= MAX_SPREAD and rounds.gain > 1 + margin
        if clears and rounds.gain > best_gain:
            best, best_gain = size, rounds.gain
    for size, rounds in measured.items():
        note = f"inference, median of {len(rounds)} rounds, spread {rounds.spread:.3f}"
        result.measurements.append(
            _row("eval_batch_size", size, baseline, rounds, size == best, note, max(EVAL_MIN_MARGIN, rounds.spread))
        )
    if best == baseline and not result.refused and all(r.spread > MAX_SPREAD for r in measured.values()):
        result.fallback["eval_batch_size"] = f"spread above {MAX_SPREAD} at every size"
    log(f"plan: evaluation batch {best} ({best_gain:.2f}x over {baseline})")
    return dataclasses.replace(plan, eval_batch_size=best)


# ---------------------------------------------------------------------------------------------
# Stored plans: the per-user cache and the study's copy


def plan_cache_dir() -> Path:
    """The per-user plan cache: ``$TLSELECT_PLAN_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/tlselect/plans``."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tlselect" / "plans"


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` (released when the file closes, however the job ends)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def _cache_locked(path: Path):
    """The cache's lock: a POSIX record lock (what NFS home folders implement) between the processes
    of any study on this machine; skipped where it cannot be taken (a read-only or lock-less file system)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "w")  # noqa: SIM115 (closed below)
    except OSError:
        yield
        return
    with handle:
        with contextlib.suppress(OSError):
            fcntl.lockf(handle, fcntl.LOCK_EX)
        yield


def _measured(stored: dict | None) -> set[str]:
    """The knobs a plan file decided (files of earlier versions measured all but compile, unless asked)."""
    if stored is None:
        return set()
    if "measured" in stored:
        return set(stored["measured"])
    return set(MEASURABLE) | ({"compile"} if stored.get("compile_measured") else set())


def _read(path: Path, cache: bool = False, log=print) -> dict | None:
    """A plan file, or None when there is none; an unreadable study copy is an error, an unreadable
    cache entry is ignored (the calibration that follows replaces it)."""
    try:
        if not path.is_file():
            return None
        stored = json.loads(path.read_text())
        stored["plan"] = dataclasses.asdict(ExecutionPlan(**stored["plan"]))  # knobs added since: their defaults
    except (OSError, ValueError, KeyError, TypeError) as error:
        if cache:
            log(f"plan: ignoring the cached plan {path} ({error})")
            return None
        raise PlanError(f"{path} is not a readable plan ({error}); delete it and the next job re-calibrates") from None
    stored["measured"] = sorted(_measured(stored))
    return stored


def _write_cache(path: Path, entry: dict, log) -> bool:
    try:
        write_json(path, entry)
        return True
    except OSError as error:
        log(f"plan: could not write the plan cache {path} ({error}); this study keeps its own copy only")
        return False


def _new_entry(key: str, work: Workload, threads: int) -> dict:
    return {"device_key": key, "device": str(work.device), "torch": torch.__version__,
            "plan": dataclasses.asdict(default_plan(work, threads)), "measured": [], "fallback": {},
            "refused": None, "measurements": [], "calibrations": [], "seconds": 0.0}  # fmt: skip


def _with(entry: dict | None, key: str, work: Workload, threads: int, calibration: Calibration, knobs: set) -> dict:
    """``entry`` (or a new one) with ``knobs`` set from ``calibration`` and its measurements added."""
    entry = copy.deepcopy(entry) if entry else _new_entry(key, work, threads)
    entry["plan"].update({knob: getattr(calibration.plan, knob) for knob in knobs})
    entry["measured"] = sorted(set(entry.get("measured", [])) | knobs)
    entry["fallback"] = {**entry.get("fallback", {}), **{k: v for k, v in calibration.fallback.items() if k in knobs}}
    entry["refused"] = calibration.refused or entry.get("refused")
    entry["measurements"] = entry.get("measurements", []) + [m for m in calibration.measurements if m["knob"] in knobs]
    entry["compile_measured"] = "compile" in entry["measured"]
    entry.setdefault("calibrated_on", {"backbone": work.backbone, "resolution": work.resolution,
                                       "batch_size": work.batch_size})  # fmt: skip
    entry.setdefault("calibrations", []).append(
        {"knobs": sorted(knobs), "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": calibration.seconds,
         "refused": calibration.refused, "other_load": calibration.load, "baseline_images_per_second":
         calibration.baseline, "workload": {"backbone": work.backbone, "resolution": work.resolution,
                                            "batch_size": work.batch_size}}
    )  # fmt: skip
    entry["seconds"] = round(entry.get("seconds", 0.0) + calibration.seconds, 1)
    return entry


def _known_rate(entry: dict | None, work: Workload) -> dict | None:
    """The images/s an earlier, unrefused calibration of this device measured on the same workload."""
    workload = {"backbone": work.backbone, "resolution": work.resolution, "batch_size": work.batch_size}
    for past in reversed((entry or {}).get("calibrations", [])):
        if past.get("workload") == workload and not past.get("refused") and past.get("baseline_images_per_second"):
            return past["baseline_images_per_second"]
    return None


def _from_cache(entry: dict, cached: dict, knobs: set) -> dict:
    """``entry`` with ``knobs`` taken from the cached plan ``cached``."""
    entry = copy.deepcopy(entry)
    entry["plan"].update({knob: cached["plan"][knob] for knob in knobs})
    entry["measured"] = sorted(set(entry["measured"]) | knobs)
    entry["fallback"] = {**entry.get("fallback", {}), **{k: v for k, v in cached.get("fallback", {}).items()
                                                         if k in knobs}}  # fmt: skip
    entry["measurements"] = entry.get("measurements", []) + [m for m in cached.get("measurements", [])
                                                             if m.get("knob") in knobs]  # fmt: skip
    entry["refused"] = entry.get("refused") or cached.get("refused")
    return entry


def stored_plan(plans: str | Path, work: Workload, threads: int, measure_compile: bool = False, log=print,
                knobs=None, recalibrate: bool = False) -> dict:  # fmt: skip
    """The plan of this device for ``knobs`` (default :data:`MEASURABLE`, plus compile with
    ``measure_compile``): the study's copy under ``plans`` when it has them, else the per-user
    cache's (copied into the study), else measured now (into both). ``recalibrate``: measure again,
    replacing the cache's plan (unless the new calibration is refused); the study's copy, when there
    is one, stays as it is. The returned dict has ``file`` (the study's copy) and ``source``
    (study, cache, calibrated or recalibrated).
    """
    knobs = set(MEASURABLE) | ({"compile"} if measure_compile else set()) if knobs is None else set(knobs)
    key = device_key(work.device, threads)
    path = Path(plans) / f"{key}.json"
    stored = _read(path)
    if stored is not None and knobs <= set(stored["measured"]) and not recalibrate:
        return stored | {"file": str(path), "source": "study"}
    cache = plan_cache_dir() / f"{key}.json"
    with _locked(path.with_suffix(".lock")), _cache_locked(cache.with_suffix(".lock")):
        stored = _read(path)  # another job may have written it while this one waited
        if stored is not None and knobs <= set(stored["measured"]) and not recalibrate:
            return stored | {"file": str(path), "source": "study"}
        cached = _read(cache, cache=True, log=log)
        recalibration = {}
        if recalibrate:
            entry, recalibration = _recalibrate(stored, cached, cache, key, work, threads, knobs, log)
            source = "recalibrated"
        else:
            entry, source = _complete(stored, cached, cache, key, work, threads, knobs, log)
        if stored is None or not recalibrate:
            entry = {k: v for k, v in entry.items() if k not in ("file", "source", "cache_file")}
            write_json(path, entry | {"cache_file": str(cache)})
            stored = entry | {"cache_file": str(cache)}
        else:
            log(f"plan: this study keeps its plan {path} (its runs used it); delete it to take the new one here")
    return stored | {"file": str(path), "source": source} | recalibration


def _complete(stored, cached, cache: Path, key, work, threads, knobs: set, log) -> tuple[dict, str]:
    """The study's plan with ``knobs`` filled in: from the cache, else measured (and added to the cache)."""
    entry = stored or (copy.deepcopy(cached) if cached else None)
    missing = knobs - _measured(entry)
    source = "cache" if stored is None and cached is not None else "study"
    if cached is not None and entry is not cached and missing & _measured(cached):
        entry = _from_cache(entry or _new_entry(key, work, threads), cached, missing & _measured(cached))
        missing -= _measured(cached)
        source = "cache"
    if not missing:
        entry = entry or _new_entry(key, work, threads)
        if source == "cache":
            log(f"plan: using this machine's plan from {cache}")
        return entry, source
    log(f"plan: measuring {', '.join(sorted(missing))} on this device ({key}); other jobs wait ...")
    start = ExecutionPlan(**entry["plan"]) if entry else None
    calibration = calibrate(work, threads, "compile" in missing, log=log, knobs=missing, start=start,
                            known_rate=_known_rate(cached, work))  # fmt: skip
    entry = _with(entry, key, work, threads, calibration, missing)
    cache_missing = missing - _measured(cached)
    if cache_missing:
        _write_cache(cache, _with(cached, key, work, threads, calibration, cache_missing), log)
    return entry, "calibrated"


def _recalibrate(stored, cached, cache: Path, key, work, threads, knobs: set, log) -> tuple[dict, dict]:
    """Measure ``knobs`` and every knob the cache held again, from the defaults; replace the cache's
    plan unless the new calibration was refused where the cached one was not. Returns the study's
    plan (the new one where the study has none) and ``{"recalibration": what happened}``."""
    knobs = knobs | _measured(cached)
    log(f"plan: recalibrating {', '.join(sorted(knobs)) or 'nothing (no knob is auto)'} on this device ({key}) ...")
    calibration = calibrate(
        work, threads, "compile" in knobs, log=log, knobs=knobs, known_rate=_known_rate(cached, work)
    )
    entry = _with(None, key, work, threads, calibration, knobs)
    outcome = {"plan": entry["plan"], "refused": calibration.refused, "cache_file": str(cache),
               "cache_written": False, "seconds": calibration.seconds}  # fmt: skip
    if calibration.refused and cached is not None and not cached.get("refused"):
        log(f"plan: the recalibration was refused; the cached plan {cache} stays")
        entry = cached
    else:
        outcome["cache_written"] = _write_cache(cache, entry, log)
    return (entry if stored is None else stored), {"recalibration": outcome}


def resolve(pinned: ExecutionPlan, auto: set[str], plans: str, work: Workload, log=print,
            recalibrate: bool = False) -> tuple[ExecutionPlan, dict]:  # fmt: skip
    """The plan a job runs with: ``pinned``'s knobs, except those in ``auto``, which the device's plan sets.

    Returns the plan and a note for the record: the plan file, where it came from, the knobs taken
    from it (``auto``) and those the config pinned, and whether its calibration was refused.
    """
    unknown = auto - set(KNOBS)
    if unknown:
        raise PlanError(f"unknown plan knob(s) {', '.join(sorted(unknown))}; the knobs are {', '.join(KNOBS)}")
    if not auto and not recalibrate:
        return pinned, {"file": None, "auto": [], "pinned": list(RUN_KNOBS)}
    if not plans:
        raise PlanError("knobs set to auto need a plans folder (--plans DIR), where measured plans are kept")
    stored = stored_plan(plans, work, pinned.threads, "compile" in auto, log, knobs=auto, recalibrate=recalibrate)
    measured = stored["plan"]
    chosen = dataclasses.replace(pinned, **{k: measured[k] for k in auto})
    fallback = {k: v for k, v in stored.get("fallback", {}).items() if k in auto}
    if fallback:
        log(f"plan: WARNING: {', '.join(sorted(fallback))} at the defaults, not measured values: "
            + "; ".join(sorted(set(fallback.values()))))  # fmt: skip
    note = {"file": stored["file"], "device_key": stored["device_key"], "source": stored["source"],
            "auto": sorted(auto), "pinned": [k for k in RUN_KNOBS if k not in auto], "fallback": fallback,
            "refused": stored.get("refused")}  # fmt: skip
    if "recalibration" in stored:
        note["recalibration"] = stored["recalibration"]
    return chosen, note | {"measurements": stored["measurements"]}
