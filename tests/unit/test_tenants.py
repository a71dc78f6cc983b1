"""Many users: the global schedulers on hand-made pools where the right choice is known, the replay's
bookkeeping, the pool table, and the ``tenants`` block's checks (each error names its tenant)."""

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
from helpers import SCHEMA, default_config

from tlselect.config import ConfigError, load_and_check, merged
from tlselect.search import replay, strategies, tenancy, tenants


def pool(task: str, values: dict[str, list[float]], seconds: float = 1.0) -> dict[str, replay.Candidate]:
    """A pool of one-epoch candidates: ``{arm backbone: [accuracy of each lr]}`` (validation = test)."""
    rows = {}
    for arm, accuracies in values.items():
        for i, accuracy in enumerate(accuracies):
            params = {"backbone": arm, "init": "scratch", "freeze": "none", "lr": 0.01 * (i + 1), "resolution": 32,
                      "weight_decay": 0.0, "label_smoothing": 0.0, "batch_size": 8}  # fmt: skip
            name = f"{task}-{arm}-{i}"
            rows[name] = replay.Candidate(name, params, (accuracy,), (seconds,), accuracy)
    return rows


# A tenant whose candidates are all alike, and one with a needle: the right use of the budget is to
# give the flat tenant no more than the warm-up and the needle tenant the rest.
POOLS = {
    "flat": pool("flat", {"a": [0.80, 0.80, 0.80, 0.80], "b": [0.80, 0.80, 0.80, 0.80]}),
    "needle": pool("needle", {"a": [0.30, 0.30, 0.30, 0.30], "b": [0.50, 0.50, 0.50, 0.95]}),
}


def test_greedy_gives_the_flat_tenant_only_its_warm_up_until_the_needle_is_found():
    budget = 10 / 16  # ten of the sixteen one-second jobs
    for seed in range(4):
        greedy = tenants.replay_run(POOLS, "greedy", "gp_ucb", budget, seed)
        robin = tenants.replay_run(POOLS, "round_robin", "gp_ucb", budget, seed)
        assert len(greedy) == len(robin) == 10
        assert [round(step[1] * 16) for step in greedy] == list(range(1, 11))  # each job: one second of 16
        assert [step[3] for step in robin] == ["flat", "needle"] * 5
        # greedy: each tenant twice (the warm-up), then the needle tenant (results 0.3 and 0.5: room
        # to improve) outbids the flat one (0.8 twice) until its 0.95 is found
        found = next(j for j, _, regret, _ in greedy if regret == pytest.approx(0.0))
        assert [step[3] for step in greedy[:found]].count("flat") <= tenants.WARMUP
        assert found <= next((j for j, _, regret, _ in robin if regret == pytest.approx(0.0)), math.inf)


def test_greedy_scores_the_tenant_with_room_to_improve_higher():
    flat = tenants.Tenant("flat", [r.params for r in POOLS["flat"].values()], strategy="gp_ucb")
    needle = tenants.Tenant("needle", [r.params for r in POOLS["needle"].values()], strategy="gp_ucb")
    flat.history = [(r.params, 0.8, 1.0) for r in list(POOLS["flat"].values())[:2]]
    rows = list(POOLS["needle"].values())
    needle.history = [(rows[0].params, 0.3, 1.0), (rows[4].params, 0.5, 1.0)]
    assert tenants.potential(needle) > tenants.potential(flat) > 0
    rng = np.random.RandomState(0)
    assert tenants.choose("greedy", [flat, needle], rng).name == "needle"
    # hybrid: greedy while a gain exceeds the threshold, round robin (fewest jobs) once none does
    assert tenants.choose("hybrid", [flat, needle], rng, threshold=0.0).name == "needle"
    flat.history = flat.history[:2]
    needle.history.append((rows[1].params, 0.3, 1.0))
    assert tenants.choose("hybrid", [flat, needle], rng, threshold=10.0).name == "flat"
    assert tenants.choose("greedy", [flat, needle], rng, threshold=10.0).name == "needle"
    # a tenant's weight multiplies its gain
    flat.weight = 1000.0
    assert tenants.choose("greedy", [flat, needle], rng).name == "flat"


