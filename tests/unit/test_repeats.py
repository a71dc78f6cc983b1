"""Repeats and k-fold validation: runs per seed and fold with stable ids, stratified folds, selection
on a configuration's mean (the one ranking rule), t-intervals, the probability of being best over
images and repeats, the tables' mean and refit rows, and the config checks."""

import dataclasses
import math
from collections import Counter

import numpy as np
import pytest
from helpers import default_config

from tlselect import runs
from tlselect.config import ConfigError, check
from tlselect.core.registry import configuration, rank
from tlselect.data.folders import stratified_folds
from tlselect.report import answer, tables
from tlselect.search import compare


def record(name, seed, val, test=0.5, fold=0, hits=None, status="completed", kind="policy"):
    """A registry record with what the tables read."""
    return {
        "run_id": f"{name}-s{seed}-f{fold}",
        "kind": kind,
        "name": name,
        "status": status,
        "seed": seed,
        "config": {
            "backbone": "resnet18",
            "init": "scratch",
            "freeze": "none",
            "epochs": 2,
            "lr": 0.1,
            "batch_size": 32,
            "seed": seed,
            "fold": fold,
            "folds": 2 if fold else 0,
        },  # fmt: skip
        "parameters": {"trainable": 10, "total": 10},
        "metrics": {
            "val_accuracy": val,
            "best_val_accuracy": val,
            "test_accuracy": test,
            **({"val_correct": hits} if hits else {}),
        },  # fmt: skip
        "timings": {"train_seconds": 1.0, "cache_seconds": 0.0, "eval_seconds": 0.1, "wall_seconds": 2.0},
        "throughput_images_per_second": 100.0,
        "data": {"train": 80, "val": len(hits) if hits else 20, "test": 40},
    }


def text(hits) -> str:
    return "".join("1" if h else "0" for h in hits)


def test_one_repeat_keeps_the_run_ids_and_more_name_their_seed_and_fold():
    config = default_config()
    assert config["repeats"] == 1 and config["validation"]["folds"] == 1
    single = {**runs.policy_runs(config), **runs.probe_runs(config)}
    assert "finetune-resnet18-imagenet-45429538" in single and "probe_layer1-resnet18-imagenet-996a1516" in single
    config["repeats"] = 3
    repeated = {**runs.policy_runs(config), **runs.probe_runs(config)}
    assert set(single) < set(repeated) and len(repeated) == 3 * len(single)
    seeds = Counter(spec.settings["seed"] for spec in repeated.values())
    assert seeds == {config["seed"] + r: len(single) for r in range(3)}
    assert all(("-seed" in run_id) == (spec.settings["seed"] != config["seed"]) for run_id, spec in repeated.items())
    config["validation"]["folds"] = 2
    folded = runs.policy_runs(config)
    assert len(folded) == 3 * 2 * len(config["policies"]) and not set(folded) & set(single)
    assert {(s.settings["fold"], s.settings["folds"]) for s in folded.values()} == {(1, 2), (2, 2)}
    assert "--fold 2 --folds 2" in next(s for s in folded.values() if s.settings["fold"] == 2).flags()
    # every run of one configuration is one configuration, whatever its seed and fold
    recorded = [{"kind": s.kind, "name": s.name, "config": s.settings} for s in folded.values()]
    assert len({configuration(r) for r in recorded}) == len(config["policies"])


def test_folds_are_disjoint_cover_every_image_and_are_stratified():
    labels = [0] * 10 + [1] * 7 + [2] * 13
    folds = stratified_folds(labels, 3, seed=4)
    assert sorted(set(folds)) == [1, 2, 3] and len(folds) == len(labels)  # each image in exactly one fold
    for label in set(labels):
        sizes = Counter(f for f, y in zip(folds, labels, strict=True) if y == label)
        assert max(sizes.values()) - min(sizes.values()) <= 1  # every class split evenly
    assert stratified_folds(labels, 3, seed=4) == folds and stratified_folds(labels, 3, seed=5) != folds


def test_a_fold_run_trains_on_the_other_folds(tensor_data, tmp_path):
    from tlselect.training.options import TrainConfig
    from tlselect.training.trainer import train

    settings = dict(data=str(tensor_data), out=str(tmp_path / "f.pt"), epochs=1, batch_size=32, device="cpu",
                    eval_batch_size=64, folds=4, fold=2)  # fmt: skip
    fold = train(TrainConfig(**settings), log=lambda _: None)
    assert fold["data"]["train"] == 96 and fold["data"]["val"] == 32  # (96 + 32) images in 4 folds
    assert len(fold["metrics"]["val_correct"]) == 32 and fold["config"]["fold"] == 2


