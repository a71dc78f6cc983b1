# Per-layer feature cache (each layer from the previous one) and linear probes on it.


rule extract_features:
    input:
        unpack(feature_inputs),
    output:
        expand(
            "results/features/{{backbone}}/{{init}}/{{layer}}/{split}.npy",
            split=SPLITS,
        ),
    log:
        "results/logs/extract_features/{backbone}/{init}/{layer}.log",
    benchmark:
        "results/benchmarks/extract_features/{backbone}/{init}/{layer}.tsv"
    wildcard_constraints:
        backbone=one_of(FEATURE_CHAINS),
        init=one_of(FEATURE_INITS),
        layer=one_of(sorted({s for chain in FEATURE_CHAINS.values() for s in chain})),
    conda:
        "../envs/torch.yaml"
    threads: config["threads"]
    resources:
        gpu=GPU,
        mem_mb=lambda wildcards, attempt: 2000 * attempt,
        runtime=60,
    params:
        script=script("extract_features.py"),
        flags=feature_flags,
        source=source_checkpoint_flag,
        settings=(
            f"--resolution {config['resolution']} --seed {config['seed']} "
            f"--dtype {config['features']['dtype']} "
            f"--memory-mb {config['features']['memory_mb']} --device {config['device']}"
        ),
    shell:
        "python {params.script} --backbone {wildcards.backbone} --layer {wildcards.layer} "
        "--out-dir results/features/{wildcards.backbone}/{wildcards.init} {params.flags} "
        "{params.source} {params.settings} --gpus {resources.gpu} --threads {threads} 2>&1 | tee {log}"


rule probe:
    input:
        unpack(probe_inputs),
    output:
        model="results/models/{run_id}.pt",
        record="results/registry/{run_id}.json",
    log:
        "results/logs/probe/{run_id}.log",
    benchmark:
        "results/benchmarks/probe/{run_id}.tsv"
    wildcard_constraints:
        run_id=one_of(PROBES),
    conda:
        "../envs/torch.yaml"
    threads: config["threads"]
    resources:
        gpu=GPU,
        mem_mb=lambda wildcards, attempt: 2000 * attempt,
        runtime=30,
    params:
        script=script("train.py"),
        flags=probe_flags,
        device=config["device"],
    shell:
        "python {params.script} {params.flags} --data results/data --out {output.model} "
        "--record {output.record} --run-id {wildcards.run_id} --device {params.device} "
        "--gpus {resources.gpu} --threads {threads} 2>&1 | tee {log}"
