# Data: fetch the image folder (download or archive), materialize the seeded subset as tensors.


include: "inputs/data.smk"


localrules:
    fetch_data,
    fetch_weights,
    remove_stale_resume_files,
    remove_stale_kept_runs,


rule fetch_data:
    output:
        directory(DATA_ROOT),
    log:
        "results/logs/fetch_data.log",
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=memory_mb(1000),
        runtime=60,
    params:
        script=script("prepare_data.py"),
        archive=(
            f"--archive {config['data']['archive']}"
            if config["data"]["archive"]
            else ""
        ),
    shell:
        "python {params.script} fetch --dest {output} {params.archive} 2>&1 | tee {log}"


# With an archive, the decoding steps read it, not the unpacked folder: they restore the decoded
# subset from the per-user cache, or unpack it into a temporary folder of their own.
rule subset:
    input:
        IMAGES,
    output:
        **subset_files(),
    log:
        "results/logs/subset.log",
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=memory_mb(2000),
        runtime=30,
    params:
        script=script("prepare_data.py"),
        out=lambda wildcards, output: os.path.dirname(output.subset),
        classes=" ".join(config["data"]["classes"]),
        sizes=(
            f"--train-per-class {config['data']['train_per_class']} "
            f"--val-per-class {config['data']['val_per_class']} "
            f"--test-per-class {config['data']['test_per_class']} "
            f"--image-size {config['data']['image_size']} --seed {config['seed']}"
        ),
        skip="--skip-unreadable" if config["data"]["skip_unreadable"] else "",
        root=image_root,
        cache=SUBSET_CACHE_FLAGS,
    shell:
        "python {params.script} subset --root {params.root} --out {params.out} "
        "--classes {params.classes} {params.sizes} {params.skip} {params.cache} 2>&1 | tee {log}"


# ImageNet weights through torchvision's weights API, once, where Snakemake runs (with network);
# training jobs read the file, so they work on offline compute nodes. Offline, the error names
# the file to place (torchvision's own cache under $TORCH_HOME is used when it has it).
rule fetch_weights:
    output:
        IMAGENET_WEIGHTS,
    log:
        "results/logs/fetch_weights/{backbone}.log",
    wildcard_constraints:
        backbone=one_of(KNOWN_BACKBONES),
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=memory_mb(2000),
        runtime=30,
    params:
        script=script("prepare_data.py"),
        folder=(
            f"--folder {config['weights_folder']}" if config["weights_folder"] else ""
        ),
    shell:
        "python {params.script} weights --backbone {wildcards.backbone} {params.folder} --out {output} "
        "2>&1 | tee {log}"


# Housekeeping, run by name only: `snakemake remove_stale_resume_files` (same --config as the
# study) lists and removes the resume files of runs the config no longer has; nothing else.
rule remove_stale_resume_files:
    log:
        "results/logs/remove_stale_resume_files.log",
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        **SMALL_RESOURCES,
    params:
        script=script("housekeeping.py"),
        results="results",
        keep=lambda wildcards: " ".join(checkpoints()),
    shell:
        "python {params.script} --results {params.results} --keep {params.keep} 2>&1 | tee {log}"


# `snakemake remove_stale_kept_runs`: removes the files of results/cache/runs that no output shares
# any more (runs removed or trained again since their group kept them); run it when no study runs.
rule remove_stale_kept_runs:
    log:
        "results/logs/remove_stale_kept_runs.log",
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        **SMALL_RESOURCES,
    params:
        script=script("housekeeping.py"),
        kept=RUN_STORE,
    shell:
        "python {params.script} --results results --kept-runs {params.kept} 2>&1 | tee {log}"
