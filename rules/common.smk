# Config validation, the run specs (tlselect.runs), every result path and the input functions
# the other files share. Paths live here and in the rules only; scripts get them as arguments.
import functools
import glob
import inspect
import json
import os
import re
import sys

import yaml

from snakemake.utils import min_version, validate

min_version("9.0")

sys.path.insert(0, workflow.basedir)

from tlselect.search import mop  # noqa: E402
from tlselect import runs  # noqa: E402
from tlselect.core import settings  # noqa: E402
from tlselect.search import brackets  # noqa: E402
from tlselect.training import forkserver  # noqa: E402
from tlselect.core.backbones import BACKBONES  # noqa: E402
from tlselect.config import (
    ConfigError,
    check,
    check_renamed,
    coerce_cli_values,
    plan_flags,
    uses_source,
)  # noqa: E402

SCHEMA = f"{workflow.basedir}/schemas/config.schema.yaml"
with open(SCHEMA) as schema:
    coerce_cli_values(
        config, yaml.safe_load(schema)
    )  # --config 'search={enabled: true}'
try:
    check_renamed(config)
    validate(config, SCHEMA)
    check(config)
    brackets.check(config)
except ConfigError as error:
    raise ValueError(f"invalid configuration: {error}") from None

# Every job reads it (scripts/_cli.py): whether to run in a fork of the fork server.
os.environ[forkserver.ENV] = "1" if config["fork_server"] else "0"

RUNS = runs.policy_runs(config)
PROBES = runs.probe_runs(config)
SEARCH = config["search"]["enabled"]
POOL = runs.candidate_runs(config) if SEARCH else {}
RANDOM = runs.random_runs(config) if SEARCH else {}
BRACKETS = (
    {m: brackets.brackets(config, m, POOL) for m in ("sh", "hb")} if SEARCH else {}
)
# Cached feature chains: the probes' layers, plus every stage of each searched backbone (proxies).
FEATURE_INITS = runs.cached_inits(config)
FEATURE_CHAINS = runs.feature_chains(config)
SPEEDUPS = config["speedups"]["enabled"]
SPLITS = ["train", "val", "test"]
DATA_ROOT = f"resources/{config['data']['name']}"
SUBSET = "results/data/subset.json"
SOURCE_SUBSET = "results/source/data/subset.json"
# ImageNet weights, fetched once by a local rule (jobs on offline compute nodes read this file).
IMAGENET_WEIGHTS = "resources/weights/{backbone}-imagenet.pth"
# Files a job found corrupt (tlselect.core.files.verify moved each to <file>.corrupt): targets of rule
# all, so that the next run computes them anew, and everything that reads them.
CORRUPT = [
    marker.removesuffix(".corrupt")
    for marker in glob.glob("results/**/*.corrupt", recursive=True)
    + glob.glob("resources/weights/*.corrupt")
]
RUNG = "results/search/{method}/b{bracket}/rung{rung}"
ROUND = "results/search/{method}/round{round}"
STUDY_FIGURES = [
    "accuracy_vs_time",
    "accuracy_by_policy",
    "validation_curves",
    "accuracy_by_layer",
]
FIGURES = STUDY_FIGURES + (["speedups"] if SPEEDUPS else [])
# The study first: its jobs (policies, probes, their features, table, figures and notebook) go
# before the model search's and the benchmark's whenever both are ready. The study's notebook
# (results/report/study.html) is then done early; solution.html adds the search and benchmark.
STUDY_FIRST = 50
REPORTS = ["solution"] + (["study"] if SEARCH or SPEEDUPS else [])
# The model search's report files by name; the study asks for them when the search is on.
SEARCH_FILES = {
    "search": "results/tables/search.csv",
    "proxies": "results/tables/proxies.csv",
    "proxy_tau": "results/tables/proxy_tau.csv",
    "search_compute": "results/figures/search_compute.png",
    "proxy_vs_finetune": "results/figures/proxy_vs_finetune.png",
    "replay": "results/tables/replay.csv",
    "replay_anytime": "results/figures/replay_anytime.png",
}
SEARCH_OUTPUTS = SEARCH_FILES if SEARCH else {}
OPTIMIZATIONS = "results/tables/optimizations.csv"
# Execution plans measured per kind of device (tlselect.training.plan): the first job on one writes it.
PLANS = "results/plans"
PLAN_FLAGS = f"{plan_flags(config)} --plans {PLANS}"
# Model hopper parallelism: partition files, and each run's partition per sub-epoch (tlselect.search.mop).
MOP_RUNS = runs.mop_runs(config)
MOP_PARTITIONS = [
    f"results/mop/partitions/p{k}.pt" for k in range(config["mop"]["partitions"])
]
MOP_STEP = "results/mop/{run_id}/s{step}"
MOP_CHAINS = dict(
    zip(
        MOP_RUNS,
        mop.chains(
            len(MOP_RUNS),
            config["mop"]["partitions"],
            max((s.settings["epochs"] for s in MOP_RUNS.values()), default=0)
            // config["mop"]["partitions"],
            config["mop"]["schedule"],
            config["seed"],
        ),
    )
)
MOP_OUTPUTS = [
    MOP_STEP.format(run_id=r, step=s.settings["epochs"] - 1) + ".json"
    for r, s in MOP_RUNS.items()
]
# GPUs each training/extraction job asks for: none on device cpu, else one. A local run's
# --resources gpu=N caps the total (gpu=0 lowers it to 0, so device auto runs on the CPU); on SLURM
# the profile's set-resources decide. The job claims its GPU itself (tlselect.training.gpus, --gpus).
# With gpu_jobs_per_device N, up to N jobs share one GPU and --resources gpu counts GPU slots (GPUs x N).
GPU = 0 if config["device"] == "cpu" else 1


