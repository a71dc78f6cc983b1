"""The report's answer and sentences are computed from the tables: the selected run, its margin,
the cheapest run within noise, the gain over scratch, each with Wilson intervals."""

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
    assert "1 other run(s) are within noise" in text  # 0.78 on 400 images overlaps 0.80; 0.55 does not
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
