# Config validation, run ids and input functions shared by every stage.
import sys

from snakemake.utils import min_version, validate

min_version("9.0")

sys.path.insert(0, workflow.basedir)

from tlselect.config import (  # noqa: E402
    ConfigError,
    check,
    runs,
    source_checkpoint,
    source_settings,
    train_flags,
    uses_source,
)

validate(config, "../schemas/config.schema.yaml")
try:
    check(config)
except ConfigError as error:
    raise ValueError(f"invalid configuration: {error}") from None

RUNS = runs(config)
SPLITS = ["train", "val", "test"]
FIGURES = ["accuracy_vs_time", "accuracy_by_policy", "validation_curves"]
DATA_ROOT = f"resources/{config['data']['name']}"
GPU = 1 if config["device"] == "cuda" else 0


def run_inputs(wildcards):
    """Decoded subset, plus the source checkpoint when the run starts from it."""
    inputs = {"data": expand("results/data/{split}.pt", split=SPLITS)}
    if RUNS[wildcards.run_id]["init"] == "source":
        inputs["source"] = source_checkpoint(config)
    return inputs


def run_flags(wildcards):
    return train_flags(RUNS[wildcards.run_id])


def source_checkpoint_flag(wildcards, input):
    return f"--source-checkpoint {input.source}" if "source" in input.keys() else ""


def script(name):
    """Path of a command-line entry point under scripts/."""
    return f"{workflow.basedir}/scripts/{name}"
