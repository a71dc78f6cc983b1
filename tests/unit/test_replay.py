"""The replay on a synthetic grid: successive halving's replay chooses what the workflow's own
promotion chooses, every method is seeded and spends at most the grid's compute, regret is exact."""

import math
import sys

import numpy as np
import pandas as pd
import pytest
from helpers import REPO

from tlselect.core.registry import rank, write_record
from tlselect.report.tables import write_csv
from tlselect.runs import candidate_runs
from tlselect.search import brackets, replay

sys.path.insert(0, str(REPO / "scripts"))
import replay as replay_cli  # noqa: E402

SEARCH = {"eta": 3, "min_epochs": 1, "max_epochs": 9, "brackets": 3, "q": 3, "startup": 4, "delta": 0.1, "workers": 3,
          "rho": 1 / 3}  # fmt: skip


def synthetic_records(config, seed=0, epochs=9):
    """Grid records of the config's pool: learning curves that cross, costs by backbone and freeze depth."""
    rng = np.random.RandomState(seed)
    records = []
    for name, spec in candidate_runs(config).items():
        s = spec.settings
        final = 0.5 + 0.2 * (s["init"] != "scratch") + 0.1 * rng.rand() - 0.05 * (s["lr"] > 0.05)
        speed = 1.0 + 3 * rng.rand()  # fast starters are not always the best at the end
        val = [float(np.clip(final * (1 - math.exp(-speed * (e + 1) / epochs)), 0, 1)) for e in range(epochs)]
        per_epoch = {"resnet18": 2.0, "mobilenet_v3_small": 1.0, "resnet50": 6.0}[s["backbone"]]
        per_epoch *= 0.4 if s["freeze"] not in ("none",) else 1.0
        curves = [{"val_accuracy": v, "train_seconds": per_epoch, "eval_seconds": 0.1} for v in val]
        records.append({
            "name": name, "status": "completed", "config": s, "curves": curves,
            "metrics": {"val_accuracy": val[-1], "test_accuracy": float(final + 0.02 * rng.randn())},
        })  # fmt: skip
    return records


def test_sh_replay_chooses_what_the_workflow_promotion_chooses(config):
    rows = replay.table(synthetic_records(config))
    settings = {**config["search"], **SEARCH}
    # the workflow's brackets and promotion, rung by rung, on the rows' validation accuracy at each rung's epochs
    (bracket,) = brackets.brackets(config, "sh")
    names = list(bracket.candidates)
    reached = dict.fromkeys(names, bracket.epochs[0])  # epochs each candidate trained in all
    for rung in range(1, bracket.rungs):
        before = bracket.epochs[rung - 1]
        records = {n: {"name": n, "status": "completed", "metrics": {"val_accuracy": rows[n].val[before - 1]}}
                   for n in names}  # fmt: skip
        names = [k["candidate"] for k in brackets.promote(records, bracket.keep[rung])]
        reached.update(dict.fromkeys(names, bracket.epochs[rung]))
    done = replay.run("sh", rows, settings, seed=5)
    assert done.trace[-1][2] == names[0] and len(names) == 1
    assert done.epochs == bracket.cost() == sum(reached.values()) and done.level == 9
    # survivors continue their checkpoints: each candidate's epochs are paid once
    assert done.seconds == pytest.approx(sum(sum(rows[n].seconds[:e]) for n, e in reached.items()))
    assert replay.run("sh", rows, settings, seed=6).trace[-1] == done.trace[-1]


@pytest.mark.parametrize("method", replay.METHODS)
def test_every_method_is_seeded_and_within_the_grid_budget(config, method):
    rows = replay.table(synthetic_records(config))
    settings = {**config["search"], **SEARCH}
    first, again = replay.run(method, rows, settings, 3), replay.run(method, rows, settings, 3)
    assert first.trace == again.trace
    grid_epochs = sum(len(r.val) for r in rows.values())
    if method in ("hb", "bohb"):
        assert first.epochs >= grid_epochs and first.trace[0][0] < first.trace[-1][0]
    else:
        assert first.epochs <= grid_epochs
    if method in ("grid", "random", "tpe", "gp_ucb", "cost_gp_ucb"):  # they end having trained every grid point
        assert first.epochs == grid_epochs and len(first.trace) == len(rows)
        chosen = rows[first.trace[-1][2]]
        assert chosen.val[-1] == max(r.val[-1] for r in rows.values())