def test_hybrid_sets_aside_a_tenant_that_stopped_improving_and_greedy_does_not():
    rows = list(POOLS["needle"].values())
    noisy = tenants.Tenant("noisy", [r.params for r in rows], strategy="gp_ucb")
    flat = tenants.Tenant("flat", [r.params for r in POOLS["flat"].values()], strategy="gp_ucb")
    flat.history = [(r.params, 0.8, 1.0) for r in list(POOLS["flat"].values())[:2]]
    # wide results (room to improve by GREEDY's bound), but its best came four jobs ago
    noisy.history = [(rows[4].params, 0.6, 1.0), (rows[0].params, 0.1, 1.0), (rows[1].params, 0.2, 1.0),
                     (rows[5].params, 0.55, 1.0)]  # fmt: skip
    assert tenants.potential(noisy) > tenants.potential(flat)
    assert noisy.stalled(3) and not noisy.stalled(4) and not flat.stalled(3)
    rng = np.random.RandomState(0)
    assert tenants.choose("greedy", [flat, noisy], rng, patience=3).name == "noisy"
    assert tenants.choose("hybrid", [flat, noisy], rng, threshold=0.0, patience=3).name == "flat"
    assert tenants.choose("hybrid", [flat, noisy], rng, threshold=0.0, patience=4).name == "noisy"


def test_round_robin_cycles_in_order_and_skips_exhausted_tenants():
    small = {"one": pool("one", {"a": [0.5]}), "two": pool("two", {"a": [0.4, 0.6, 0.7]})}
    order = []
    built = [tenants.Tenant(n, [r.params for r in small[n].values()], strategy="random") for n in small]
    for round_ in range(5):
        chosen = tenants.schedule(built, "round_robin", 1, 0, round_)
        if not chosen:
            break
        name, params = chosen[0]
        order.append(name)
        built[list(small).index(name)].history.append((params, 0.5, 1.0))
    assert order == ["one", "two", "two", "two"]
    assert tenants.schedule(built, "round_robin", 1, 0, 9) == []


def test_random_scheduler_is_seeded_and_a_round_spreads_its_jobs():
    built = [tenants.Tenant(n, [r.params for r in POOLS[n].values()], seed=i) for i, n in enumerate(POOLS)]
    draws = [tenants.schedule(built, "random", 3, 7, r) for r in range(4)]
    assert draws == [tenants.schedule(built, "random", 3, 7, r) for r in range(4)]
    assert {name for d in draws for name, _ in d} == set(POOLS)
    # two jobs of the same tenant in one round: two different candidates, and the histories are untouched
    chosen = tenants.schedule(built, "round_robin", 4, 0, 0)
    for name in POOLS:
        keys = [strategies.point_key(p) for n, p in chosen if n == name]
        assert len(keys) == 2 and len(set(keys)) == 2
    assert all(not t.history for t in built)


def test_replay_table_reports_every_scheduler_and_the_compute_to_round_robins_final():
    curve, summary = tenants.replay_table(POOLS, tenants.SCHEDULERS, "gp_ucb", 10 / 16, 3, [5 / 16, 10 / 16])
    assert set(curve["scheduler"]) == set(tenants.SCHEDULERS) and (curve["seeds"] == 3).all()
    assert set(summary["scheduler"]) == {*tenants.SCHEDULERS, "oracle"}
    assert list(curve.columns) == ["scheduler", "strategy", "axis", "share", "regret_points", "ci95_low",
                                   "ci95_high", "seeds"]  # fmt: skip
    rows = summary.set_index("scheduler")
    assert rows.loc["round_robin", "compute_to_round_robin_final"] <= 1.0
    assert rows.loc["greedy", "compute_to_round_robin_final"] <= rows.loc["round_robin", "compute_to_round_robin_final"]


