# The input and params functions and paths of rules/tenants.smk, included by it before its rules.
import functools
import json

TENANT_DIR = "results/tenants/{tenant}"
SCHEDULE_ROUND = "results/schedules/{scheduler}/round{round}"
TENANT_TABLE = "results/tables/tenants.csv"
TENANT_FIGURE = "results/figures/tenants.png"


def tenant_subset(tenant):
    return f"{TENANT_DIR.format(tenant=tenant)}/data/subset.json"


def schedule_jobs(scheduler, rounds=None):
    """``(assignment file, [job records])`` of a scheduler's first ``rounds`` rounds."""
    last = tenancy.rounds(config) if rounds is None else rounds
    out = []
    for r in range(last):
        path = SCHEDULE_ROUND.format(scheduler=scheduler, round=r)
        out.append(
            (
                f"{path}/assigned.json",
                [f"{path}/job{s}.json" for s in range(tenancy.slots(config, r))],
            )
        )
    return out


def schedule_inputs(wildcards):
    """The earlier rounds' assignment files and job records (every tenant's history so far)."""
    earlier = schedule_jobs(wildcards.scheduler, int(wildcards.round))
    return {
        "assigned": [assigned for assigned, _ in earlier],
        "records": [record for _, records in earlier for record in records],
    }


@functools.cache
def tenant_weights():
    """``(init, backbone, weights file)`` of every pretrained init and backbone of any tenant's pool."""
    pairs = {
        settings.weights_of(settings.resolve_init(c, i), b)
        for c in TENANTS.values()
        for b in c["search"]["backbones"]
        for i in c["search"]["inits"]
    }
    return sorted((*pair, weights_file(*pair)) for pair in pairs if pair)


@fixed_signature
def tenant_job_inputs(wildcards):
    """The round's assignment file, every tenant's decoded subset and every weights file a job may load."""
    return {
        "assigned": f"{SCHEDULE_ROUND.format(**wildcards)}/assigned.json",
        "subset": [tenant_subset(t) for t in TENANTS],
        "data": [
            f"{TENANT_DIR.format(tenant=t)}/data/{split}.pt"
            for t in TENANTS
            for split in SPLITS
        ],
        "weights": [path for *_, path in tenant_weights()],
    }


def tenant_job_args(wildcards, input):
    folders = " ".join(f"{t}={os.path.dirname(tenant_subset(t))}" for t in TENANTS)
    weights = " ".join(f"--init-weights {i} {b} {p}" for i, b, p in tenant_weights())
    return (
        f"job --assigned {input.assigned} --slot {wildcards.slot} --tenant-data {folders} "
        f"{weights} {PLAN_FLAGS}"
    )


def tenant_table_inputs(wildcards):
    jobs = {s: schedule_jobs(s) for s in config["tenants"]["schedulers"]}
    return {
        "assigned": [a for pairs in jobs.values() for a, _ in pairs],
        "records": [r for pairs in jobs.values() for _, rs in pairs for r in rs],
    }


def tenant_table_args(wildcards):
    """Each scheduler's files as SCHEDULER=FILE, in round and slot order."""
    args = []
    for s in config["tenants"]["schedulers"]:
        pairs = schedule_jobs(s)
        args.append("--assigned " + " ".join(f"{s}={a}" for a, _ in pairs))
        args.append("--records " + " ".join(f"{s}={r}" for _, rs in pairs for r in rs))
    return " ".join(args)