def test_regret_is_the_best_test_minus_the_incumbents():
    rows = {
        "a": replay.Candidate("a", {}, (0.5, 0.9), (1.0, 1.0), 0.70),
        "b": replay.Candidate("b", {}, (0.6, 0.8), (3.0, 3.0), 0.80),
    }
    done = replay.Replay(rows)
    done.train("b", 1)  # incumbent b at 1 epoch
    done.train("a", 1)  # b still (0.6 > 0.5)
    done.train("a", 2, start=1)  # a at 2 epochs: the most epochs so far
    assert [name for *_, name in done.trace] == ["b", "b", "a"] and done.epochs == 3 and done.seconds == 5.0
    # grid: 4 epochs, 8 seconds; best test 0.80
    assert replay.regrets(done, rows, (0.2, 0.25, 0.5, 0.75), "epochs") == pytest.approx(
        [math.nan, 0.0, 0.0, 10.0], nan_ok=True
    )
    assert replay.regrets(done, rows, (0.25, 0.5, 0.625), "seconds") == pytest.approx(
        [math.nan, 0.0, 10.0], nan_ok=True
    )
    mean, low, high, n = replay.summarize(np.array([1.0, 2.0, 3.0, math.nan]))
    assert (mean, n) == (2.0, 3) and high - mean == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)


def test_the_script_writes_the_table_and_the_figure(config, tmp_path):
    paths = []
    for i, record in enumerate(synthetic_records(config)):
        for curve in record["curves"]:
            curve.update(epoch=1, train_loss=1.0, train_accuracy=0.5, val_loss=1.0, lr=0.1)
        record.update(
            run_id=f"run{i}", kind="candidate", seed=0, init={"source": "x", "classifier_replaced": True},
            num_classes=10, parameters={"trainable": 1, "total": 1}, data={"train": 1, "val": 1, "test": 1},
            timings=dict.fromkeys(("data_seconds", "cache_seconds", "train_seconds", "eval_seconds"), 1.0)
            | {"wall_seconds": 1.0, "epoch_seconds": [1.0]}, throughput_images_per_second=None,
            hardware={"platform": "x", "device": "cpu"},
            versions={"python": "3", "torch": "2", "torchvision": "0"},
        )  # fmt: skip
        record["metrics"]["best_val_accuracy"] = record["metrics"]["val_accuracy"]
        paths.append(tmp_path / f"run{i}.json")
        write_record(paths[-1], record)
    out, figure = tmp_path / "replay.csv", tmp_path / "replay.png"
    args = ["--grid", *map(str, paths), "--eta", "3", "--min-epochs", "1", "--max-epochs", "9", "--brackets", "3"]
    assert replay_cli.main([*args, "--seeds", "5", "--q", "3", "--out", str(out), "--figure", str(figure)]) == 0
    table = pd.read_csv(out)
    assert len(table) == len(replay.METHODS) * 2 * 4 and set(table["method"]) == set(replay.METHODS)
    full = table[(table["share"] == 1.0) & ~table["method"].isin(["hb", "bohb"])]
    best_by_val = max(synthetic_records(config), key=lambda r: r["metrics"]["val_accuracy"])
    best_test = max(r["metrics"]["test_accuracy"] for r in synthetic_records(config))
    random_regret = 100 * (best_test - best_by_val["metrics"]["test_accuracy"])
    rows = full[full["method"].isin(["grid", "random", "tpe", "gp_ucb", "cost_gp_ucb"])]
    assert rows["regret_points"].to_numpy() == pytest.approx(random_regret) and (rows["seeds"] == 5).all()
    assert (table["ci95_low"] <= table["regret_points"]).all() and figure.read_bytes()[:4] == b"\x89PNG"


