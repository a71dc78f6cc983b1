# The table beside the images (data.table) and scikit-learn models on its join with each cached
# layer's features, on the layer alone and on the columns alone (tlselect.training.join).


include: "inputs/join.smk"


rule example_table:
    input:
        DATA_ROOT,
    output:
        EXAMPLE_TABLE,
    log:
        "results/logs/example_table.log",
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        **SMALL_RESOURCES,
    params:
        script=script("join.py"),
        seed=config["seed"],
    shell:
        "python {params.script} example --root {input} --out {output} --seed {params.seed} 2>&1 | tee {log}"


rule join_table:
    input:
        table=TABLE,
        subset=SUBSET,
    output:
        columns=TABLE_COLUMNS,
        report=TABLE_REPORT,
    log:
        "results/logs/join_table.log",
    priority: STUDY_FIRST
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        **SMALL_RESOURCES,
    params:
        script=script("join.py"),
        settings=shlex.quote(json.dumps(TABLE_SETTINGS)),
    shell:
        "python {params.script} table --table {input.table} --subset {input.subset} "
        "--settings {params.settings} --columns {output.columns} --report {output.report} 2>&1 | tee {log}"


rule join_model:
    input:
        unpack(join_inputs),
    output:
        record="results/registry/{run_id}.json",
    log:
        "results/logs/join/{run_id}.log",
    benchmark:
        "results/benchmarks/join/{run_id}.tsv"
    wildcard_constraints:
        run_id=one_of(JOINS),
    priority: STUDY_FIRST
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=memory_mb(int(config["features"]["memory_mb"]) + 1500),
        runtime=30,
    params:
        script=script("join.py"),
        args=join_args,
        run_id="{run_id}",
    shell:
        "python {params.script} fit {params.args} --columns {input.columns} "
        "--record {output.record} --run-id {params.run_id} --threads {threads} 2>&1 | tee {log}"
