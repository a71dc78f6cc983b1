"""Model search: LogME against hand-computed evidence, rung arithmetic, promotion on validation
accuracy only, seeded random search, a promoted slot continuing its checkpoint, compute accounting."""

import copy
import json
import math
import sys

import numpy as np
import pytest
from helpers import REPO
from scipy import optimize, stats

from tlselect.core.files import write_json
from tlselect.core.registry import RegistryError, read_record, write_record
from tlselect.runs import candidate_runs, random_runs
from tlselect.search import brackets, compare, jobs, proxies
from tlselect.training.options import TrainConfig
from tlselect.training.trainer import train

sys.path.insert(0, str(REPO / "scripts"))
import search as search_cli  # noqa: E402


def test_evidence_matches_a_hand_computed_case():
    # F = (1, 1)^T, y = (1, 1), alpha = beta = 1: y ~ N(0, I + F F^T) = N(0, [[2, 1], [1, 2]]),
    # det 3, y' C^-1 y = (2 - 1 - 1 + 2) / 3 = 2/3, so log p = -log(2 pi) - log(3)/2 - 1/3.
    f, y = np.array([[1.0], [1.0]]), np.array([1.0, 1.0])
    assert proxies.log_evidence(f, y, 1.0, 1.0) == pytest.approx(-math.log(2 * math.pi) - math.log(3) / 2 - 1 / 3)


def test_logme_is_the_maximized_evidence():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(12, 3))
    y = (f @ np.array([1.0, -0.5, 0.0]) + rng.normal(scale=0.5, size=12) > 0).astype(float)

    def negative(log_params):
        alpha, beta = np.exp(log_params)
        cov = np.eye(12) / beta + f @ f.T / alpha
        return -stats.multivariate_normal(np.zeros(12), cov).logpdf(y)

    best = optimize.minimize(negative, [0.0, 0.0], method="Nelder-Mead", options={"xatol": 1e-8, "fatol": 1e-10})
    value, alpha, beta = proxies.maximize_evidence(f, y)
    assert proxies.log_evidence(f, y, alpha, beta) == pytest.approx(-negative(np.log([alpha, beta])))
    assert value == pytest.approx(-best.fun / 12, abs=1e-5)
    # LogME averages the per-class evidence over the one-hot columns
    labels = y.astype(int)
    per_class = [proxies.maximize_evidence(f, (labels == c).astype(float))[0] for c in (0, 1)]
    assert proxies.logme(f, labels) == pytest.approx(np.mean(per_class))


def test_logme_without_signal_is_the_noise_model():
    # zero features: evidence = n/2 log(beta) - n/2 log(2 pi) - n/2 with beta = n / |y|^2
    labels = np.array([0, 0, 1, 1, 1, 2])
    expected = np.mean([0.5 * math.log(6 / k) - 0.5 * math.log(2 * math.pi) - 0.5 for k in (2, 3, 1)])
    assert proxies.logme(np.zeros((6, 4)), labels) == pytest.approx(expected, rel=1e-6)


def test_informative_features_score_higher_than_noise():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 20)
    informative = np.eye(3)[labels] * 3 + rng.normal(size=(60, 3))
    noise = rng.normal(size=(60, 3))
    assert proxies.logme(informative, labels) > proxies.logme(noise, labels)
    assert proxies.knn_accuracy(informative, labels, informative, labels) > 0.9
    assert proxies.weighted_tau([3, 2, 1], [0.9, 0.8, 0.7]) == pytest.approx(1.0)


def test_pool_and_rung_arithmetic(config):
    pool = candidate_runs(config)
    # 2 backbones x (pretrained x {none, most} + scratch x {none}) x 2 learning rates
    assert len(pool) == 12 and len(set(pool)) == 12
    assert {s.settings["freeze"] for s in pool.values()} == {"none", "layer3", "block3"}
    assert all(s.settings["schedule"] == "constant" for s in pool.values())
    (sh,) = brackets.brackets(config, "sh")
    assert (sh.keep, sh.epochs) == ((12, 4, 1), (1, 3, 9))
    assert sh.cost() == 12 + 4 * 2 + 1 * 6 <= 12 * 9 / 3
    hb = brackets.brackets(config, "hb")
    assert [(b.keep, b.epochs) for b in hb] == [((9, 3, 1), (1, 3, 9)), ((5, 1), (3, 9)), ((3,), (9,))]
    assert all(set(b.candidates) <= set(pool) and len(b.candidates) == b.keep[0] for b in hb)
    config["search"]["brackets"] = 1
    assert len(brackets.brackets(config, "hb")) == 1
    assert candidate_runs(config) == pool  # stable ids


