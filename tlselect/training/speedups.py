"""Speed benchmarks of the optimizations, each a ratio measured within one run on one machine.

``training``: the trainer against a bare loop (efficiency) and each optimization against the naive
ImageFolder + PIL + DataLoader fp32 path, plus an accuracy check that the fast path trades none away.
``features``: the per-layer feature cache (VISTA's staged plan) against recomputing from pixels.
``jobs``: a whole one-epoch training job's seconds outside its training and evaluation, started
in a fresh process against handed to the fork server (tlselect.training.forkserver).
Each plan's peak extra resident memory (CPU) or peak allocated memory (CUDA) is measured too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from tlselect.data.tensors import load_split
from tlselect.training import forkserver
from tlselect.training.features import extract_all_in_memory
from tlselect.training.loop import autocast, execution, resolve_device
from tlselect.training.models import StagedNet
from tlselect.training.options import TrainConfig
from tlselect.training.plan import RUN_KNOBS, training_step
from tlselect.training.trainer import hardware, resolve_batch_size, resolve_plan, train, versions


class PeakMemory:
    """Peak extra memory of a block: CUDA's allocator peak, or resident set growth on Linux CPUs."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mb = None

    @staticmethod
    def _status(field: str) -> int:
        return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
                self.base = self._status("VmRSS")
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        elif self.base is not None:
            self.mb = (self._status("VmHWM") - self.base) / 1024


def timed(device: torch.device, fn):
    """(seconds, peak extra MB, result) of ``fn()``."""
    with PeakMemory(device) as peak:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return seconds, peak.mb, result


def row(suite, name, baseline, seconds, baseline_seconds, goal=None, peak_mb=None, baseline_peak_mb=None, note=""):
    speedup = baseline_seconds / seconds
    return {
        "suite": suite,
        "optimization": name,
        "baseline": baseline,
        "seconds": round(seconds, 3),
        "baseline_seconds": round(baseline_seconds, 3),
        "speedup": round(speedup, 3),
        "goal": goal,
        "meets_goal": None if goal is None else bool(speedup >= goal),
        "peak_mb": None if peak_mb is None else round(peak_mb, 1),
        "baseline_peak_mb": None if baseline_peak_mb is None else round(baseline_peak_mb, 1),
        "note": note,
    }


# ---------------------------------------------------------------------------------------------
# Training loop


def bare_loop_images_per_second(config: TrainConfig, steps: int = 12) -> float:
    """Images/s of the plain step (forward, loss, backward, SGD) on random tensors already in memory."""
    device = resolve_device(config.device)
    plan = execution(config)
    model = StagedNet(config.backbone, 10, config.resolution)
    model.to(device, memory_format=plan.memory_format())
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = plan.grad_scaler(device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (config.batch_size, 3, 32, 32), dtype=torch.uint8, generator=generator).to(device)
    x = plan.prepare(x)
    y = torch.randint(0, 10, (config.batch_size,), generator=generator).to(device)

    def step():
        training_step(model, x, y, optimizer, plan, scaler, device)

    for _ in range(3):
        step()
    seconds, _, _ = timed(device, lambda: [step() for _ in range(steps)])
    return steps * config.batch_size / seconds


def epoch_images_per_second(config: TrainConfig, log) -> tuple[float, float, dict]:
    """(images/s of the last epoch including its validation, peak MB, record) of a short real run."""
    with tempfile.TemporaryDirectory() as tmp:
        config = dataclasses.replace(config, out=f"{tmp}/model.pt", record="")
        device = resolve_device(config.device)
        _, peak, record = timed(device, lambda: train(config, log=log))
    last = record["curves"][-1]
    return last["images"] / (last["train_seconds"] + last["eval_seconds"]), peak, record


CHOSEN = "the chosen plan (in-memory + this device's measured plan)"