def test_a_probe_validates_on_its_fold_of_the_cached_features(tensor_data, tmp_path):
    import torch

    from tlselect.training.options import TrainConfig
    from tlselect.training.trainer import train

    layer = tmp_path / "layer4"
    layer.mkdir()
    for split in ("train", "val", "test"):
        labels = torch.load(tensor_data / f"{split}.pt", weights_only=True)["labels"]
        features = torch.zeros(len(labels), 4, 1, 1)
        features[torch.arange(len(labels)), labels] = 1.0  # one channel per class
        np.save(layer / f"{split}.npy", features.numpy().astype(np.float16))
    probe = TrainConfig(data=str(tensor_data), out=str(tmp_path / "p.pt"), kind="probe", name="probe_layer4",
                        features=str(layer), layer="layer4", epochs=20, lr=0.1, batch_size=32, device="cpu",
                        folds=2, fold=1)  # fmt: skip
    record = train(probe, log=lambda _: None)
    assert record["data"]["train"] == record["data"]["val"] == 64 and record["metrics"]["val_accuracy"] > 0.9
    refit = train(dataclasses.replace(probe, fold=0), log=lambda _: None)  # every fold
    assert refit["data"]["train"] == 128 and refit["config"]["folds"] == 2


def test_rank_chooses_on_the_mean_over_a_configurations_repeats():
    lucky = [record("lucky", 0, 0.90), record("lucky", 1, 0.50)]  # one high seed, mean 0.70
    steady = [record("steady", 0, 0.75), record("steady", 1, 0.70)]  # mean 0.725
    ranked = rank(lucky + steady)
    assert [r["name"] for r in ranked] == ["steady", "steady", "lucky", "lucky"]
    assert rank(lucky + steady[:1])[0]["name"] == "steady"  # 0.75 against 0.70
    older = {**steady[0], "config": {k: v for k, v in steady[0]["config"].items() if k not in ("fold", "folds")}}
    assert configuration(older) == configuration(steady[1])  # a record from before folds: the same configuration
    broken = [record("b", 0, 0.9), record("b", 1, None, status="diverged")]  # a diverged seed: not a candidate
    assert rank([record("a", 0, 0.6), *broken])[0]["name"] == "a"


def test_the_refit_retrains_the_best_mean_on_every_fold_with_its_seed():
    records = [record(n, s, v, fold=f) for n, vs in (("a", (0.9, 0.4, 0.5, 0.5)), ("b", (0.6, 0.6, 0.6, 0.6)))
               for (s, f), v in zip([(0, 1), (0, 2), (1, 1), (1, 2)], vs, strict=True)]  # fmt: skip
    flags = runs.refit_flags(records, seed=1)  # b's mean 0.6 beats a's 0.575, though a has the best run
    assert flags[flags.index("--name") + 1] == "b" and flags[flags.index("--seed") + 1] == "1"
    assert flags[flags.index("--fold") + 1] == "0" and flags[flags.index("--folds") + 1] == "2"
    assert "--run-id" not in flags and "--out" not in flags  # the refit job gives its own


def test_t_interval_is_the_students_t_interval():
    mean, low, high = answer.t_interval([1.0, 2.0, 3.0])
    half = 4.302653 / math.sqrt(3)  # t(0.975, 2) * sd 1 / sqrt(3)
    assert mean == 2.0 and low == pytest.approx(2 - half, abs=1e-5) and high == pytest.approx(2 + half, abs=1e-5)
    assert math.isnan(answer.t_interval([0.5])[1]) and math.isnan(answer.t_interval([])[0])


def test_probability_of_being_best_over_images_and_repeats():
    rng = np.random.default_rng(3)
    a = [rng.random(300) < 0.7 for _ in range(3)]
    twins = answer.probability_best({"a": [text(h) for h in a], "twin": [text(h) for h in a]})
    assert abs(twins["a"] - 0.5) < 0.05 and sum(twins.values()) == pytest.approx(1)  # repeats drawn apart
    shuffled = [rng.permutation(h) for h in a]  # the same accuracies, other images right: equal on purpose
    equal = answer.probability_best({"a": [text(h) for h in a], "b": [text(h) for h in shuffled]})
    assert abs(equal["a"] - 0.5) < 0.1 and sum(equal.values()) == pytest.approx(1)
    worse = [h & (rng.random(300) < 0.85) for h in a]
    clear = answer.probability_best({"a": [text(h) for h in a], "worse": [text(h) for h in worse]})
    assert clear["a"] > 0.99
    # the repeats are resampled too: a configuration best in one repeat of two, far behind in the
    # other, is best in about the draws that keep its good repeat
    good, bad, middle = text(a[0]), text(a[0] & (rng.random(300) < 0.6)), text(a[0] & (rng.random(300) < 0.9))
    split = answer.probability_best({"split": [good, bad], "middle": [middle, middle]})
    assert 0.1 < split["split"] < 0.4