def fixed_signature(func):
    """``func`` with its signature worked out once. Snakemake inspects the signature of an input,
    params or resources function at every job: a tenth of the DAG's build time in a large search.
    """
    func.__signature__ = inspect.signature(func)
    return func


def memory_mb(mb):
    """mem_mb of a job: ``mb`` at the first attempt, twice at the second (``--retries``), and so on."""
    return fixed_signature(lambda wildcards, attempt: mb * attempt)


@fixed_signature
def gpu_flags(wildcards, resources):
    """--gpus: the job's gpu resource, or 1 for a SLURM share of a GPU (gres shard or mps); jobs per GPU."""
    gpus = resources.gpu or int(
        bool(re.match(r"(shard|mps)\b", str(resources.get("gres", ""))))
    )
    return f"--gpus {gpus} --gpu-jobs-per-device {config['gpu_jobs_per_device']}"


def one_of(names):
    """Wildcard constraint matching exactly one of ``names``."""
    return "|".join(re.escape(name) for name in names) or "^$"


def script(name):
    """Path of a command-line entry point under scripts/."""
    return f"{workflow.basedir}/scripts/{name}"


def subset_files(subset=SUBSET, splits=SPLITS):
    """A decoded subset: its subset.json and one tensor file per split."""
    base = os.path.dirname(subset)
    return {"subset": subset, "data": [f"{base}/{split}.pt" for split in splits]}


def source_model(backbone):
    return f"results/source/{backbone}.pt"


def weights_file(init, backbone):
    """The weights a pretrained init loads: the source model, or the fetched ImageNet weights."""
    return (
        source_model(backbone)
        if init == "source"
        else IMAGENET_WEIGHTS.format(backbone=backbone)
    )


def feature_files(backbone, init, layer, splits=SPLITS):
    return [
        f"results/features/{backbone}/{init}/{layer}/{split}.npy" for split in splits
    ]


def run_inputs(spec):
    """What a run reads: the decoded subset, its pretrained weights, a probe's cached layer."""
    inputs = subset_files()
    if spec.weights:
        inputs["weights"] = weights_file(*spec.weights)
    if spec.features:
        inputs["features"] = feature_files(*spec.features)
    return inputs


