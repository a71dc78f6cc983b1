"""Run specs: every kind of run the workflow trains, from the config, in one place.

A run is one training job (or one run of a job's run group, :func:`run_groups`). Its
:class:`RunSpec` holds a stable id, the trainer settings (the fields of
``tlselect.training.options.TrainConfig``, so :meth:`RunSpec.flags` are ``scripts/train.py``'s
flags) and what the job needs besides the decoded subset: the source model of a backbone, or a
cached feature layer. Kinds of run:

- ``policy``: one entry of ``policies`` (the study's compared runs);
- ``probe``: a linear probe on one cached layer of one init (``features``);
- ``source``: the model the workflow pretrains itself for init ``source``;
- ``refit`` (not a kind of its own): with folds, the selected policy or probe retrained on every
  fold, once per seed (:func:`refit_flags`, chosen at run time from the folds' records);
- ``candidate``: one point of the model search's space (``search``): a grid point of the pool, a
  random-search draw, or a trial a strategy suggests at run time (from :func:`candidate_config`).
- ``join``: a scikit-learn model on the table beside the images (``data.table``): on the table's
  columns joined with one cached layer's features, on that layer's features alone, or on the
  columns alone (``join``).

A run that starts from pretrained weights names them as ``weights``: ``("source", backbone)`` (the
model the workflow pretrains) or ``("imagenet", backbone)`` (the file the workflow fetches).

Policies and probes train once per seed of :func:`repeat_seeds` (``repeats``) and, with
``validation.folds`` k, once per fold of :func:`fold_numbers` (each validates on its fold of the
training images and trains on the others); the seed and fold are settings, so they are in the id
(``-seed<seed>``, ``-fold<i>`` after the name), and the first seed without folds keeps the id it
had before repeats existed.

Ids are readable (``<name>-<backbone>-<init>-<hash>``) and the hash covers everything that
determines the run (its settings, the subset, and the source model it starts from), so the same
config names the same files and any change names new ones. Rules turn specs into jobs and own
every path; nothing else merges hyperparameters or invents ids. Importing this module does not
import torch, so parsing the Snakefile stays fast.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from dataclasses import dataclass

import numpy as np

from tlselect.core.backbones import NO_FREEZE, backbone_spec
from tlselect.core.registry import configuration, rank
from tlselect.core.settings import PROBE_HYPER_KEYS, freeze_stage, hyperparameters, init_label, resolve_init, weights_of


@dataclass(frozen=True)
class RunSpec:
    """One run: its id, its trainer settings, and the inputs it needs beyond the decoded subset."""

    id: str
    settings: dict  # TrainConfig fields, ``kind`` and ``name`` included
    weights: tuple[str, str] | None = None  # (init, backbone) of the pretrained weights file it loads
    features: tuple[str, str, str] | None = None  # (backbone, init label, layer) a probe trains on

    @property
    def kind(self) -> str:
        return self.settings["kind"]

    @property
    def name(self) -> str:
        return self.settings["name"]

    def flags(self, **overrides) -> str:
        """Command-line flags of ``scripts/train.py`` for the settings (``overrides`` win)."""
        flags = []
        for key, value in {**self.settings, **overrides}.items():
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                flags.append(flag if value else "--no-" + key.replace("_", "-"))
            else:
                flags += [flag, shlex.quote(str(value))]
        return " ".join(flags)


# What runs trained fused share (tlselect.training.groups): the network's shape, the steps, the
# data, the device and the plan. Runs of a run group (:func:`run_groups`) share the ones a spec sets.
SHAPE = ("backbone", "resolution", "freeze", "batch_size", "epochs", "data", "partition", "device", "precision",
         "channels_last", "threads")  # fmt: skip


def run_groups(specs: dict[str, RunSpec], size: int) -> dict[str, list[str]]:
    """``{group: [run_id, ...]}``: the runs of ``specs`` that can train as one job, in groups of up
    to ``size``; with ``size`` 1, none (every run is a job of its own).

    Runs of one kind and one :data:`SHAPE` (as far as their settings give it; a probe or a cached
    prefix never fuses, so it is grouped with none) are taken in the order of ``specs`` and cut into
    groups of ``size``; a last group of one run is no group. A group is named after its backbone and
    a digest of its runs' ids (a name Snakemake takes for a rule), so changing one run's settings
    renames its own group only.
    """
    shapes: dict[tuple, list[str]] = {}
    for run_id, spec in specs.items():
        if size > 1 and spec.kind != "probe" and not spec.settings.get("cache_features"):
            shapes.setdefault((spec.kind, *(str(spec.settings.get(key)) for key in SHAPE)), []).append(run_id)
    groups = {}
    for members in shapes.values():
        for start in range(0, len(members), size):
            chunk = members[start : start + size]
            if len(chunk) > 1:
                backbone = re.sub(r"\W+", "_", specs[chunk[0]].settings["backbone"])
                groups[f"{backbone}_{_digest({'runs': chunk})}"] = chunk
    return groups


def _digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]


def _subset_identity(config: dict) -> dict:
    data = config["data"]
    return {k: data[k] for k in ("name", "classes", "train_per_class", "val_per_class", "test_per_class", "image_size")}


def _run_id(config: dict, label: str, tag: str, settings: dict, **more) -> str:
    """``<label>-<hash>``; the hash covers the settings, the subset, the source model and ``more``.

    ``tag`` is the name the hash has always been computed under (a policy's name, ``search`` for
    pool candidates), so ids of unchanged configs stay the same across versions.
    """
    identity = {"run": {"policy": tag, **_unnamed(settings)}, "data": _subset_identity(config), **more}
    if settings["init"] == "source":
        source = source_run(config, settings["backbone"]).settings
        identity["source"] = {"settings": _unnamed(source), "data": config["source"]}
    return f"{label}-{_digest(identity)}"


def _unnamed(settings: dict) -> dict:
    """Settings without ``kind`` and ``name``: what determines a run, not what it is called."""
    return {k: v for k, v in settings.items() if k not in ("kind", "name")}


def _model_settings(config: dict, backbone: str, init: str, freeze: str, resolution: int) -> dict:
    return {"backbone": backbone, "init": init, "freeze": freeze, "resolution": resolution, "seed": config["seed"]}


def repeat_seeds(config: dict) -> list[int]:
    """The seeds every policy and probe trains with: ``seed``, ``seed + 1``, ... (``repeats`` of them).

    The subset is drawn with ``seed`` alone, so repeats vary the init, data order and augmentation only."""
    return [config["seed"] + repeat for repeat in range(config.get("repeats", 1))]


def fold_numbers(config: dict) -> list[int]:
    """The folds a policy or probe validates on, 1..k with ``validation.folds`` k; ``[0]`` (the
    single validation split) when folds are off (1)."""
    folds = config["validation"]["folds"]
    return list(range(1, folds + 1)) if folds > 1 else [0]


def _variants(config: dict):
    """``(label suffix, settings)`` of each repeat and fold of one configuration: its seed, and its
    fold with the number of folds when there are folds."""
    folds = config["validation"]["folds"]
    for seed in repeat_seeds(config):
        for fold in fold_numbers(config):
            suffix = ("" if seed == config["seed"] else f"-seed{seed}") + (f"-fold{fold}" if fold else "")
            yield suffix, {"seed": seed, **({"fold": fold, "folds": folds} if fold else {})}


# Settings of a selected run's record that its refit does not take over: where it ran and what it
# wrote (the refit job gives its own), and its fold.
REFIT_DROPS = {"run_id", "out", "record", "device", "threads", "plans", "auto", "fold", "keep_state", "continue_from"}


def refit_flags(records: list[dict], seed: int) -> list[str]:
    """``scripts/train.py``'s flags of the refit with ``seed``: the configuration that
    :func:`tlselect.core.registry.rank` puts first among the folds' ``records`` (on its mean over the
    seeds and folds), retrained with fold 0, on every training and validation image (GridSearchCV's
    refit). Its settings are those its own run with ``seed`` recorded."""
    chosen = configuration(rank(records)[0])
    run = next(r for r in records if configuration(r) == chosen and r["seed"] == seed)
    settings = {k: v for k, v in run["config"].items() if k not in REFIT_DROPS}
    return shlex.split(RunSpec("refit", {**settings, "kind": run["kind"], "name": run["name"], "fold": 0}).flags())


def source_run(config: dict, backbone: str | None = None) -> RunSpec:
    """The source model the workflow pretrains itself (default: the study's backbone), from scratch."""
    backbone = backbone or config["backbone"]
    hyper = hyperparameters(config, config["source"]["train"])
    hyper["cache_features"] = False
    settings = {
        "kind": "source",
        "name": "source",
        **_model_settings(config, backbone, "scratch", NO_FREEZE, config["resolution"]),
        **hyper,
    }
    return RunSpec(f"source-{backbone}", settings)


def policy_runs(config: dict) -> dict[str, RunSpec]:
    """``{run_id: spec}`` of every entry of ``policies``."""
    out = {}
    for policy in config["policies"]:
        init = resolve_init(config, policy["init"])
        backbone = config["backbone"]
        base = {
            "kind": "policy",
            "name": policy["name"],
            **_model_settings(config, backbone, init, policy["freeze"], config["resolution"]),
            **hyperparameters(config, policy),
        }
        for suffix, variant in _variants(config):
            settings = {**base, **variant}
            label = f"{policy['name']}{suffix}-{backbone}-{init_label(init)}"
            run_id = _run_id(config, label, policy["name"], settings)
            out[run_id] = RunSpec(run_id, settings, weights=weights_of(init, backbone))
    return out


def feature_inits(config: dict) -> dict[str, str]:
    """``{label: init}`` of the inits whose probe features are cached (labels name folders)."""
    inits = (resolve_init(config, i) for i in config["features"]["inits"]) if config["features"]["layers"] else ()
    return {init_label(init): init for init in inits}


def feature_layers(config: dict) -> list[str]:
    """The probes' cached chain: every stage from the first to the deepest probed one, in order.

    Each is extracted from the one before it, so adding a probed layer never changes how the
    others are computed (and never re-runs their probes).
    """
    stages = backbone_spec(config["backbone"]).stage_names
    wanted = config["features"]["layers"]
    return stages[: max(stages.index(layer) for layer in wanted) + 1] if wanted else []


def probe_runs(config: dict) -> dict[str, RunSpec]:
    """``{run_id: spec}`` of one linear probe per probed layer and init."""
    feats, backbone = config["features"], config["backbone"]
    hyper = hyperparameters(config, feats["probe"], PROBE_HYPER_KEYS)
    stages = backbone_spec(backbone).stage_names
    out = {}
    for label, init in feature_inits(config).items():
        for layer in sorted(feats["layers"], key=stages.index):
            base = {
                "kind": "probe",
                "name": f"probe_{layer}",
                "backbone": backbone,
                "init": init,
                "layer": layer,
                "pool": feats["pool"],
                "seed": config["seed"],
                **hyper,
            }
            features = {"resolution": config["resolution"], "dtype": feats["dtype"]}
            for suffix, variant in _variants(config):
                settings = {**base, **variant}
                name = f"probe_{layer}{suffix}-{backbone}-{label}"
                run_id = _run_id(config, name, f"probe_{layer}", settings, features=features)
                out[run_id] = RunSpec(run_id, settings, features=(backbone, label, layer))
    return out


def candidate_spec(config: dict, params: dict, seed: int | None = None) -> RunSpec:
    """The run spec of one point of the search space (:mod:`tlselect.search.space`): grid point or sample,
    trained with ``seed`` (default: ``seed`` of the config).

    A candidate's ``name`` is the id of its run with the config's seed, the same for every repeat
    (so :func:`tlselect.core.registry.configuration` gathers them); another seed's id adds
    ``-seed<seed>`` to the label. The search rules set its epochs.
    """
    backbone, init, depth = params["backbone"], params["init"], params["freeze"]
    settings = {
        "kind": "candidate",
        **_model_settings(config, backbone, init, freeze_stage(backbone, depth), params["resolution"]),
        **hyperparameters(config, config["search"]["train"]),
        **{k: params[k] for k in ("lr", "weight_decay", "label_smoothing", "batch_size")},
    }
    label = f"{backbone}-{init_label(init)}-{depth}-lr{params['lr']:g}-r{params['resolution']}"
    name = _run_id(config, label, "search", settings)
    if seed is None or seed == config["seed"]:
        return RunSpec(name, {**settings, "name": name}, weights=weights_of(init, backbone))
    settings["seed"] = seed
    run_id = _run_id(config, f"{label}-seed{seed}", "search", settings)
    return RunSpec(run_id, {**settings, "name": name}, weights=weights_of(init, backbone))


def candidate_repeats(config: dict, params: dict) -> list[RunSpec]:
    """One :func:`candidate_spec` of ``params`` per seed of :func:`repeat_seeds` (``repeats``), first seed first."""
    return [candidate_spec(config, params, seed) for seed in repeat_seeds(config)]


def candidate_config(config: dict) -> dict:
    """The part of ``config`` that defines the search space and its candidates' specs: with it,
    :func:`candidate_spec` and :meth:`tlselect.search.space.Space.from_config` give what they give with the
    whole config (a strategy's suggest job gets only this, so nothing else reruns it)."""
    space = ("backbones", "inits", "freezes", "lrs", "resolutions", "distributions", "train")
    return {
        **{k: config[k] for k in ("seed", "train", "resolution", "source", "pretrained")},
        **({"repeats": config["repeats"]} if config.get("repeats", 1) > 1 else {}),  # one seed: as before
        "data": _subset_identity(config),
        "search": {k: config["search"][k] for k in space},
    }


def candidate_runs(config: dict) -> dict[str, RunSpec]:
    """``{candidate_id: spec}`` of the search pool: the grid of the search space (the ``search`` lists),
    each point once per seed of :func:`repeat_seeds` (its seeds one after another)."""
    from tlselect.search.space import Space  # the space builds on this module's helpers

    specs = (spec for params in Space.from_config(config).grid() for spec in candidate_repeats(config, params))
    return {spec.id: spec for spec in specs}


def random_runs(config: dict) -> dict[str, RunSpec]:
    """``{candidate_id: spec}`` of random search: ``search.random_samples`` draws from the space's
    distributions (:meth:`tlselect.search.space.Space.sample`, seeded with ``seed``), in draw order,
    each once per seed of :func:`repeat_seeds`."""
    from tlselect.search.space import Space

    space, rng = Space.from_config(config), np.random.RandomState(config["seed"])
    draws = [space.sample(rng) for _ in range(config["search"]["random_samples"])]
    specs = (spec for params in draws for spec in candidate_repeats(config, params))
    return {spec.id: spec for spec in specs}


def mop_runs(config: dict) -> dict[str, RunSpec]:
    """``{run_id: spec}`` of the policies that ``mop`` trains by model hopper parallelism.

    Each is a chain of sub-epochs, one per data partition and epoch, so its ``epochs`` and
    ``warmup_epochs`` count sub-epochs (the policy's times ``mop.partitions``). ``mop.train``
    overrides the policy: a constant learning rate, since each sub-epoch job continues the last.
    """
    mop = config["mop"]
    if not mop["enabled"]:
        return {}
    policies = {p["name"]: p for p in config["policies"]}
    backbone, parts = config["backbone"], mop["partitions"]
    out = {}
    for name in mop["policies"]:
        policy = policies[name]
        init = resolve_init(config, policy["init"])
        hyper = hyperparameters(config, {**policy, **mop["train"]})
        settings = {
            "kind": "policy",
            "name": f"mop-{name}",
            **_model_settings(config, backbone, init, policy["freeze"], config["resolution"]),
            **hyper,
            "epochs": hyper["epochs"] * parts,
            "warmup_epochs": hyper["warmup_epochs"] * parts,
        }
        layout = {"partitions": parts, "schedule": mop["schedule"], "policies": mop["policies"]}
        run_id = _run_id(config, f"mop-{name}-{backbone}-{init_label(init)}", f"mop-{name}", settings, mop=layout)
        out[run_id] = RunSpec(run_id, settings, weights=weights_of(init, backbone))
    return out


def feature_chains(config: dict) -> dict[str, list[str]]:
    """``{backbone: cached stages}``: the probes' chain, and every stage of each searched backbone
    (the proxies score the last one). Chains only grow at their end, so no cached stage changes."""
    chains = {config["backbone"]: feature_layers(config)} if feature_layers(config) else {}
    if config["search"]["enabled"]:
        chains.update({b: backbone_spec(b).stage_names for b in config["search"]["backbones"]})
    return chains


def previous_stage(chains: dict[str, list[str]], backbone: str, layer: str) -> str | None:
    """The cached stage ``layer`` of ``backbone`` is extracted from: the one before it in its
    :func:`feature_chains` chain, or None for the chain's first (extracted from the decoded images)."""
    chain = chains[backbone]
    index = chain.index(layer)
    return chain[index - 1] if index else None


def cached_stages(chains: dict[str, list[str]]) -> list[str]:
    """Every stage name some :func:`feature_chains` chain caches, sorted."""
    return sorted({stage for chain in chains.values() for stage in chain})


def cached_inits(config: dict) -> dict[str, str]:
    """``{label: init}`` whose features are cached: the probes', the joins' and the searched ones."""
    inits = feature_inits(config)
    if uses_table(config) and config["features"]["layers"]:
        inits.update({init_label(i): i for i in (resolve_init(config, i) for i in config["join"]["inits"])})
    if config["search"]["enabled"]:
        inits.update({init_label(i): i for i in (resolve_init(config, i) for i in config["search"]["inits"])})
    return inits


def proxy_layers(config: dict) -> list[tuple[str, str, str]]:
    """``(backbone, init label, last stage)`` of every searched backbone and init: what the proxies score."""
    labels = sorted({init_label(resolve_init(config, i)) for i in config["search"]["inits"]})
    return [(b, label, backbone_spec(b).stage_names[-1]) for b in config["search"]["backbones"] for label in labels]


def source_backbones(specs) -> list[str]:
    """The backbones whose pretrained source model some of ``specs`` start from (a probe: its features)."""
    return sorted(
        {spec.settings["backbone"] for spec in specs if spec.settings["init"] == "source" and spec.kind != "source"}
    )


def uses_table(config: dict) -> bool:
    """Whether a table beside the images is joined (``data.table.path`` or ``data.table.example``)."""
    table = config["data"]["table"]
    return bool(table["path"]) or table["example"]


JOIN_INPUTS = ("join", "features", "columns")


def join_runs(config: dict) -> dict[str, RunSpec]:
    """``{run_id: spec}`` of the downstream models on the table (``join``): per model, one on the
    columns alone, and per join init and probed layer one on the join and one on the features alone.

    Names read ``<inputs>_<model>[_<layer>]``; the id covers the model's hyperparameters, the table's
    settings, the pooling and the memory budget (which decides how the model is fitted).
    """
    if not uses_table(config):
        return {}
    join, feats, backbone = config["join"], config["features"], config["backbone"]
    stages = backbone_spec(backbone).stage_names
    layers = sorted(feats["layers"], key=stages.index)
    inits = {init_label(i): i for i in (resolve_init(config, i) for i in join["inits"])} if layers else {}
    table = {k: v for k, v in config["data"]["table"].items()}
    budget = {"memory_mb": feats["memory_mb"], **{k: join[k] for k in ("over_budget", "pca_width", "chunk_epochs")}}
    out = {}
    for model, hyper in join["models"].items():
        choices = [("columns", None, None)]
        choices += [(inputs, label, layer) for label in inits for layer in layers for inputs in ("join", "features")]
        for inputs, label, layer in choices:
            name = f"{inputs}_{model}" + (f"_{layer}" if layer else "")
            settings = {
                "kind": "join",
                "name": name,
                "model": model,
                "inputs": inputs,
                "backbone": backbone if layer else "",
                "init": inits[label] if layer else "",
                "layer": layer or "",
                "pool": feats["pool"],
                "seed": config["seed"],
                **budget,
                "hyper": dict(sorted(hyper.items())),
            }
            identity = {"run": _unnamed(settings), "data": _subset_identity(config), "table": table}
            if layer:
                identity["features"] = {"resolution": config["resolution"], "dtype": feats["dtype"]}
                if inits[label] == "source":
                    source = source_run(config, backbone).settings
                    identity["source"] = {"settings": _unnamed(source), "data": config["source"]}
            label_part = f"-{backbone}-{label}" if layer else ""
            run_id = f"{name}{label_part}-{_digest(identity)}"
            out[run_id] = RunSpec(run_id, settings, features=(backbone, label, layer) if inputs != "columns" else None)
    return out
