# Source model: pretrain the backbone on training images outside the target subset
# (the offline stand-in for ImageNet weights, used by init "source").


rule source_data:
    input:
        root=IMAGES,
        subset=SUBSET,
    output:
        **subset_files(SOURCE_SUBSET, ["train", "val"]),
    log:
        "results/logs/source_data.log",
    priority: STUDY_FIRST
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=memory_mb(2000),
        runtime=30,
    params:
        script=script("prepare_data.py"),
        out=lambda wildcards, output: os.path.dirname(output.subset),
        classes=" ".join(config["source"]["classes"]),
        sizes=(
            f"--train-per-class {config['source']['train_per_class']} "
            f"--val-per-class {config['source']['val_per_class']} "
            f"--image-size {config['data']['image_size']} --seed {config['seed']}"
        ),
        root=image_root,
        cache=SUBSET_CACHE_FLAGS,
    shell:
        "python {params.script} source --root {params.root} --subset {input.subset} "
        "--out {params.out} --classes {params.classes} {params.sizes} {params.cache} 2>&1 | tee {log}"


use rule train as pretrain_source with:
    input:
        **subset_files(SOURCE_SUBSET, ["train", "val"]),
    output:
        model="results/source/{backbone}.pt",
        record="results/source/{backbone}.json",
    log:
        "results/logs/pretrain_source/{backbone}.log",
    benchmark:
        "results/benchmarks/pretrain_source/{backbone}.tsv"
    wildcard_constraints:
        backbone=one_of(KNOWN_BACKBONES),
    params:
        args=lambda wildcards, input: train_args(
            runs.source_run(config, wildcards.backbone), input
        ),
        run_id="source-{backbone}",