def train_args(spec, input, **overrides):
    """scripts/train.py's arguments for a run: its flags and the folders of its inputs."""
    args = (
        f"{spec.flags(**overrides)} {PLAN_FLAGS} --data {os.path.dirname(input.subset)}"
    )
    if spec.weights:
        args += f" --weights {input.weights}"
    if spec.features:
        args += f" --features {os.path.dirname(input.features[0])}"
    return args


def spec_inputs(specs, key):
    """Input function of the training rules: what the run ``specs[wildcards.<key>]`` reads."""
    return fixed_signature(lambda wildcards: run_inputs(specs[getattr(wildcards, key)]))


def spec_args(specs, key, **overrides):
    """params.args of the training rules: scripts/train.py's arguments for ``specs[wildcards.<key>]``."""
    return fixed_signature(
        lambda wildcards, input: train_args(
            specs[getattr(wildcards, key)], input, **overrides
        )
    )


# Resources of every job that trains; rules that differ say so.
TRAINING_RESOURCES = {
    "gpu": GPU,
    "mem_mb": memory_mb(4000),
    "runtime": 120,
}
# Resources of the small bookkeeping jobs (tables, figures, promotions).
SMALL_RESOURCES = {"mem_mb": memory_mb(1000), "runtime": 10}


def feature_inputs(wildcards):
    """The previous cached layer (or the decoded images for the first), plus the init's weights."""
    chain = FEATURE_CHAINS[wildcards.backbone]
    index = chain.index(wildcards.layer)
    if index == 0:
        inputs = subset_files()
    else:
        inputs = {
            "previous": feature_files(
                wildcards.backbone, wildcards.init, chain[index - 1]
            )
        }
    weights = settings.weights_of(FEATURE_INITS[wildcards.init], wildcards.backbone)
    return inputs | ({"weights": weights_file(*weights)} if weights else {})


def feature_args(wildcards, input):
    chain = FEATURE_CHAINS[wildcards.backbone]
    index = chain.index(wildcards.layer)
    args = f"--init {FEATURE_INITS[wildcards.init]}"
    if index:
        args += f" --from-layer {chain[index - 1]} --inputs {os.path.dirname(input.previous[0])}"
    else:
        args += f" --inputs {os.path.dirname(input.subset)}"
    if "weights" in input.keys():
        args += f" --weights {input.weights}"
    return args


def speedups_inputs(wildcards):
    """Decoded subset and image folder (the naive path reads images), plus the init's weights."""
    weights = settings.weights_of(config["pretrained"], config["backbone"])
    return {**subset_files(), "images": DATA_ROOT} | (
        {"weights": weights_file(*weights)} if weights else {}
    )


def speedups_args(wildcards, input):
    bench = config["speedups"]
    args = (
        f"--suites {' '.join(bench['suites'])} --epochs {bench['epochs']} "
        f"--accuracy-epochs {bench['accuracy_epochs']} --init {config['pretrained']} "
        f"--layers {' '.join(config['features']['layers'] or ['layer1', 'layer2', 'layer3', 'layer4'])} "
        f"--batch-size {settings.hyperparameters(config, {})['batch_size']} --lr {config['train']['lr']} "
        f"--data {os.path.dirname(input.subset)} --plans {PLANS} "
        "--auto precision,channels_last,threads,eval_batch_size"
    )
    if "weights" in input.keys():
        args += f" --weights {input.weights}"
    return args + (" --compile" if bench["compile"] else "")


def study_records():
    """Registry records of every policy and probe, and the source model's when one is used."""
    records = {
        "records": [
            f"results/registry/{run_id}.json" for run_id in sorted([*RUNS, *PROBES])
        ]
    }
    if uses_source(config):
        records["source"] = source_model(config["backbone"]).replace(".pt", ".json")
    return records