def hand_pool(vals: dict[str, list[float]], seconds: float = 1.0) -> dict[str, replay.Candidate]:
    """A pool of one arm whose candidates differ in learning rate: ``{name: validation accuracy per epoch}``."""
    return {
        name: replay.Candidate(
            name,
            {
                "backbone": "resnet18",
                "init": "source",
                "freeze": "none",
                "lr": 0.01 * (i + 1),
                "resolution": 32,
                "weight_decay": 1e-4,
                "label_smoothing": 0.0,
                "batch_size": 16,
            },
            tuple(val),
            (seconds,) * len(val),
            val[-1],
        )  # fmt: skip
        for i, (name, val) in enumerate(sorted(vals.items()))
    }


def test_asha_promotes_the_top_of_a_rung_before_it_starts_a_new_candidate():
    rng = np.random.RandomState(0)
    rows = hand_pool({f"c{i}": list(rng.rand(9)) for i in range(12)})
    settings = {**SEARCH, "workers": 1}
    done = replay.run("asha", rows, settings, seed=4)
    epochs = (1, 3, 9)
    results = {e: [] for e in epochs}  # records of each rung, as they came
    promoted = set()
    for name, reached in done.results:  # one worker: each job starts when the one before has ended
        tops = {e: [r["name"] for r in rank(results[e])[: len(results[e]) // 3]] for e in epochs[:-1]}
        waiting = [(n, epochs[epochs.index(e) + 1]) for e, top in tops.items() for n in top]
        waiting = [job for job in waiting if job not in promoted]
        if reached == 1:  # a new candidate only when nothing can be promoted
            assert not waiting
        else:  # the best waiting candidate of the highest rung
            assert (name, reached) == max(waiting, key=lambda job: job[1])
            promoted.add((name, reached))
        val = rows[name].val[reached - 1]
        results[reached].append({"name": name, "status": "completed", "metrics": {"val_accuracy": val}})
    assert done.epochs <= 12 * 9 and len(results[9]) >= 1
    # compute: each promotion continues its checkpoint
    assert done.epochs == sum(len(results[e]) * (e - p) for e, p in zip(epochs, (0, 1, 3), strict=True))


def test_asha_on_several_workers_charges_each_job_when_it_starts():
    rows = hand_pool({f"c{i}": [0.1 * (i % 5) + 0.01 * e for e in range(9)] for i in range(15)}, seconds=2.0)
    one, four = (replay.run("asha", rows, {**SEARCH, "workers": w}, seed=1) for w in (1, 4))
    assert one.results != four.results and four.epochs <= 15 * 9
    # with 4 workers the first result arrives when 4 one-epoch jobs have started
    assert four.trace[0][:2] == (4, 8.0) and one.trace[0][:2] == (1, 2.0)


def test_bohb_draws_at_random_until_a_budget_has_enough_observations_then_from_tpe_on_the_largest():
    rng = np.random.RandomState(0)
    vals = {f"c{i}": list(rng.rand(9)) for i in range(30)}
    pool = hand_pool(vals)
    names = sorted(pool)
    space = replay._space(pool, names)
    few = {1: [(pool[n].params, 0.5) for n in names[:2]]}  # d = 1 varying parameter (lr): the model needs 4
    drawn = replay._bohb_draw(space, names, pool, few, 5, {"rho": 0.0}, np.random.RandomState(3), seed=7)
    assert len(set(drawn)) == 5 and set(drawn) <= set(names)
    observed = {1: [(pool[n].params, vals[n][0]) for n in names[:20]],
                3: [(pool[n].params, vals[n][2]) for n in names[:6]],
                9: [(pool[n].params, vals[n][8]) for n in names[:3]]}  # fmt: skip
    drawn = replay._bohb_draw(space, names, pool, observed, 4, {"rho": 0.0}, np.random.RandomState(3), seed=7)
    asked = replay.strategies.tpe_suggest(space, observed[3], 4, 7, discrete=True, startup=4)
    assert drawn == [n for p in asked for n in names if pool[n].params == p]


def test_goals_read_the_anytime_curve():
    shares = [0.1, 0.2, 1 / 3, 0.5, 1.0]
    regret = {  # method -> mean regret at each share; the same on both axes
        "random": [9, 6, 5, 3, 2], "tpe": [9, 5, 2, 2, 2], "bohb": [8, 0.8, 4.5, 3, 2],
        "gp_ucb": [9, 6, 4, 2, 2], "cost_gp_ucb": [8, 2, 2, 2, 2],
    }  # fmt: skip
    curve = pd.DataFrame([
        {"method": m, "axis": axis, "share": s, "regret_points": r, "ci95_low": r - 0.5, "ci95_high": r + 0.5,
         "seeds": 10}
        for axis in ("epochs", "seconds") for m, values in regret.items() for s, r in zip(shares, values, strict=True)
    ])  # fmt: skip
    goals = replay.goals(curve).set_index(["goal", "axis", "method"])
    assert goals.loc[("a", "epochs", "bohb"), "met"] and goals.loc[("a", "epochs", "bohb"), "regret_points"] == 0.8
    assert goals.loc[("b", "seconds", "tpe"), "met"] and not goals.loc[("b", "seconds", "bohb"), "met"]
    # plain GP-UCB first reaches its final 2 at half the seconds, cost-aware at a fifth
    c = goals.loc[("c", "seconds", "cost_gp_ucb")]
    assert c["met"] and c["share"] == 0.2 and "0.500" in c["reference"]


SHIPPED = REPO / "benchmarks" / "pools" / "cifar10-deer-horse.csv"


def test_the_shipped_pool_is_a_product_with_every_epoch_and_reads_back_as_written(tmp_path):
    rows = replay.read_pool(SHIPPED)
    assert len(rows) >= 100
    (epochs,) = {len(r.val) for r in rows.values()}  # every candidate trained to the same last epoch
    assert all(len(r.seconds) == epochs and r.test is not None for r in rows.values())
    replay._space(rows, sorted(rows))  # a product of its own values, or an error
    assert {"backbone", "init", "freeze", "lr", "weight_decay"} <= {
        k for k in replay.POOL_COLUMNS[1:9] if len({r.params[k] for r in rows.values()}) > 1
    }
    write_csv(replay.pool_frame(rows), tmp_path / "again.csv")
    assert replay.read_pool(tmp_path / "again.csv") == rows


def test_every_method_replays_a_slice_of_the_shipped_pool():
    rows = replay.read_pool(SHIPPED)
    lrs, wds = (sorted({r.params[k] for r in rows.values()}) for k in ("lr", "weight_decay"))
    part = {n: r for n, r in rows.items() if r.params["lr"] in lrs[-2:] and r.params["weight_decay"] == wds[0]}
    top = len(next(iter(part.values())).val)
    settings = {**SEARCH, "eta": 3, "max_epochs": top, "brackets": 2, "q": 2, "startup": 3}
    curve = replay.curves(part, settings, seeds=3, shares=(0.5, 1.0))
    assert set(curve["method"]) == set(replay.METHODS) and (curve["regret_points"].dropna() >= 0).all()
    chosen = min(part.values(), key=lambda r: (-(r.val[-1] or 0.0), r.name))  # rank's order: ties by name
    exhaustive = 100 * (max(r.test or 0.0 for r in part.values()) - (chosen.test or 0.0))
    final = curve[(curve["share"] == 1.0) & curve["method"].isin(["grid", "random", "tpe", "gp_ucb"])]
    assert final["regret_points"].to_numpy() == pytest.approx(exhaustive)


def test_the_seeds_spread_over_processes_give_the_same_curves():
    rng = np.random.RandomState(1)
    rows = hand_pool({f"c{i}": list(rng.rand(9)) for i in range(9)})
    one, two = (replay.curves(rows, SEARCH, 4, (0.2, 1.0), ("random", "asha"), processes=p) for p in (1, 2))
    pd.testing.assert_frame_equal(one, two)


def test_a_missing_benchmark_pool_is_a_config_error_naming_the_key(config, tmp_path):
    config["search"]["replay"]["benchmark"].update(enabled=True, pool=str(tmp_path / "absent.csv"))
    with pytest.raises(brackets.ConfigError, match=r"search\.replay\.benchmark\.pool: .*absent\.csv does not exist"):
        brackets.check(config)
    config["search"]["replay"]["benchmark"]["pool"] = "benchmarks/pools/cifar10-deer-horse.csv"  # the workflow's own
    brackets.check(config)
    assert brackets.benchmark_pool(config) == SHIPPED
