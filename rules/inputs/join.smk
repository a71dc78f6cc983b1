# The input and params functions and paths of rules/join.smk, included by it before its rules.
import json
import shlex

# The downstream models on the table beside the images (tlselect.runs.join_runs).
JOINS = runs.join_runs(config)
TABLE_SETTINGS = config["data"]["table"]
EXAMPLE_TABLE = "results/table/example.csv"
TABLE = TABLE_SETTINGS["path"] or EXAMPLE_TABLE
TABLE_COLUMNS = "results/table/columns.npz"
TABLE_REPORT = "results/table/report.json"


def join_inputs(wildcards):
    """The encoded columns, and the cached layer unless the run is columns-only."""
    spec = JOINS[wildcards.run_id]
    inputs = {"columns": TABLE_COLUMNS}
    return inputs | (
        {"features": feature_files(*spec.features)} if spec.features else {}
    )


def join_args(wildcards, input):
    spec = JOINS[wildcards.run_id]
    args = f"--settings {shlex.quote(json.dumps(spec.settings))}"
    if spec.features:
        args += f" --features {os.path.dirname(input.features[0])}"
    return args
