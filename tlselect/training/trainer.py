"""The trainer: ``train()`` runs named steps (settings check, data, model, cached prefix, resume, plan,
epochs, record, checkpoint) over in-memory uint8 tensors.

One plain loop in the spirit of torchvision's reference trainer. Data stays as decoded uint8
tensors (on the training device); augmentation (random crop with padding, horizontal flip) runs
on whole batches. With a frozen prefix and augmentation off, ``cache_features`` runs the prefix
once and trains the suffix on its activations, which gives the same result as the uncached loop.
Epochs end with resume files (every epoch on a CPU; see :data:`RESUME_EVERY_WRITE_TIMES`), so a
killed run resumes after its last one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn

from tlselect.core.files import CorruptFile, load_torch, remove, save_torch
from tlselect.data.folders import stratified_folds
from tlselect.data.tensors import image_folder_loader, load_split
from tlselect.training.features import load_features
from tlselect.training.loop import (
    LinearProbe,
    autocast,
    build_optimizer,
    evaluate,
    execution,
    lr_at,
    memory_batches,
    prepare_input,
    resolve_device,
    run_prefix,
)
from tlselect.training.models import StagedNet, initialize
from tlselect.training.options import (
    CONTINUABLE,
    PROBE_KNOBS,
    RESUMABLE,
    TrainConfig,
    TrainingError,
    _same_run,
    auto_batch_size,
    check_settings,
    recorded_settings,
    resume_path,
)
from tlselect.training.plan import RUN_KNOBS, Workload, check_precision, resolve

SPLITS = ("train", "val", "test")


def hardware() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count()}
    info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
    }


@dataclass
class Splits:
    """The run's data: ``{split: (inputs, labels)}`` (test may be absent) and where it came from."""

    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    num_classes: int
    subset: dict | None  # subset.json beside the tensors, when there is one
    seconds: float


def load_splits(config: TrainConfig, device: torch.device) -> Splits:
    """Decoded subset tensors (a probe's inputs: its cached layer's activations); training data on ``device``."""
    t0 = time.perf_counter()
    data_dir = Path(config.data)
    names = ["train", "val"] + (["test"] if (data_dir / "test.pt").is_file() else [])
    files = {split: data_dir / f"{split}.pt" for split in names} | (
        {"train": config.partition} if config.partition else {}
    )
    tensors = {split: load_split(files[split]) for split in names}
    num_classes = int(max(tensors["train"][1].max(), tensors["val"][1].max())) + 1
    subset_file = data_dir / "subset.json"
    subset = json.loads(subset_file.read_text()) if subset_file.is_file() else None
    if config.kind == "probe":
        tensors = {
            s: (load_features(Path(config.features) / f"{s}.npy", config.pool), y) for s, (_, y) in tensors.items()
        }
    if config.folds:
        tensors.update(fold_splits(tensors, config, subset["seed"] if subset else 0))
    if config.kind == "probe":
        tensors["val"] = (tensors["val"][0].to(device), tensors["val"][1])
    if config.data_path == "memory":
        tensors["train"] = tuple(t.to(device) for t in tensors["train"])
    elif subset is None:
        raise TrainingError(f"the naive data path needs {subset_file} (it names the image files)")
    return Splits(tensors, num_classes, subset, time.perf_counter() - t0)


def fold_splits(tensors: dict, config: TrainConfig, seed: int) -> dict:
    """``train`` and ``val`` of fold ``config.fold`` of ``config.folds`` over the training and validation
    images together (:func:`tlselect.data.folders.stratified_folds`, seeded with the subset's seed, so
    every run of the study sees the same folds): the other folds and this one; fold 0 (the refit)
    trains on all of them and keeps the validation split."""
    inputs = torch.cat([tensors["train"][0], tensors["val"][0]])
    labels = torch.cat([tensors["train"][1], tensors["val"][1]])
    folds = torch.tensor(stratified_folds(labels.tolist(), config.folds, seed))
    if not config.fold:
        return {"train": (inputs, labels)}
    held = folds == config.fold
    return {"train": (inputs[~held], labels[~held]), "val": (inputs[held], labels[held])}


