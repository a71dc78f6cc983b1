"""Run groups: several runs trained in one process, runs of one shape fused into one network.

:func:`train_group` takes the runs' trainer settings (:class:`TrainConfig`, one per run spec) and
trains them all. Runs of the same shape (:func:`fusion_key`: backbone, resolution, freeze depth,
batch size, epochs, data, device and execution plan, and the epoch they resume after) train as one
:class:`~tlselect.training.fusion.FusedStagedNet`; they may differ in everything else a run
sets: learning rate and schedule, optimizer, momentum, weight decay, label smoothing, init and seed
(each run's batches, in its own data order and augmentation, are stacked along the channels).
The other runs (probes, cached prefixes, compiled models, the naive data path, a shape of their
own) train one after another through the trainer itself.

Each run goes through the trainer's own steps (:func:`~tlselect.training.trainer.prepare` before
its epochs, :func:`~tlselect.training.trainer.finish` after: the same checkpoint, record and
curves a job of its own writes) and writes its own resume files, so a killed group resumes every
run from its own; a run whose checkpoint and record are already written is not trained again, nor
one whose files a keep folder holds (hard links made as each run finishes, keyed by its settings:
Snakemake deletes a job's outputs before it runs the job again). A run that diverges (a
non-finite training loss) is finished as diverged after that epoch, and the others train on,
fused without it. A fused run's ``train_seconds`` are its share of the fused epochs (their
seconds over the runs in them); its record names the runs it was fused with.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from tlselect.core.files import CorruptFile, checksum_path, load_torch
from tlselect.core.registry import RegistryError, read_record, write_record
from tlselect.runs import SHAPE
from tlselect.training.fusion import FusedStagedNet, FusionError, fused_step
from tlselect.training.loop import autocast, evaluate, lr_at, prepare_input
from tlselect.training.options import TrainConfig, TrainingError, check_settings
from tlselect.training.trainer import PreparedRun, ResumeFiles, finish, fit, prepare, record_epoch, train


def fusible(config: TrainConfig) -> bool:
    """Whether a run can train fused at all: an image model on in-memory batches, uncompiled,
    without a cached prefix (those train one after another)."""
    return config.kind != "probe" and config.data_path == "memory" and not config.cache_features and not config.compile


def fusion_key(run: PreparedRun) -> tuple | None:
    """Runs with the same key train fused; None: the run trains alone."""
    config = run.state.config
    if not fusible(config):
        return None
    return (*(getattr(config, name) for name in SHAPE), run.first_epoch, run.state.images)


def train_runs(configs: list[TrainConfig], fuse: bool = False, keep: str = "") -> list[dict]:
    """A training job's runs: one run through the trainer (its record written where it names one),
    several as a run group (:func:`train_group`); returns their records in order."""
    if len(configs) > 1:
        return train_group(configs, fuse=fuse, keep=keep)
    record = train(configs[0])
    if configs[0].record:
        write_record(configs[0].record, record)
    return [record]


def train_group(configs: list[TrainConfig], log=print, fuse: bool = True, keep: str = "") -> list[dict]:
    """Train every run of ``configs`` in this process (``fuse``: runs of one shape fused) and write
    each one's checkpoint and record; returns the records in the order of ``configs``. ``keep``: a
    folder where each finished run's files are kept (hard links, keyed by its settings), restored
    instead of trained again when the group runs again (Snakemake deletes a job's outputs first)."""
    for config in configs:
        check_settings(config)
    outs = [config.out for config in configs]
    if len(set(outs)) < len(outs):
        raise TrainingError("two runs of the group write the same checkpoint; give each run its own --out")
    if keep:
        for config in configs:
            restore(config, keep, log)
    records = {config.out: done for config in configs if (done := finished_record(config, log))}
    todo = [config for config in configs if config.out not in records]
    prepared = []
    for config in todo:
        if fuse and fusible(config):
            run = prepare(config, log)
            run.state.rng = torch.Generator()  # its dropout's draws, from where the global generator stands
            run.state.rng.set_state(torch.get_rng_state())
            prepared.append(run)
    sets: dict[tuple, list[PreparedRun]] = {}
    for index, run in enumerate(prepared):
        sets.setdefault(fusion_key(run) or ("alone", index), []).append(run)
    for runs in sets.values():
        for record in fit_fused(runs, log, keep) if len(runs) > 1 else [fit_alone(runs[0], log, keep)]:
            records[record["config"]["out"]] = record
    for config in todo:
        if config.out not in records:
            records[config.out] = write(config, train(config, log), keep)
    return [records[config.out] for config in configs]


def config_files(config: TrainConfig) -> list[Path]:
    """A run's files: its checkpoint, the checkpoint's checksum, its record."""
    return [Path(config.out), checksum_path(config.out), Path(config.record)]


def kept_files(config: TrainConfig, keep: str) -> list[Path]:
    """Where ``keep`` holds a finished run's :func:`config_files`: named by its id and its settings."""
    digest = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:12]
    base = Path(keep) / f"{config.run_id}-{digest}"
    return [base.with_name(base.name + suffix) for suffix in (".pt", ".pt.crc32", ".json")]


def link_files(sources: list[Path], targets: list[Path]) -> None:
    """Hard-link each of ``sources`` (those that exist) to its target, replacing it atomically."""
    for source, target in zip(sources, targets, strict=True):
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.link")
            temporary.unlink(missing_ok=True)
            os.link(source, temporary)
            os.replace(temporary, target)
            temporary.unlink(missing_ok=True)  # left where target already was source (the rename did nothing)