def test_read_pools_round_trips_the_pool_table(tmp_path):
    rows = []
    for task, candidates in POOLS.items():
        for name, row in candidates.items():
            rows.append({"task": task, "candidate": name, **row.params, "epoch": 1, "val_accuracy": row.val[0],
                         "seconds": row.seconds[0], "test_accuracy": row.test})  # fmt: skip
    pd.DataFrame(rows).to_csv(tmp_path / "pools.csv", index=False)
    assert tenants.read_pools(tmp_path / "pools.csv") == POOLS
    pd.DataFrame(rows).drop(columns="seconds").to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(Exception, match="seconds"):
        tenants.read_pools(tmp_path / "bad.csv")


# --- the tenants block ---------------------------------------------------------------------------


def tenant_config(archive, studies, **block):
    from snakemake.utils import validate

    config = merged(default_config(validated=False), {
        "data": {"archive": str(archive), "name": "tiny", "train_per_class": 8, "val_per_class": 2,
                 "test_per_class": 4},
        "search": {"backbones": ["resnet18"], "inits": ["scratch"], "freezes": ["none"], "lrs": [0.05, 0.1]},
        "tenants": {"studies": studies, **block},
    })  # fmt: skip
    return load_and_check(config, SCHEMA, lambda data, schema: validate(data, schema))


def test_each_tenant_gets_the_study_config_with_its_own_blocks_merged_over(tiny_archive):
    config = tenant_config(tiny_archive, [
        {"name": "pets", "data": {"classes": ["cat", "dog"]}},
        {"name": "frogs", "data": {"classes": ["frog"]}, "search": {"lrs": [0.1]}, "weight": 2, "strategy": "random"},
    ], jobs=3, q=2)  # fmt: skip
    configs = tenancy.tenant_configs(config)
    assert list(configs) == ["pets", "frogs"]
    assert configs["pets"]["data"]["classes"] == ["cat", "dog"] and configs["pets"]["search"]["lrs"] == [0.05, 0.1]
    assert configs["frogs"]["search"]["lrs"] == [0.1] and configs["frogs"]["data"]["train_per_class"] == 8
    contexts = tenancy.contexts(config)
    assert contexts["frogs"]["weight"] == 2 and contexts["frogs"]["strategy"] == "random"
    assert (
        contexts["pets"]["strategy"] == "cost_gp_ucb" and contexts["pets"]["epochs"] == config["search"]["max_epochs"]
    )
    assert tenancy.rounds(config) == 2 and [tenancy.slots(config, r) for r in (0, 1)] == [2, 1]
    # no tenants: nothing to schedule
    assert tenancy.rounds(tenant_config(tiny_archive, [])) == 0


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"data": {"archive": "/nonexistent/images.tar.gz"}}, r"tenants.studies\[1\] \(wild\): data.archive"),
        ({"data": {"classes": ["cat", "zebra"]}}, r"tenants.studies\[1\] \(wild\): data.classes: \['zebra'\]"),
        ({"data": {"train_per_class": 50}}, r"tenants.studies\[1\] \(wild\): data.train_per_class"),
        ({"search": {"inits": ["source"]}}, r"tenants.studies\[1\] \(wild\).search.inits: init source"),
        ({"search": {"lrs": "fast"}}, r"tenants.studies\[1\] \(wild\): "),
    ],
)
def test_a_bad_tenant_is_refused_by_name_before_any_job(tiny_archive, bad, message):
    good = {"name": "pets", "data": {"classes": ["cat", "dog"]}}
    with pytest.raises(ConfigError, match=message):
        tenant_config(tiny_archive, [good, {"name": "wild", **bad}])


