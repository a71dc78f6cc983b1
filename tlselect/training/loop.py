"""The pieces of an epoch: batched augmentation, the learning-rate schedule, the optimizer, batches
from memory, evaluation, and a frozen prefix's activations.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tlselect.training.models import StagedNet
from tlselect.training.options import TrainConfig, TrainingError
from tlselect.training.plan import RUN_KNOBS, ExecutionPlan


class LinearProbe(nn.Module):
    """A linear classifier on (pooled) cached activations of one layer."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(x, 1))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' asked for but no CUDA device is visible; use device: auto or cpu")
    return torch.device(name)


def augment_draws(generator: torch.Generator, n: int, pad: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop offsets (2, n) and horizontal flips (n) for a batch of ``n``, drawn on the CPU."""
    shifts = torch.randint(0, 2 * pad + 1, (2, n), generator=generator)
    return shifts, torch.rand(n, generator=generator) < 0.5


def augment_batch(images: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Crop with zero padding ``pad`` at ``shifts`` and flip where ``flips``, for a whole uint8 batch."""
    n, _, h, w = images.shape
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


def execution(config: TrainConfig) -> ExecutionPlan:
    """The execution plan a (resolved) config runs with."""
    return ExecutionPlan(**{knob: getattr(config, knob) for knob in RUN_KNOBS})


def autocast(config: TrainConfig, device: torch.device):
    return execution(config).autocast(device)


def memory_batches(images, labels, batch_size, generator=None, augment=False, device=None):
    """Batches of in-memory tensors: shuffled full batches when ``generator`` is given, else in order."""
    if generator is None:
        for i in range(0, len(images), batch_size):
            yield images[i : i + batch_size], labels[i : i + batch_size]
        return
    order = torch.randperm(len(images), generator=generator)
    steps = max(1, len(images) // batch_size)
    sizes = [len(order[step * batch_size : (step + 1) * batch_size]) for step in range(steps)]
    if augment:  # every step's draws now, in the order step-by-step draws take, copied to the device once:
        draws = [augment_draws(generator, n) for n in sizes]  # a copy per step would stall on the GPU
        shifts = torch.cat([shift for shift, _ in draws], 1).to(images.device)
        flips = torch.cat([flip for _, flip in draws]).to(images.device)
    order = order.to(images.device)
    for step, n in enumerate(sizes):
        batch = slice(step * batch_size, step * batch_size + n)
        x = images[order[batch]]
        yield (augment_batch(x, shifts[:, batch], flips[batch]) if augment else x), labels[order[batch]]


@torch.no_grad()
def evaluate(model, forward, batches, config, device):
    """(accuracy, mean loss, predictions) of ``forward`` (``model``'s forward pass) over ``batches``."""
    model.eval()
    correct, loss_sum, predictions, count = 0, 0.0, [], 0
    for x, y in batches:
        x = prepare_input(x.to(device, non_blocking=True), config)
        y = y.to(device, non_blocking=True)
        count += len(y)
        with autocast(config, device):
            logits = forward(x)
        loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
        pred = logits.argmax(1)
        correct += (pred == y).sum().item()
        predictions.append(pred.cpu())
    return correct / count, loss_sum / count, torch.cat(predictions)


def prepare_input(x: torch.Tensor, config) -> torch.Tensor:
    """4-D batches (images, activations) go channels-last when asked; flat features stay as they are."""
    return execution(config).prepare(x)


@torch.no_grad()
def run_prefix(model: StagedNet, images: torch.Tensor, stop: int, config, device) -> torch.Tensor:
    """Outputs of stages ``0..stop-1`` (the frozen prefix) for every image, in float32."""
    model.eval()
    outs = []
    for i in range(0, len(images), config.eval_batch_size):
        with autocast(config, device):
            outs.append(model(images[i : i + config.eval_batch_size].to(device), stop=stop).float())
    return torch.cat(outs)
