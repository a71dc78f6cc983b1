"""The trainer's settings: :class:`TrainConfig` (one field per ``scripts/train.py`` flag), what may
change on resume, and the checks a run passes before it starts.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from tlselect.core.errors import TLSelectError
from tlselect.training.gpus import assign
from tlselect.training.models import NO_FREEZE


@dataclass
class TrainConfig:
    """Every knob of a training run; ``scripts/train.py`` turns each field into a flag."""

    data: str = field(default="", metadata={"help": "folder with train.pt, val.pt and (optional) test.pt (required)"})
    out: str = field(default="", metadata={"help": "checkpoint to write (required)"})
    record: str = field(default="", metadata={"help": "registry record (JSON) to write; empty: none"})
    run_id: str = field(default="run", metadata={"help": "id of the run in logs and its record"})
    kind: str = field(default="policy", metadata={"help": "policy | probe | source | candidate (tlselect.runs)"})
    name: str = field(default="", metadata={"help": "the run's name within its kind (policy name, probe_<layer>, ...)"})
    backbone: str = field(default="resnet18", metadata={"help": "backbone name (tlselect.core.backbones)"})
    init: str = field(
        default="scratch", metadata={"help": "scratch | imagenet | source | state-dict path (a probe: its features')"}
    )
    weights: str = field(
        default="", metadata={"help": "the init's weights file: the source model, or the fetched ImageNet weights"}
    )
    freeze: str = field(default=NO_FREEZE, metadata={"help": "freeze stages up to and including this one, or none"})
    resolution: int = field(default=32, metadata={"help": "input side in pixels (images are resized to it)"})
    epochs: int = field(default=10, metadata={"help": "training epochs"})
    batch_size: int = field(
        default=256,
        metadata={"help": "training batch size; 0: auto (about 1/16 of the training images, 32 to 256, with the "
                  "learning rate scaled by batch/256)"},
    )  # fmt: skip
    optimizer: str = field(default="sgd", metadata={"help": "sgd | adamw"})
    lr: float = field(default=0.1, metadata={"help": "peak learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "weight decay"})
    schedule: str = field(default="cosine", metadata={"help": "cosine | constant (after linear warmup)"})
    warmup_epochs: float = field(default=0.0, metadata={"help": "linear warmup length in epochs"})
    label_smoothing: float = field(default=0.0, metadata={"help": "cross-entropy label smoothing"})
    augment: bool = field(default=True, metadata={"help": "random crop (padding 4) and horizontal flip"})
    precision: str = field(
        default="float32",
        metadata={"help": "float32 | bfloat16 | float16 (autocast; float16: CUDA only, with a gradient scaler)"},
    )
    channels_last: bool = field(default=True, metadata={"help": "channels-last memory format for convolutions"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (slow start, faster steps)"})
    cudnn_benchmark: bool = field(
        default=True, metadata={"help": "cuDNN autotuning of each convolution shape (CUDA only; nothing on a CPU)"}
    )
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
    plans: str = field(default="", metadata={"help": "folder of measured execution plans, one per device"})
    auto: str = field(
        default="",
        metadata={"help": "comma-separated plan knobs (precision, channels_last, threads, compile, eval_batch_size, "
                  "cudnn_benchmark; group_size and fuse are measured for the workflow's run groups) taken from "
                  "this device's plan in --plans, measured there first if it has none"},
    )  # fmt: skip
    features: str = field(default="", metadata={"help": "a probe: folder of one cached layer's <split>.npy"})
    layer: str = field(default="", metadata={"help": "a probe: the name of that layer (recorded)"})
    pool: int = field(default=1, metadata={"help": "a probe: adaptive average pooling to pool x pool (0: none)"})
    keep_state: bool = field(
        default=False,
        metadata={"help": "keep the training state (optimizer, RNG) in the checkpoint for --continue-from"},
    )
    continue_from: str = field(
        default="",
        metadata={"help": "continue a finished run (a --keep-state checkpoint of the same config) to --epochs"},
    )
    partition: str = field(
        default="", metadata={"help": "train on this split file instead of <data>/train.pt (a data partition)"}
    )
    folds: int = field(
        default=0,
        metadata={"help": "k-fold cross-validation over the training and validation images together (0: off)"},
    )
    fold: int = field(
        default=0,
        metadata={"help": "with --folds k: validate on this fold (1..k), train on the others; 0: train on all "
                  "(the refit; it validates on the validation split, which it trained on)"},
    )  # fmt: skip


# Knobs that may change when a killed run resumes (they do not change its results on one device).
RESUMABLE = {"threads", "device", "workers", "eval_batch_size", "channels_last", "compile", "cudnn_benchmark", "plans",
             "auto"}  # fmt: skip


# Knobs that may differ between a run and the run it continues (successive-halving rungs; a model
# hopping over data partitions, one sub-epoch per partition file).
CONTINUABLE = {"epochs", "out", "record", "run_id", "name", "continue_from", "keep_state", "partition"}


KINDS = ("policy", "probe", "source", "candidate")


# Image-model knobs a linear probe on cached activations never uses; its record leaves them out.
PROBE_UNUSED = {"weights", "freeze", "resolution", "augment", "precision", "channels_last", "compile",
                "cudnn_benchmark", "data_path", "workers", "cache_features"}  # fmt: skip


# Plan knobs a probe (a linear head on cached activations) takes from the device's plan.
PROBE_KNOBS = {"threads", "eval_batch_size"}


def _same_run(saved: dict, current: dict, allowed: set, differences: bool = False):
    """Whether two configs agree outside ``allowed`` (or, with ``differences``, the keys that differ).
    A key ``saved`` lacks (a knob added since it was written) counts as its default."""
    saved = {**asdict(TrainConfig()), **saved}
    differing = sorted(k for k, v in current.items() if k not in allowed and saved.get(k) != v)
    return differing if differences else not differing


class TrainingError(TLSelectError):
    """A run cannot start as configured; the message names the knob and the fix."""


def resume_path(config: TrainConfig) -> Path:
    return Path(config.out).with_suffix(".resume.pt")


def check_settings(config: TrainConfig) -> None:
    """Settings that cannot run together, rejected before any data is read."""
    if not (config.data and config.out):
        raise TrainingError("give --data (the decoded subset's folder) and --out (the checkpoint to write)")
    if config.kind not in KINDS:
        raise TrainingError(f"unknown kind {config.kind!r}; use one of {', '.join(KINDS)}")
    if config.data_path not in ("memory", "naive"):
        raise TrainingError(f"unknown data path {config.data_path!r}; use memory or naive")
    if config.partition and (config.data_path != "memory" or config.kind == "probe"):
        raise TrainingError("--partition needs the memory data path and an image model (not a probe)")
    if config.folds and (config.folds < 2 or not 0 <= config.fold <= config.folds):
        raise TrainingError(f"--folds {config.folds} --fold {config.fold}: give k >= 2 folds and a fold from 0 to k")
    if config.folds and (config.partition or config.data_path != "memory"):
        raise TrainingError("--folds needs the memory data path and no --partition")
    if config.kind == "probe":
        if not (config.features and config.layer):
            raise TrainingError("a probe needs --features (a cached layer's folder) and --layer (its name)")
        if config.data_path == "naive":
            raise TrainingError("the naive data path reads images: a probe trains on cached features")
        return
    if config.cache_features and config.freeze == NO_FREEZE:
        raise TrainingError(
            "--cache-features needs a frozen prefix (--freeze STAGE); nothing to cache with freeze none"
        )
    if config.cache_features and config.augment:
        raise TrainingError(
            "--cache-features with augmentation is not exact: a cached prefix sees each image once, "
            "unaugmented. Turn augmentation off for this policy, or drop --cache-features."
        )
    if config.cache_features and config.data_path == "naive":
        raise TrainingError("the naive data path reads images: it cannot be combined with cached features")


def recorded_settings(config: TrainConfig) -> dict:
    """The settings a record keeps: a probe's leave out the image-model knobs it never uses."""
    settings = asdict(config)
    return {k: v for k, v in settings.items() if k not in PROBE_UNUSED} if config.kind == "probe" else settings


