"""Workflow configuration: checks beyond the JSON schema, policy resolution and stable run ids.

``rules/common.smk`` validates ``config.yaml`` against ``schemas/config.schema.yaml`` (which also
fills in defaults), then calls :func:`check` and :func:`runs`. Everything here is plain Python so
it is testable without Snakemake.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

from tlselect.data import archive_image_counts
from tlselect.models import BACKBONES, NO_FREEZE

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
    "amp",
    "cache_features",
)
NAMED_INITS = ("scratch", "imagenet", "source")
SOURCE_DIR = "results/source"


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and the fix."""


def resolve_init(config: dict, init: str) -> str:
    """'pretrained' means the study's ``pretrained`` setting; the rest name themselves."""
    return config["pretrained"] if init == "pretrained" else init


def _check_init(key: str, init: str) -> None:
    if init not in NAMED_INITS and not Path(init).is_file():
        raise ConfigError(f"{key}: {init!r} is neither one of {', '.join(NAMED_INITS)} nor an existing state-dict file")


def check(config: dict) -> None:
    """Reject a schema-valid config that still cannot run; the message names the key."""
    backbone = config["backbone"]
    if backbone not in BACKBONES:
        raise ConfigError(f"backbone: unknown backbone {backbone!r}; known: {', '.join(BACKBONES)}")
    stages = BACKBONES[backbone].stage_names
    data = config["data"]
    if data["val_per_class"] >= data["train_per_class"]:
        raise ConfigError(
            f"data.val_per_class ({data['val_per_class']}) must be smaller than data.train_per_class "
            f"({data['train_per_class']}): validation images are carved out of the training images"
        )
    if data["archive"] and not Path(data["archive"]).is_file():
        raise ConfigError(f"data.archive: {data['archive']} does not exist; give the path of an image-folder archive")
    _check_init("pretrained", config["pretrained"])
    if config["pretrained"] == "pretrained":
        raise ConfigError("pretrained: must be imagenet, source or a state-dict path, not 'pretrained'")
    seen = set()
    for i, policy in enumerate(config["policies"]):
        key = f"policies[{i}] ({policy['name']})"
        if policy["name"] in seen:
            raise ConfigError(f"{key}: duplicate policy name {policy['name']!r}; policy names must be unique")
        seen.add(policy["name"])
        _check_init(f"{key}.init", resolve_init(config, policy["init"]))
        if policy["freeze"] != NO_FREEZE and policy["freeze"] not in stages:
            raise ConfigError(
                f"{key}.freeze: {backbone} has no stage {policy['freeze']!r}; use none or one of {', '.join(stages)}"
            )
        hyper = policy_hyper(config, policy)
        if hyper["cache_features"] and policy["freeze"] == NO_FREEZE:
            raise ConfigError(f"{key}.cache_features: needs a frozen prefix, but freeze is none")
        if hyper["cache_features"] and hyper["augment"]:
            raise ConfigError(
                f"{key}.cache_features: cached prefix outputs are not augmented; set augment: false for this "
                "policy or turn cache_features off"
            )
        if resolve_init(config, policy["init"]) == "scratch" and policy["freeze"] != NO_FREEZE:
            raise ConfigError(f"{key}.freeze: freezing randomly initialized stages makes no sense with init scratch")

    for layer in config["features"]["layers"]:
        if layer not in stages:
            raise ConfigError(f"features.layers: {backbone} has no stage {layer!r}; stages: {', '.join(stages)}")
    for init in config["features"]["inits"]:
        _check_init("features.inits", resolve_init(config, init))
    if data["archive"]:
        _check_subset_fits(config, archive_image_counts(Path(data["archive"])))


def _check_subset_fits(config: dict, counts: dict[str, dict[str, int]]) -> None:
    """The subset (and the source task) against the images per class that data.archive holds."""
    data, source, archive = config["data"], config["source"], config["data"]["archive"]
    if not counts["train"]:
        raise ConfigError(f"data.archive: {archive} holds no images in train/<class>/ (top level or one folder down)")
    classes = data["classes"] or sorted(counts["train"])
    unknown = [c for c in classes if c not in counts["train"]]
    if unknown:
        raise ConfigError(f"data.classes: {unknown} not in {archive}; it holds {', '.join(sorted(counts['train']))}")
    for key, split in (("train_per_class", "train"), ("test_per_class", "test")):
        short = {c: counts[split].get(c, 0) for c in classes if counts[split].get(c, 0) < data[key]}
        if short:
            raise ConfigError(
                f"data.{key}: the subset asks for {data[key]} images per class, but {split}/ of {archive} holds "
                f"only {', '.join(f'{n} of {c}' for c, n in short.items())}; lower data.{key}"
            )
    if not uses_source(config):
        return
    for c in source["classes"] or classes:
        if c not in counts["train"]:
            raise ConfigError(f"source.classes: {c!r} is not a class of {archive}")
        free = counts["train"][c] - (data["train_per_class"] if c in classes else 0)
        if free < source["train_per_class"]:
            raise ConfigError(
                f"source.train_per_class: the source task asks for {source['train_per_class']} images of class "
                f"{c!r} outside the target subset, but {archive} has {free} more; lower "
                "source.train_per_class or data.train_per_class"
            )