def figure_inputs(wildcards):
    inputs = {"runs": "results/tables/runs.csv", "curves": "results/tables/curves.csv"}
    return inputs | (
        {"optimizations": OPTIMIZATIONS} if wildcards.figure == "speedups" else {}
    )


# Model search (rules/search.smk): the static rung plan and its input functions.


def rung_slots(method, bracket, rung, suffix=".json"):
    """Record (or checkpoint, benchmark) paths of every slot of one rung."""
    keep = BRACKETS[method][int(bracket)].keep[int(rung)]
    path = RUNG.format(method=method, bracket=bracket, rung=rung)
    return [f"{path}/slot{slot}{suffix}" for slot in range(keep)]


def search_jobs(method, last_only=False):
    """``(record, benchmark file)`` of every job of a method (or only its brackets' last rungs)."""
    return [
        (
            record,
            "results/benchmarks/"
            + record.removeprefix("results/").replace(".json", ".tsv"),
        )
        for b, bracket in enumerate(BRACKETS[method])
        for r in range(bracket.rungs)
        if not last_only or r == bracket.rungs - 1
        for record in rung_slots(method, b, r)
    ]


def grid_jobs(method="grid"):
    """``(record, benchmark file)`` of the grid's runs, or random search's (``method="random"``)."""
    candidates = sorted(POOL) if method == "grid" else list(RANDOM)
    return [
        (
            f"results/search/{method}/{c}.json",
            f"results/benchmarks/search/{method}/{c}.tsv",
        )
        for c in candidates
    ]


def round_jobs(method, rounds=None):
    """``(record, benchmark file)`` of every trial of a model-based method's first ``rounds`` rounds."""
    return [
        (
            f"{ROUND.format(method=method, round=r)}/trial{slot}.json",
            f"results/benchmarks/search/{method}/round{r}/trial{slot}.tsv",
        )
        for r in range(config["search"]["rounds"] if rounds is None else rounds)
        for slot in range(config["search"]["q"])
    ]


def suggest_inputs(wildcards):
    """The earlier rounds' suggestion files and trial records (a few per round, not the pool)."""
    earlier = int(wildcards.round)
    return {
        "suggested": [
            f"{ROUND.format(method=wildcards.method, round=r)}/suggested.json"
            for r in range(earlier)
        ],
        "records": [record for record, _ in round_jobs(wildcards.method, earlier)],
    }


@functools.cache
def space_weights():
    """``(init, backbone, weights file)`` of every pretrained init and backbone of the search space."""
    inits = {settings.resolve_init(config, i) for i in config["search"]["inits"]}
    pairs = {
        settings.weights_of(i, b) for b in config["search"]["backbones"] for i in inits
    }
    return sorted((*pair, weights_file(*pair)) for pair in pairs if pair)


@fixed_signature
def trial_inputs(wildcards):
    """The round's suggestion file, the data and every weights file a suggestion may start from."""
    return {
        "suggested": f"{ROUND.format(**wildcards)}/suggested.json",
        **subset_files(),
        "weights": [path for *_, path in space_weights()],
    }


def first_rung_candidate(wildcards):
    return POOL[
        BRACKETS[wildcards.method][int(wildcards.bracket)].candidates[
            int(wildcards.slot)
        ]
    ]


@functools.cache
def bracket_weights(method, bracket):
    """The weights files any candidate of a bracket may start from (computed once per bracket)."""
    weights = {POOL[c].weights for c in BRACKETS[method][int(bracket)].candidates}
    return sorted(weights_file(*w) for w in weights if w)


def previous_ranking(wildcards):
    """The ranking file of the rung before this one."""
    rung = int(wildcards.rung) - 1
    return f"{RUNG.format(method=wildcards.method, bracket=wildcards.bracket, rung=rung)}/ranking.json"


