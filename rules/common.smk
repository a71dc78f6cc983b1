# Config validation, run ids and input functions shared by every stage.
import re
import sys

from snakemake.utils import min_version, validate

min_version("9.0")

sys.path.insert(0, workflow.basedir)

from tlselect.config import (  # noqa: E402
    ConfigError,
    check,
    probes,
    runs,
    source_checkpoint,
    source_settings,
    train_flags,
    uses_source,
)
from tlselect import search  # noqa: E402

validate(config, "../schemas/config.schema.yaml")
try:
    check(config)
    search.check(config)
except ConfigError as error:
    raise ValueError(f"invalid configuration: {error}") from None

RUNS = runs(config)
PROBES = probes(config)
# Cached feature chains: the probes' layers, plus every stage of each searched backbone (proxies).
FEATURE_INITS = search.cached_inits(config)
FEATURE_CHAINS = search.feature_chains(config)
SEARCH = config["search"]["enabled"]
SPLITS = ["train", "val", "test"]
BENCHMARKS = config["benchmarks"]["enabled"]
FIGURES = [
    "accuracy_vs_time",
    "accuracy_by_policy",
    "validation_curves",
    "accuracy_by_layer",
]
FIGURES += ["speedups"] if BENCHMARKS else []
DATA_ROOT = f"resources/{config['data']['name']}"
# GPUs each training/extraction job asks for: none on device cpu, else one. A local run's
# --resources gpu=N caps the total (gpu=0 lowers it to 0, so device auto runs on the CPU); on SLURM
# the profile's set-resources decide. The job claims its GPU itself (tlselect.gpus, --gpus).
GPU = 0 if config["device"] == "cpu" else 1


def one_of(names):
    """Wildcard constraint matching exactly one of ``names``."""
    return "|".join(re.escape(name) for name in names) or "^$"


def with_source(inputs, init, backbone=None):
    """Add the source checkpoint to a job's inputs when it starts from the source model."""
    if init == "source":
        inputs["source"] = source_checkpoint(config, backbone)
    return inputs


def run_inputs(wildcards):
    """Decoded subset, plus the source checkpoint when the run starts from it."""
    inputs = {"data": expand("results/data/{split}.pt", split=SPLITS)}
    return with_source(inputs, RUNS[wildcards.run_id]["init"])


def run_flags(wildcards):
    return train_flags(RUNS[wildcards.run_id])


def feature_inputs(wildcards):
    """The previous cached layer (or the decoded images for the first), plus the source model."""
    chain = FEATURE_CHAINS[wildcards.backbone]
    index = chain.index(wildcards.layer)
    if index == 0:
        inputs = {"data": expand("results/data/{split}.pt", split=SPLITS)}
    else:
        inputs = {
            "previous": expand(
                "results/features/{backbone}/{init}/{layer}/{split}.npy",
                backbone=wildcards.backbone,
                init=wildcards.init,
                layer=chain[index - 1],
                split=SPLITS,
            )
        }
    return with_source(inputs, FEATURE_INITS[wildcards.init], wildcards.backbone)


def feature_flags(wildcards):
    chain = FEATURE_CHAINS[wildcards.backbone]
    index = chain.index(wildcards.layer)
    flags = f"--init {FEATURE_INITS[wildcards.init]}"
    return flags + (f" --from-layer {chain[index - 1]}" if index else "")


def probe_inputs(wildcards):
    settings = PROBES[wildcards.run_id]
    return {
        "data": expand("results/data/{split}.pt", split=SPLITS),
        "features": expand(
            f"{settings['features']}/{settings['layer']}/{{split}}.npy", split=SPLITS
        ),
    }


def benchmark_inputs(wildcards):
    """Decoded subset and image folder (the naive path reads images), plus the source model."""
    inputs = {
        "data": expand("results/data/{split}.pt", split=SPLITS),
        "images": DATA_ROOT,
    }
    return with_source(inputs, config["pretrained"])


