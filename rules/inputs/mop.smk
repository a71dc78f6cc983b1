# The input and params functions and paths of rules/mop.smk, included by it before its rules.
from tlselect.search import mop

MOP_PARTITIONS = [
    f"results/mop/partitions/p{k}.pt" for k in range(config["mop"]["partitions"])
]
MOP_STEP = "results/mop/{run_id}/s{step}"
# Each run's partition per sub-epoch (tlselect.search.mop.run_chains).
MOP_CHAINS = mop.run_chains(config, MOP_RUNS)
MOP_OUTPUTS = [
    MOP_STEP.format(run_id=r, step=s.settings["epochs"] - 1) + ".json"
    for r, s in MOP_RUNS.items()
]


def mop_step_inputs(wildcards):
    """A sub-epoch reads the subset's folder, its partition and the run's previous sub-epoch."""
    step = int(wildcards.step)
    inputs = run_inputs(MOP_RUNS[wildcards.run_id])
    inputs["partition"] = MOP_PARTITIONS[MOP_CHAINS[wildcards.run_id][step]]
    if step:
        inputs["previous"] = (
            MOP_STEP.format(run_id=wildcards.run_id, step=step - 1) + ".pt"
        )
    return inputs


def mop_step_args(wildcards, input):
    """Train one more sub-epoch, on the partition, continuing the previous one's state."""
    step = int(wildcards.step)
    spec = MOP_RUNS[wildcards.run_id]
    args = train_args(spec, input, epochs=step + 1, keep_state=True)
    args += f" --partition {input.partition}"
    return args + (f" --continue-from {input.previous}" if step else "")
