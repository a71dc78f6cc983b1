"""Workflow configuration: the checks beyond the JSON schema, before any job runs.

``rules/common.smk`` calls :func:`load_and_check`: it validates ``config.yaml`` against
``schemas/config.schema.yaml`` (which also fills in defaults), then calls :func:`check`; the runs
themselves come from :mod:`tlselect.runs`.
Plain Python without torch, so it is testable without Snakemake and quick to import.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from tlselect.core.backbones import NO_FREEZE, BackboneError, backbone_spec, resolve
from tlselect.core.errors import TLSelectError
from tlselect.core.settings import NAMED_INITS, hyperparameters, resolve_init
from tlselect.data.fetch import archive_image_counts, archive_images
from tlselect.runs import join_runs, policy_runs, probe_runs, source_backbones, uses_table


class ConfigError(TLSelectError):
    """An invalid configuration; the message names the key and the fix."""


def coerce_cli_values(config: dict, schema: dict) -> dict:
    """Type the strings that ``--config 'key={nested: value}'`` leaves where the schema wants a scalar.

    Snakemake parses the values inside a ``--config`` mapping as plain strings, so
    ``search={enabled: true}`` arrives as ``"true"``. Where the schema asks for a boolean, integer
    or number, such a string is read as YAML (``"true"``, ``"100"``, ``"0.5"``); strings the schema
    wants as strings stay as they are. Returns ``config``, changed in place.
    """

    def resolve(node: dict) -> dict:
        while "$ref" in node:  # "#/$defs/name/...": a pointer into this schema
            target = schema
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            node = target
        return node

    def walk(value, node: dict):
        node = resolve(node)
        wanted = node.get("type")
        if isinstance(value, str) and "enum" in node and value not in node["enum"]:  # plan={compile: true}
            parsed = yaml.safe_load(value)
            return parsed if parsed in node["enum"] else value
        if isinstance(value, str) and "anyOf" in node:  # train={batch_size: 64}
            parsed = yaml.safe_load(value)
            wants_int = any(resolve(branch).get("type") == "integer" for branch in node["anyOf"])
            return parsed if wants_int and isinstance(parsed, int) and not isinstance(parsed, bool) else value
        if isinstance(value, str) and wanted in ("boolean", "integer", "number"):
            parsed = yaml.safe_load(value)
            if wanted == "boolean":
                return parsed if isinstance(parsed, bool) else value
            return parsed if isinstance(parsed, int | float) and not isinstance(parsed, bool) else value
        if isinstance(value, dict):
            properties = dict(node.get("properties", {}))
            for part in node.get("allOf", []):  # policies: their own keys and the shared overrides
                properties.update(resolve(part).get("properties", {}))
            for key, item in value.items():
                if key in properties:
                    value[key] = walk(item, properties[key])
        elif isinstance(value, list) and "items" in node:
            value[:] = [walk(item, node["items"]) for item in value]
        return value

    return walk(config, schema)


def load_and_check(config: dict, schema_path: str | Path, validate: Callable[[dict, str], None]) -> dict:
    """Check the workflow's ``config`` before any job runs, in place: the one call of ``rules/common.smk``.

    In order: type the strings of ``--config`` values (:func:`coerce_cli_values`), refuse keys of
    earlier versions (:func:`check_renamed`), validate against the schema at ``schema_path`` with
    ``validate`` (Snakemake's ``snakemake.utils.validate``, which also fills in the defaults), then
    :func:`check`, the model search's :func:`tlselect.search.brackets.check` and every tenant's
    :func:`tlselect.search.tenancy.check`. A problem these checks find raises :class:`ConfigError`
    ``invalid configuration: <key>: <what to fix>``; a schema violation raises what ``validate``
    raises. Returns ``config``.
    """
    from tlselect.search import brackets, tenancy  # they import this module

    coerce_cli_values(config, yaml.safe_load(Path(schema_path).read_text()))  # --config 'search={enabled: true}'
    try:
        check_renamed(config)
        check_run_groups(config)
        validate(config, str(schema_path))
        check(config)
        brackets.check(config)
        tenancy.check(config, validate, str(schema_path))
    except ConfigError as error:
        raise ConfigError(f"invalid configuration: {error}") from None
    return config


def merged(base: dict, overlay: dict) -> dict:
    """Snakemake's merge of config files: nested dicts merge key by key, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# Top-level keys of earlier versions: (old, new, what it is).
RENAMED_KEYS = (
    ("warm_start", "fork_server", "one process imports torch once and forks every job"),
    ("benchmarks", "speedups", "the optimizations benchmark"),
)


def check_renamed(config: dict) -> None:
    """Keys of earlier versions, named with what replaced them (before the schema calls them unknown)."""
    places = [("train", config.get("train") or {}), ("source.train", (config.get("source") or {}).get("train") or {})]
    places += [(f"policies[{i}]", p) for i, p in enumerate(config.get("policies") or [])]
    for key, block in places:
        if isinstance(block, dict) and "amp" in block:
            raise ConfigError(
                f"{key}.amp: mixed precision is now part of the execution plan; remove amp and set "
                "plan.precision (auto: measured per device, or float32, bfloat16, float16)"
            )
    for old_key, new_key, what in RENAMED_KEYS:
        if old_key in config:
            raise ConfigError(f"{old_key} is now called {new_key} ({what}): rename the key in your config")


def plan_flags(config: dict) -> str:
    """scripts/train.py's flags for the ``plan`` block: pinned knobs as flags, the rest as --auto."""
    plan = {"cudnn_benchmark": "auto", **config["plan"]}
    knobs = ("precision", "channels_last", "threads", "compile", "cudnn_benchmark")
    auto = [knob for knob in knobs if plan[knob] == "auto"]
    flags = [f"--precision {plan['precision']}"] if plan["precision"] != "auto" else []
    for knob in ("channels_last", "compile", "cudnn_benchmark"):
        if plan[knob] != "auto":
            flags.append(("--" if plan[knob] else "--no-") + knob.replace("_", "-"))
    if plan["eval_batch_size"]:
        flags.append(f"--eval-batch-size {plan['eval_batch_size']}")
    else:
        auto.append("eval_batch_size")
    # Measured for the run groups' layout, when auto: fusion, and the group size where it can be more
    # than one (on a CPU without fusion it is one run a job, tlselect.training.plan).
    groups = config.get("run_groups") or {}
    if groups.get("size") == "auto" and (groups.get("fuse") == "auto" or planning_device(config) == "cuda"):
        auto.append("group_size")
    if groups.get("fuse") == "auto":
        auto.append("fuse")
    return " ".join(flags + ([f"--auto {','.join(auto)}"] if auto else []))


def recalibration_flags(config: dict) -> str:
    """scripts/calibrate.py's workload flags: the study's backbone, resolution, and the ``train``
    defaults' batch size (0: sized to the training images) and epochs (the job a compile is spread over)."""
    hyper = hyperparameters(config, {})
    return (
        f"--backbone {config['backbone']} --resolution {config['resolution']} "
        f"--batch-size {hyper['batch_size']} --epochs {hyper['epochs']}"
    )


def speedups_flags(config: dict, data: str, plans: str, weights: str = "") -> str:
    """scripts/speedups.py's flags for the ``speedups`` block: its suites and epochs, the study's
    pretrained init, probed layers (``features.layers``, else ResNet's four), batch size and learning
    rate; ``data``: the decoded subset's folder, ``plans``: the plans folder, ``weights``: the
    init's weights file, if it has one."""
    bench = config["speedups"]
    args = (
        f"--suites {' '.join(bench['suites'])} --epochs {bench['epochs']} "
        f"--accuracy-epochs {bench['accuracy_epochs']} --init {config['pretrained']} "
        f"--layers {' '.join(config['features']['layers'] or ['layer1', 'layer2', 'layer3', 'layer4'])} "
        f"--batch-size {hyperparameters(config, {})['batch_size']} --lr {config['train']['lr']} "
        f"--data {data} --plans {plans} "
        "--auto precision,channels_last,threads,eval_batch_size"
    )
    if weights:
        args += f" --weights {weights}"
    return args + (" --compile" if bench["compile"] else "")


def check_init(key: str, init: str) -> None:
    """A resolved init must be a named one or an existing state-dict file."""
    if init not in NAMED_INITS and not Path(init).is_file():
        raise ConfigError(f"{key}: {init!r} is neither one of {', '.join(NAMED_INITS)} nor an existing state-dict file")


def check(config: dict) -> None:
    """Reject a schema-valid config that still cannot run; the message names the key."""
    backbone = config["backbone"]
    resolve_backbones(config)
    stages = backbone_spec(backbone).stage_names
    data = config["data"]
    if data["val_per_class"] >= data["train_per_class"]:
        raise ConfigError(
            f"data.val_per_class ({data['val_per_class']}) must be smaller than data.train_per_class "
            f"({data['train_per_class']}): validation images are carved out of the training images"
        )
    if data["archive"] and not Path(data["archive"]).is_file():
        raise ConfigError(f"data.archive: {data['archive']} does not exist; give the path of an image-folder archive")
    check_init("pretrained", config["pretrained"])
    if config["pretrained"] == "pretrained":
        raise ConfigError("pretrained: must be imagenet, source or a state-dict path, not 'pretrained'")
    seen = set()
    for i, policy in enumerate(config["policies"]):
        key = f"policies[{i}] ({policy['name']})"
        if policy["name"] in seen:
            raise ConfigError(f"{key}: duplicate policy name {policy['name']!r}; policy names must be unique")
        seen.add(policy["name"])
        check_init(f"{key}.init", resolve_init(config, policy["init"]))
        if policy["freeze"] != NO_FREEZE and policy["freeze"] not in stages:
            raise ConfigError(
                f"{key}.freeze: {backbone} has no stage {policy['freeze']!r}; use none or one of {', '.join(stages)}"
            )
        hyper = hyperparameters(config, policy)
        if hyper["cache_features"] and policy["freeze"] == NO_FREEZE:
            raise ConfigError(f"{key}.cache_features: needs a frozen prefix, but freeze is none")
        if hyper["cache_features"] and hyper["augment"]:
            raise ConfigError(
                f"{key}.cache_features: cached prefix outputs are not augmented; set augment: false for this "
                "policy or turn cache_features off"
            )
        if resolve_init(config, policy["init"]) == "scratch" and policy["freeze"] != NO_FREEZE:
            raise ConfigError(f"{key}.freeze: freezing randomly initialized stages makes no sense with init scratch")

    _check_mop(config, seen)
    _check_repeats_and_folds(config)
    for layer in config["features"]["layers"]:
        if layer not in stages:
            raise ConfigError(f"features.layers: {backbone} has no stage {layer!r}; stages: {', '.join(stages)}")
    for init in config["features"]["inits"]:
        check_init("features.inits", resolve_init(config, init))
    if data["archive"]:
        _check_subset_fits(config, archive_image_counts(Path(data["archive"])))
    if uses_table(config):
        for init in config["join"]["inits"]:
            check_init("join.inits", resolve_init(config, init))
        _check_table(config)


def _check_table(config: dict) -> None:
    """The table beside the images (``data.table``), before any job runs: its columns, their types,
    missing values and, with ``data.archive`` or an image folder already under resources/, the rows
    naming no image and the images of the study's classes without a row (:func:`tlselect.data.table.check_table`).
    The example table is generated by a job, which runs the same checks."""
    from tlselect.data import table
    from tlselect.data.folders import scan_image_folder

    data, settings = config["data"], config["data"]["table"]
    if settings["path"] and settings["example"]:
        raise ConfigError("data.table: give a path or example: true, not both")
    if not settings["path"]:
        return
    folder = Path("resources") / data["name"]
    listing = archive_images(Path(data["archive"])) if data["archive"] else None
    if listing is None and (folder / "train").is_dir():
        listing = scan_image_folder(folder)
    images = table.listed_images(listing) if listing else None
    picks = table.listed_images(listing, data["classes"] or None) if listing else None
    try:
        table.check_table(settings, *table.read_table(settings["path"]), images, picks)
    except table.TableError as error:
        raise ConfigError(str(error)) from None


def resolve_backbones(config: dict) -> None:
    """Find the stages of ``backbone`` and, with the search on, expand ``search.backbones`` (names and
    patterns) into model names in place, listing the expansion on stderr; unknown names, models whose
    stages cannot be found and patterns matching more than ``search.max_backbones`` stop here."""
    try:
        resolve([config["backbone"]])
    except BackboneError as error:
        raise ConfigError(f"backbone: {error}") from None
    search = config["search"]
    if not search["enabled"]:
        return
    try:
        names = resolve(search["backbones"], search["max_backbones"])
    except BackboneError as error:
        raise ConfigError(f"search.backbones: {str(error).removeprefix('search.backbones: ')}") from None
    if names != search["backbones"]:
        print(f"search.backbones: {len(names)} models: {', '.join(names)}", file=sys.stderr)
    search["backbones"] = names


def _check_mop(config: dict, policies: set[str]) -> None:
    mop = config["mop"]
    if not mop["enabled"]:  # a config that renames the policies need not touch the mode it leaves off
        return
    unknown = [name for name in mop["policies"] if name not in policies]
    if unknown:
        raise ConfigError(f"mop.policies: {unknown} are not policies; known: {', '.join(sorted(policies))}")
    if mop["train"].get("schedule", config["train"]["schedule"]) != "constant":
        raise ConfigError("mop.train.schedule: must be constant (each sub-epoch job continues the previous one)")
    if mop["partitions"] > config["data"]["train_per_class"] - config["data"]["val_per_class"]:
        raise ConfigError("mop.partitions: more partitions than training images per class; lower mop.partitions")


def _check_repeats_and_folds(config: dict) -> None:
    """``repeats`` and ``validation.folds``: their ranges, and the parts of the workflow they leave out."""
    repeats, folds = config["repeats"], config["validation"]["folds"]
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats: {repeats!r} is not a positive integer; give the number of seeds, e.g. 3 (1: off)")
    per_class = config["data"]["train_per_class"]
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 1 or folds > per_class:
        raise ConfigError(
            f"validation.folds: {folds!r} is not an integer from 2 to {per_class} (the images of the smallest "
            "class in the training subset, data.train_per_class); give 1 for the single validation split"
        )
    if folds > 1 and config["search"]["enabled"]:
        raise ConfigError(
            "validation.folds: the model search validates its candidates on the single validation split "
            "(repeats work with it); set validation.folds: 1 or turn the search off (search.enabled: false)"
        )


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


def uses_source(config: dict) -> bool:
    """Whether a policy or probe starts from the source model the workflow pretrains."""
    specs = [*policy_runs(config).values(), *probe_runs(config).values(), *join_runs(config).values()]
    return bool(source_backbones(specs))


# Run groups (docs/execution-plans.md#run-groups): what ``auto`` means where no plan file says.
GROUP_SIZE_DEFAULT = {"cpu": 1, "cuda": 8}  # to be replaced by the plan's measurement (plan.group_size)
PLAN_CACHE_ENV = "TLSELECT_PLAN_CACHE"  # tlselect.training.plan.plan_cache_dir's, which imports torch


def check_run_groups(config: dict) -> None:
    """``run_groups`` before the schema: a size or fuse it cannot take, named with what it takes."""
    groups = config.get("run_groups") or {}
    size, fuse = groups.get("size", "auto"), groups.get("fuse", False)
    if size != "auto" and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ConfigError(f"run_groups.size: {size!r}; give an integer >= 1 (1: a job per run) or auto")
    if fuse not in ("auto", True, False):
        raise ConfigError(f"run_groups.fuse: {fuse!r}; give true, false or auto (fused where the plan says so)")


def planning_device(config: dict) -> str:
    """The device the training jobs will run on, as parsing the workflow sees it (without torch):
    ``device``, where auto is cuda when an NVIDIA driver is visible here."""
    if config["device"] != "auto":
        return config["device"]
    return "cuda" if Path("/dev/nvidiactl").exists() else "cpu"


def planned(config: dict, knob: str, plans: str = "results/plans"):
    """``knob`` of the plan chosen for this study's device, or None: the study's plan file under
    ``plans``, else the per-user cache's (tlselect.training.plan), for this device type, torch version
    and, on a CPU, core count and threads. Read without importing torch."""
    device = planning_device(config)
    try:
        torch_version = importlib.metadata.version("torch").split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        return None
    machine = f"-{os.cpu_count()}cpu-{config['threads']}t" if device == "cpu" else ""
    cache = Path(os.environ.get(PLAN_CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                 / "tlselect" / "plans")  # fmt: skip
    for folder in (Path(plans), cache):
        for path in sorted(folder.glob(f"{device}-*{machine}-torch{torch_version}.json")):
            try:
                value = json.loads(path.read_text()).get("plan", {}).get(knob)
            except (OSError, ValueError, AttributeError):
                continue  # the training job reports an unreadable plan
            if value is not None:
                return value
    return None


def run_group_settings(config: dict) -> tuple[int, bool]:
    """``(size, fuse)`` of ``run_groups`` with auto resolved: from this device's plan
    (``plan.group_size``, ``plan.fuse``), else :data:`GROUP_SIZE_DEFAULT` and fusing on CUDA only."""
    groups, device = config["run_groups"], planning_device(config)
    size = groups["size"] if groups["size"] != "auto" else planned(config, "group_size") or GROUP_SIZE_DEFAULT[device]
    fuse = groups["fuse"] if groups["fuse"] != "auto" else planned(config, "fuse")
    return int(size), bool(device == "cuda" if fuse is None else fuse)