def benchmark_flags(wildcards, input):
    bench = config["benchmarks"]
    flags = (
        f"--suites {' '.join(bench['suites'])} --epochs {bench['epochs']} "
        f"--accuracy-epochs {bench['accuracy_epochs']} --init {config['pretrained']} "
        f"--layers {' '.join(config['features']['layers'] or ['layer1', 'layer2', 'layer3', 'layer4'])} "
        f"--batch-size {config['train']['batch_size']} --lr {config['train']['lr']} --device {config['device']}"
    )
    if "source" in input.keys():
        flags += f" --source-checkpoint {input.source}"
    return flags + (" --compile" if bench["compile"] else "")


def figure_inputs(wildcards):
    tables = (
        ["runs", "curves", "optimizations"]
        if wildcards.figure == "speedups"
        else ["runs", "curves"]
    )
    return {table: f"results/tables/{table}.csv" for table in tables}


def probe_flags(wildcards):
    return train_flags(PROBES[wildcards.run_id])


def source_checkpoint_flag(wildcards, input):
    return f"--source-checkpoint {input.source}" if "source" in input.keys() else ""


def script(name):
    """Path of a command-line entry point under scripts/."""
    return f"{workflow.basedir}/scripts/{name}"


# Model search (rules/search.smk): the pool, the static rung plan and their input functions.
POOL = search.pool(config) if SEARCH else {}
PLAN = {m: search.brackets(config, m) for m in ("sh", "hb")} if SEARCH else {}
RUNG = "results/search/{method}/b{bracket}/rung{rung}"
SEARCH_TABLES = (
    [
        "results/tables/search.csv",
        "results/tables/proxies.csv",
        "results/tables/proxy_tau.csv",
    ]
    if SEARCH
    else []
)
SEARCH_OUTPUTS = SEARCH_TABLES + (
    ["results/figures/search_compute.png", "results/figures/proxy_vs_finetune.png"]
    if SEARCH
    else []
)


def rung_slots(method, bracket, rung):
    """Record paths of every slot of one rung."""
    keep = PLAN[method][int(bracket)].keep[int(rung)]
    path = RUNG.format(method=method, bracket=bracket, rung=rung)
    return [f"{path}/slot{slot}.json" for slot in range(keep)]


def search_records(method, last_only=False):
    """Every job record of a method (or only its brackets' last rungs)."""
    return [
        path
        for b, plan in enumerate(PLAN[method])
        for r in range(plan.rungs)
        if not last_only or r == plan.rungs - 1
        for path in rung_slots(method, b, r)
    ]


def first_rung_candidate(wildcards):
    return PLAN[wildcards.method][int(wildcards.bracket)].candidates[
        int(wildcards.slot)
    ]


def search_inputs(candidate):
    settings = POOL[candidate]
    inputs = {"data": expand("results/data/{split}.pt", split=SPLITS)}
    return with_source(inputs, settings["init"], settings["backbone"])


def search_flags(candidate, epochs):
    return train_flags({**POOL[candidate], "policy": candidate, "epochs": epochs})


def next_rung_inputs(wildcards):
    """The promotion file and every checkpoint of the previous rung (which slot continues which is
    decided at run time), the data and the source models the candidates may start from.
    """
    previous = rung_slots(wildcards.method, wildcards.bracket, int(wildcards.rung) - 1)
    inputs = {
        "promoted": f"{RUNG.format(**wildcards)}/promoted.json",
        "records": previous,
        "checkpoints": [p.replace(".json", ".pt") for p in previous],
        "data": expand("results/data/{split}.pt", split=SPLITS),
    }
    plan = PLAN[wildcards.method][int(wildcards.bracket)]
    sources = {
        source_checkpoint(config, POOL[c]["backbone"])
        for c in plan.candidates
        if POOL[c]["init"] == "source"
    }
    return inputs | ({"source": sorted(sources)} if sources else {})
