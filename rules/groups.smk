# Run groups (docs/execution-plans.md#run-groups): one job trains a group of runs of one shape
# (tlselect.runs.run_groups) for the study's policies, the search grid and the first rung of every
# bracket, and one job a group of a later rung's slots; the per-run rules (train, search_grid,
# search_first_rung, search_next_rung) leave the grouped runs to these.
# Each group is a rule of its own, named after its runs, with their usual files as outputs.

# name prefix: (specs, groups, log and benchmark folder, priority, each run's files, settings overridden)
GROUPED_RULES = {
    "train_group": (
        RUNS,
        RUN_GROUPS,
        "train",
        STUDY_FIRST,
        lambda m: (f"results/models/{m}.pt", f"results/registry/{m}.json", m),
        {},
    ),
    "search_grid_group": (
        POOL,
        GRID_GROUPS,
        "search/grid",
        0,
        lambda m: (
            f"results/search/grid/{m}.pt",
            f"results/search/grid/{m}.json",
            f"grid-{m}",
        ),
        {"epochs": config["search"]["max_epochs"]},
    ),
    "search_first_rung_group": (
        FIRST_RUNG,
        FIRST_RUNG_GROUPS,
        "search/first_rung",
        0,
        lambda m: (
            f"results/search/{m}.pt",
            f"results/search/{m}.json",
            FIRST_RUNG[m].id,
        ),
        {},
    ),
}


for prefix, (specs, groups, folder, order, files, overrides) in GROUPED_RULES.items():
    for group, members in groups.items():

        rule:
            name:
                f"{prefix}_{group}"
            input:
                **group_inputs(specs, members),
            output:
                models=[files(m)[0] for m in members],
                records=[files(m)[1] for m in members],
            log:
                f"results/logs/{folder}/group_{group}.log",
            benchmark:
                group_benchmark(folder, group)
            priority: order
            conda:
                "../envs/torch.yaml"
            threads: config["threads"]
            resources:
                **TRAINING_RESOURCES | {"runtime": 120 * len(members)},
            params:
                gpus=gpu_flags,
                script=script("train.py"),
                args=group_args(specs, members, files, **overrides),
                device=config["device"],
            shell:
                "python {params.script} {params.args} --device {params.device} {params.gpus} "
                "--threads {threads} 2>&1 | tee {log}"


for group, (method, b, rung, slots) in NEXT_RUNG_GROUPS.items():
    path = RUNG.format(method=method, bracket=b, rung=rung)

    rule:
        name:
            f"search_next_rung_group_{group}"
        input:
            **subset_files(),
            promoted=f"{path}/promoted.json",
            weights=bracket_weights(method, b),
        output:
            models=[f"{path}/slot{s}.pt" for s in slots],
            records=[f"{path}/slot{s}.json" for s in slots],
        log:
            f"results/logs/search/next_rung/group_{group}.log",
        benchmark:
            group_benchmark("search/next_rung", group)
        priority: 0
        conda:
            "../envs/torch.yaml"
        threads: config["threads"]
        resources:
            **TRAINING_RESOURCES | {"runtime": 120 * len(slots)},
        params:
            gpus=gpu_flags,
            script=script("search.py"),
            args=(
                f"continue --promoted {path}/promoted.json --slot {' '.join(map(str, slots))} "
                f"--epochs {BRACKETS[method][b].epochs[rung]} "
                f"--out {' '.join(f'{path}/slot{s}.pt' for s in slots)} "
                f"--record {' '.join(f'{path}/slot{s}.json' for s in slots)} "
                f"--run-id {' '.join(f'{method}-b{b}-rung{rung}-slot{s}' for s in slots)} "
                f"--keep {RUN_STORE}{' --fuse' if FUSE else ''}"
            ),
            device=config["device"],
        shell:
            "python {params.script} {params.args} --device {params.device} {params.gpus} "
            "--threads {threads} 2>&1 | tee {log}"
