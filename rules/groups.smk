# Run groups (docs/execution-plans.md#run-groups): one job trains a group of runs of one shape
# (tlselect.runs.run_groups) for the study's policies, the search grid, random search and the first
# rung of every bracket, and one job a group of a later rung's slots or of a model-based round's
# trials; the per-run rules (train, search_grid, search_random, search_first_rung, search_next_rung,
# search_trial) leave the grouped runs to these.
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
    "search_random_group": (
        RANDOM,
        RANDOM_GROUPS,
        "search/random",
        0,
        lambda m: (
            f"results/search/random/{m}.pt",
            f"results/search/random/{m}.json",
            f"random-{m}",
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
                # records first: Snakemake tries a rule's outputs in order, and looks up records most
                records=[files(m)[1] for m in members],
                models=[files(m)[0] for m in members],
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


# The groups of slots whose candidates are decided at run time, ``{rule name: (inputs, folder, slots,
# file stem, run id prefix, log and benchmark folder, scripts/search.py command)}``: a later rung's
# slots continue the candidates its promotion file names, a round's trials train those its
# suggestion file names.
SLOT_GROUP_RULES = {
    **{
        f"search_next_rung_group_{group}": (
            next_rung_files(method, b, rung),
            path,
            slots,
            "slot",
            f"{method}-b{b}-rung{rung}-slot",
            ("search/next_rung", group),
            f"continue --promoted {path}/promoted.json --epochs {BRACKETS[method][b].epochs[rung]}",
        )
        for group, (method, b, rung, slots) in NEXT_RUNG_GROUPS.items()
        for path in [RUNG.format(method=method, bracket=b, rung=rung)]
    },
    **{
        f"search_trial_group_{group}": (
            trial_files(method, r),
            path,
            slots,
            "trial",
            f"{method}-round{r}-trial",
            ("search/trial", group),
            trial_command(f"{path}/suggested.json"),
        )
        for group, (method, r, slots) in TRIAL_GROUPS.items()
        for path in [ROUND.format(method=method, round=r)]
    },
}


for name, (
    inputs,
    path,
    slots,
    stem,
    run_id,
    (folder, group),
    command,
) in SLOT_GROUP_RULES.items():

    rule:
        name:
            name
        input:
            **inputs,
        output:
            records=[f"{path}/{stem}{s}.json" for s in slots],
            models=[f"{path}/{stem}{s}.pt" for s in slots],
        log:
            f"results/logs/{folder}/group_{group}.log",
        benchmark:
            group_benchmark(folder, group)
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
                f"{command} --slot {' '.join(map(str, slots))} "
                f"--out {' '.join(f'{path}/{stem}{s}.pt' for s in slots)} "
                f"--record {' '.join(f'{path}/{stem}{s}.json' for s in slots)} "
                f"--run-id {' '.join(f'{run_id}{s}' for s in slots)} "
                f"--keep {RUN_STORE}{' --fuse' if FUSE else ''}"
            ),
            device=config["device"],
        shell:
            "python {params.script} {params.args} --device {params.device} {params.gpus} "
            "--threads {threads} 2>&1 | tee {log}"
