"""The model search with two seeds per candidate: snakemake on a tiny pool of two configurations; every
method trains each candidate with both seeds, successive halving promotes on the mean over them,
search.csv gives the chosen configuration's mean with its interval, the replay reads the means, and
the proxies compare with the best configuration's mean."""

import json
from collections import Counter
from statistics import mean

import pandas as pd
import pytest
from helpers import snakemake, tiny_study, write_study

from tlselect.core.registry import read_record
from tlselect.report.answer import t_interval

SEARCH = {"enabled": True, "backbones": ["resnet18"], "inits": ["scratch"], "freezes": ["none"],
          "lrs": [0.05, 0.2], "random_samples": 1, "rounds": 1, "q": 1, "distributions": {"batch_sizes": [8]},
          "eta": 2, "min_epochs": 1, "max_epochs": 2, "brackets": 1,
          "replay": {"seeds": 2, "q": 1, "startup": 1}}  # fmt: skip


@pytest.fixture(scope="module")
def repeated_search(tmp_path_factory, tiny_archive):
    workdir = tmp_path_factory.mktemp("search-repeats")
    study = tiny_study(tiny_archive, repeats=2, features={"layers": [], "inits": []}, speedups={"enabled": False},
                       search=SEARCH)  # fmt: skip
    write_study(workdir, study)
    snakemake(workdir, "results/tables/search.csv", "results/tables/replay.csv", "results/tables/proxies.csv",
              "results/figures/search_compute.png", "results/figures/proxy_vs_finetune.png")  # fmt: skip
    return workdir


def records(folder):
    """The run records of a search folder (not its rankings, promotions or suggestions)."""
    files = ("ranking.json", "promoted.json", "suggested.json")
    return [read_record(path) for path in sorted(folder.glob("*.json")) if path.name not in files]


def test_every_candidate_trains_with_both_seeds(repeated_search):
    search = repeated_search / "results/search"
    for folder in ("grid", "random", "sh/b0/rung0", "sh/b0/rung1", "tpe/round0", "gp_ucb/round0"):
        seeds = Counter(r["name"] for r in records(search / folder))
        assert seeds and set(seeds.values()) == {2}, folder  # each configuration twice
        for name in seeds:
            assert sorted(r["seed"] for r in records(search / folder) if r["name"] == name) == [0, 1], folder
    assert len(records(search / "grid")) == 4 and len(records(search / "sh/b0/rung1")) == 2


def test_the_rung_promotes_the_configuration_with_the_best_mean(repeated_search):
    rung = repeated_search / "results/search/sh/b0"
    first = records(rung / "rung0")
    means = {
        name: mean(r["metrics"]["val_accuracy"] for r in first if r["name"] == name)
        for name in {r["name"] for r in first}
    }
    best = max(sorted(means), key=means.get)
    ranking = json.loads((rung / "rung0/ranking.json").read_text())["ranking"]
    assert [slot["candidate"] for slot in ranking[:2]] == [best, best]  # both seeds of the best mean first
    promoted = json.loads((rung / "rung1/promoted.json").read_text())["slots"]
    assert promoted == ranking[:2]
    for slot in promoted:  # each seed continues its own checkpoint
        continued = read_record(rung / f"rung1/slot{slot['slot']}.json")
        assert continued["continued_from"] == slot["checkpoint"] and continued["name"] == best
        assert continued["seed"] == read_record(repeated_search / slot["record"])["seed"]


def test_search_csv_gives_the_chosen_mean_and_its_interval(repeated_search):
    table = pd.read_csv(repeated_search / "results/tables/search.csv").set_index("method")
    assert (table["seeds"] == 2).all() and table["p_best"].between(0, 1).all()
    grid = records(repeated_search / "results/search/grid")
    chosen = [r for r in grid if r["name"] == table.loc["grid", "chosen"]]
    others = [r for r in grid if r["name"] != table.loc["grid", "chosen"]]
    assert mean(r["metrics"]["val_accuracy"] for r in chosen) >= mean(r["metrics"]["val_accuracy"] for r in others)
    expected = t_interval([r["metrics"]["test_accuracy"] for r in chosen])
    row = table.loc["grid"]
    assert (row["test_accuracy"], row["test_low"], row["test_high"]) == pytest.approx(expected)
    assert row["val_low"] <= row["val_accuracy"] <= row["val_high"]
    assert table.loc["grid", "candidates"] == 2 and table.loc["grid", "jobs"] == 4
    replay = pd.read_csv(repeated_search / "results/tables/replay.csv")
    assert not replay.empty and replay["regret_points"].notna().any()


def test_the_proxies_compare_with_the_best_mean_and_the_figures_draw_intervals(repeated_search):
    proxies = pd.read_csv(repeated_search / "results/tables/proxies.csv").iloc[0]
    grid = records(repeated_search / "results/search/grid")
    means = {
        name: mean(r["metrics"]["val_accuracy"] for r in grid if r["name"] == name)
        for name in {r["name"] for r in grid}
    }
    assert proxies["finetune_val_accuracy"] == pytest.approx(means[proxies["finetune_candidate"]])
    assert proxies["finetune_val_accuracy"] == pytest.approx(max(means.values()))
    assert proxies["finetune_val_low"] <= proxies["finetune_val_accuracy"] <= proxies["finetune_val_high"]
    for figure in ("search_compute", "proxy_vs_finetune"):
        assert (repeated_search / f"results/figures/{figure}.png").read_bytes()[:4] == b"\x89PNG"
