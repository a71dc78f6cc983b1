# Model search over the candidate pool (tlselect.search): proxies on cached features, the full grid
# (random search is a seeded sample of its runs), successive halving (sh) and Hyperband (hb).
# Rungs are unrolled statically: rung 0 of a bracket trains its candidates for the first rung's
# epochs; a promote job ranks rung k-1's records on validation accuracy and names which candidate
# each slot of rung k holds; the slot job continues that candidate's rung k-1 checkpoint.


rule search_grid:
    input:
        unpack(lambda wildcards: search_inputs(wildcards.candidate)),
    output:
        model="results/search/grid/{candidate}.pt",
        record="results/search/grid/{candidate}.json",
    log:
        "results/logs/search/grid/{candidate}.log",
    benchmark:
        "results/benchmarks/search/grid/{candidate}.tsv"
    wildcard_constraints:
        candidate=one_of(POOL),
    conda:
        "../envs/torch.yaml"
    threads: config["threads"]
    resources:
        gpu=GPU,
        mem_mb=lambda wildcards, attempt: 4000 * attempt,
        runtime=120,
    params:
        script=script("train.py"),
        flags=lambda wildcards: search_flags(
            wildcards.candidate, config["search"]["max_epochs"]
        ),
        source=source_checkpoint_flag,
        device=config["device"],
    shell:
        "python {params.script} {params.flags} {params.source} --data results/data "
        "--out {output.model} --record {output.record} --run-id grid-{wildcards.candidate} "
        "--device {params.device} --gpus {resources.gpu} --threads {threads} 2>&1 | tee {log}"


rule search_first_rung:
    input:
        unpack(lambda wildcards: search_inputs(first_rung_candidate(wildcards))),
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
    conda:
        "../envs/torch.yaml"
    threads: config["threads"]
    resources:
        gpu=GPU,
        mem_mb=lambda wildcards, attempt: 4000 * attempt,
        runtime=120,
    params:
        script=script("train.py"),
        flags=lambda wildcards: search_flags(
            first_rung_candidate(wildcards),
            PLAN[wildcards.method][int(wildcards.bracket)].epochs[0],
        ),
        source=source_checkpoint_flag,
        device=config["device"],
    shell:
        "python {params.script} {params.flags} {params.source} --keep-state --data results/data "
        "--out {output.model} --record {output.record} "
        "--run-id {wildcards.method}-b{wildcards.bracket}-rung0-slot{wildcards.slot} "
        "--device {params.device} --gpus {resources.gpu} --threads {threads} 2>&1 | tee {log}"


rule search_promote:
    input:
        lambda wildcards: rung_slots(
            wildcards.method, wildcards.bracket, int(wildcards.rung) - 1
        ),
    output:
        "results/search/{method}/b{bracket}/rung{rung}/promoted.json",
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
        mem_mb=lambda wildcards, attempt: 1000 * attempt,
        runtime=10,
    params:
        script=script("search.py"),
        keep=lambda wildcards: PLAN[wildcards.method][int(wildcards.bracket)].keep[
            int(wildcards.rung)
        ],
    shell:
        "python {params.script} promote {input} --keep {params.keep} --out {output} 2>&1 | tee {log}"


rule search_next_rung:
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
    conda:
        "../envs/torch.yaml"
    threads: config["threads"]
    resources:
        gpu=GPU,
        mem_mb=lambda wildcards, attempt: 4000 * attempt,
        runtime=120,
    params:
        script=script("search.py"),
        epochs=lambda wildcards: PLAN[wildcards.method][int(wildcards.bracket)].epochs[
            int(wildcards.rung)
        ],
        device=config["device"],
    shell:
        "python {params.script} continue --promoted {input.promoted} --slot {wildcards.slot} "
        "--epochs {params.epochs} --out {output.model} --record {output.record} "
        "--run-id {wildcards.method}-b{wildcards.bracket}-rung{wildcards.rung}-slot{wildcards.slot} "
        "--device {params.device} --gpus {resources.gpu} --threads {threads} 2>&1 | tee {log}"


rule search_proxies:
    input:
        features=(
            [
                f"{folder}/{split}.npy"
                for folder in search.proxy_folders(config)
                for split in ("train", "val")
            ]
            if SEARCH
            else []
        ),
        data=expand("results/data/{split}.pt", split=SPLITS),
        grid=expand("results/search/grid/{candidate}.json", candidate=sorted(POOL)),
    output:
        proxies=report("results/tables/proxies.csv", category="Model search"),
        tau=report("results/tables/proxy_tau.csv", category="Model search"),
    log:
        "results/logs/search/proxies.log",
    conda:
        "../envs/torch.yaml"
    threads: config["threads"]
    resources:
        mem_mb=lambda wildcards, attempt: 4000 * attempt,
        runtime=30,
    params:
        script=script("search.py"),
        folders=" ".join(search.proxy_folders(config)) if SEARCH else "",
        settings=f"--pool {config['features']['pool']} --neighbors {config['search']['neighbors']}",
    shell:
        "python {params.script} proxies --features {params.folders} --data results/data "
        "--grid {input.grid} {params.settings} --out {output.proxies} --tau-out {output.tau} "
        "2>&1 | tee {log}"


rule search_compare:
    input:
        grid=expand("results/search/grid/{candidate}.json", candidate=sorted(POOL)),
        sh=search_records("sh") if SEARCH else [],
        hb=search_records("hb") if SEARCH else [],
        sh_final=search_records("sh", last_only=True) if SEARCH else [],
        hb_final=search_records("hb", last_only=True) if SEARCH else [],
    output:
        report("results/tables/search.csv", category="Model search"),
    log:
        "results/logs/search/compare.log",
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=lambda wildcards, attempt: 1000 * attempt,
        runtime=10,
    params:
        script=script("search.py"),
        random=" ".join(search.random_candidates(config)) if SEARCH else "",
    shell:
        "python {params.script} compare --grid {input.grid} --random {params.random} "
        "--sh {input.sh} --sh-final {input.sh_final} --hb {input.hb} "
        "--hb-final {input.hb_final} --out {output} 2>&1 | tee {log}"


rule search_figure:
    input:
        table=lambda wildcards: (
            "results/tables/search.csv"
            if wildcards.figure == "search_compute"
            else "results/tables/proxies.csv"
        ),
        tau=lambda wildcards: (
            "results/tables/proxy_tau.csv"
            if wildcards.figure == "proxy_vs_finetune"
            else []
        ),
    output:
        report("results/figures/{figure}.png", category="Model search"),
    log:
        "results/logs/figures/{figure}.log",
    wildcard_constraints:
        figure="search_compute|proxy_vs_finetune",
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=lambda wildcards, attempt: 1000 * attempt,
        runtime=10,
    params:
        script=script("search.py"),
        tau=lambda wildcards, input: f"--tau {input.tau}" if input.tau else "",
    shell:
        "python {params.script} figure {wildcards.figure} --table {input.table} {params.tau} "
        "--out {output} 2>&1 | tee {log}"