def test_the_table_has_a_row_per_run_and_a_mean_per_configuration_and_selects_the_mean():
    rng = np.random.default_rng(0)
    good = [text(rng.random(40) < 0.8) for _ in range(2)]
    poor = [text(rng.random(40) < 0.4) for _ in range(2)]
    records = [record("good", s, h.count("1") / 40, hits=h) for s, h in enumerate(good)]
    records += [record("poor", s, h.count("1") / 40, hits=h) for s, h in enumerate(poor)]
    table = tables.runs_table(records)
    assert Counter(table["row"]) == {"run": 4, "mean": 2}
    means = table[table["row"] == "mean"].set_index("name")
    vals = [h.count("1") / 40 for h in good]
    mean, low, high = answer.t_interval(vals)
    assert means.loc["good", "val_accuracy"] == pytest.approx(mean)
    assert means.loc["good", "val_low"] == pytest.approx(low) and means.loc["good", "val_high"] == pytest.approx(high)
    assert means.loc["good", "repeats"] == 2 and means.loc["good", "selected"] and means.loc["good", "p_best"] > 0.95
    assert table[table["row"] == "run"]["p_best"].isna().all() and table["selected"].sum() == 1
    assert "mean over 2 runs: 2 seeds" in answer.answer(table)
    assert answer.runs_sentence(table).startswith("2 configurations completed every run (2 policies")
    single = tables.runs_table([records[0], records[2]])  # one run per configuration: no mean rows
    assert set(single["row"]) == {"run"} and single["selected"].sum() == 1 and single["p_best"].notna().all()


def test_folds_average_within_a_seed_and_the_refit_reports_test():
    records = [record(n, s, v, fold=f, hits=text([1] * int(v * 20) + [0] * (20 - int(v * 20))))
               for n, vs in (("a", (0.8, 0.6, 0.7, 0.9)), ("b", (0.5, 0.6, 0.55, 0.5)))
               for (s, f), v in zip([(0, 1), (0, 2), (1, 1), (1, 2)], vs, strict=True)]  # fmt: skip
    refits = [record("a", s, 0.99, test=t) for s, t in ((0, 0.81), (1, 0.79))]
    table = tables.runs_table(records, refits)
    assert Counter(table["row"]) == {"run": 8, "mean": 2, "refit": 2, "refit mean": 1}
    a = table[(table["row"] == "mean") & (table["name"] == "a")].iloc[0]
    assert a["val_accuracy"] == pytest.approx(0.75) and a["val_images"] == 40 and a["folds"] == 2
    assert a["val_low"] == pytest.approx(answer.t_interval([0.7, 0.8])[1])  # over the seeds' fold means
    refit = table[table["row"] == "refit mean"].iloc[0]
    assert refit["test_accuracy"] == pytest.approx(0.80) and pd_isna(refit["val_accuracy"])
    assert not table[table["row"].str.startswith("refit")]["selected"].any()
    assert "**Refit**: `a`" in answer.answer(table)
    shown = answer.repeats_table(table)  # the notebook's table: configurations, then the refits
    assert list(shown["configuration"].str.startswith("refit")) == [False, False, True, True, True]
    assert shown.loc[0, "each run's val"] == "0.800 / 0.600 / 0.700 / 0.900" and shown.loc[0, "selected"]
    assert "2 seeds x 2 folds" in answer.repeats_sentence(table)
    assert answer.repeats_table(tables.runs_table(records[:1])).empty


def pd_isna(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def test_the_search_comparison_gives_the_chosen_candidates_probability_of_being_best(tmp_path):
    benchmark = tmp_path / "job.tsv"
    benchmark.write_text("s\th:m:s\n1.0\t0:00:01\n")
    rng = np.random.default_rng(2)
    strong, weak = rng.random(200) < 0.8, rng.random(200) < 0.5
    finals = [record("x", 0, strong.mean(), hits=text(strong)), record("y", 0, weak.mean(), hits=text(weak))]
    jobs = [compare.Job({**r, "curves": []}, 0, str(benchmark)) for r in finals]
    row = compare.compare({"grid": jobs}, {"grid": finals})[0]
    assert row["chosen"] == "x" and row["p_best"] > 0.99
    tied = [finals[0], {**finals[0], "run_id": "copy", "name": "x2"}]
    assert compare.compare({"grid": jobs}, {"grid": tied})[0]["p_best"] == 0.5
    assert math.isnan(compare.chosen_probability([{**finals[0], "metrics": {}}], finals[0]))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(repeats=0), r"repeats: 0 is not a positive integer"),
        (lambda c: c["validation"].update(folds=0), r"validation\.folds: 0 is not an integer from 2 to 500"),
        (lambda c: c["validation"].update(folds=501), r"validation\.folds: 501 .*data\.train_per_class"),
        (lambda c: (c["validation"].update(folds=3), c["search"].update(enabled=True)), r"validation\.folds: the"),
    ],
)
def test_repeats_and_folds_are_checked_naming_the_key_and_the_fix(change, message):
    config = default_config()
    change(config)
    with pytest.raises(ConfigError, match=message):
        check(config)


def test_a_resume_file_written_before_folds_existed_is_the_same_run():
    from tlselect.training.options import TrainConfig, _same_run

    current = dataclasses.asdict(TrainConfig(data="d", out="o"))
    older = {k: v for k, v in current.items() if k not in ("fold", "folds")}  # a missing knob: its default
    assert _same_run(older, current, set()) and not _same_run({**older, "fold": 1}, current, set())
