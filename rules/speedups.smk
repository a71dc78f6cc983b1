# Optimizations benchmark: each speedup measured as a ratio within one run (scripts/speedups.py).


include: "inputs/speedups.smk"


rule speedups:
    input:
        unpack(speedups_inputs),
    output:
        "results/speedups/optimizations.json",
    log:
        "results/logs/speedups.log",
    conda:
        "../envs/torch.yaml"
    threads: config["threads"]
    resources:
        **TRAINING_RESOURCES | {"mem_mb": memory_mb(6000), "runtime": 60},
    params:
        script=script("speedups.py"),
        args=speedups_args,
        device=config["device"],
    shell:
        "python {params.script} {params.args} --out {output} --device {params.device} "
        "--threads {threads} --gpus {resources.gpu} 2>&1 | tee {log}"
