# The input and params functions and paths of rules/report.smk, included by it before its rules.
from tlselect.config import uses_source

STUDY_FIGURES = [
    "accuracy_vs_time",
    "accuracy_by_policy",
    "validation_curves",
    "accuracy_by_layer",
] + (["join_by_layer"] if JOINS else [])
FIGURES = STUDY_FIGURES + (["speedups"] if SPEEDUPS else [])
REPORTS = ["solution"] + (["study"] if SEARCH or SPEEDUPS else [])
OPTIMIZATIONS = "results/tables/optimizations.csv"
FIGURE_QUESTIONS = {
    "accuracy_vs_time": PICK,
    "accuracy_by_policy": PICK,
    "validation_curves": TRAINING,
    "accuracy_by_layer": LAYERS,
    "join_by_layer": LAYERS,
    "speedups": SPEED,
}


def study_records():
    """Registry records of every policy and probe, the source model's when one is used, and the refits' with folds."""
    records = {
        "records": [
            f"results/registry/{run_id}.json"
            for run_id in sorted([*RUNS, *PROBES, *JOINS])
        ]
    }
    if uses_source(config):
        records["source"] = source_model(config["backbone"]).replace(".pt", ".json")
    if REFITS:
        records["refits"] = REFITS
    return records


def figure_inputs(wildcards):
    inputs = {"runs": "results/tables/runs.csv", "curves": "results/tables/curves.csv"}
    return inputs | (
        {"optimizations": OPTIMIZATIONS} if wildcards.figure == "speedups" else {}
    )


def notebook_inputs(wildcards):
    """The study's tables and figures; the solution notebook adds the benchmark's and the search's."""
    full = wildcards.report == "solution"
    inputs = {
        "notebook": f"{workflow.basedir}/notebooks/solution.ipynb",
        "runs": "results/tables/runs.csv",
        "curves": "results/tables/curves.csv",
        "plans": "results/tables/plans.csv",
        "figures": [
            f"results/figures/{f}.png" for f in (FIGURES if full else STUDY_FIGURES)
        ],
    }
    if full and SPEEDUPS:
        inputs["optimizations"] = OPTIMIZATIONS
    if full and TENANTS:  # rules/tenants.smk
        inputs["tenants"] = TENANT_TABLE
        inputs["figures"].append(TENANT_FIGURE)
    return inputs | ((SEARCH_OUTPUTS | BENCHMARK_OUTPUTS) if full else {})