def restore(config: TrainConfig, keep: str, log) -> None:
    """Link a run's kept files back where a job wants them (checked as any finished run's are)."""
    kept = kept_files(config, keep)
    if config.record and all(path.is_file() for path in kept) and not Path(config.out).is_file():
        link_files(kept, config_files(config))
        log(f"[{config.run_id}] restored from {kept[0].parent}")


def finished_record(config: TrainConfig, log) -> dict | None:
    """The record of a run of the group that already finished (its checkpoint and record written), or None."""
    if not (config.record and Path(config.record).is_file() and Path(config.out).is_file()):
        return None
    try:
        record, checkpoint = read_record(config.record), load_torch(config.out)
    except (CorruptFile, RegistryError):  # retrained
        return None
    if record["run_id"] != config.run_id or checkpoint.get("run_id") != config.run_id:
        return None
    log(f"[{config.run_id}] already trained: {config.out}")
    return record


def write(config: TrainConfig, record: dict, keep: str = "") -> dict:
    """Write a finished run's record (its checkpoint is written); ``keep``: link both into that folder at once."""
    if config.record:
        write_record(config.record, record)
        if keep:
            link_files(config_files(config), kept_files(config, keep))
    return record


def fit_alone(run: PreparedRun, log, keep: str = "") -> dict:
    """A prepared run with a shape of its own: the trainer's epochs, then its files."""
    status = fit(run.state, run.forward, run.batches, run.first_epoch, run.scaler, run.device, log)
    return write(run.state.config, finish(run, status, log), keep)


def fit_fused(runs: list[PreparedRun], log, keep: str = "") -> list[dict]:
    """Train runs of one shape fused, validating each after every epoch, with resume files; a
    diverged run is finished at once and the rest fused again without it. Their records."""
    try:
        fused = FusedStagedNet([run.state.model for run in runs], [run.state.rng for run in runs])
    except FusionError as error:
        log(f"training {len(runs)} runs one after another: {error}")
        return [fit_alone(run, log, keep) for run in runs]
    names = [run.state.config.run_id for run in runs]
    log(f"fused {len(runs)} runs: {', '.join(names)}")
    records, active = [], list(runs)
    first, config = runs[0], runs[0].state.config
    steps_per_epoch = max(1, first.state.images // config.batch_size)
    resume_files = ResumeFiles()
    for epoch in range(first.first_epoch, config.epochs):
        epoch_start = time.perf_counter()
        results = fused_epoch(fused, active, epoch, steps_per_epoch)
        share = (time.perf_counter() - epoch_start) / len(active)
        survivors = []
        for run, result in zip(active, results, strict=True):
            t0 = time.perf_counter()
            model, own = run.state.model, run.state.config
            val_acc, val_loss, _ = evaluate(model, run.forward, run.batches("val"), own, run.device)
            seconds = (share, time.perf_counter() - t0)
            if record_epoch(run.state, epoch, result, (val_acc, val_loss), seconds, log):
                survivors.append(run)
            else:
                records.append(finish_fused(run, "diverged", names, log, keep))
        if not survivors:
            return records
        if len(survivors) < len(active):
            active = survivors
            fused = FusedStagedNet([run.state.model for run in active], [run.state.rng for run in active])
        resume_files.after_epoch([run.state for run in active], epoch, time.perf_counter() - epoch_start)
    return records + [finish_fused(run, "completed", names, log, keep) for run in active]


def finish_fused(run: PreparedRun, status: str, names: list[str], log, keep: str = "") -> dict:
    record = finish(run, status, log)
    record["fused_with"] = [name for name in names if name != run.state.config.run_id]
    return write(run.state.config, record, keep)


def fused_epoch(fused: FusedStagedNet, runs: list[PreparedRun], epoch: int, steps_per_epoch: int) -> list[tuple]:
    """One epoch of fused optimizer steps, each run on its own batches with its own loss, learning
    rate and optimizer; per run (mean training loss, training accuracy, images), as ``fit_epoch``'s."""
    config, device = runs[0].state.config, runs[0].device
    fused.train()
    loss_sums, corrects, seen = [0.0] * len(runs), [0] * len(runs), 0
    streams = [run.batches("train", shuffled=True) for run in runs]
    for step, batches in enumerate(zip(*streams, strict=True)):
        x = prepare_input(torch.cat([x for x, _ in batches], 1).to(device, non_blocking=True), config)
        labels = [y.to(device, non_blocking=True) for _, y in batches]
        for run in runs:
            for group in run.state.optimizer.param_groups:
                group["lr"] = lr_at(run.state.config, epoch * steps_per_epoch + step, steps_per_epoch)
        logits, losses = fused_step(
            fused, x, labels, [run.state.optimizer for run in runs], [run.scaler for run in runs],
            autocast(config, device), [run.state.config.label_smoothing for run in runs],
        )  # fmt: skip
        for b in range(len(runs)):
            loss_sums[b] += losses[b].detach() * len(labels[b])
            corrects[b] += (logits[:, b].detach().argmax(1) == labels[b]).sum()
        seen += len(labels[0])
    return [(float(loss) / seen, int(correct) / seen, seen) for loss, correct in zip(loss_sums, corrects, strict=True)]