def auto_batch_size(images: int) -> int:
    """The power of two nearest below 1/16 of the training images, between 32 and 256.

    Small subsets then still take at least 16 optimizer steps an epoch: with a fixed batch of 256, a
    few thousand images give 9 steps and the runs under-train at equal epochs.
    """
    size = 32
    while size * 2 <= min(256, images // 16):
        size *= 2
    return size


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


def job_config(argv=None, description: str = "") -> TrainConfig:
    """A training job's config from its flags, the GPUs it was given claimed before CUDA starts:
    ``--gpus N`` (the scheduler's gpu resource; 0 hides every GPU) and ``--gpu-jobs-per-device M``
    (at most M jobs share one GPU; :func:`tlselect.training.gpus.assign`), then every
    :class:`TrainConfig` flag."""
    return group_job(argv, description).runs[0]


@dataclass
class GroupJob:
    """A training job's runs (one, or a run group's) and how the group trains."""

    runs: list[TrainConfig]
    fuse: bool = False
    keep: str = ""


def group_job(argv=None, description: str = "") -> GroupJob:
    """A training job of one run (:func:`job_config`'s flags) or of a run group: ``--run "FLAGS"``
    once per run (its own flags: settings, --out, --record, --run-id, ...), the other flags shared
    by every run, plus ``--fuse`` (runs of one shape fused) and ``--keep FOLDER`` (finished runs
    kept by run id, for a rerun of the group). The GPUs it was given are claimed before CUDA starts."""
    job = argparse.ArgumentParser(add_help=False)
    job.add_argument("--gpus", type=int, default=None)
    job.add_argument("--gpu-jobs-per-device", type=int, default=1, help="jobs sharing one GPU at most")
    job.add_argument("--run", action="append", default=[], help="a run group's member: its own flags, quoted")
    job.add_argument("--fuse", action="store_true", help="train a group's runs of one shape fused")
    job.add_argument("--keep", default="", help="folder keeping a group's finished runs by run id")
    known, rest = job.parse_known_args(argv)
    members = [shlex.split(run) for run in known.run] or [[]]
    runs = [config_from_args(rest + member, description) for member in members]
    assign(known.gpus, runs[0].device, per_device=known.gpu_jobs_per_device)
    return GroupJob(runs, known.fuse, known.keep)