def build_model(config: TrainConfig, splits: Splits, device: torch.device) -> tuple[nn.Module, dict]:
    """The network with its init applied and its prefix frozen (a probe: a linear head); and the init note."""
    if config.kind == "probe":
        model = LinearProbe(splits.tensors["train"][0][0].numel(), splits.num_classes)
        note = {"source": f"features:{config.features}", "classifier_replaced": False, "skipped_keys": []}
    else:
        model = StagedNet(config.backbone, splits.num_classes, config.resolution)
        note = initialize(model, config.init, config.weights or None)
        model.freeze_through(config.freeze)
    model.to(device, memory_format=torch.channels_last if config.channels_last else torch.preserve_format)
    return model, note


def cache_prefix(model: nn.Module, splits: Splits, config: TrainConfig, device: torch.device) -> tuple[int, float]:
    """With ``cache_features``, replace every split's images by the frozen prefix's outputs.

    Returns the stage the training forward pass starts from, and the seconds it took.
    """
    if not config.cache_features or config.kind == "probe":
        return 0, 0.0
    t0 = time.perf_counter()
    start = model.frozen_stop()
    for split, (x, y) in splits.tensors.items():
        splits.tensors[split] = (run_prefix(model, x, start, config, device), y)
    return start, time.perf_counter() - t0


def batch_source(config: TrainConfig, splits: Splits, generator: torch.Generator):
    """``batches(split, shuffled)``: shuffled (augmented) training batches, or evaluation batches in order."""
    if config.data_path == "naive":
        loaders = {
            split: image_folder_loader(splits.subset, split, config, generator if split == "train" else None)
            for split in splits.tensors
        }
        return lambda split, shuffled=False: loaders[split]
    augment = config.augment and config.kind != "probe"

    def batches(split: str, shuffled: bool = False):
        size = config.batch_size if shuffled else config.eval_batch_size
        return memory_batches(*splits.tensors[split], size, generator if shuffled else None, shuffled and augment)

    return batches


