# Many users (tlselect.search.tenants, tlselect.search.tenancy): each tenant of `tenants.studies` has
# its own data and pool; one budget of jobs is spent by each global scheduler on its own. Per tenant:
# the image folder, the decoded subset, and its tables under results/tenants/<tenant>/. Per scheduler,
# round r: a schedule job reads every earlier round's assignment file and job records (every
# tenant's history) and writes round r's assignments (tenant, candidate); each job trains one on its
# tenant's data. The tables job writes each tenant's tables and the global table.

from tlselect.search import tenancy  # noqa: E402

# Each tenant's config: its data, search and train blocks merged over the study's.
TENANTS = tenancy.tenant_configs(config)


include: "inputs/tenants.smk"


localrules:
    tenant_fetch_data,  # like fetch_data: it may download, which compute nodes may not


TENANT_OUTPUTS = (
    [TENANT_TABLE, TENANT_FIGURE]
    + [
        f"{TENANT_DIR.format(tenant=t)}/{f}"
        for t in TENANTS
        for f in ("runs.csv", "summary.md")
    ]
    if TENANTS
    else []
)


# `snakemake tenants`: only the tenants' tables and the global figure.
rule tenants:
    input:
        TENANT_OUTPUTS,


use rule fetch_data as tenant_fetch_data with:
    output:
        directory("resources/tenants/{tenant}/images"),
    log:
        "results/logs/tenants/{tenant}/fetch_data.log",
    wildcard_constraints:
        tenant=one_of(TENANTS),
    params:
        script=script("prepare_data.py"),
        archive=lambda wildcards: (
            f"--archive {TENANTS[wildcards.tenant]['data']['archive']}"
            if TENANTS[wildcards.tenant]["data"]["archive"]
            else ""
        ),


use rule subset as tenant_subset with:
    input:
        "resources/tenants/{tenant}/images",
    output:
        **subset_files(tenant_subset("{tenant}")),
    log:
        "results/logs/tenants/{tenant}/subset.log",
    wildcard_constraints:
        tenant=one_of(TENANTS),
    params:
        script=script("prepare_data.py"),
        out=lambda wildcards, output: os.path.dirname(output.subset),
        classes=lambda wildcards: " ".join(TENANTS[wildcards.tenant]["data"]["classes"]),
        sizes=lambda wildcards: (
            "--train-per-class {train_per_class} --val-per-class {val_per_class} "
            "--test-per-class {test_per_class} --image-size {image_size}"
        ).format(**TENANTS[wildcards.tenant]["data"])
        + f" --seed {TENANTS[wildcards.tenant]['seed']}",
        skip=lambda wildcards: (
            "--skip-unreadable"
            if TENANTS[wildcards.tenant]["data"]["skip_unreadable"]
            else ""
        ),


rule tenant_schedule:
    input:
        unpack(schedule_inputs),
    output:
        f"{SCHEDULE_ROUND}/assigned.json",
    log:
        "results/logs/schedules/{scheduler}/round{round}.log",
    wildcard_constraints:
        scheduler=one_of(config["tenants"]["schedulers"]),
        round=r"\d+",
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        **SMALL_RESOURCES,
    params:
        script=script("tenants.py"),
        slots=lambda wildcards: tenancy.slots(config, int(wildcards.round)),
        contexts=json.dumps(tenancy.contexts(config), sort_keys=True),
        settings=f"--seed {config['seed']} --delta {config['search']['delta']} "
        f"--threshold {config['tenants']['threshold']} --patience {config['tenants']['patience']}",
    shell:
        "python {params.script} schedule --scheduler {wildcards.scheduler} --round {wildcards.round} "
        "--slots {params.slots} {params.settings} --contexts {params.contexts:q} "
        "--assigned {input.assigned} --records {input.records} --out {output} 2>&1 | tee {log}"


use rule train as tenant_job with:
    input:
        unpack(tenant_job_inputs),
    output:
        model=f"{SCHEDULE_ROUND}/job{{slot}}.pt",
        record=f"{SCHEDULE_ROUND}/job{{slot}}.json",
    log:
        "results/logs/schedules/{scheduler}/round{round}/job{slot}.log",
    benchmark:
        "results/benchmarks/schedules/{scheduler}/round{round}/job{slot}.tsv"
    wildcard_constraints:
        scheduler=one_of(config["tenants"]["schedulers"]),
        round=r"\d+",
        slot=r"\d+",
    priority: 0
    params:
        script=script("tenants.py"),
        args=fixed_signature(tenant_job_args),
        run_id="{scheduler}-round{round}-job{slot}",


rule tenant_tables:
    input:
        unpack(tenant_table_inputs),
    output:
        table=report(TENANT_TABLE, category=SEARCHING),
        runs=[f"{TENANT_DIR.format(tenant=t)}/runs.csv" for t in TENANTS],
        summaries=[f"{TENANT_DIR.format(tenant=t)}/summary.md" for t in TENANTS],
        registries=[
            directory(f"{TENANT_DIR.format(tenant=t)}/registry") for t in TENANTS
        ],
    log:
        "results/logs/tenants/tables.log",
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        **SMALL_RESOURCES,
    params:
        script=script("tenants.py"),
        files=tenant_table_args,
        contexts=json.dumps(tenancy.contexts(config), sort_keys=True),
        schedulers=" ".join(config["tenants"]["schedulers"]),
        dirs=" ".join(f"{t}={TENANT_DIR.format(tenant=t)}" for t in TENANTS),
    shell:
        "python {params.script} tables --contexts {params.contexts:q} --schedulers {params.schedulers} "
        "{params.files} --tenant-dirs {params.dirs} --out {output.table} 2>&1 | tee {log}"


rule tenant_figure:
    input:
        TENANT_TABLE,
    output:
        report(TENANT_FIGURE, caption="../report/figure.rst", category=SEARCHING),
    log:
        "results/logs/figures/tenants.log",
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        **SMALL_RESOURCES,
    params:
        script=script("tenants.py"),
    shell:
        "python {params.script} figure --table {input} --out {output} 2>&1 | tee {log}"
