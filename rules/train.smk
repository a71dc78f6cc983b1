# Training: one job per policy run; each writes a checkpoint and a registry record.


rule train:
    input:
        unpack(run_inputs),
    output:
        model="results/models/{run_id}.pt",
        record="results/registry/{run_id}.json",
    log:
        "results/logs/train/{run_id}.log",
    benchmark:
        "results/benchmarks/train/{run_id}.tsv"
    wildcard_constraints:
        run_id=one_of(RUNS),
    conda:
        "../envs/torch.yaml"
    threads: config["threads"]
    resources:
        gpu=GPU,
        mem_mb=lambda wildcards, attempt: 4000 * attempt,
        runtime=120,
    params:
        script=script("train.py"),
        flags=run_flags,
        source=source_checkpoint_flag,
        device=config["device"],
    shell:
        "python {params.script} {params.flags} {params.source} --data results/data "
        "--out {output.model} --record {output.record} --run-id {wildcards.run_id} "
        "--device {params.device} --gpus {resources.gpu} --threads {threads} 2>&1 | tee {log}"