@dataclass
class TrainingState:
    """Everything a killed run needs to resume, and a finished one to continue (--keep-state)."""

    config: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    images: int  # training images (or cached activations) per epoch
    curves: list[dict] = field(default_factory=list)
    # What the run's dropout draws from: torch's global generator, or, for a run trained fused with
    # others (tlselect.training.groups), a generator of its own holding what the global one would.
    rng: torch.Generator = torch.default_generator

    def snapshot(self) -> dict:
        cuda = torch.cuda.is_initialized()  # a CPU run never starts CUDA here: its file has no cuda_rng
        return {
            "config": asdict(self.config),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": self.rng.get_state(),
            **({"cuda_rng": torch.cuda.get_rng_state_all()} if cuda else {}),
            "curves": self.curves,
        }

    def restore(self, saved: dict) -> int:
        """Restore ``saved``; returns the epochs it had finished."""
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.generator.set_state(saved["generator"])
        self.rng.set_state(saved["torch_rng"])  # dropout (e.g. mobilenet's head) draws from it
        if "cuda_rng" in saved and torch.cuda.is_initialized():  # dropout on the GPU draws from CUDA's
            for index, rng in enumerate(saved["cuda_rng"][: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(rng, index)
        self.curves[:] = saved["curves"]
        return len(self.curves)


def resume_or_continue(state: TrainingState, log) -> tuple[int, int | None]:
    """Resume a killed run from its resume file, or continue a finished one (--continue-from).

    Returns (first epoch to train, epoch resumed after or None).
    """
    config = state.config
    resume_file = resume_path(config)
    try:
        saved = load_torch(resume_file) if resume_file.is_file() else None
    except CorruptFile:
        log(f"[{config.run_id}] warning: {resume_file} no longer matches its checksum; deleted it, starting over")
        remove(resume_file)
        saved = None
    if saved is not None:
        if _same_run(saved["config"], asdict(config), RESUMABLE):
            first = state.restore(saved)
            log(f"[{config.run_id}] resuming after epoch {first} from {resume_file}")
            return first, first
        log(f"[{config.run_id}] ignoring {resume_file}: it was written with another configuration")
    if not config.continue_from:
        return 0, None
    saved = load_torch(config.continue_from).get("training_state")
    if saved is None:
        raise TrainingError(f"{config.continue_from} holds no training state; train it with --keep-state")
    differing = _same_run(saved["config"], asdict(config), CONTINUABLE | RESUMABLE, differences=True)
    if differing:
        raise TrainingError(f"cannot continue {config.continue_from}: its run differs in {', '.join(differing)}")
    first = state.restore(saved)
    if first > config.epochs:
        raise TrainingError(f"{config.continue_from} already trained {first} epochs (> --epochs)")
    log(f"[{config.run_id}] continuing {config.continue_from} after epoch {first}")
    return first, None


def fit_epoch(state: TrainingState, forward, batches, epoch: int, steps_per_epoch: int, scaler, device):
    """One epoch of optimizer steps; returns (mean training loss, training accuracy, images seen)."""
    config, optimizer = state.config, state.optimizer
    state.model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    for step, (x, y) in enumerate(batches("train", shuffled=True)):
        x = prepare_input(x.to(device, non_blocking=True), config)
        y = y.to(device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(config, epoch * steps_per_epoch + step, steps_per_epoch)
        with autocast(config, device):
            logits = forward(x)
        loss = nn.functional.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
    return float(loss_sum) / seen, int(correct) / seen, seen


def make_record(
    state: TrainingState, status: str, splits: Splits, init_note: dict, test, timings, device, resumed_from
) -> dict:
    """The registry record of a finished (or diverged) run."""
    config, model, curves = state.config, state.model, state.curves
    test_acc, test_loss = test
    train_total = sum(c["train_seconds"] for c in curves)
    return {
        "run_id": config.run_id,
        "kind": config.kind,
        "name": config.name,
        "status": status,
        "config": recorded_settings(config),
        "seed": config.seed,
        "data_checksum": splits.subset["source"]["sha256"] if splits.subset else None,
        "init": init_note,
        "num_classes": splits.num_classes,
        "parameters": parameter_counts(model),
        "data": {split: len(splits.tensors[split][1]) if split in splits.tensors else 0 for split in SPLITS},
        "timings": {
            **timings,
            "train_seconds": train_total,
            "eval_seconds": sum(c["eval_seconds"] for c in curves),
            "epoch_seconds": [c["train_seconds"] for c in curves],
        },
        "throughput_images_per_second": sum(c["images"] for c in curves) / train_total if train_total else None,
        "metrics": {
            "val_accuracy": curves[-1]["val_accuracy"] if curves else None,
            "best_val_accuracy": max((c["val_accuracy"] for c in curves), default=None),
            "test_accuracy": test_acc,
            "test_loss": test_loss,
        },
        "curves": curves,
        "resumed_from_epoch": resumed_from,
        "continued_from": config.continue_from or None,
        "hardware": {**hardware(), "device": str(device)},
        "versions": versions(),
    }


# A resume file follows the first epoch, then any epoch that ends at least this many times the last
# write's seconds of training after it: at most a tenth of the time goes to resume files. On a CPU
# (epochs of seconds) that is every epoch; on a GPU, where an epoch of the default subset takes
# less time than writing the file, every few epochs.
RESUME_EVERY_WRITE_TIMES = 10


def record_epoch(state: TrainingState, epoch: int, train: tuple, val: tuple, seconds: tuple, log) -> bool:
    """Append an epoch's curve (``train``: loss, accuracy, images; ``val``: accuracy, loss; ``seconds``:
    training, evaluation) and log it; False when its training loss is not finite (the run diverged)."""
    config = state.config
    (train_loss, train_acc, seen), (val_acc, val_loss), (train_seconds, eval_seconds) = train, val, seconds
    state.curves.append(
        {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_accuracy": train_acc,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "lr": state.optimizer.param_groups[0]["lr"],
            "train_seconds": train_seconds,
            "eval_seconds": eval_seconds,
            "images": seen,
        }
    )
    log(
        f"[{config.run_id}] epoch {epoch + 1}/{config.epochs} loss {train_loss:.4f} "
        f"val_acc {val_acc:.4f} ({train_seconds:.1f}s train, {eval_seconds:.1f}s eval)"
    )
    if not math.isfinite(train_loss):
        log(f"[{config.run_id}] training loss is {train_loss}: the run diverged; lower the learning rate")
        return False
    return True


class ResumeFiles:
    """When resume files are written: after the first epoch, then after any epoch that ends at least
    :data:`RESUME_EVERY_WRITE_TIMES` times the last write's seconds after it; never after the last."""

    def __init__(self):
        self.since_last, self.write_seconds = 0.0, 0.0

    def after_epoch(self, states: list[TrainingState], epoch: int, seconds: float) -> None:
        self.since_last += seconds
        if epoch + 1 >= states[0].config.epochs or self.since_last < RESUME_EVERY_WRITE_TIMES * self.write_seconds:
            return  # after the last epoch, the checkpoint follows at once
        t0 = time.perf_counter()
        for state in states:
            save_torch(resume_path(state.config), state.snapshot())
        self.write_seconds, self.since_last = time.perf_counter() - t0, 0.0


def fit(state: TrainingState, forward, batches, first_epoch: int, scaler, device, log) -> str:
    """Train from ``first_epoch`` to the last epoch, validating each, with resume files; the run's status."""
    config = state.config
    # Full batches only (the remainder is reshuffled into later epochs): uniform shapes, and no
    # single-image batch for BatchNorm to choke on.
    steps_per_epoch = max(1, state.images // config.batch_size)
    resume_files = ResumeFiles()
    for epoch in range(first_epoch, config.epochs):
        t0 = time.perf_counter()
        train = fit_epoch(state, forward, batches, epoch, steps_per_epoch, scaler, device)
        train_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        val_acc, val_loss, _ = evaluate(state.model, forward, batches("val"), config, device)
        eval_seconds = time.perf_counter() - t0
        if not record_epoch(state, epoch, train, (val_acc, val_loss), (train_seconds, eval_seconds), log):
            return "diverged"
        resume_files.after_epoch([state], epoch, train_seconds + eval_seconds)
    return "completed"


def save_checkpoint(state: TrainingState, status: str, test_predictions) -> None:
    """The finished run's weights (torchvision's keys), test predictions and, with --keep-state, its state."""
    model, config = state.model, state.config
    weights = model.net.state_dict() if isinstance(model, StagedNet) else model.state_dict()
    checkpoint = {"model": weights, "run_id": config.run_id, "status": status}
    if test_predictions is not None:
        checkpoint["test_predictions"] = test_predictions
    if config.keep_state:
        checkpoint["training_state"] = state.snapshot()
    save_torch(config.out, checkpoint)
    remove(resume_path(config))


@dataclass
class PreparedRun:
    """A run set up to train (its data, model, optimizer, resumed state) and what its record needs."""

    state: TrainingState
    splits: Splits
    forward: object  # the model's forward pass (compiled, past a cached prefix)
    batches: object  # batch_source's batches(split, shuffled)
    scaler: torch.amp.GradScaler
    device: torch.device
    first_epoch: int
    resumed_from: int | None
    init_note: dict
    plan_note: dict
    cache_seconds: float
    wall_start: float


def prepare(config: TrainConfig, log=print) -> PreparedRun:
    """Every step of a run before its epochs: settings, data, plan, model, optimizer, resume."""
    wall_start = time.perf_counter()
    check_settings(config)
    device = resolve_device(config.device)
    splits = load_splits(config, device)
    config = resolve_batch_size(config, training_images(config, splits))
    config, plan_note = resolve_plan(config, device, len(splits.tensors["train"][1]), log)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    torch.backends.cudnn.benchmark = config.cudnn_benchmark and device.type == "cuda"
    torch.manual_seed(config.seed)
    model, init_note = build_model(config, splits, device)
    optimizer = build_optimizer(config, [p for p in model.parameters() if p.requires_grad])
    images = len(splits.tensors["train"][1])
    state = TrainingState(config, model, optimizer, torch.Generator().manual_seed(config.seed), images)
    start, cache_seconds = cache_prefix(model, splits, config, device)
    batches = batch_source(config, splits, state.generator)
    compiled = torch.compile(model) if config.compile else model
    forward = functools.partial(compiled, start=start) if start else compiled  # a cached prefix is skipped
    scaler = execution(config).grad_scaler(device)
    first_epoch, resumed_from = resume_or_continue(state, log)
    log(f"[{config.run_id}] {describe(config, splits, model)} on {device}")
    return PreparedRun(
        state, splits, forward, batches, scaler, device, first_epoch, resumed_from, init_note, plan_note,
        cache_seconds, wall_start,
    )  # fmt: skip


def finish(run: PreparedRun, status: str, log=print) -> dict:
    """Every step of a run after its epochs: test and validation predictions, record, checkpoint."""
    state, splits, forward, batches, device = run.state, run.splits, run.forward, run.batches, run.device
    config, model = state.config, state.model
    test, val_correct = (None, None, None), None
    if "test" in splits.tensors and status == "completed":
        test = evaluate(model, forward, batches("test"), config, device)
    if status == "completed":  # per-image correctness on validation: how sure the choice is (report.answer)
        val_predictions = evaluate(model, forward, batches("val"), config, device)[2]
        hits = (val_predictions == splits.tensors["val"][1].cpu()).tolist()
        val_correct = "".join("1" if hit else "0" for hit in hits)
    timings = {"data_seconds": splits.seconds, "cache_seconds": run.cache_seconds}
    timings["plan_seconds"] = run.plan_note["seconds"]
    timings["wall_seconds"] = time.perf_counter() - run.wall_start
    record = make_record(state, status, splits, run.init_note, test[:2], timings, device, run.resumed_from)
    record["plan"] = {k: v for k, v in run.plan_note.items() if k != "seconds"}
    if val_correct is not None:
        record["metrics"]["val_correct"] = val_correct
    save_checkpoint(state, status, test[2])
    log(f"[{config.run_id}] {status}: val_acc {record['metrics']['val_accuracy']} test_acc {test[0]} "
        f"in {timings['wall_seconds']:.1f}s")  # fmt: skip
    return record


def train(config: TrainConfig, log=print) -> dict:
    """Run one training run to completion (or divergence); write its checkpoint; return its record."""
    run = prepare(config, log)
    status = fit(run.state, run.forward, run.batches, run.first_epoch, run.scaler, run.device, log)
    return finish(run, status, log)


def training_images(config: TrainConfig, splits: Splits) -> int:
    """Training images of the run: with a data partition, the whole training split's (from subset.json)."""
    if config.partition and splits.subset:
        sizes = splits.subset["sizes"]
        return (sizes["train_per_class"] - sizes["val_per_class"]) * len(splits.subset["classes"])
    return len(splits.tensors["train"][1])


def resolve_batch_size(config: TrainConfig, images: int) -> TrainConfig:
    """Batch size 0 (auto) becomes :func:`auto_batch_size`, and ``lr`` (given for batch 256) scales with it."""
    if config.batch_size:
        return config
    batch = auto_batch_size(images)
    return dataclasses.replace(config, batch_size=batch, lr=config.lr * batch / 256)


def resolve_plan(
    config: TrainConfig, device: torch.device, images: int, log, recalibrate: bool = False
) -> tuple[TrainConfig, dict]:
    """The config with its ``auto`` knobs set from this device's plan: the study's copy, else the
    per-user cache's, else measured now (``recalibrate``: measured again; tlselect.training.plan)."""
    t0 = time.perf_counter()
    auto = {knob.strip() for knob in config.auto.split(",") if knob.strip()}
    if config.kind == "probe":
        auto &= PROBE_KNOBS
    pinned = execution(config)
    steps = config.epochs * max(1, images // config.batch_size)
    work = Workload(config.backbone, config.resolution, config.batch_size, device, job_steps=steps)

    def prefixed(message: str) -> None:
        log(f"[{config.run_id}] {message}")

    plan, note = resolve(pinned, auto, config.plans, work, log=prefixed, recalibrate=recalibrate)
    if config.kind != "probe":
        check_precision(plan.precision, device)
    if auto:
        log(f"[{config.run_id}] plan: " + ", ".join(f"{k}={getattr(plan, k)}" for k in RUN_KNOBS))
    note["seconds"] = time.perf_counter() - t0
    return dataclasses.replace(config, **{k: getattr(plan, k) for k in RUN_KNOBS}), note


def recalibrate_plan(config: TrainConfig, log=print) -> dict:
    """Measure this device's plan again for ``config``'s workload (its backbone, resolution and batch
    size on its data); returns the plan note, whose ``recalibration`` says what was measured and
    whether the per-user cache took it."""
    device = resolve_device(config.device)
    splits = load_splits(config, device)
    config = resolve_batch_size(config, training_images(config, splits))
    _, note = resolve_plan(config, device, len(splits.tensors["train"][1]), log, recalibrate=True)
    return note


def describe(config: TrainConfig, splits: Splits, model: nn.Module) -> str:
    """One line on what the run trains, for its log."""
    what = f"probe on {config.layer}" if config.kind == "probe" else f"freeze={config.freeze}"
    counts = parameter_counts(model)
    return (
        f"{config.backbone} init={config.init} {what}: {len(splits.tensors['train'][1])} train / "
        f"{len(splits.tensors['val'][1])} val images, {counts['trainable']:,}/{counts['total']:,} "
        "trainable parameters"
    )


def parameter_counts(model: nn.Module) -> dict:
    """``{"trainable": n, "total": n}`` parameters of ``model`` (frozen ones are not trainable)."""
    return {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
    }
