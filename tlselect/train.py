"""The training loop: in-memory uint8 tensors, batched augmentation, optional cached prefix.

One plain loop in the spirit of torchvision's reference trainer. Data stays as decoded uint8
tensors (on the training device); augmentation (random crop with padding, horizontal flip) runs
on whole batches. With a frozen prefix and augmentation off, ``cache_features`` runs the prefix
once and trains the suffix on its activations, which gives the same result as the uncached loop.
Every epoch is checkpointed, so a killed run resumes from its last finished epoch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torchvision
from torch import nn

from tlselect.atomic import load_torch, save_torch
from tlselect.data import image_folder_loader, load_split
from tlselect.features import load_features
from tlselect.models import NO_FREEZE, StagedNet, initialize


@dataclass
class TrainConfig:
    """Every knob of a training run; ``scripts/train.py`` turns each field into a flag."""

    data: str = field(default="results/data", metadata={"help": "folder with train.pt, val.pt and (optional) test.pt"})
    out: str = field(default="results/models/run.pt", metadata={"help": "checkpoint to write"})
    record: str = field(default="", metadata={"help": "registry record (JSON) to write; empty: none"})
    run_id: str = field(default="run", metadata={"help": "name of the run in logs and its record"})
    policy: str = field(default="", metadata={"help": "policy name, recorded for the report"})
    backbone: str = field(default="resnet18", metadata={"help": "backbone name (see tlselect.models.BACKBONES)"})
    init: str = field(default="scratch", metadata={"help": "scratch | imagenet | source | path to a state dict"})
    source_checkpoint: str = field(default="", metadata={"help": "checkpoint used by --init source"})
    freeze: str = field(default=NO_FREEZE, metadata={"help": "freeze stages up to and including this one, or none"})
    resolution: int = field(default=32, metadata={"help": "input side in pixels (images are resized to it)"})
    epochs: int = field(default=10, metadata={"help": "training epochs"})
    batch_size: int = field(default=256, metadata={"help": "training batch size"})
    optimizer: str = field(default="sgd", metadata={"help": "sgd | adamw"})
    lr: float = field(default=0.1, metadata={"help": "peak learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "weight decay"})
    schedule: str = field(default="cosine", metadata={"help": "cosine | constant (after linear warmup)"})
    warmup_epochs: float = field(default=0.0, metadata={"help": "linear warmup length in epochs"})
    label_smoothing: float = field(default=0.0, metadata={"help": "cross-entropy label smoothing"})
    augment: bool = field(default=True, metadata={"help": "random crop (padding 4) and horizontal flip"})
    amp: bool = field(default=False, metadata={"help": "mixed precision autocast (see --amp-dtype)"})
    amp_dtype: str = field(
        default="bfloat16", metadata={"help": "bfloat16 | float16 (float16 adds a gradient scaler; CUDA only)"}
    )
    channels_last: bool = field(default=True, metadata={"help": "channels-last memory format for convolutions"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (slow start, faster steps)"})
    data_path: str = field(
        default="memory",
        metadata={"help": "memory: decoded tensors, batched augmentation | naive: ImageFolder + PIL + DataLoader"},
    )
    workers: int = field(default=2, metadata={"help": "DataLoader worker processes of the naive data path"})
    cache_features: bool = field(default=False, metadata={"help": "train the suffix on cached frozen-prefix outputs"})
    seed: int = field(default=0, metadata={"help": "seed for init, shuffling and augmentation"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: leave torch's default)"})
    eval_batch_size: int = field(default=1024, metadata={"help": "evaluation batch size"})
    features: str = field(
        default="", metadata={"help": "probe mode: folder of cached activations <layer>/<split>.npy (see --layer)"}
    )
    layer: str = field(default="", metadata={"help": "probe mode: which cached layer to train a linear probe on"})
    pool: int = field(default=1, metadata={"help": "probe mode: adaptive average pooling to pool x pool (0: none)"})
    keep_state: bool = field(
        default=False,
        metadata={"help": "keep the training state (optimizer, RNG) in the checkpoint for --continue-from"},
    )
    continue_from: str = field(
        default="",
        metadata={"help": "continue a finished run (a --keep-state checkpoint of the same config) to --epochs"},
    )


# Knobs that may change when a killed run resumes (they do not change its results on one device).
RESUMABLE = {"threads", "device", "workers", "eval_batch_size"}
# Knobs that may differ between a run and the run it continues (successive-halving rungs).
CONTINUABLE = {"epochs", "out", "record", "run_id", "policy", "continue_from", "keep_state"}


def _same_run(saved: dict, current: dict, allowed: set, differences: bool = False):
    """Whether two configs agree outside ``allowed`` (or, with ``differences``, the keys that differ)."""
    differing = sorted(k for k, v in current.items() if k not in allowed and saved.get(k) != v)
    return differing if differences else not differing


class LinearProbe(nn.Module):
    """A linear classifier on (pooled) cached activations of one layer."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        return self.fc(torch.flatten(x, 1))


