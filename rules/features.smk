# Per-layer feature cache: each layer's activations from the previous layer's (probes: train.smk).


include: "inputs/features.smk"


rule extract_features:
    input:
        unpack(feature_inputs),
    output:
        feature_files("{backbone}", "{init}", "{layer}"),
    log:
        "results/logs/extract_features/{backbone}/{init}/{layer}.log",
    benchmark:
        "results/benchmarks/extract_features/{backbone}/{init}/{layer}.tsv"
    wildcard_constraints:
        backbone=one_of(FEATURE_CHAINS),
        init=one_of(FEATURE_INITS),
        layer=one_of(runs.cached_stages(FEATURE_CHAINS)),
    priority: STUDY_FIRST
    conda:
        "../envs/torch.yaml"
    threads: config["threads"]
    resources:
        **TRAINING_RESOURCES | {"mem_mb": memory_mb(2000), "runtime": 60},
    params:
        gpus=gpu_flags,
        script=script("extract_features.py"),
        args=feature_args,
        out=lambda wildcards, output: os.path.dirname(output[0]),
        settings=(
            f"--resolution {config['resolution']} --seed {config['seed']} "
            f"--dtype {config['features']['dtype']} "
            f"--memory-mb {config['features']['memory_mb']} --device {config['device']}"
        ),
    shell:
        "python {params.script} --backbone {wildcards.backbone} --layer {wildcards.layer} "
        "--out {params.out} {params.args} {params.settings} {params.gpus} "
        "--threads {threads} 2>&1 | tee {log}"