@fixed_signature
def next_rung_inputs(wildcards):
    """The promotion file, the data and the weights files the candidates may start from. Which
    checkpoint a slot continues is decided at run time: the promote job declares the previous
    rung's records and checkpoints and names one in the promotion file, so each slot job has a
    few inputs, not the whole previous rung (which would make the DAG quadratic in the pool).
    """
    return {
        "promoted": f"{RUNG.format(**wildcards)}/promoted.json",
        **subset_files(),
        "weights": bracket_weights(wildcards.method, wildcards.bracket),
    }


def compare_inputs(wildcards):
    """Every search job's record and Snakemake benchmark file (its wall time), per method."""
    jobs = {
        "grid": grid_jobs(),
        "random": grid_jobs("random"),
        "sh": search_jobs("sh"),
        "hb": search_jobs("hb"),
        **{method: round_jobs(method) for method in brackets.MODEL_BASED},
    }
    inputs = {name: [record for record, _ in pairs] for name, pairs in jobs.items()}
    for name, pairs in jobs.items():
        inputs[f"{name}_benchmarks"] = [bench for _, bench in pairs]
    for name in ("sh", "hb"):
        inputs[f"{name}_final"] = [r for r, _ in search_jobs(name, last_only=True)]
    return inputs


def proxy_inputs(wildcards):
    return {
        "features": [
            path
            for backbone, init, layer in runs.proxy_layers(config)
            for path in feature_files(backbone, init, layer, ["train", "val"])
        ],
        "grid": [record for record, _ in grid_jobs()],
        **subset_files(),
    }


def notebook_inputs(wildcards):
    """The study's tables and figures; the solution notebook adds the benchmark's and the search's."""
    full = wildcards.report == "solution"
    inputs = {
        "notebook": f"{workflow.basedir}/notebooks/solution.ipynb",
        "runs": "results/tables/runs.csv",
        "curves": "results/tables/curves.csv",
        "plans": "results/tables/plans.csv",
        "figures": [
            f"results/figures/{f}.png" for f in (FIGURES if full else STUDY_FIGURES)
        ],
    }
    if full and SPEEDUPS:
        inputs["optimizations"] = OPTIMIZATIONS
    return inputs | (SEARCH_OUTPUTS if full else {})


def mop_step_inputs(wildcards):
    """A sub-epoch reads the subset's folder, its partition and the run's previous sub-epoch."""
    step = int(wildcards.step)
    inputs = run_inputs(MOP_RUNS[wildcards.run_id])
    inputs["partition"] = MOP_PARTITIONS[MOP_CHAINS[wildcards.run_id][step]]
    if step:
        inputs["previous"] = (
            MOP_STEP.format(run_id=wildcards.run_id, step=step - 1) + ".pt"
        )
    return inputs


def mop_step_args(wildcards, input):
    """Train one more sub-epoch, on the partition, continuing the previous one's state."""
    step = int(wildcards.step)
    spec = MOP_RUNS[wildcards.run_id]
    args = train_args(spec, input, epochs=step + 1, keep_state=True)
    args += f" --partition {input.partition}"
    return args + (f" --continue-from {input.previous}" if step else "")


def checkpoints():
    """Every checkpoint the current config's training jobs write (their resume files sit beside)."""
    specs = [*RUNS.values(), *PROBES.values(), *POOL.values()]
    paths = [f"results/models/{run_id}.pt" for run_id in [*RUNS, *PROBES]]
    paths += [source_model(b) for b in runs.source_backbones(specs)]
    paths += [record.replace(".json", ".pt") for record, _ in grid_jobs()]
    if SEARCH:
        jobs = [*grid_jobs("random"), *(j for m in BRACKETS for j in search_jobs(m))]
        jobs += [j for m in brackets.MODEL_BASED for j in round_jobs(m)]
        paths += [record.replace(".json", ".pt") for record, _ in jobs]
    paths += [
        MOP_STEP.format(run_id=r, step=k) + ".pt"
        for r, spec in MOP_RUNS.items()
        for k in range(spec.settings["epochs"])
    ]
    return paths