def test_random_search_draws_its_own_runs_seeded(config):
    first = random_runs(config)
    assert first == random_runs(copy.deepcopy(config)) and len(first) == 4
    assert not set(first) & set(candidate_runs(config))  # draws from the distributions, not the grid
    low, high = config["search"]["distributions"]["lr"]
    for run_id, spec in first.items():
        assert spec.name == run_id and spec.kind == "candidate" and low <= spec.settings["lr"] <= high
        assert spec.settings["batch_size"] in config["search"]["distributions"]["batch_sizes"]
    draws = {tuple(random_runs({**config, "seed": s})) for s in range(5)}
    assert len(draws) == 5


def _record(candidate, val, test, status="completed"):
    return {"name": candidate, "status": status, "metrics": {"val_accuracy": val, "test_accuracy": test}}


def test_promote_ranks_on_validation_never_test():
    records = {
        "r/slot0.json": _record("a", 0.5, 0.99),
        "r/slot1.json": _record("b", 0.7, 0.10),
        "r/slot2.json": _record("c", 0.7, 0.20),
        "r/slot3.json": _record("d", None, None, "diverged"),
    }
    kept = brackets.promote(records, 3)
    assert [k["candidate"] for k in kept] == ["b", "c", "a"]  # ties by candidate id, test ignored
    assert kept[0]["checkpoint"] == "r/slot1.pt" and [k["slot"] for k in kept] == [0, 1, 2]
    assert brackets.promote(records, 4)[-1]["candidate"] == "d"


def test_a_promoted_slot_continues_its_checkpoint(tensor_data, tmp_path):
    rung0 = tmp_path / "rung0"
    for slot, lr in enumerate((0.05, 0.2)):
        cfg = TrainConfig(
            data=str(tensor_data), out=str(rung0 / f"slot{slot}.pt"), record=str(rung0 / f"slot{slot}.json"),
            run_id=f"slot{slot}", kind="candidate", name=f"cand{slot}", epochs=1, batch_size=32, lr=lr,
            schedule="constant", precision="float32", device="cpu", keep_state=True, eval_batch_size=64,
        )  # fmt: skip
        write_record(cfg.record, train(cfg, log=lambda _: None))
    ranking, promoted = rung0 / "ranking.json", tmp_path / "rung1" / "promoted.json"
    records = [str(rung0 / f"slot{s}.json") for s in (0, 1)]
    assert search_cli.main(["rank", *records, "--out", str(ranking)]) == 0
    assert search_cli.main(["promote", str(ranking), "--keep", "1", "--out", str(promoted)]) == 0
    ranked = json.loads(ranking.read_text())["ranking"]
    assert len(ranked) == 2 and ranked[0]["val_accuracy"] >= ranked[1]["val_accuracy"]
    slot = json.loads(promoted.read_text())["slots"][0]
    assert json.loads(promoted.read_text())["slots"] == ranked[:1]
    out = tmp_path / "rung1" / "slot0"
    args = ["--promoted", str(promoted), "--slot", "0", "--epochs", "3", "--device", "cpu"]
    args += ["--out", f"{out}.pt", "--record", f"{out}.json", "--run-id", "rung1-slot0"]
    assert search_cli.main(["continue", *args]) == 0
    record = read_record(f"{out}.json")
    assert record["name"] == slot["candidate"] and record["continued_from"] == slot["checkpoint"]
    assert len(record["curves"]) == 3
    previous = read_record(slot["record"])
    assert record["curves"][0] == previous["curves"][0]  # the first epoch is the rung-0 run's, not redone
    found = jobs.jobs([f"{out}.json"], [f"{out}.tsv"])
    assert found[0].first_epoch == 1 and compare.job_cost(found[0].record, found[0].first_epoch)[0] == 2


