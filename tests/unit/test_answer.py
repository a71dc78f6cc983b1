"""The report's answer and sentences are computed from the tables: the selected run, its margin,
the cheapest run within noise, the gain over scratch, each with Wilson intervals."""

import numpy as np
import pandas as pd
import pytest

from tlselect.report import answer


def runs_table(rows) -> pd.DataFrame:
    base = {"kind": "policy", "layer": "", "status": "completed", "val_images": 400, "test_images": 1000,
            "selected": False}  # fmt: skip
    table = pd.DataFrame([{**base, **row} for row in rows])
    table.loc[table["val_accuracy"].idxmax(), "selected"] = True
    return table


def test_wilson_interval_matches_the_textbook_values():
    low, high = answer.wilson(0.5, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    low, high = answer.wilson(0.0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    assert all(pd.isna(bound) for bound in answer.wilson(0.5, None))


def test_the_answer_names_the_selected_run_its_margin_and_the_cheapest_run_within_noise():
    runs = runs_table([
        {"name": "finetune", "init": "source", "freeze": "none", "val_accuracy": 0.80, "test_accuracy": 0.79,
         "train_seconds": 60.0},
        {"name": "freeze_most", "init": "source", "freeze": "layer3", "val_accuracy": 0.78, "test_accuracy": 0.77,
         "train_seconds": 20.0},
        {"name": "scratch", "init": "scratch", "freeze": "none", "val_accuracy": 0.55, "test_accuracy": 0.56,
         "train_seconds": 60.0},
    ])  # fmt: skip
    text = answer.answer(runs)
    assert "**Selected**: `finetune` (init source, freeze none), validation 0.800 [" in text
    assert "2.0 points of validation accuracy ahead of the next best, `freeze_most`" in text
    assert "within noise of it (validation intervals overlapping): `freeze_most` (source)." in text  # 0.55 is not
    assert "**Cheapest within noise**: `freeze_most`" in text and "20 s against the selected run's 60 s" in text
    assert "+25.0 points (the intervals do not overlap)" in text


def test_without_image_counts_no_interval_is_claimed():
    runs = runs_table([
        {"name": "a", "init": "source", "freeze": "none", "val_accuracy": 0.8, "test_accuracy": 0.8,
         "train_seconds": 5.0},
        {"name": "b", "init": "scratch", "freeze": "none", "val_accuracy": 0.7, "test_accuracy": 0.7,
         "train_seconds": 1.0},
    ]).drop(columns=["val_images", "test_images"])  # fmt: skip
    text = answer.answer(runs)
    assert "[" not in text and "no interval is known" in text
    assert "the selected run itself" in text


def test_a_run_with_a_clear_margin_is_said_to_be_clear_and_diverged_runs_are_listed():
    runs = runs_table([
        {"name": "good", "init": "source", "freeze": "none", "val_accuracy": 0.95, "test_accuracy": 0.9,
         "train_seconds": 5.0},
        {"name": "poor", "init": "scratch", "freeze": "none", "val_accuracy": 0.40, "test_accuracy": 0.4,
         "train_seconds": 1.0},
    ])  # fmt: skip
    runs = pd.concat([runs, runs.iloc[[1]].assign(name="wild", status="diverged", selected=False)])
    text = answer.answer(runs)
    assert "clear of every other run's" in text and "**Diverged**: wild" in text


def test_figure_sentences_are_computed_from_the_tables():
    runs = runs_table([
        {"name": "a", "init": "source", "freeze": "none", "val_accuracy": 0.8, "test_accuracy": 0.7,
         "train_seconds": 5.0},
        {"name": "b", "init": "source", "freeze": "layer3", "val_accuracy": 0.7, "test_accuracy": 0.75,
         "train_seconds": 1.0},
    ])  # fmt: skip
    assert "Validation picks `a`" in answer.policy_sentence(runs) and "test favours `b`" in answer.policy_sentence(runs)
    assert "2 run(s) are on the Pareto front" in answer.front_sentence(runs)
    curves = pd.DataFrame({"kind": "policy", "name": ["a", "a", "b", "b"], "epoch": [1, 2, 1, 2],
                           "val_accuracy": [0.5, 0.8, 0.7, 0.6]})  # fmt: skip
    assert answer.curves_sentence(curves).startswith("1 of 2 policies peak at their last epoch (`a`)")
    assert answer.markdown_to_rst("**Selected**: `a`") == "**Selected**: a"


def test_probability_of_being_best_splits_ties_and_follows_the_evidence():
    rng = np.random.default_rng(1)
    a = rng.random(400) < 0.7
    shuffled = a.copy()
    rng.shuffle(shuffled)  # the same accuracy, other errors: equal on purpose
    as_text = lambda hits: "".join("1" if h else "0" for h in hits)  # noqa: E731
    same = answer.probability_best({"a": as_text(a), "twin": as_text(a)})
    assert same == {"a": 0.5, "twin": 0.5}
    equal = answer.probability_best({"a": as_text(a), "b": as_text(shuffled)})
    assert abs(equal["a"] - 0.5) < 0.1 and sum(equal.values()) == pytest.approx(1)
    worse = a & (rng.random(400) < 0.8)  # right on a subset of a's images only
    clear = answer.probability_best({"a": as_text(a), "worse": as_text(worse)})
    assert clear["a"] > 0.99
    assert all(pd.isna(v) for v in answer.probability_best({"a": "01", "b": "011"}).values())


def test_the_answer_gives_the_picks_probability_of_being_best():
    runs = runs_table([
        {"name": "a", "init": "source", "freeze": "none", "val_accuracy": 0.8, "test_accuracy": 0.8,
         "train_seconds": 5.0, "p_best": 0.73},
        {"name": "b", "init": "scratch", "freeze": "none", "val_accuracy": 0.79, "test_accuracy": 0.7,
         "train_seconds": 1.0, "p_best": 0.27},
    ])  # fmt: skip
    assert "probability of being the best 0.73" in answer.answer(runs)


def test_sentences_hold_when_the_tables_have_gaps():
    taus = pd.DataFrame({"proxy": ["logme", "knn"], "weighted_kendall_tau": [float("nan")] * 2,
                         "top_by_proxy": ["a", "b"], "top_by_finetune": ["c", "c"]})  # fmt: skip
    assert "undefined" in answer.proxies_sentence(taus) and "`c` first" in answer.proxies_sentence(taus)
    taus.loc[1, "weighted_kendall_tau"] = 0.4
    assert answer.proxies_sentence(taus).startswith("**knn** agrees best")
    replay = pd.DataFrame({"method": ["sh"], "axis": ["epochs"], "share": [1 / 5], "regret_points": [float("nan")]})
    assert answer.replay_sentence(replay).startswith("No method had chosen")


def test_the_benchmark_goals_read_as_sentences_and_the_regrets_as_cells():
    goals = pd.DataFrame([
        {"goal": "a", "axis": "epochs", "method": "asha", "share": 0.2, "regret_points": 0.8, "ci95_low": 0.6,
         "ci95_high": 1.0, "reference": "1 point", "met": True},
        {"goal": "b", "axis": "epochs", "method": "tpe", "share": 1 / 3, "regret_points": 1.0, "ci95_low": 0.8,
         "ci95_high": 1.2, "reference": "random 2.00 [1.80, 2.20]", "met": True},
        {"goal": "b", "axis": "epochs", "method": "bohb", "share": 1 / 3, "regret_points": 1.9, "ci95_low": 1.5,
         "ci95_high": 2.3, "reference": "random 2.00 [1.80, 2.20]", "met": False},
        {"goal": "c", "axis": "seconds", "method": "cost_gp_ucb", "share": float("nan"), "regret_points": float("nan"),
         "ci95_low": float("nan"), "ci95_high": float("nan"), "reference": "gp_ucb's final 1.00 first at 0.500",
         "met": False},
    ])  # fmt: skip
    sentence = answer.goals_sentence(goals)
    assert "**asha** holds the least mean regret, 0.80 points [0.60, 1.00]: within 1 point" in sentence
    assert "tpe is below random search" in sentence and "bohb" not in sentence.split("random search")[0][-40:]
    assert "Cost-aware GP-UCB never reaches plain GP-UCB's final regret" in sentence
    replay = pd.DataFrame({"method": ["sh", "sh", "tpe"], "axis": ["epochs", "epochs", "epochs"],
                           "share": [0.2, 1.0, 0.2], "regret_points": [2.0, 1.0, 3.0], "ci95_low": [1.5, 1.0, 2.0],
                           "ci95_high": [2.5, 1.0, 4.0]})  # fmt: skip
    table = answer.regret_table(replay, "epochs")
    assert list(table["method"]) == ["sh", "tpe"] and table.iloc[0, 1] == "2.00 [1.50, 2.50]"
    assert table.iloc[1].isna().sum() == 1  # tpe has no row at the whole grid's compute
