"""The table beside the images in the workflow: the tiny study with the generated example table
runs its join, features-only and columns-only runs into the registry, the runs table and the
figure; a user's table with problems stops the workflow before any job runs."""

import csv
import json

import pandas as pd
import pytest
from helpers import snakemake, tiny_study, write_study

JOIN = {"models": {"logistic": {"max_iter": 100}, "boosting": {"max_iter": 10}}}


def join_study(archive, **table):
    return tiny_study(
        archive,
        device="cpu",
        pretrained="scratch",
        policies=[{"name": "scratch", "init": "scratch"}],
        features={"layers": ["layer1", "layer2"], "inits": ["scratch"], "probe": {"epochs": 1}},
        join={**JOIN, "inits": ["scratch"]},
        speedups={"enabled": False},
        search={"enabled": False},
    ) | {"data": {**tiny_study(archive)["data"], "table": table}}


@pytest.fixture(scope="module")
def joined(tmp_path_factory, tiny_archive):
    workdir = tmp_path_factory.mktemp("join")
    write_study(workdir, join_study(tiny_archive, example=True, missing="impute"))
    snakemake(workdir, "results/tables/runs.csv", "results/figures/join_by_layer.png")
    return workdir


def test_the_example_table_joins_every_layer_into_the_registry_and_the_runs_table(joined):
    runs = pd.read_csv(joined / "results/tables/runs.csv")
    joins = runs[runs["kind"] == "join"]
    expected = {f"{inputs}_{model}_{layer}" for inputs in ("join", "features") for model in ("logistic", "boosting")
                for layer in ("layer1", "layer2")} | {"columns_logistic", "columns_boosting"}  # fmt: skip
    assert set(joins["name"]) == expected
    assert (joins["status"] == "completed").all() and joins["test_accuracy"].between(0, 1).all()
    for run_id in joins["run_id"]:
        record = json.loads((joined / f"results/registry/{run_id}.json").read_text())
        assert record["join"]["plan"]["chose"] == "in_memory"
    report = json.loads((joined / "results/table/report.json").read_text())
    assert report["types"] == {"site": "categorical", "weight": "numeric", "noise": "numeric", "batch": "categorical"}
    assert report["splits"]["train"] == {"images": 18, "kept": 18, "without_row": 0, "dropped_missing": 0}
    assert (joined / "results/figures/join_by_layer.png").stat().st_size > 0


def test_a_table_with_missing_rows_stops_the_workflow_before_any_job(tmp_path, tiny_archive, joined):
    rows = list(csv.reader((joined / "results/table/example.csv").open()))
    with (tmp_path / "table.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows[:-2])  # the last two images lose their rows
    write_study(tmp_path, join_study(tiny_archive, path=str(tmp_path / "table.csv"), missing="impute"))
    result = snakemake(tmp_path, "-n", check=False, timeout=120)
    assert result.returncode != 0
    assert "2 image(s) of the study's classes have no row" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()
