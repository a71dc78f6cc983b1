"""What every part shares about a run's settings, without torch: the hyperparameter keys, the named
inits, the generic freeze depths of the search space and how they map onto a backbone's stages.
"""

from __future__ import annotations

from pathlib import Path

from tlselect.core.backbones import NO_FREEZE, backbone_spec

# Hyperparameters the ``train`` block sets and a policy (or source.train, search.train) overrides.
HYPER_KEYS = (
    "epochs",
    "batch_size",
    "optimizer",
    "lr",
    "momentum",
    "weight_decay",
    "schedule",
    "warmup_epochs",
    "label_smoothing",
    "augment",
    "cache_features",
)


# What a linear probe on fixed cached activations uses of them (no augmentation or caching).
PROBE_HYPER_KEYS = HYPER_KEYS[:9]


NAMED_INITS = ("scratch", "imagenet", "source")


# Generic freeze depths of the search pool, mapped onto each backbone's stage table.
FREEZE_DEPTHS = ("none", "early", "most")


def resolve_init(config: dict, init: str) -> str:
    """'pretrained' means the study's ``pretrained`` setting; the rest name themselves."""
    return config["pretrained"] if init == "pretrained" else init


def init_label(init: str) -> str:
    """A resolved init as it appears in ids and folder names (a weights file by its stem)."""
    return init if init in NAMED_INITS else "file-" + Path(init).stem.replace("_", "-")


def hyperparameters(config: dict, overrides: dict, keys: tuple[str, ...] = HYPER_KEYS) -> dict:
    """The ``train`` defaults, overridden key by key (by a policy, ``source.train`` or ``search.train``)."""
    merged = {k: overrides.get(k, config["train"][k]) for k in keys}
    if merged.get("batch_size") == "auto":
        merged["batch_size"] = 0  # sized to the training images (tlselect.training.options.auto_batch_size)
    return merged


def weights_of(init: str, backbone: str) -> tuple[str, str] | None:
    """The weights file a run with this init loads, as ``(init, backbone)``; None for scratch or a path."""
    return (init, backbone) if init in ("source", "imagenet") else None


def freeze_stage(backbone: str, depth: str) -> str:
    """The stage that ``depth`` freezes through: early = the 2nd stage, most = the second-to-last."""
    stages = backbone_spec(backbone).stage_names
    return {"none": NO_FREEZE, "early": stages[1], "most": stages[-2]}[depth]


def freeze_depth(backbone: str, stage: str) -> str:
    """The generic depth whose :func:`freeze_stage` is ``stage`` (a recorded candidate's depth)."""
    return next(d for d in FREEZE_DEPTHS if freeze_stage(backbone, d) == stage)
