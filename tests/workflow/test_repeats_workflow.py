"""Repeats and k-fold validation in the workflow: the tiny study with two seeds, then with two folds;
runs.csv holds a row per seed or fold, a mean row per configuration, and (folds) the refit."""

import json
from collections import Counter

import pandas as pd
import pytest
import yaml
from helpers import make_study, snakemake

POLICIES = [{"name": "fast", "init": "scratch", "freeze": "none"}, {"name": "slow", "init": "scratch",
            "freeze": "none", "lr": 0.001}]  # fmt: skip
TARGETS = ["results/tables/runs.csv", "results/figures/validation_curves.png", "results/figures/accuracy_by_policy.png"]


def run_study(workdir, archive, *more, **blocks) -> pd.DataFrame:
    make_study(workdir, archive, POLICIES, epochs=1)
    study = yaml.safe_load((workdir / "tiny.yaml").read_text())
    (workdir / "tiny.yaml").write_text(yaml.safe_dump({**study, **blocks}))
    snakemake(workdir, *TARGETS, *more)
    for figure in TARGETS[1:]:
        assert (workdir / figure).read_bytes()[:4] == b"\x89PNG"
    return pd.read_csv(workdir / "results/tables/runs.csv")


def test_two_seeds_give_a_row_per_seed_and_a_mean_per_policy(tmp_path, tiny_archive):
    runs = run_study(tmp_path / "study", tiny_archive, repeats=2)
    assert Counter(runs["row"]) == {"run": 4, "mean": 2}
    for _, rows in runs[runs["row"] == "run"].groupby("name"):
        assert sorted(rows["seed"]) == [0, 1] and rows["run_id"].str.contains("-seed1-").sum() == 1
    means = runs[runs["row"] == "mean"].set_index("name")
    for name in ("fast", "slow"):
        seeds = runs[(runs["row"] == "run") & (runs["name"] == name)]
        assert means.loc[name, "val_accuracy"] == pytest.approx(seeds["val_accuracy"].mean())
        assert means.loc[name, "val_low"] <= means.loc[name, "val_accuracy"] <= means.loc[name, "val_high"]
    assert runs["selected"].sum() == 1 and runs.loc[runs["selected"], "row"].item() == "mean"
    assert means["p_best"].sum() == pytest.approx(1)


def test_two_folds_give_a_row_per_fold_a_mean_and_the_refit(tmp_path, tiny_archive):
    runs = run_study(tmp_path / "study", tiny_archive, "results/report/solution.html", validation={"folds": 2})
    assert Counter(runs["row"]) == {"run": 4, "mean": 2, "refit": 1}
    folds = runs[runs["row"] == "run"]
    assert sorted(folds["fold"]) == [1, 1, 2, 2] and (folds["val_images"] * 2 == folds["val_images"].sum() / 2).all()
    selected = runs.loc[runs["selected"]].iloc[0]
    refit = runs[runs["row"] == "refit"].iloc[0]
    assert refit["name"] == selected["name"] and pd.isna(refit["val_accuracy"]) and 0 <= refit["test_accuracy"] <= 1
    assert refit["train_images"] == folds["train_images"].iloc[0] + folds["val_images"].iloc[0]  # every fold
    assert "**Refit**" in (tmp_path / "study/results/tables/summary.md").read_text()
    notebook = json.loads((tmp_path / "study/results/report/solution.ipynb").read_text())
    outputs = "".join(json.dumps(cell.get("outputs", [])) for cell in notebook["cells"])
    assert "1 seed x 2 folds" in outputs and "refit of" in outputs and "Error" not in outputs