class TrainingError(RuntimeError):
    """A run cannot start as configured; the message names the knob and the fix."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' asked for but no CUDA device is visible; use device: auto or cpu")
    return torch.device(name)


def augment_batch(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding ``pad`` and random horizontal flip, for a whole uint8 batch."""
    n, _, h, w = images.shape
    shifts = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).to(images.device)
    flips = (torch.rand(n, generator=generator) < 0.5).to(images.device)
    padded = nn.functional.pad(images, (pad, pad, pad, pad))
    rows = torch.arange(h, device=images.device)[None, :] + shifts[0][:, None]
    cols = torch.arange(w, device=images.device)[None, :] + shifts[1][:, None]
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch_index = torch.arange(n, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch_index, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def lr_at(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate at optimizer step ``step``: linear warmup, then cosine decay or constant."""
    total = config.epochs * steps_per_epoch
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.schedule == "constant":
        return config.lr
    progress = (step - warmup) / max(1, total - warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True
        )
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    raise TrainingError(f"unknown optimizer {config.optimizer!r}; use sgd or adamw")


def autocast(config: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=getattr(torch, config.amp_dtype), enabled=config.amp)


def memory_batches(images, labels, batch_size, generator=None, augment=False, device=None):
    """Batches of in-memory tensors: shuffled full batches when ``generator`` is given, else in order."""
    if generator is None:
        for i in range(0, len(images), batch_size):
            yield images[i : i + batch_size], labels[i : i + batch_size]
        return
    order = torch.randperm(len(images), generator=generator).to(images.device)
    for step in range(max(1, len(images) // batch_size)):
        index = order[step * batch_size : (step + 1) * batch_size]
        x = images[index]
        yield (augment_batch(x, generator) if augment else x), labels[index]


@torch.no_grad()
def evaluate(model, batches, config, device, start: int = 0):
    """(accuracy, mean loss, predictions) of ``model`` run from stage ``start`` over ``batches``."""
    model.eval()
    correct, loss_sum, predictions, count = 0, 0.0, [], 0
    for x, y in batches:
        x = prepare_input(x.to(device, non_blocking=True), config)
        y = y.to(device, non_blocking=True)
        count += len(y)
        with autocast(config, device):
            logits = model(x, start=start)
        loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
        pred = logits.argmax(1)
        correct += (pred == y).sum().item()
        predictions.append(pred.cpu())
    return correct / count, loss_sum / count, torch.cat(predictions)


def prepare_input(x: torch.Tensor, config) -> torch.Tensor:
    """4-D batches (images, activations) go channels-last when asked; flat features stay as they are."""
    return x.contiguous(memory_format=torch.channels_last) if config.channels_last and x.dim() == 4 else x


@torch.no_grad()
def run_prefix(model: StagedNet, images: torch.Tensor, stop: int, config, device) -> torch.Tensor:
    """Outputs of stages ``0..stop-1`` (the frozen prefix) for every image, in float32."""
    model.eval()
    outs = []
    for i in range(0, len(images), config.eval_batch_size):
        with autocast(config, device):
            outs.append(model(images[i : i + config.eval_batch_size].to(device), stop=stop).float())
    return torch.cat(outs)


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


def resume_path(config: TrainConfig) -> Path:
    return Path(config.out).with_suffix(".resume.pt")


def train(config: TrainConfig, log=print) -> dict:
    """Run one training run to completion (or divergence); write checkpoint and record; return the record."""
    wall_start = time.perf_counter()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    if config.cache_features and config.freeze == NO_FREEZE:
        raise TrainingError(
            "--cache-features needs a frozen prefix (--freeze STAGE); nothing to cache with freeze none"
        )
    if config.cache_features and config.augment:
        raise TrainingError(
            "--cache-features with augmentation is not exact: a cached prefix sees each image once, "
            "unaugmented. Turn augmentation off for this policy, or drop --cache-features."
        )

    if config.data_path not in ("memory", "naive"):
        raise TrainingError(f"unknown data path {config.data_path!r}; use memory or naive")
    if config.data_path == "naive" and (config.features or config.cache_features):
        raise TrainingError("the naive data path reads images: it cannot be combined with cached features")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    t0 = time.perf_counter()
    data_dir = Path(config.data)
    train_x, train_y = load_split(data_dir / "train.pt")
    val_x, val_y = load_split(data_dir / "val.pt")
    has_test = (data_dir / "test.pt").is_file()
    test_x, test_y = load_split(data_dir / "test.pt") if has_test else (None, None)
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    subset_file = data_dir / "subset.json"
    subset = json.loads(subset_file.read_text()) if subset_file.is_file() else None
    data_checksum = subset["source"]["sha256"] if subset else None
    if config.data_path == "memory":
        train_x, train_y = train_x.to(device), train_y.to(device)
    elif subset is None:
        raise TrainingError(f"the naive data path needs {subset_file} (it names the image files)")
    data_seconds = time.perf_counter() - t0

    torch.manual_seed(config.seed)
    if config.features:
        if not config.layer:
            raise TrainingError("probe mode (--features) needs --layer: which cached layer to probe")
        folder = Path(config.features) / config.layer
        train_x, val_x = (load_features(folder / f"{s}.npy", config.pool).to(device) for s in ("train", "val"))
        test_x = load_features(folder / "test.npy", config.pool) if has_test else None
        model = LinearProbe(train_x[0].numel(), num_classes)
        init_note = {"source": f"features:{folder}", "classifier_replaced": False, "skipped_keys": []}
    else:
        model = StagedNet(config.backbone, num_classes, config.resolution)
        init_note = initialize(model, config.init, config.source_checkpoint or None)
        model.freeze_through(config.freeze)
    model.to(device, memory_format=torch.channels_last if config.channels_last else torch.preserve_format)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(config, [p for p in model.parameters() if p.requires_grad])
    generator = torch.Generator().manual_seed(config.seed)

    start = 0
    cache_seconds = 0.0
    if config.cache_features and not config.features:  # probes read features cached on disk
        t0 = time.perf_counter()
        start = model.frozen_stop()
        train_x = run_prefix(model, train_x, start, config, device)
        val_x = run_prefix(model, val_x, start, config, device)
        if has_test:
            test_x = run_prefix(model, test_x, start, config, device)
        cache_seconds = time.perf_counter() - t0

    if config.data_path == "naive":
        loaders = {
            split: image_folder_loader(subset, split, config, generator if split == "train" else None)
            for split in ("train", "val", "test")
            if split != "test" or has_test
        }

        def batches(split, shuffled=False):
            return loaders[split]

    else:
        splits = {"train": (train_x, train_y), "val": (val_x, val_y), "test": (test_x, test_y)}

        def batches(split, shuffled=False):
            size = config.batch_size if shuffled else config.eval_batch_size
            rng = generator if shuffled else None
            return memory_batches(*splits[split], size, rng, shuffled and config.augment)

    # Full batches only (the remainder is reshuffled into later epochs): uniform shapes, and no
    # single-image batch for BatchNorm to choke on.
    steps_per_epoch = max(1, len(train_y) // config.batch_size)
    forward = torch.compile(model) if config.compile else model
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp and config.amp_dtype == "float16")
    curves: list[dict] = []
    first_epoch = 0
    status = "completed"
    resumed_from = None
    resume_file = resume_path(config)

    def restore(state: dict) -> int:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])  # dropout (e.g. mobilenet's head) draws from it
        curves[:] = state["curves"]
        return len(curves)

    if resume_file.is_file():
        state = load_torch(resume_file)
        if _same_run(state["config"], asdict(config), RESUMABLE):
            first_epoch = resumed_from = restore(state)
            log(f"[{config.run_id}] resuming after epoch {first_epoch} from {resume_file}")
        else:
            log(f"[{config.run_id}] ignoring {resume_file}: it was written with another configuration")
    if config.continue_from and not first_epoch:
        state = load_torch(config.continue_from).get("training_state")
        if state is None:
            raise TrainingError(f"{config.continue_from} holds no training state; train it with --keep-state")
        differing = _same_run(state["config"], asdict(config), CONTINUABLE | RESUMABLE, differences=True)
        if differing:
            raise TrainingError(f"cannot continue {config.continue_from}: its run differs in {', '.join(differing)}")
        first_epoch = restore(state)
        if first_epoch > config.epochs:
            raise TrainingError(f"{config.continue_from} already trained {first_epoch} epochs (> --epochs)")
        log(f"[{config.run_id}] continuing {config.continue_from} after epoch {first_epoch}")

    what = f"probe on {config.layer}" if config.features else f"freeze={config.freeze}"
    log(
        f"[{config.run_id}] {config.backbone} init={config.init} {what} on {device}: "
        f"{len(train_y)} train / {len(val_y)} val images, {trainable:,}/{total:,} trainable parameters"
    )

    def training_state() -> dict:
        return {
            "config": asdict(config),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "curves": curves,
        }

    for epoch in range(first_epoch, config.epochs):
        model.train()
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        for step, (x, y) in enumerate(batches("train", shuffled=True)):
            x = prepare_input(x.to(device, non_blocking=True), config)
            y = y.to(device, non_blocking=True)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(config, epoch * steps_per_epoch + step, steps_per_epoch)
            with autocast(config, device):
                logits = forward(x, start=start)
            loss = nn.functional.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
        train_loss = float(loss_sum) / seen
        train_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        val_acc, val_loss, _ = evaluate(forward, batches("val"), config, device, start)
        eval_seconds = time.perf_counter() - t0
        curves.append(
            {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "train_accuracy": int(correct) / seen,
                "val_loss": val_loss,
                "val_accuracy": val_acc,
                "lr": optimizer.param_groups[0]["lr"],
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
            status = "diverged"
            log(f"[{config.run_id}] training loss is {train_loss}: the run diverged; lower the learning rate")
            break
        save_torch(resume_file, training_state())

    test_acc = test_loss = None
    test_predictions = None
    if has_test and status == "completed":
        test_acc, test_loss, test_predictions = evaluate(forward, batches("test"), config, device, start)
    train_total = sum(c["train_seconds"] for c in curves)
    eval_total = sum(c["eval_seconds"] for c in curves)
    record = {
        "run_id": config.run_id,
        "policy": config.policy,
        "status": status,
        "config": asdict(config),
        "seed": config.seed,
        "data_checksum": data_checksum,
        "init": init_note,
        "num_classes": num_classes,
        "parameters": {"trainable": trainable, "total": total},
        "data": {"train": len(train_y), "val": len(val_y), "test": len(test_y) if has_test else 0},
        "timings": {
            "data_seconds": data_seconds,
            "cache_seconds": cache_seconds,
            "train_seconds": train_total,
            "eval_seconds": eval_total,
            "wall_seconds": time.perf_counter() - wall_start,
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
    weights = model.net.state_dict() if isinstance(model, StagedNet) else model.state_dict()
    checkpoint = {"model": weights, "run_id": config.run_id, "status": status}
    if test_predictions is not None:
        checkpoint["test_predictions"] = test_predictions
    if config.keep_state:
        checkpoint["training_state"] = training_state()
    save_torch(config.out, checkpoint)
    resume_file.unlink(missing_ok=True)
    log(
        f"[{config.run_id}] {status}: val_acc {record['metrics']['val_accuracy']} test_acc {test_acc} "
        f"in {record['timings']['wall_seconds']:.1f}s"
    )
    return record


def config_from_args(argv=None, description: str = "") -> TrainConfig:
    """Parse command-line flags, one per :class:`TrainConfig` field (``--no-X`` for booleans)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=type(default), default=default, help=f.metadata["help"])
    return TrainConfig(**vars(parser.parse_args(argv)))
