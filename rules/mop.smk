# Model hopper parallelism (Cerebro; tlselect.search.mop): the training images split into partition files,
# and each `mop.policies` run a chain of sub-epoch jobs. Sub-epoch s of a run trains one more
# sub-epoch on the partition its schedule names, continuing sub-epoch s-1's checkpoint, so a job
# reads only its partition (plus validation and test). Every partition once per epoch.


include: "inputs/mop.smk"


rule mop_partitions:
    input:
        "results/data/train.pt",
    output:
        MOP_PARTITIONS,
    log:
        "results/logs/mop/partitions.log",
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        **SMALL_RESOURCES,
    params:
        script=script("prepare_data.py"),
        seed=config["seed"],
    shell:
        "python {params.script} partition --split {input} --out {output} --seed {params.seed} "
        "2>&1 | tee {log}"


use rule train as mop_sub_epoch with:
    input:
        unpack(mop_step_inputs),
    output:
        model=f"{MOP_STEP}.pt",
        record=f"{MOP_STEP}.json",
    log:
        "results/logs/mop/{run_id}/s{step}.log",
    benchmark:
        "results/benchmarks/mop/{run_id}/s{step}.tsv"
    wildcard_constraints:
        run_id=one_of(MOP_RUNS),
        step=r"\d+",
    priority: 0
    params:
        args=mop_step_args,
        run_id="{run_id}",
