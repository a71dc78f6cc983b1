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
        gpu=GPU,
        mem_mb=lambda wildcards, attempt: 6000 * attempt,
        runtime=60,
    params:
        script=script("benchmark.py"),
        flags=benchmark_flags,
    shell:
        "python {params.script} --data results/data --out {output} {params.flags} "
        "--threads {threads} --gpus {resources.gpu} 2>&1 | tee {log}"
