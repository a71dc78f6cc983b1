# Execution plans (tlselect.training.plan): every training job takes its plan from the study's copy
# in results/plans, else from the per-user cache, else measures it. `snakemake plan_recalibrate`
# measures this machine again on purpose and replaces the cache's plan; a study that has its copy
# keeps it (delete results/plans/<device>.json there to take the new one).
from tlselect.config import recalibration_flags


rule plan_recalibrate:
    input:
        **subset_files(),
    log:
        "results/logs/plan_recalibrate.log",
    conda:
        "../envs/torch.yaml"
    threads: config["threads"]
    resources:
        **TRAINING_RESOURCES,
    params:
        gpus=gpu_flags,
        script=script("calibrate.py"),
        args=f"{recalibration_flags(config)} {PLAN_FLAGS} --data {os.path.dirname(SUBSET)}",
        device=config["device"],
    shell:
        "python {params.script} {params.args} --run-id plan_recalibrate --device {params.device} "
        "{params.gpus} --threads {threads} 2>&1 | tee {log}"