def training_suite(base: TrainConfig, accuracy_epochs: int, log=print) -> list[dict]:
    """Efficiency against the bare loop, speedups over the naive path, accuracy of fast vs naive.

    ``base`` carries the plan knobs (``auto`` and ``plans``): the chosen-plan variant runs with them,
    the single-optimization variants each change one knob of the naive float32 path.
    """
    quiet = lambda message: None  # noqa: E731
    fast = dataclasses.replace(base, data_path="memory", epochs=2)
    naive = dataclasses.replace(
        base, data_path="naive", precision="float32", channels_last=False, compile=False, auto="", epochs=2
    )
    variants = {
        "naive fp32 (ImageFolder + PIL + DataLoader)": naive,
        "in-memory tensors + batched augmentation": dataclasses.replace(naive, data_path="memory"),
        "bfloat16 autocast": dataclasses.replace(naive, precision="bfloat16"),
        "channels_last": dataclasses.replace(naive, channels_last=True),
        CHOSEN: fast,
    }
    if resolve_device(base.device).type == "cuda":
        variants["float16 autocast"] = dataclasses.replace(naive, precision="float16")
    if base.compile:
        variants["chosen plan + torch.compile"] = dataclasses.replace(fast, compile=True)
    measured = {}
    for name, config in variants.items():
        log(f"training suite: {name} ...")
        try:
            measured[name] = epoch_images_per_second(config, quiet)
        except Exception as error:  # torch.compile fails on some torch/backend combinations
            if not config.compile:
                raise
            log(f"  failed, left out: {type(error).__name__}: {str(error).splitlines()[0]}")
            continue
        log(f"  {measured[name][0]:.0f} images/s")
    rows = []
    baseline_name = next(iter(variants))
    base_ips, base_peak, _ = measured[baseline_name]
    for name, (ips, peak, record) in list(measured.items())[1:]:
        note = "per image"
        if name == CHOSEN:
            note += "; plan: " + ", ".join(f"{k}={record['config'][k]}" for k in RUN_KNOBS)
        rows.append(row("training", name, baseline_name, 1 / ips, 1 / base_ips, None, peak, base_peak, note))

    resolved = measured[CHOSEN][2]["config"]  # the plan's knobs, and the batch size and lr of batch_size auto
    chosen = TrainConfig(**{**dataclasses.asdict(fast), **{k: resolved[k] for k in (*RUN_KNOBS, "batch_size", "lr")}})
    bare = bare_loop_images_per_second(dataclasses.replace(chosen, auto=""))
    trainer_ips = measured[CHOSEN][0]
    rows.append(
        row(
            "training",
            "efficiency: trainer epoch vs bare loop",
            "bare loop on random in-memory tensors",
            1 / trainer_ips,
            1 / bare,
            0.9,
            note=f"trainer {trainer_ips:.0f} images/s (augmentation, optimizer and validation included), "
            f"bare loop {bare:.0f} images/s",
        )
    )
    log(f"efficiency: {trainer_ips / bare:.2f} (trainer {trainer_ips:.0f} vs bare {bare:.0f} images/s)")

    if accuracy_epochs:
        accuracy = {}
        for name, config in (("fast", chosen), ("naive", naive)):
            log(f"accuracy check: {name} path, {accuracy_epochs} epochs ...")
            _, _, record = epoch_images_per_second(dataclasses.replace(config, epochs=accuracy_epochs), quiet)
            accuracy[name] = record
        fast_val = accuracy["fast"]["metrics"]["val_accuracy"]
        naive_val = accuracy["naive"]["metrics"]["val_accuracy"]
        fast_s = accuracy["fast"]["timings"]["wall_seconds"]
        naive_s = accuracy["naive"]["timings"]["wall_seconds"]
        gap = abs(fast_val - naive_val) * 100
        rows.append(
            row(
                "training",
                f"whole run, {accuracy_epochs} epochs (accuracy check)",
                baseline_name,
                fast_s,
                naive_s,
                note=f"validation accuracy fast {fast_val:.4f} vs naive {naive_val:.4f} "
                f"({gap:.1f} points apart; goal within 1)",
            )
        )
        log(f"accuracy: fast {fast_val:.4f} vs naive {naive_val:.4f} ({gap:.1f} points)")
    return rows


# ---------------------------------------------------------------------------------------------
# Feature cache


