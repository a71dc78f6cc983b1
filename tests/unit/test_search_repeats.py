"""Repeats in the model search: a candidate's seeds share its name (its configuration), the brackets
keep whole configurations, promotion, the strategies' observations, the replay's table and the
comparison all use the mean over the seeds."""

import json
import math

import pytest
from helpers import default_config

from tlselect.config import ConfigError, check
from tlselect.core.registry import configuration
from tlselect.report.answer import t_interval, wilson
from tlselect.runs import candidate_runs, random_runs
from tlselect.search import brackets, compare, jobs, replay


def repeated(config, repeats=2):
    return {**config, "repeats": repeats}


def test_each_candidate_trains_once_per_seed_and_the_first_keeps_its_id(config):
    single, twice = candidate_runs(config), candidate_runs(repeated(config))
    assert len(twice) == 2 * len(single) and set(single) <= set(twice)  # the first seed's ids are the old ones
    for run_id, spec in twice.items():
        assert spec.name in single and spec.settings["seed"] == (0 if run_id == spec.name else 1)
        assert run_id == spec.name or "-seed1-" in run_id
    by_name = {}
    for spec in twice.values():
        by_name.setdefault(spec.name, []).append(spec.settings["seed"])
    assert all(seeds == [0, 1] for seeds in by_name.values())  # a configuration's seeds one after another
    drawn = random_runs(repeated(config))
    assert len(drawn) == 2 * len(random_runs(config)) and len({s.name for s in drawn.values()}) == len(drawn) // 2


def test_brackets_halve_configurations_and_train_every_seed_of_each(config):
    for method in ("sh", "hb"):
        single, twice = brackets.brackets(config, method), brackets.brackets(repeated(config), method)
        assert [b.epochs for b in twice] == [b.epochs for b in single]
        assert [b.keep for b in twice] == [tuple(2 * k for k in b.keep) for b in single]
        pool = candidate_runs(repeated(config))
        for one, two in zip(single, twice, strict=True):
            assert [pool[c].name for c in two.candidates] == [c for c in one.candidates for _ in (0, 1)]


def run(name, seed, val, test=0.5, hits=None):
    """A candidate's record with what ranking, promotion and the comparison read."""
    return {
        "run_id": f"{name}-{seed}",
        "kind": "candidate",
        "name": name,
        "status": "completed",
        "seed": seed,
        "config": {"lr": 0.1, "seed": seed, "continue_from": f"rung0/{name}-{seed}.pt"},
        "metrics": {"val_accuracy": val, "test_accuracy": test, **({"val_correct": hits} if hits else {})},
        "data": {"val": len(hits) if hits else 100, "test": 200},
        "curves": [],
    }


def test_a_rung_promotes_the_best_mean_not_the_best_single_seed():
    # "lucky" has the best single seed (0.9), "steady" the best mean (0.75 against 0.6)
    records = {"r/slot0.json": run("lucky", 0, 0.9), "r/slot1.json": run("lucky", 1, 0.3),
               "r/slot2.json": run("steady", 0, 0.7), "r/slot3.json": run("steady", 1, 0.8)}  # fmt: skip
    kept = brackets.promote(records, 2)
    assert [(k["candidate"], k["record"]) for k in kept] == [("steady", "r/slot2.json"), ("steady", "r/slot3.json")]
    assert configuration(records["r/slot2.json"]) == configuration(records["r/slot3.json"])  # continue_from aside


def test_the_replay_reads_a_candidates_seeds_as_one_row():
    def grid_run(seed, vals, test):
        curves = [{"val_accuracy": v, "train_seconds": 1.0 + seed, "eval_seconds": 0.5} for v in vals]
        config = {"backbone": "resnet18", "init": "scratch", "freeze": "none", "lr": 0.1, "resolution": 32,
                  "weight_decay": 0.0, "label_smoothing": 0.0, "batch_size": 8, "seed": seed}  # fmt: skip
        return {"name": "a", "config": config, "curves": curves, "metrics": {"test_accuracy": test}}

    (row,) = replay.table([grid_run(0, [0.5, 0.7], 0.6), grid_run(1, [0.6, 0.8], 0.8)]).values()
    assert row.val == pytest.approx((0.55, 0.75)) and row.test == pytest.approx(0.7)
    assert row.seconds == pytest.approx((1.5 + 2.5, 1.5 + 2.5))  # what training both seeds cost
    diverged = grid_run(1, [0.6, None], 0.8)
    assert replay.table([grid_run(0, [0.5, 0.7], 0.6), diverged])["a"].val[1] is None


