"""Many users in the workflow: two tiny tenants with their own data and pools share a budget of three
jobs in rounds of two, under round robin and GREEDY; each tenant's tables and the global table; a
re-run has nothing to do; a lost job reruns alone; a tenant with bad data stops the run by name
before any job, leaving the other tenant's results as they were."""

import json

import pandas as pd
import pytest
import yaml
from helpers import job_counts, snakemake, tiny_study, write_study

from tlselect.core.registry import read_record

TARGETS = ("results/tables/tenants.csv", "results/figures/tenants.png")
STUDIES = [
    {"name": "pets", "data": {"classes": ["cat", "dog"]}},
    {"name": "wild", "data": {"val_per_class": 3}, "weight": 2, "strategy": "random",
     "search": {"backbones": ["resnet18", "mobilenet_v3_small"]}},
]  # fmt: skip


@pytest.fixture(scope="module")
def tenants_study(tmp_path_factory, tiny_archive):
    workdir = tmp_path_factory.mktemp("tenants")
    tiny = tiny_study(
        tiny_archive,
        device="cpu",
        features={"layers": []},
        speedups={"enabled": False},
        search={"backbones": ["resnet18"], "inits": ["scratch"], "freezes": ["none"], "lrs": [0.05, 0.1],
                "max_epochs": 1},
        tenants={"studies": STUDIES, "jobs": 3, "q": 2, "schedulers": ["round_robin", "greedy"]},
    )  # fmt: skip
    write_study(workdir, tiny)
    snakemake(workdir, *TARGETS)
    return workdir


def assigned(workdir, scheduler):
    return [
        trial
        for r in range(2)
        for trial in json.loads((workdir / f"results/schedules/{scheduler}/round{r}/assigned.json").read_text())[
            "trials"
        ]
    ]


def test_each_scheduler_spends_the_budget_and_each_tenant_gets_its_tables(tenants_study):
    robin, greedy = assigned(tenants_study, "round_robin"), assigned(tenants_study, "greedy")
    assert [t["tenant"] for t in robin] == ["pets", "wild", "pets"]  # fewest jobs first, config order
    assert [t["tenant"] for t in greedy][:2] == ["pets", "wild"]  # the warm-up starts round robin
    for scheduler, trials in (("round_robin", robin), ("greedy", greedy)):
        for i, trial in enumerate(trials):
            record = read_record(tenants_study / f"results/schedules/{scheduler}/round{i // 2}/job{i % 2}.json")
            assert record["name"] == trial["candidate"] and record["status"] == "completed"
            # trained on its tenant's own subset: pets 2 classes x 2, wild 3 classes x 3 validation images
            assert record["data"]["val"] == {"pets": 4, "wild": 9}[trial["tenant"]]
    table = pd.read_csv(tenants_study / "results/tables/tenants.csv")
    assert set(table["tenant"]) == {"pets", "wild", "average"}
    last = table[table["job"] == 3].set_index(["scheduler", "tenant"])
    for scheduler, trials in (("round_robin", robin), ("greedy", greedy)):
        for tenant in ("pets", "wild"):
            assert last.loc[(scheduler, tenant), "jobs"] == [t["tenant"] for t in trials].count(tenant)
        tests = {t: last.loc[(scheduler, t), "test_accuracy"] for t in ("pets", "wild")}
        expected = (tests["pets"] + 2 * tests["wild"]) / 3  # wild weighs twice
        assert last.loc[(scheduler, "average"), "test_accuracy"] == pytest.approx(expected)
    assert table.groupby("scheduler")["compute_seconds"].is_monotonic_increasing.all()
    for tenant in ("pets", "wild"):
        folder = tenants_study / f"results/tenants/{tenant}"
        runs = pd.read_csv(folder / "runs.csv")
        mine = [t for t in robin + greedy if t["tenant"] == tenant]
        assert sorted(runs["name"]) == sorted(t["candidate"] for t in mine)
        assert len(list((folder / "registry").glob("*.json"))) == len(mine)
        assert runs.groupby("scheduler")["selected"].sum().eq(1).all()
        assert f"# Tenant {tenant}" in (folder / "summary.md").read_text()
    assert (tenants_study / "results/figures/tenants.png").read_bytes()[:4] == b"\x89PNG"


def test_a_rerun_does_nothing_and_a_lost_job_reruns_alone(tenants_study):
    assert "Nothing to be done" in snakemake(tenants_study, "-n", *TARGETS).stdout
    lost = tenants_study / "results/schedules/greedy/round1/job0.json"
    lost.unlink()
    (tenants_study / "results/tables/tenants.csv").unlink()  # what reads it: Snakemake keeps intermediates lost
    counts = job_counts(snakemake(tenants_study, "-n", *TARGETS).stdout)
    assert counts == {"tenant_job": 1, "tenant_tables": 1, "tenant_figure": 1}
    snakemake(tenants_study, *TARGETS)
    assert read_record(lost)["status"] == "completed"


def test_a_tenant_with_bad_data_stops_the_run_by_name_and_leaves_the_others(tenants_study, tmp_path):
    overlay = yaml.safe_load((tenants_study / "tiny.yaml").read_text())
    before = {p: p.read_bytes() for p in (tenants_study / "results/tenants/pets").rglob("*") if p.is_file()}
    broken = json.loads(json.dumps(overlay))
    broken["tenants"]["studies"][1]["data"]["archive"] = str(tmp_path / "missing.tar.gz")
    broken["tenants"]["studies"][0]["data"]["train_per_class"] = 9  # pets would rerun if anything ran
    write_study(tenants_study, broken)
    try:
        failed = snakemake(tenants_study, *TARGETS, check=False)
    finally:
        write_study(tenants_study, overlay)
    assert failed.returncode != 0
    message = failed.stdout + failed.stderr
    assert "tenants.studies[1] (wild): data.archive" in message and "missing.tar.gz does not exist" in message
    assert {p: p.read_bytes() for p in (tenants_study / "results/tenants/pets").rglob("*") if p.is_file()} == before
