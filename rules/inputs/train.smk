# The input and params functions and paths of rules/train.smk, included by it before its rules.

# The policies (and repeats) trained by one job per group (tlselect.runs.run_groups).
RUN_GROUPS = runs.run_groups(RUNS, GROUP_SIZE)

# With k-fold validation (validation.folds), the selected policy or probe is retrained on every
# fold once per seed (rule refit); the tables read these records.
REFIT_SEEDS = (
    [str(seed) for seed in runs.repeat_seeds(config)]
    if config["validation"]["folds"] > 1
    else []
)
REFITS = [f"results/refit/seed{seed}.json" for seed in REFIT_SEEDS]


def refit_inputs(wildcards):
    """Every policy's and probe's record (the refit chooses among them) and whatever any of them
    reads: the decoded subset, pretrained weights, cached layers."""
    specs = {**RUNS, **PROBES}
    inputs = subset_files()
    inputs["records"] = [f"results/registry/{run_id}.json" for run_id in sorted(specs)]
    inputs["weights"] = sorted(
        {weights_file(*s.weights) for s in specs.values() if s.weights}
    )
    inputs["features"] = sorted(
        {f for s in specs.values() if s.features for f in feature_files(*s.features)}
    )
    return inputs


def refit_args(wildcards, input):
    return f"--records {' '.join(input.records)} --seed {wildcards.seed} {PLAN_FLAGS}"
