# The input and params functions and paths of rules/search.smk, included by it before its rules.
import functools
import json

RUNG = "results/search/{method}/b{bracket}/rung{rung}"
ROUND = "results/search/{method}/round{round}"


def rung_slots(method, bracket, rung, suffix=".json"):
    """Record (or checkpoint, benchmark) paths of every slot of one rung."""
    keep = BRACKETS[method][int(bracket)].keep[int(rung)]
    path = RUNG.format(method=method, bracket=bracket, rung=rung)
    return [f"{path}/slot{slot}{suffix}" for slot in range(keep)]


# Rung 0 of every bracket, ``{"<method>/b<bracket>/rung0/slot<slot>": spec}`` (its candidate's spec
# with the rung's epochs): known when the Snakefile is parsed, so its slots train in run groups;
# with run groups on, every slot is a group's (a slot of a shape of its own: a group of one).
FIRST_RUNG = {
    f"{method}/b{b}/rung0/slot{slot}": runs.RunSpec(
        f"{method}-b{b}-rung0-slot{slot}",
        {**POOL[c].settings, "epochs": bracket.epochs[0], "keep_state": True},
        weights=POOL[c].weights,
    )
    for method, method_brackets in BRACKETS.items()
    for b, bracket in enumerate(method_brackets)
    for slot, c in enumerate(bracket.candidates)
}
FIRST_RUNG_GROUPS = runs.run_groups(FIRST_RUNG, GROUP_SIZE)
if FIRST_RUNG_GROUPS:
    FIRST_RUNG_GROUPS |= {
        re.sub(r"\W+", "_", slot): [slot]
        for slot in sorted(set(FIRST_RUNG) - grouped(FIRST_RUNG_GROUPS))
    }
# The later rungs' slots, ``{group: (method, bracket, rung, slots)}``: which candidate a slot holds
# is decided at run time, so with run groups on each rung's slots are cut into groups in slot order
# (the group job fuses those of one shape).
NEXT_RUNG_GROUPS = {
    f"{method}_b{b}_rung{rung}_slot{start}": (
        method,
        b,
        rung,
        list(range(start, min(start + GROUP_SIZE, bracket.keep[rung]))),
    )
    for method, method_brackets in BRACKETS.items()
    for b, bracket in enumerate(method_brackets)
    for rung in range(1, bracket.rungs)
    for start in range(0, bracket.keep[rung], GROUP_SIZE)
    if GROUP_SIZE > 1
}
# A model-based method's round trials: which candidate a trial holds is decided at run time by the
# round's suggest job, so with run groups on each round's trials are cut into groups in slot order
# (``{group: (method, round, slots)}``; the group job fuses those of one shape).
TRIALS_PER_ROUND = config["search"]["q"] * config["repeats"]
TRIAL_GROUPS = {
    f"{method}_round{r}_slot{start}": (
        method,
        r,
        list(range(start, min(start + GROUP_SIZE, TRIALS_PER_ROUND))),
    )
    for method in (brackets.MODEL_BASED if SEARCH else ())
    for r in range(config["search"]["rounds"])
    for start in range(0, TRIALS_PER_ROUND, GROUP_SIZE)
    if GROUP_SIZE > 1
}
# Each grouped slot ("<method>/b<bracket>/rung<rung>/slot<slot>", "<method>/round<round>/trial<slot>")
# and its group job's benchmark file.
SLOT_BENCHMARKS = {
    **{
        m: group_benchmark("search/first_rung", group)
        for group, members in FIRST_RUNG_GROUPS.items()
        for m in members
    },
    **{
        f"{method}/b{b}/rung{rung}/slot{slot}": group_benchmark(
            "search/next_rung", group
        )
        for group, (method, b, rung, slots) in NEXT_RUNG_GROUPS.items()
        for slot in slots
    },
    **{
        f"{method}/round{r}/trial{slot}": group_benchmark("search/trial", group)
        for group, (method, r, slots) in TRIAL_GROUPS.items()
        for slot in slots
    },
}


def search_jobs(method, last_only=False):
    """``(record, benchmark file)`` of every job of a method (or only its brackets' last rungs); a
    slot trained in a run group names its group's benchmark file."""
    return [
        (
            record,
            SLOT_BENCHMARKS.get(
                record.removeprefix("results/search/")[:-5],
                "results/benchmarks/"
                + record.removeprefix("results/").replace(".json", ".tsv"),
            ),
        )
        for b, bracket in enumerate(BRACKETS[method])
        for r in range(bracket.rungs)
        if not last_only or r == bracket.rungs - 1
        for record in rung_slots(method, b, r)
    ]


# The grid's candidates and random search's draws (both known at parse time) trained by one job
# per group (tlselect.runs.run_groups), and each one's group.
GRID_GROUPS = runs.run_groups(POOL, GROUP_SIZE)
RANDOM_GROUPS = runs.run_groups(RANDOM, GROUP_SIZE)
GROUP_OF = {
    method: {m: group for group, members in groups.items() for m in members}
    for method, groups in (("grid", GRID_GROUPS), ("random", RANDOM_GROUPS))
}


def grid_jobs(method="grid"):
    """``(record, benchmark file)`` of the grid's runs, or random search's (``method="random"``);
    a grouped run names its group's benchmark file."""
    candidates = sorted(POOL) if method == "grid" else list(RANDOM)
    groups = GROUP_OF[method]
    return [
        (
            f"results/search/{method}/{c}.json",
            (
                group_benchmark(f"search/{method}", groups[c])
                if c in groups
                else f"results/benchmarks/search/{method}/{c}.tsv"
            ),
        )
        for c in candidates
    ]


