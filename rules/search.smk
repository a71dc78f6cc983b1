# Model search over the candidate pool (tlselect.runs.candidate_runs, tlselect.search): proxies on
# cached features, the full grid, random search (draws from the space's distributions, each a run of
# its own), successive halving (sh), Hyperband (hb), TPE, GP-UCB and cost-aware GP-UCB. Rungs and
# rounds are unrolled statically. Rung 0 of a bracket trains its candidates for the first rung's
# epochs; a rank job ranks rung k-1's records on validation accuracy (declaring its records and
# checkpoints), a promote job names which candidate each slot of rung k holds (a slot job declares
# only the promotion file), and the slot job continues that candidate's rung k-1 checkpoint.
# A model-based method's round r: a suggest job reads the suggestion files and trial records of
# rounds < r and writes q trials (tlselect.search.strategies.suggest); each trial job trains one to
# max_epochs. The replay runs every method again, for many seeds, on the grid's records
# (tlselect.search.replay).


include: "inputs/search.smk"


localrules:
    search_promote,


use rule train as search_grid with:
    input:
        unpack(spec_inputs(POOL, "candidate")),
    output:
        model="results/search/grid/{candidate}.pt",
        record="results/search/grid/{candidate}.json",
    log:
        "results/logs/search/grid/{candidate}.log",
    benchmark:
        "results/benchmarks/search/grid/{candidate}.tsv"
    wildcard_constraints:
        # only this rule and the groups' write results/search/grid/; one_of(POOL) would slow large pools
        candidate=(
            one_of(sorted(set(POOL) - grouped(GRID_GROUPS)))
            if GRID_GROUPS
            else r"[^/]+"
        ),
    priority: 0
    params:
        args=spec_args(POOL, "candidate", epochs=config["search"]["max_epochs"]),
        run_id="grid-{candidate}",


use rule train as search_random with:
    input:
        unpack(spec_inputs(RANDOM, "candidate")),
    output:
        model="results/search/random/{candidate}.pt",
        record="results/search/random/{candidate}.json",
    log:
        "results/logs/search/random/{candidate}.log",
    benchmark:
        "results/benchmarks/search/random/{candidate}.tsv"
    wildcard_constraints:
        candidate=(
            one_of(sorted(set(RANDOM) - grouped(RANDOM_GROUPS)))
            if RANDOM_GROUPS
            else r"[^/]+"
        ),
    priority: 0
    params:
        args=spec_args(RANDOM, "candidate", epochs=config["search"]["max_epochs"]),
        run_id="random-{candidate}",


# With run groups, every first-rung slot is a group's (rules/groups.smk): no per-slot rule for Snakemake to try.
if not FIRST_RUNG_GROUPS:

    use rule train as search_first_rung with:
        input:
            unpack(
                fixed_signature(
                    lambda wildcards: run_inputs(first_rung_candidate(wildcards))
                )
            ),
        output:
            model="results/search/{method}/b{bracket}/rung0/slot{slot}.pt",
            record="results/search/{method}/b{bracket}/rung0/slot{slot}.json",
        log:
            "results/logs/search/{method}/b{bracket}/rung0/slot{slot}.log",
        benchmark:
            "results/benchmarks/search/{method}/b{bracket}/rung0/slot{slot}.tsv"
        wildcard_constraints:
            method="sh|hb",
            bracket=r"\d+",
            slot=r"\d+",
        priority: 0
        params:
            args=fixed_signature(
                lambda wildcards, input: train_args(
                    first_rung_candidate(wildcards),
                    input,
                    epochs=BRACKETS[wildcards.method][int(wildcards.bracket)].epochs[
                        0
                    ],
                    keep_state=True,
                )
            ),
            run_id="{method}-b{bracket}-rung0-slot{slot}",


rule search_rank:
    input:
        records=lambda wildcards: rung_slots(
            wildcards.method, wildcards.bracket, wildcards.rung
        ),
        checkpoints=lambda wildcards: rung_slots(
            wildcards.method, wildcards.bracket, wildcards.rung, ".pt"
        ),
    output:
        f"{RUNG}/ranking.json",
    log:
        "results/logs/search/{method}/b{bracket}/rung{rung}/rank.log",
    wildcard_constraints:
        method="sh|hb",
        bracket=r"\d+",
        rung=r"\d+",
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        **SMALL_RESOURCES,
    params:
        script=script("search.py"),
    shell:
        "python {params.script} rank {input.records} --out {output} 2>&1 | tee {log}"