def _probe_heads(features: dict, labels: torch.Tensor, epochs: int, batch: int, device) -> None:
    """Train one pooled linear head per layer on cached features (the cached probe sweep)."""
    for x in features.values():
        pooled = nn.functional.adaptive_avg_pool2d(x.float(), 1).flatten(1)
        head = nn.Linear(pooled.shape[1], int(labels.max()) + 1).to(device)
        optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
        generator = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            order = torch.randperm(len(pooled), generator=generator).to(device)
            for i in range(0, len(pooled) - batch + 1, batch):
                index = order[i : i + batch]
                loss = nn.functional.cross_entropy(head(pooled[index]), labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()


def _naive_probe_sweep(model, images, labels, layers, epochs, batch, config, device) -> None:
    """Per layer and epoch, recompute the frozen prefix from pixels for every batch, then step the head."""
    model.eval()
    for layer in layers:
        stop = model.stage_index(layer) + 1
        head = None
        generator = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=generator).to(device)
            for i in range(0, len(images) - batch + 1, batch):
                index = order[i : i + batch]
                with torch.no_grad(), autocast(config, device):
                    x = model(images[index], stop=stop)
                pooled = nn.functional.adaptive_avg_pool2d(x.float(), 1).flatten(1)
                if head is None:
                    head = nn.Linear(pooled.shape[1], int(labels.max()) + 1).to(device)
                    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
                loss = nn.functional.cross_entropy(head(pooled), labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()


def features_suite(base: TrainConfig, layers: list[str], epochs: int = 10, log=print) -> list[dict]:
    """Probe sweep, extraction and freeze-most training: recompute from pixels vs the staged cache."""
    device = resolve_device(base.device)
    data = Path(base.data)
    train_x, train_y = load_split(data / "train.pt")
    val_x, val_y = load_split(data / "val.pt")
    images = torch.cat([train_x, val_x]).to(device)
    labels = torch.cat([train_y, val_y]).to(device)
    torch.manual_seed(base.seed)
    model = StagedNet(base.backbone, 10, base.resolution).to(device)
    model.freeze_through(layers[-1])
    base = resolve_batch_size(base, len(train_x))
    batch = base.batch_size
    rows = []

    base, _ = resolve_plan(base, device, len(images), log)  # the device's plan (precision, batch, threads)
    amp_dtype = None if base.precision == "float32" else getattr(torch, base.precision)

    def staged():
        return extract_all_in_memory(model, images, layers, batch, amp_dtype)

    def lazy():
        for layer in layers:
            extract_all_in_memory(model, images, [layer], batch, amp_dtype)

    log(f"features suite: {len(images)} images, layers {', '.join(layers)}")
    staged()  # warm-up
    lazy_s, lazy_mb, _ = timed(device, lazy)
    staged_s, staged_mb, _ = timed(device, staged)
    rows.append(
        row(
            "features",
            "extraction: one staged pass for all layers",
            "one pass from pixels per layer",
            staged_s,
            lazy_s,
            2.5,
            staged_mb,
            lazy_mb,
        )
    )
    log(f"  extraction: lazy {lazy_s:.1f}s, staged {staged_s:.1f}s")

    naive_s, naive_mb, _ = timed(
        device, lambda: _naive_probe_sweep(model, images, labels, layers, epochs, batch, base, device)
    )
    cached_s, cached_mb, _ = timed(device, lambda: _probe_heads(staged(), labels, epochs, batch, device))
    rows.append(
        row(
            "features",
            f"probe sweep, {len(layers)} layers x {epochs} epochs: staged cache",
            "forward from pixels for every layer and epoch",
            cached_s,
            naive_s,
            10,
            cached_mb,
            naive_mb,
            note="cached time includes the extraction",
        )
    )
    log(f"  probe sweep: naive {naive_s:.1f}s, cached {cached_s:.1f}s")

    freeze = dataclasses.replace(base, freeze="layer3", augment=False, epochs=epochs, data_path="memory")
    quiet = lambda message: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        plain_s, plain_mb, _ = timed(device, lambda: train(dataclasses.replace(freeze, out=f"{tmp}/a.pt"), quiet))
        cache_s, cache_mb, _ = timed(
            device, lambda: train(dataclasses.replace(freeze, out=f"{tmp}/b.pt", cache_features=True), quiet)
        )
    rows.append(
        row(
            "features",
            f"freeze-most (through layer3), {epochs} epochs: cached prefix",
            "same run recomputing the frozen prefix every step",
            cache_s,
            plain_s,
            1.8,
            cache_mb,
            plain_mb,
            note="whole runs; the cached run includes its prefix pass",
        )
    )
    log(f"  freeze-most: uncached {plain_s:.1f}s, cached {cache_s:.1f}s")
    return rows


# ---------------------------------------------------------------------------------------------
# Jobs


def job_fixed_cost(args: list[str], server_dir: str | None, repo: Path = forkserver.REPO) -> tuple[float, float]:
    """``scripts/train.py args`` (of the checkout ``repo``) as a workflow job: (wall seconds, of them
    training and evaluation).

    ``server_dir``: hand it to the fork server of that folder (started by the job if none runs there);
    None: a fresh process.
    """
    env = {**os.environ, forkserver.ENV: "0" if server_dir is None else "1", forkserver.DIR_ENV: server_dir or ""}
    with tempfile.TemporaryDirectory(prefix="job-") as tmp:
        command = [sys.executable, str(repo / "scripts" / "train.py"), *args, "--record", f"{tmp}/m.json",
                   "--out", f"{tmp}/m.pt"]  # fmt: skip
        start = time.perf_counter()
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if result.returncode:
            raise RuntimeError(f"the measured job failed:\n{result.stderr[-3000:]}")
        timings = json.loads(Path(f"{tmp}/m.json").read_text())["timings"]
    return wall, timings["train_seconds"] + timings["eval_seconds"]


def jobs_suite(base: TrainConfig, repeat: int = 3, log=print) -> list[dict]:
    """A one-epoch training job's fixed cost (wall minus training and evaluation), cold and forkserver.

    Fastest of ``repeat`` jobs each; the fork server is started (and its first job run) first.
    """
    threads = str(base.threads or torch.get_num_threads())
    args = ["--data", base.data, "--init", base.init, "--weights", base.weights, "--epochs", "1",
            "--device", base.device, "--threads", threads, "--plans", base.plans, "--auto", base.auto]  # fmt: skip
    outside = {"cold": [], "forked": []}
    with tempfile.TemporaryDirectory(prefix="forkserver-") as server_dir:
        log("jobs suite: starting a fork server")
        job_fixed_cost(args, server_dir)
        for i in range(repeat):
            for mode in outside:  # in turn, so a busy spell hits both alike
                wall, inside = job_fixed_cost(args, server_dir if mode == "forked" else None)
                outside[mode].append(wall - inside)
                log(f"jobs suite: {mode} job {i + 1}/{repeat}: {wall - inside:.2f} s outside training")
    cold, hot = min(outside["cold"]), min(outside["forked"])
    note = f"seconds outside training and evaluation per job: {cold:.2f} in a fresh process, {hot:.2f} forked"
    return [row("jobs", "the fork server (a job's fixed cost)", "a fresh process per job", hot, cold, note=note)]


def measure(base: TrainConfig, suites: list[str], accuracy_epochs: int, layers: list[str], epochs: int) -> dict:
    """Run the chosen ``suites`` (``training``, ``features``, ``jobs``, in that order) from the settings
    ``base``: ``{"rows", "device", "hardware", "versions", "seconds"}``, what ``optimizations.json`` holds.
    ``accuracy_epochs``: the training suite's fast-vs-naive check (0: skip); ``layers`` and
    ``epochs``: the feature suite's probed stages and plan epochs."""
    start = time.perf_counter()
    rows = []
    if "training" in suites:
        rows += training_suite(base, accuracy_epochs)
    if "features" in suites:
        rows += features_suite(base, layers, epochs)
    if "jobs" in suites:
        rows += jobs_suite(base)
    device = resolve_device(base.device)
    return {"rows": rows, "device": str(device), "hardware": hardware(), "versions": versions(),
            "seconds": time.perf_counter() - start}  # fmt: skip


def summary(result: dict) -> str:
    """The speedups of a :func:`measure` result as printed lines, each with its baseline and goal."""
    hw = result["hardware"]
    lines = [f"\nOptimizations on {hw.get('cuda_device', hw['processor'] or 'CPU')} ({result['device']}):"]
    for r in result["rows"]:
        goal = "" if r["goal"] is None else f"  goal >= {r['goal']} {'met' if r['meets_goal'] else 'NOT met'}"
        lines.append(f"  {r['speedup']:6.2f}x  {r['optimization']}  (vs {r['baseline']}){goal}")
        if r["note"]:
            lines.append(f"           {r['note']}")
    return "\n".join(lines)
