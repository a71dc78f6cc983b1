# Optimizations benchmark: each speedup measured as a ratio within one run (scripts/benchmark.py).


rule benchmark_optimizations:
    input:
        unpack(benchmark_inputs),
    output:
        "results/benchmarks/optimizations.json",
    log:
        "results/logs/benchmark_optimizations.log",
    conda:
        "../envs/torch.yaml"
    threads: config["threads"]
    resources:
        **TRAINING_RESOURCES | {"mem_mb": memory_mb(6000), "runtime": 60},
    params:
        script=script("benchmark.py"),
        args=benchmark_args,
        device=config["device"],
    shell:
        "python {params.script} {params.args} --out {output} --device {params.device} "
        "--threads {threads} --gpus {resources.gpu} 2>&1 | tee {log}"
