# The input and params functions and paths of rules/speedups.smk, included by it before its rules.
from tlselect.config import speedups_flags


def speedups_inputs(wildcards):
    """Decoded subset and image folder (the naive path reads images), plus the init's weights."""
    weights = settings.weights_of(config["pretrained"], config["backbone"])
    return {**subset_files(), "images": DATA_ROOT} | (
        {"weights": weights_file(*weights)} if weights else {}
    )


def speedups_args(wildcards, input):
    """scripts/speedups.py's arguments (tlselect.config.speedups_flags) with this job's files."""
    weights = input.weights if "weights" in input.keys() else ""
    return speedups_flags(config, os.path.dirname(input.subset), PLANS, weights)