def test_a_strategy_observes_each_configuration_once_on_its_mean(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "read_record", lambda path: json.loads(open(path).read()))  # only what it reads
    trials, paths = [], []
    for slot, (name, seed, val) in enumerate([("a", 0, 0.6), ("a", 1, 0.8), ("b", 0, 0.5), ("b", 1, 0.5)]):
        record = {**run(name, seed, val), "curves": [{"val_accuracy": val, "train_seconds": 2.0, "eval_seconds": 1.0}]}
        record["config"].update(backbone="resnet18", init="scratch", freeze="none", resolution=32, weight_decay=0.0,
                                label_smoothing=0.0, batch_size=8)  # fmt: skip
        path = tmp_path / f"trial{slot}.json"
        path.write_text(json.dumps(record))
        paths.append(str(path))
        trials.append({"slot": slot, "candidate": f"{name}-{seed}", "name": name, "params": {"lr": len(name)},
                       "settings": {"seed": seed}})  # fmt: skip
    suggested = tmp_path / "suggested.json"
    suggested.write_text(json.dumps({"trials": trials}))
    observed = jobs.history([str(suggested)], paths)
    assert [(v, s) for _, v, s in observed] == [(pytest.approx(0.7), 6.0), (pytest.approx(0.5), 6.0)]


def test_the_comparison_chooses_on_the_mean_and_gives_its_interval(tmp_path):
    benchmark = tmp_path / "job.tsv"
    benchmark.write_text("s\th:m:s\n1.0\t0:00:01\n")
    finals = [run("lucky", 0, 0.9, 0.9), run("lucky", 1, 0.3, 0.3), run("steady", 0, 0.7, 0.6),
              run("steady", 1, 0.8, 0.7)]  # fmt: skip
    grid = [compare.Job(r, 0, str(benchmark)) for r in finals]
    row = compare.compare({"grid": grid}, {"grid": finals})[0]
    assert row["chosen"] == "steady" and row["seeds"] == 2 and row["candidates"] == 2
    assert (row["test_accuracy"], row["test_low"], row["test_high"]) == pytest.approx(t_interval([0.6, 0.7]))
    assert row["val_accuracy"] == pytest.approx(0.75)
    single = compare.compare({"grid": grid[:1]}, {"grid": finals[:1]})[0]
    assert (single["test_low"], single["test_high"]) == pytest.approx(wilson(0.9, 200))
    assert math.isnan(row["p_best"])  # no per-image hits recorded


def test_the_chosen_configurations_chance_of_being_best_pools_its_seeds():
    same = "1" * 60 + "0" * 40
    finals = [run("a", 0, 0.6, hits=same), run("a", 1, 0.6, hits=same), run("b", 0, 0.6, hits=same),
              run("b", 1, 0.6, hits=same)]  # fmt: skip
    assert compare.chosen_probability(finals, finals[0]) == pytest.approx(0.5)  # two configurations, equal
    worse = [run("b", seed, 0.3, hits="1" * 30 + "0" * 70) for seed in (0, 1)]
    assert compare.chosen_probability(finals[:2] + worse, finals[0]) > 0.99


def test_repeats_work_with_the_search_and_folds_are_refused_naming_the_fix():
    config = default_config()
    config["search"]["enabled"] = True
    config["repeats"] = 2
    check(config)
    config["repeats"], config["validation"]["folds"] = 1, 3
    with pytest.raises(ConfigError, match=r"validation\.folds: the model search .*validation\.folds: 1"):
        check(config)


def test_the_proxies_compare_with_the_best_configurations_mean():
    def grid_run(lr, seed, val):
        config = {"backbone": "resnet18", "init": "scratch", "freeze": "none", "lr": lr, "seed": seed}
        return {"name": f"lr{lr}", "status": "completed", "config": config, "metrics": {"val_accuracy": val}}

    records = [grid_run(0.1, 0, 0.9), grid_run(0.1, 1, 0.3), grid_run(0.2, 0, 0.7), grid_run(0.2, 1, 0.8)]
    best = jobs.best_finetuned(records)[("resnet18", "scratch")]
    assert best["name"] == "lr0.2" and best["metrics"]["val_accuracy"] == pytest.approx(0.75)
    assert (best["metrics"]["val_low"], best["metrics"]["val_high"]) == pytest.approx(t_interval([0.7, 0.8])[1:])
    one = jobs.best_finetuned(records[:1])[("resnet18", "scratch")]["metrics"]  # one seed: Wilson on its images
    assert math.isnan(one["val_low"])  # this record gives no image count
    counted = {**records[0], "data": {"val": 100}}
    assert jobs.best_finetuned([counted])[("resnet18", "scratch")]["metrics"]["val_low"] == pytest.approx(
        wilson(0.9, 100)[0]
    )