def test_promoted_slots_continued_as_a_group_are_the_slots_continued_alone(tensor_data, tmp_path):
    rung0 = tmp_path / "rung0"
    for slot, lr in enumerate((0.05, 0.2)):
        cfg = TrainConfig(
            data=str(tensor_data), out=str(rung0 / f"slot{slot}.pt"), record=str(rung0 / f"slot{slot}.json"),
            run_id=f"slot{slot}", kind="candidate", name=f"cand{slot}", epochs=1, batch_size=32, lr=lr,
            precision="float32", channels_last=False, device="cpu", keep_state=True, eval_batch_size=64, threads=1,
        )  # fmt: skip
        write_record(cfg.record, train(cfg, log=lambda _: None))
    promoted = tmp_path / "promoted.json"
    write_json(promoted, {"slots": brackets.promote({str(rung0 / f"slot{s}.json"): read_record(rung0 / f"slot{s}.json")
                                                     for s in (0, 1)}, 2)})  # fmt: skip
    common = ["continue", "--promoted", str(promoted), "--epochs", "2", "--device", "cpu", "--threads", "1"]
    for slot in (0, 1):
        out = tmp_path / f"alone{slot}"
        search_cli.main(
            [*common, "--slot", str(slot), "--out", f"{out}.pt", "--record", f"{out}.json", "--run-id", "s"]
        )
    group = [tmp_path / f"group{slot}" for slot in (0, 1)]
    assert search_cli.main([*common, "--slot", "0", "1", "--out", *(f"{g}.pt" for g in group), "--record",
                            *(f"{g}.json" for g in group), "--run-id", "s", "s"]) == 0  # fmt: skip
    for slot in (0, 1):
        alone, grouped = read_record(tmp_path / f"alone{slot}.json"), read_record(tmp_path / f"group{slot}.json")
        assert grouped["continued_from"] == alone["continued_from"] and grouped["metrics"] == alone["metrics"]
        assert [c["train_loss"] for c in grouped["curves"]] == [c["train_loss"] for c in alone["curves"]]


def test_compare_counts_only_new_epochs_and_chooses_on_validation(tmp_path):
    def job(candidate, val, test, epochs, first=0, seconds=10.0):
        benchmark = tmp_path / f"job{len(list(tmp_path.iterdir()))}.tsv"
        benchmark.write_text(f"s\th:m:s\n{seconds}\t0:00:10\n")
        record = {**_record(candidate, val, test), "curves": [{"train_seconds": 1.0}] * epochs}
        return compare.Job(record, first, str(benchmark))

    grid = [job("a", 0.6, 0.9, 9, seconds=30), job("b", 0.8, 0.7, 9, seconds=30)]
    sh = [job("a", 0.5, 0.9, 1), job("b", 0.6, 0.7, 1), job("b", 0.8, 0.7, 9, first=1, seconds=25)]
    rows = {r["method"]: r for r in compare.compare({"grid": grid, "sh": sh}, {"grid": [g.record for g in grid],
                                                                              "sh": [sh[-1].record]})}  # fmt: skip
    assert rows["grid"]["chosen"] == "b" and rows["grid"]["epochs"] == 18
    assert rows["sh"]["epochs"] == 1 + 1 + 8 and rows["sh"]["compute_share"] == pytest.approx(10 / 18)
    assert rows["sh"]["wall_seconds"] == pytest.approx(45) and rows["sh"]["wall_share"] == pytest.approx(45 / 60)
    assert rows["sh"]["test_gap_points"] == pytest.approx(0.0)


def test_runs_of_one_group_job_count_its_seconds_and_the_job_once(tmp_path):
    benchmark = tmp_path / "group.tsv"
    benchmark.write_text("s\th:m:s\n12.0\t0:00:12\n")
    records = [{**_record(name, 0.5, 0.5), "curves": [{"train_seconds": 1.0}] * 2} for name in "abc"]
    jobs = [compare.Job(record, 0, str(benchmark)) for record in records]  # one job trained all three
    (row,) = compare.compare({"grid": jobs}, {"grid": records})
    assert (row["jobs"], row["candidates"], row["epochs"], row["wall_seconds"]) == (1, 3, 6, 12.0)


def test_a_missing_benchmark_file_is_an_error_not_zero_seconds(tmp_path):
    record = {**_record("a", 0.5, 0.5), "curves": [{"train_seconds": 1.0}]}
    with pytest.raises(RegistryError, match="benchmark file"):
        compare.compare({"grid": [compare.Job(record, 0, str(tmp_path / "missing.tsv"))]}, {"grid": [record]})
