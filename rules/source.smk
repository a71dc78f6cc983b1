# Source model: pretrain the backbone on training images outside the target subset
# (the offline stand-in for ImageNet weights, used by init "source").


rule source_data:
    input:
        root=DATA_ROOT,
        subset="results/data/subset.json",
    output:
        expand("results/source/data/{split}.pt", split=["train", "val"]),
        subset="results/source/data/subset.json",
    log:
        "results/logs/source_data.log",
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=lambda wildcards, attempt: 2000 * attempt,
        runtime=30,
    params:
        script=script("prepare_data.py"),
        classes=" ".join(config["source"]["classes"]),
        sizes=(
            f"--train-per-class {config['source']['train_per_class']} "
            f"--val-per-class {config['source']['val_per_class']} "
            f"--image-size {config['data']['image_size']} --seed {config['seed']}"
        ),
    shell:
        "python {params.script} source --root {input.root} --subset {input.subset} "
        "--out results/source/data --classes {params.classes} {params.sizes} 2>&1 | tee {log}"


rule pretrain_source:
    input:
        expand("results/source/data/{split}.pt", split=["train", "val"]),
    output:
        model="results/source/{backbone}.pt",
        record="results/source/{backbone}.json",
    log:
        "results/logs/pretrain_source/{backbone}.log",
    benchmark:
        "results/benchmarks/pretrain_source/{backbone}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: config["threads"]
    resources:
        gpu=GPU,
        mem_mb=lambda wildcards, attempt: 4000 * attempt,
        runtime=120,
    params:
        script=script("train.py"),
        flags=lambda wildcards: train_flags(source_settings(config, wildcards.backbone)),
        device=config["device"],
    shell:
        "python {params.script} {params.flags} --data results/source/data --out {output.model} "
        "--record {output.record} --run-id source-{wildcards.backbone} --policy source "
        "--device {params.device} --gpus {resources.gpu} --threads {threads} 2>&1 | tee {log}"