def test_the_budget_and_names_are_checked(tiny_archive):
    studies = [{"name": "pets"}, {"name": "frogs"}]
    with pytest.raises(ConfigError, match="tenants.jobs: 5 jobs but the tenants' pools hold 4 candidates"):
        tenant_config(tiny_archive, studies, jobs=5)
    with pytest.raises(ConfigError, match="duplicate tenant name 'pets'"):
        tenant_config(tiny_archive, [{"name": "pets"}, {"name": "pets"}], jobs=2)
    with pytest.raises(ConfigError, match="not 'average'"):
        tenant_config(tiny_archive, [{"name": "average"}], jobs=1)


def test_the_global_figure_and_sentence_come_from_the_global_table(tmp_path):
    from tlselect.report.tenant_plots import draw_tenants, tenants_sentence

    rows = []
    for scheduler, accuracies in (("round_robin", (0.6, 0.7)), ("greedy", (0.8, 0.7))):
        for job, seconds in ((1, 2.0), (2, 5.0)):
            tests = {"a": accuracies[0] if job > 1 else 0.5, "b": accuracies[1]}
            for tenant, test in tests.items():
                rows.append({"scheduler": scheduler, "job": job, "compute_seconds": seconds, "tenant": tenant,
                             "jobs": 1, "candidate": "c", "val_accuracy": test, "test_accuracy": test})  # fmt: skip
            rows.append({"scheduler": scheduler, "job": job, "compute_seconds": seconds, "tenant": "average",
                         "jobs": job, "candidate": "", "val_accuracy": None,
                         "test_accuracy": sum(tests.values()) / 2})  # fmt: skip
    table = pd.DataFrame(rows)
    sentence = tenants_sentence(table)
    assert sentence.startswith("After 2 jobs shared by 2 tenants")
    assert sentence.index("greedy 0.750 in 5 s") < sentence.index("round_robin 0.650 in 5 s")  # best first
    draw_tenants(table, tmp_path / "tenants.png")
    assert (tmp_path / "tenants.png").read_bytes()[:4] == b"\x89PNG"


def test_a_diverged_run_counts_at_the_worst_accuracy_in_greedys_bound():
    rows = list(POOLS["needle"].values())
    diverging = tenants.Tenant("diverging", [r.params for r in rows], strategy="gp_ucb")
    diverging.history = [(rows[0].params, 0.5, 1.0), (rows[4].params, None, 1.0), (rows[1].params, 0.45, 1.0)]
    at_worst = dataclasses.replace(diverging, history=[(p, v or 0.45, s) for p, v, s in diverging.history])
    assert tenants.potential(diverging) == pytest.approx(tenants.potential(at_worst))
    assert diverging.best() == 0.5  # its incumbent is still its best run


def test_the_oracle_needs_no_more_than_any_scheduler_and_gives_the_flat_tenant_one_job():
    needle = tenants.tenant_curve(POOLS["needle"], "gp_ucb", seed=1)  # the oracle's seed 0: tenant 1 is needle
    found = int(np.argmax(np.isclose(needle[:, 1], 0.0)))
    assert needle[found, 1] == pytest.approx(0.0) and needle[found, 0] == found  # one second a job
    # global regret 0: the flat tenant's first job (0.8, its best) and the needle tenant's jobs to 0.95
    assert tenants.oracle_share(POOLS, "gp_ucb", 0, 0.0) == pytest.approx((1 + found) / 16)
    assert tenants.oracle_share(POOLS, "gp_ucb", 0, 0.0, budget=found / 16) == math.inf
    for scheduler in tenants.SCHEDULERS:
        trace = tenants.replay_run(POOLS, scheduler, "gp_ucb", 1.0, 0)
        assert tenants.oracle_share(POOLS, "gp_ucb", 0, 5.0) <= tenants.reached(trace, 5.0)


def test_a_tenant_of_model_types_chooses_as_the_model_search():
    points = [r.params for r in POOLS["needle"].values()]
    history = [(points[0], 0.3, 1.0)]
    for seed in range(3):
        tenant = tenants.Tenant("needle", points, history=list(history), seed=seed)
        assert tenants.next_candidate(tenant) == strategies.ucb_suggest(points, history, 1, seed, cost_aware=True)[0]
