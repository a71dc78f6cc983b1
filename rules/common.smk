# Config validation, the run tables (tlselect.runs), the shared paths and the input functions that
# several rule files share; each rule file holds its own input functions. Paths live in rules/ only;
# scripts get them as arguments, and everything else is in the package.
import inspect
import os
import re
import shlex
import sys

from snakemake.utils import min_version, validate

min_version("9.0")

sys.path.insert(0, workflow.basedir)

from tlselect import runs  # noqa: E402
from tlselect.config import load_and_check, plan_flags, run_group_settings  # noqa: E402
from tlselect.core import settings  # noqa: E402
from tlselect.core.backbones import BACKBONES  # noqa: E402
from tlselect.search import brackets  # noqa: E402
from tlselect.training import forkserver, gpus  # noqa: E402

# validate reads `workflow` from its caller's globals (for a module's skip_validation): call it from here.
load_and_check(
    config,
    f"{workflow.basedir}/schemas/config.schema.yaml",
    lambda data, schema: validate(data, schema),
)

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
# Model hopper parallelism's runs (rules/mop.smk), each a chain of sub-epoch jobs.
MOP_RUNS = runs.mop_runs(config)
# Cached feature chains: the probes' layers, plus every stage of each searched backbone (proxies).
FEATURE_INITS = runs.cached_inits(config)
FEATURE_CHAINS = runs.feature_chains(config)
# Every backbone a job may build: the table's and the config's (patterns already expanded).
KNOWN_BACKBONES = sorted(
    {*BACKBONES, config["backbone"], *config["search"]["backbones"]}
)
SPEEDUPS = config["speedups"]["enabled"]
SPLITS = ["train", "val", "test"]
DATA_ROOT = f"resources/{config['data']['name']}"
SUBSET = "results/data/subset.json"
SOURCE_SUBSET = "results/source/data/subset.json"
# Activations and SHiFT's features kept by image content: caches, never declared outputs (a grown data
# set computes its new images only; deleting them costs recomputation).
LAYER_STORE = "results/cache/layers"
FEATURE_STORE = "results/cache/features"
# ImageNet weights, fetched once by a local rule (jobs on offline compute nodes read this file).
IMAGENET_WEIGHTS = "resources/weights/{backbone}-imagenet.pth"
# The study first: its jobs (policies, probes, their features, table, figures and notebook) go
# before the model search's and the benchmark's whenever both are ready. The study's notebook
# (results/report/study.html) is then done early; solution.html adds the search and benchmark.
STUDY_FIRST = 50
# The model search's report files by name (rules/search.smk); the study asks for them when the
# search is on (rule all, the solution notebook).
SEARCH_FILES = {
    "search": "results/tables/search.csv",
    "proxies": "results/tables/proxies.csv",
    "proxy_tau": "results/tables/proxy_tau.csv",
    "search_compute": "results/figures/search_compute.png",
    "proxy_vs_finetune": "results/figures/proxy_vs_finetune.png",
    "replay": "results/tables/replay.csv",
    "replay_anytime": "results/figures/replay_anytime.png",
    "shift": "results/tables/shift.csv",
}
SEARCH_OUTPUTS = SEARCH_FILES if SEARCH else {}
# Every search method replayed on the pool table shipped with the project (rule replay_benchmark).
BENCHMARK_FILES = {
    "replay_benchmark": "results/tables/replay_benchmark.csv",
    "replay_benchmark_goals": "results/tables/replay_benchmark_goals.csv",
    "replay_benchmark_anytime": "results/figures/replay_benchmark_anytime.png",
}
BENCHMARK_OUTPUTS = (
    BENCHMARK_FILES if config["search"]["replay"]["benchmark"]["enabled"] else {}
)
# Execution plans (tlselect.training.plan, rules/plan.smk): the study's copy of the per-user cache's plan.
PLANS = "results/plans"
PLAN_FLAGS = f"{plan_flags(config)} --plans {PLANS}"
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
    """--gpus (tlselect.training.gpus.job_gpus: a SLURM share of a GPU is one); jobs per GPU."""
    given = gpus.job_gpus(resources.gpu, resources.get("gres", ""))
    return f"--gpus {given} --gpu-jobs-per-device {config['gpu_jobs_per_device']}"


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


# Run groups (docs/execution-plans.md#run-groups): up to GROUP_SIZE runs of one shape per job, FUSE:
# trained as one fused network. A group job keeps its finished runs' files in RUN_STORE (hard links,
# by run id and settings) and restores them when Snakemake runs the group again.
GROUP_SIZE, FUSE = run_group_settings(config)
RUN_STORE = "results/cache/runs"


def group_inputs(specs, members):
    """What a run group reads: the decoded subset and its runs' pretrained weights."""
    inputs = subset_files()
    inputs["weights"] = sorted(
        {weights_file(*specs[m].weights) for m in members if specs[m].weights}
    )
    return inputs


def group_args(specs, members, files, **overrides):
    """scripts/train.py's arguments for a run group: one --run with each run's flags and its files
    (``files(member)``: checkpoint, record, run id), then what every run shares."""
    runs = []
    for member in members:
        spec, (model, record, run_id) = specs[member], files(member)
        flags = f"{spec.flags(**overrides)} --out {model} --record {record} --run-id {run_id}"
        if spec.weights:
            flags += f" --weights {weights_file(*spec.weights)}"
        runs.append(f"--run {shlex.quote(flags)}")
    fuse = " --fuse" if FUSE else ""
    return f"{PLAN_FLAGS} --data {os.path.dirname(SUBSET)} {' '.join(runs)}{fuse} --keep {RUN_STORE}"


def group_benchmark(folder, group):
    """The benchmark file of a run group's job (rules/groups.smk); its runs' wall time."""
    return f"results/benchmarks/{folder}/group_{group}.tsv"


def grouped(groups):
    """The run ids of ``groups`` (runs that the per-run rule must not train)."""
    return {member for members in groups.values() for member in members}


# Resources of every job that trains; rules that differ say so.
TRAINING_RESOURCES = {
    "gpu": GPU,
    "mem_mb": memory_mb(4000),
    "runtime": 120,
}
# Resources of the small bookkeeping jobs (tables, figures, promotions).
SMALL_RESOURCES = {"mem_mb": memory_mb(1000), "runtime": 10}

# The questions `snakemake --report` groups its results by (its categories, in this order).
PICK = "1. Which run to pick"
TRAINING = "2. How the runs trained"
LAYERS = "3. Which layer transfers"
SPEED = "4. How fast it ran"
SEARCHING = "5. Which search method finds it"
NOTEBOOK = "6. The executed notebook"
