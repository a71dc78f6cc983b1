# The input and params functions and paths of rules/data.smk, included by it before its rules.

# What the decoding steps read: the archive when there is one (tlselect.data.subset_cache), else
# the image folder that fetch_data downloads.
IMAGES = config["data"]["archive"] or DATA_ROOT


def image_root(wildcards, input):
    """The image folder the decoding steps read: the input one, or where the archive unpacks."""
    return DATA_ROOT if config["data"]["archive"] else input[0]


SUBSET_CACHE_FLAGS = (
    f"--archive {config['data']['archive']} "
    + ("--cache" if config["data"]["subset_cache"] else "--no-cache")
    if config["data"]["archive"]
    else ""
)


def checkpoints():
    """Every checkpoint the current config's training jobs write (their resume files sit beside).
    It reads the search's, the model hopper's and the tenants' path functions (rules/search.smk,
    rules/mop.smk, rules/tenants.smk), included later: it runs when the DAG is built, after every
    rule file is read."""
    specs = [*RUNS.values(), *PROBES.values(), *POOL.values()]
    paths = [f"results/models/{run_id}.pt" for run_id in [*RUNS, *PROBES]]
    paths += [source_model(b) for b in runs.source_backbones(specs)]
    paths += [record.replace(".json", ".pt") for record, _ in grid_jobs()]
    if SEARCH:
        jobs = [*grid_jobs("random"), *(j for m in BRACKETS for j in search_jobs(m))]
        jobs += [j for m in brackets.MODEL_BASED for j in round_jobs(m)]
        paths += [record.replace(".json", ".pt") for record, _ in jobs]
    paths += [
        record.replace(".json", ".pt")
        for scheduler in config["tenants"]["schedulers"]
        for _, records in schedule_jobs(scheduler)
        for record in records
    ]
    paths += [
        MOP_STEP.format(run_id=r, step=k) + ".pt"
        for r, spec in MOP_RUNS.items()
        for k in range(spec.settings["epochs"])
    ]
    return paths