# Its own job with one input: Snakemake scans the input list of a file's producer for every job that
# reads the file, so a promotion file made by the rank job itself would make the DAG's build
# quadratic in the pool (docs/measurements/dag-scale-cpu.md).
rule search_promote:
    input:
        previous_ranking,
    output:
        f"{RUNG}/promoted.json",
    log:
        "results/logs/search/{method}/b{bracket}/rung{rung}/promote.log",
    wildcard_constraints:
        method="sh|hb",
        bracket=r"\d+",
        rung=r"[1-9]\d*",
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        **SMALL_RESOURCES,
    params:
        script=script("search.py"),
        keep=lambda wildcards: BRACKETS[wildcards.method][int(wildcards.bracket)].keep[
            int(wildcards.rung)
        ],
    shell:
        "python {params.script} promote {input} --keep {params.keep} --out {output} 2>&1 | tee {log}"


# With run groups, every later rung's slot is a group's (rules/groups.smk): no per-slot rule for Snakemake to try.
if not NEXT_RUNG_GROUPS:

    use rule train as search_next_rung with:
        input:
            unpack(next_rung_inputs),
        output:
            model="results/search/{method}/b{bracket}/rung{rung}/slot{slot}.pt",
            record="results/search/{method}/b{bracket}/rung{rung}/slot{slot}.json",
        log:
            "results/logs/search/{method}/b{bracket}/rung{rung}/slot{slot}.log",
        benchmark:
            "results/benchmarks/search/{method}/b{bracket}/rung{rung}/slot{slot}.tsv"
        wildcard_constraints:
            method="sh|hb",
            bracket=r"\d+",
            rung=r"[1-9]\d*",
            slot=r"\d+",
        priority: 0
        params:
            script=script("search.py"),
            args=fixed_signature(
                lambda wildcards, input: (
                    f"continue --promoted {input.promoted} --slot {wildcards.slot} --epochs "
                    f"{BRACKETS[wildcards.method][int(wildcards.bracket)].epochs[int(wildcards.rung)]}"
                )
            ),
            run_id="{method}-b{bracket}-rung{rung}-slot{slot}",


rule search_suggest:
    input:
        unpack(suggest_inputs),
    output:
        "results/search/{method}/round{round}/suggested.json",
    log:
        "results/logs/search/{method}/round{round}/suggest.log",
    wildcard_constraints:
        method=one_of(brackets.MODEL_BASED),
        round=r"\d+",
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        **SMALL_RESOURCES,
    params:
        script=script("search.py"),
        settings=" ".join(f"--{key} {config['search'][key]}" for key in ("q", "delta"))
        + f" --epochs {config['search']['max_epochs']}",
        context=json.dumps(runs.candidate_config(config), sort_keys=True),
    shell:
        "python {params.script} suggest --method {wildcards.method} --round {wildcards.round} "
        "{params.settings} --context {params.context:q} --suggested {input.suggested} "
        "--records {input.records} --out {output} 2>&1 | tee {log}"


# With run groups, every round's trial is a group's (rules/groups.smk): no per-slot rule for Snakemake to try.
if not TRIAL_GROUPS:

    use rule train as search_trial with:
        input:
            unpack(trial_inputs),
        output:
            model="results/search/{method}/round{round}/trial{slot}.pt",
            record="results/search/{method}/round{round}/trial{slot}.json",
        log:
            "results/logs/search/{method}/round{round}/trial{slot}.log",
        benchmark:
            "results/benchmarks/search/{method}/round{round}/trial{slot}.tsv"
        wildcard_constraints:
            method=one_of(brackets.MODEL_BASED),
            round=r"\d+",
            slot=r"\d+",
        priority: 0
        params:
            script=script("search.py"),
            args=fixed_signature(
                lambda wildcards, input: (
                    f"{trial_command(input.suggested)} --slot {wildcards.slot}"
                )
            ),
            run_id="{method}-round{round}-trial{slot}",


rule search_proxies:
    input:
        unpack(proxy_inputs),
    output:
        proxies=report(SEARCH_FILES["proxies"], category=SEARCHING),
        tau=report(SEARCH_FILES["proxy_tau"], category=SEARCHING),
    log:
        "results/logs/search/proxies.log",
    conda:
        "../envs/torch.yaml"
    threads: config["threads"]
    resources:
        mem_mb=memory_mb(4000),
        runtime=30,
    params:
        script=script("search.py"),
        folders=lambda wildcards, input: " ".join(
            sorted({os.path.dirname(path) for path in input.features})
        ),
        data=lambda wildcards, input: os.path.dirname(input.subset),
        settings=f"--pool {config['features']['pool']} --neighbors {config['search']['neighbors']}",
    shell:
        "python {params.script} proxies --features {params.folders} --data {params.data} "
        "--grid {input.grid} {params.settings} --out {output.proxies} --tau-out {output.tau} "
        "2>&1 | tee {log}"


