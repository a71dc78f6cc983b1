# Training: one job per run. Rule `train` (the policies) is the shape of every training job;
# probes, the source pretraining and the search's jobs reuse it with their own files and flags.
# With run_groups.size > 1, policies of one shape train in one job per group (rules/groups.smk).


include: "inputs/train.smk"


rule train:
    input:
        unpack(spec_inputs(RUNS, "run_id")),
    output:
        model="results/models/{run_id}.pt",
        record="results/registry/{run_id}.json",
    log:
        "results/logs/train/{run_id}.log",
    benchmark:
        "results/benchmarks/train/{run_id}.tsv"
    wildcard_constraints:
        run_id=one_of(sorted(set(RUNS) - grouped(RUN_GROUPS))),
    priority: STUDY_FIRST
    conda:
        "../envs/torch.yaml"
    threads: config["threads"]
    resources:
        **TRAINING_RESOURCES,
    params:
        gpus=gpu_flags,
        script=script("train.py"),
        args=spec_args(RUNS, "run_id"),
        run_id="{run_id}",
        device=config["device"],
    shell:
        "python {params.script} {params.args} --out {output.model} --record {output.record} "
        "--run-id {params.run_id} --device {params.device} {params.gpus} "
        "--threads {threads} 2>&1 | tee {log}"


use rule train as probe with:
    input:
        unpack(spec_inputs(PROBES, "run_id")),
    log:
        "results/logs/probe/{run_id}.log",
    benchmark:
        "results/benchmarks/probe/{run_id}.tsv"
    wildcard_constraints:
        run_id=one_of(PROBES),
    resources:
        **TRAINING_RESOURCES | {"mem_mb": memory_mb(2000), "runtime": 30},
    params:
        args=spec_args(PROBES, "run_id"),


use rule train as refit with:
    input:
        unpack(refit_inputs),
    output:
        model="results/refit/seed{seed}.pt",
        record="results/refit/seed{seed}.json",
    log:
        "results/logs/refit/seed{seed}.log",
    benchmark:
        "results/benchmarks/refit/seed{seed}.tsv"
    wildcard_constraints:
        seed=one_of(REFIT_SEEDS),
    params:
        script=script("refit.py"),
        args=refit_args,
        run_id="refit-seed{seed}",