def policy_hyper(config: dict, policy: dict) -> dict:
    """The policy's hyperparameters: the ``train`` defaults, overridden key by key."""
    return {k: policy.get(k, config["train"][k]) for k in HYPER_KEYS}


def _data_identity(config: dict) -> dict:
    data = config["data"]
    return {k: data[k] for k in ("name", "classes", "train_per_class", "val_per_class", "test_per_class", "image_size")}


def source_settings(config: dict, backbone: str | None = None) -> dict:
    """Trainer settings of the source model the workflow pretrains itself (default: the study's backbone)."""
    hyper = {k: config["source"]["train"].get(k, config["train"][k]) for k in HYPER_KEYS}
    hyper["cache_features"] = False
    return {
        "backbone": backbone or config["backbone"],
        "init": "scratch",
        "freeze": NO_FREEZE,
        "resolution": config["resolution"],
        "seed": config["seed"],
        **hyper,
    }


def source_checkpoint(config: dict, backbone: str | None = None) -> str:
    return f"{SOURCE_DIR}/{backbone or config['backbone']}.pt"


def _init_label(init: str) -> str:
    return init if init in NAMED_INITS else "file-" + Path(init).stem.replace("_", "-")


def _digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]


def runs(config: dict) -> dict[str, dict]:
    """``{run_id: settings}`` for every policy; ids are readable and change only with the run's config."""
    out = {}
    for policy in config["policies"]:
        init = resolve_init(config, policy["init"])
        settings = {
            "policy": policy["name"],
            "backbone": config["backbone"],
            "init": init,
            "freeze": policy["freeze"],
            "resolution": config["resolution"],
            "seed": config["seed"],
            **policy_hyper(config, policy),
        }
        identity = {"run": settings, "data": _data_identity(config)}
        if init == "source":
            identity["source"] = {"settings": source_settings(config), "data": config["source"]}
        out[f"{policy['name']}-{config['backbone']}-{_init_label(init)}-{_digest(identity)}"] = settings
    return out


def feature_inits(config: dict) -> dict[str, str]:
    """``{label: init}`` of the inits whose features are cached (labels name folders)."""
    inits = (resolve_init(config, i) for i in config["features"]["inits"]) if config["features"]["layers"] else ()
    return {_init_label(init): init for init in inits}


def feature_layers(config: dict) -> list[str]:
    """The cached chain: every stage from the first to the deepest probed one, in order.

    Each is extracted from the one before it, so adding a probed layer never changes how the
    others are computed (and never re-runs their probes).
    """
    stages = BACKBONES[config["backbone"]].stage_names
    wanted = config["features"]["layers"]
    return stages[: max(stages.index(layer) for layer in wanted) + 1] if wanted else []


def probes(config: dict) -> dict[str, dict]:
    """``{run_id: settings}`` of one linear probe per cached layer and init."""
    feats = config["features"]
    hyper = {k: feats["probe"].get(k, config["train"][k]) for k in HYPER_KEYS}
    hyper.update(augment=False, amp=False, cache_features=True)
    out = {}
    stages = BACKBONES[config["backbone"]].stage_names
    for label, init in feature_inits(config).items():
        for layer in sorted(feats["layers"], key=stages.index):
            settings = {
                "policy": f"probe_{layer}",
                "backbone": config["backbone"],
                "init": init,
                "freeze": layer,
                "resolution": config["resolution"],
                "seed": config["seed"],
                "features": f"results/features/{config['backbone']}/{label}",
                "layer": layer,
                "pool": feats["pool"],
                **hyper,
            }
            identity = {"run": settings, "data": _data_identity(config), "dtype": feats["dtype"]}
            if init == "source":
                identity["source"] = {"settings": source_settings(config), "data": config["source"]}
            out[f"probe_{layer}-{config['backbone']}-{label}-{_digest(identity)}"] = settings
    return out


def uses_source(config: dict) -> bool:
    return any(s["init"] == "source" for s in [*runs(config).values(), *probes(config).values()])


def train_flags(settings: dict) -> str:
    """Command-line flags of ``scripts/train.py`` for a run's settings."""
    flags = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            flags += [flag, shlex.quote(str(value))]
    return " ".join(flags)