# SHiFT's successive halving over data: each round reads one more chunk of training images per
# surviving model; features come from the content-keyed store under results/cache/features, so a
# grown data set extracts only its new images (tlselect.search.shift, tlselect.training.store).
# Repeated over search.shift.seeds orders of the images, against the grid's fine-tuned accuracy.
rule search_shift:
    input:
        unpack(shift_inputs),
    output:
        table=report(SEARCH_FILES["shift"], category=SEARCHING),
        summary="results/search/shift/summary.json",
    log:
        "results/logs/search/shift.log",
    benchmark:
        "results/benchmarks/search/shift.tsv"
    conda:
        "../envs/torch.yaml"
    threads: config["threads"]
    resources:
        mem_mb=memory_mb(4000),
        runtime=60,
    params:
        script=script("search.py"),
        data=lambda wildcards, input: os.path.dirname(input.subset),
        arms=" ".join(f"{b},{i},{w}" for b, i, w in shift_arms()),
        store=FEATURE_STORE,
        settings=(
            f"--eta {config['search']['shift']['eta']} --proxy {config['search']['shift']['proxy']} "
            f"--seed {config['seed']} --seeds {config['search']['shift']['seeds']} "
            f"--resolution {config['resolution']} "
            f"--neighbors {config['search']['neighbors']}"
        ),
    shell:
        "python {params.script} shift --data {params.data} --arms {params.arms} "
        "--store {params.store} --grid {input.grid} {params.settings} --out {output.table} "
        "--summary {output.summary} 2>&1 | tee {log}"


rule search_compare:
    input:
        unpack(compare_inputs),
    output:
        report(SEARCH_FILES["search"], category=SEARCHING),
    log:
        "results/logs/search/compare.log",
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        **SMALL_RESOURCES,
    params:
        script=script("search.py"),
        files=lambda wildcards, input: " ".join(
            f"--{name.replace('_', '-')} {' '.join(input[name])}"
            for name in input.keys()
        ),
    shell:
        "python {params.script} compare {params.files} --out {output} 2>&1 | tee {log}"


rule search_figure:
    input:
        table=lambda wildcards: SEARCH_FILES[
            "search" if wildcards.figure == "search_compute" else "proxies"
        ],
        tau=lambda wildcards: (
            SEARCH_FILES["proxy_tau"]
            if wildcards.figure == "proxy_vs_finetune"
            else []
        ),
    output:
        report(
            "results/figures/{figure}.png",
            caption="../report/figure.rst",
            category=SEARCHING,
        ),
    log:
        "results/logs/figures/{figure}.log",
    wildcard_constraints:
        figure="search_compute|proxy_vs_finetune",
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        **SMALL_RESOURCES,
    params:
        script=script("search.py"),
        tau=lambda wildcards, input: f"--tau {input.tau}" if input.tau else "",
    shell:
        "python {params.script} figure {wildcards.figure} --table {input.table} {params.tau} "
        "--out {output} 2>&1 | tee {log}"


rule search_replay:
    input:
        lambda wildcards: [record for record, _ in grid_jobs()],
    output:
        table=report(SEARCH_FILES["replay"], category=SEARCHING),
        figure=report(SEARCH_FILES["replay_anytime"], category=SEARCHING),
    log:
        "results/logs/search/replay.log",
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=memory_mb(2000),
        runtime=60,
    params:
        script=script("replay.py"),
        settings=" ".join(
            f"--{key.replace('_', '-')} {config['search'][key]}"
            for key in ("eta", "min_epochs", "max_epochs", "brackets", "delta")
        )
        + " "
        + " ".join(
            f"--{key} {value}"
            for key, value in config["search"]["replay"].items()
            if key != "benchmark"
        ),
    shell:
        "python {params.script} --grid {input} {params.settings} --out {output.table} "
        "--figure {output.figure} 2>&1 | tee {log}"


# The same methods replayed on the pool table shipped with the project (benchmarks/pools/; its
# rungs and seeds in search.replay.benchmark, TPE's, GP-UCB's, ASHA's and BOHB's settings as above).
rule replay_benchmark:
    input:
        str(brackets.benchmark_pool(config)),
    output:
        table=report(BENCHMARK_FILES["replay_benchmark"], category=SEARCHING),
        goals=report(BENCHMARK_FILES["replay_benchmark_goals"], category=SEARCHING),
        figure=report(BENCHMARK_FILES["replay_benchmark_anytime"], category=SEARCHING),
    log:
        "results/logs/search/replay_benchmark.log",
    conda:
        "../envs/torch.yaml"
    threads: config["threads"]
    resources:
        mem_mb=memory_mb(2000),
        runtime=120,
    params:
        script=script("replay.py"),
        settings=" ".join(
            f"--{key.replace('_', '-')} {value}"
            for key, value in config["search"]["replay"]["benchmark"].items()
            if key not in ("enabled", "pool")
        )
        + " "
        + " ".join(
            f"--{key} {config['search']['replay'][key]}"
            for key in ("q", "startup", "workers", "rho")
        )
        + f" --delta {config['search']['delta']}",
    shell:
        "python {params.script} --pool {input} {params.settings} --processes {threads} --out {output.table} "
        "--goals {output.goals} --figure {output.figure} 2>&1 | tee {log}"