def round_jobs(method, rounds=None):
    """``(record, benchmark file)`` of every trial of a model-based method's first ``rounds`` rounds
    (q configurations a round, each once per seed of ``repeats``)."""
    return [
        (
            f"{ROUND.format(method=method, round=r)}/trial{slot}.json",
            SLOT_BENCHMARKS.get(
                f"{method}/round{r}/trial{slot}",
                f"results/benchmarks/search/{method}/round{r}/trial{slot}.tsv",
            ),
        )
        for r in range(config["search"]["rounds"] if rounds is None else rounds)
        for slot in range(TRIALS_PER_ROUND)
    ]


def suggest_inputs(wildcards):
    """The earlier rounds' suggestion files and trial records (a few per round, not the pool)."""
    earlier = int(wildcards.round)
    return {
        "suggested": [
            f"{ROUND.format(method=wildcards.method, round=r)}/suggested.json"
            for r in range(earlier)
        ],
        "records": [record for record, _ in round_jobs(wildcards.method, earlier)],
    }


@functools.cache
def space_weights():
    """``(init, backbone, weights file)`` of every pretrained init and backbone of the search space."""
    inits = {settings.resolve_init(config, i) for i in config["search"]["inits"]}
    pairs = {
        settings.weights_of(i, b) for b in config["search"]["backbones"] for i in inits
    }
    return sorted((*pair, weights_file(*pair)) for pair in pairs if pair)


def trial_files(method, round):
    """What a round's trials read: its suggestion file, the data and every weights file a
    suggestion may start from."""
    return {
        "suggested": f"{ROUND.format(method=method, round=round)}/suggested.json",
        **subset_files(),
        "weights": [path for *_, path in space_weights()],
    }


trial_inputs = fixed_signature(
    lambda wildcards: trial_files(wildcards.method, wildcards.round)
)


def trial_command(suggested):
    """scripts/search.py's trial command for a round's suggestion file (its slots and files follow)."""
    weights = " ".join(
        f"--init-weights {i} {b} {path}" for i, b, path in space_weights()
    )
    return f"trial --suggested {suggested} {PLAN_FLAGS} --data {os.path.dirname(SUBSET)} {weights}"


def first_rung_candidate(wildcards):
    return POOL[
        BRACKETS[wildcards.method][int(wildcards.bracket)].candidates[
            int(wildcards.slot)
        ]
    ]


@functools.cache
def bracket_weights(method, bracket):
    """The weights files any candidate of a bracket may start from (computed once per bracket)."""
    weights = {POOL[c].weights for c in BRACKETS[method][int(bracket)].candidates}
    return sorted(weights_file(*w) for w in weights if w)


def previous_ranking(wildcards):
    """The ranking file of the rung before this one."""
    rung = int(wildcards.rung) - 1
    return f"{RUNG.format(method=wildcards.method, bracket=wildcards.bracket, rung=rung)}/ranking.json"


def next_rung_files(method, bracket, rung):
    """What a later rung's slots read: the promotion file, the data and the weights files the
    candidates may start from. Which checkpoint a slot continues is decided at run time: the
    promote job declares the previous rung's records and checkpoints and names one in the
    promotion file, so each slot job has a few inputs, not the whole previous rung (which would
    make the DAG quadratic in the pool).
    """
    return {
        "promoted": f"{RUNG.format(method=method, bracket=bracket, rung=rung)}/promoted.json",
        **subset_files(),
        "weights": bracket_weights(method, bracket),
    }


next_rung_inputs = fixed_signature(
    lambda wildcards: next_rung_files(
        wildcards.method, wildcards.bracket, wildcards.rung
    )
)


def compare_inputs(wildcards):
    """Every search job's record and Snakemake benchmark file (its wall time), per method."""
    jobs = {
        "grid": grid_jobs(),
        "random": grid_jobs("random"),
        "sh": search_jobs("sh"),
        "hb": search_jobs("hb"),
        **{method: round_jobs(method) for method in brackets.MODEL_BASED},
    }
    inputs = {name: [record for record, _ in pairs] for name, pairs in jobs.items()}
    for name, pairs in jobs.items():
        inputs[f"{name}_benchmarks"] = [bench for _, bench in pairs]
    for name in ("sh", "hb"):
        inputs[f"{name}_final"] = [r for r, _ in search_jobs(name, last_only=True)]
    return inputs


def shift_arms():
    """``(backbone, init, weights file or "")`` of every model SHiFT's successive halving searches."""
    inits = [settings.resolve_init(config, i) for i in config["search"]["inits"]]
    return [
        (
            b,
            i,
            (
                weights_file(*settings.weights_of(i, b))
                if settings.weights_of(i, b)
                else ""
            ),
        )
        for b in config["search"]["backbones"]
        for i in dict.fromkeys(inits)
    ]


def shift_inputs(wildcards):
    return {
        "weights": sorted({w for _, _, w in shift_arms() if w}),
        "grid": [record for record, _ in grid_jobs()],
        **subset_files(splits=["train", "val"]),
    }


def proxy_inputs(wildcards):
    return {
        "features": [
            path
            for backbone, init, layer in runs.proxy_layers(config)
            for path in feature_files(backbone, init, layer, ["train", "val"])
        ],
        "grid": [record for record, _ in grid_jobs()],
        **subset_files(),
    }
