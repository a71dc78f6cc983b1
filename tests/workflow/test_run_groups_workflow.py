"""Run groups in the workflow: the tiny study's policies trained by one job per group give the runs,
files and results of one job per run (identical one after another, to float rounding fused); a killed
group job resumes every run; a diverging run is marked so while the others finish."""

import json
import time

import pandas as pd
import pytest
import torch
import yaml
from helpers import (
    TIMING_KEYS,
    job_counts,
    kill_session,
    make_study,
    snakemake,
    snakemake_command,
    start_snakemake,
    tiny_study,
    write_study,
)

POLICIES = [{"name": "a", "init": "scratch", "freeze": "none"},
            {"name": "b", "init": "scratch", "freeze": "none", "lr": 0.01, "weight_decay": 0.0},
            {"name": "c", "init": "scratch", "freeze": "none", "lr": 0.02, "label_smoothing": 0.0}]  # fmt: skip
WILD = {"name": "wild", "init": "scratch", "freeze": "none", "lr": 1e8}  # diverges in its second epoch
TABLE = "results/tables/runs.csv"
# What differs between two runs of the same spec: timings, and where a run resumed or whom it fused with.
VARYING = {"timings", "throughput_images_per_second", "wall_seconds", "resumed_from_epoch", "fused_with"}


def study(workdir, archive, policies, run_groups, epochs=3, **blocks) -> dict:
    """Write the tiny study of ``policies`` with ``run_groups``; its runs."""
    runs = make_study(workdir, archive, policies, epochs=epochs)
    overlay = yaml.safe_load((workdir / "tiny.yaml").read_text())
    groups = {"run_groups": run_groups} if run_groups else {}  # none: the default (auto)
    (workdir / "tiny.yaml").write_text(yaml.safe_dump({**overlay, **groups, **blocks}))
    return runs


def results(workdir, runs) -> dict:
    """Each run's record (timings aside), and its checkpoint's weights and test predictions."""
    out = {}
    for run_id in runs:
        record = json.loads((workdir / f"results/registry/{run_id}.json").read_text())
        record = {k: v for k, v in record.items() if k not in VARYING}
        record["curves"] = [{k: v for k, v in c.items() if k not in TIMING_KEYS} for c in record["curves"]]
        checkpoint = torch.load(workdir / f"results/models/{run_id}.pt", weights_only=True)
        predictions = checkpoint.get("test_predictions", torch.empty(0))  # none: the run diverged
        out[run_id] = (record, {"test_predictions": predictions, **checkpoint["model"]})
    return out


def assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for run_id, (record, weights) in got.items():
        assert record == expected[run_id][0], run_id
        assert all(torch.equal(weights[k], v) for k, v in expected[run_id][1].items()), run_id


def training_jobs(run) -> dict[str, int]:
    """Training jobs per rule of a finished snakemake ``run``."""
    return {rule: n for rule, n in job_counts(run.stdout + run.stderr).items() if rule.startswith("train")}


@pytest.fixture(scope="module")
def alone(tmp_path_factory, tiny_archive):
    """The study with the default run groups, on a CPU without a plan that says otherwise a job per
    run: its runs, results and training jobs."""
    workdir = tmp_path_factory.mktemp("alone")
    runs = study(workdir, tiny_archive, POLICIES, None)
    jobs = training_jobs(snakemake(workdir, TABLE))
    return runs, results(workdir, runs), jobs


def test_one_job_per_group_trains_what_a_job_per_run_trains(tmp_path, tiny_archive, alone):
    runs, expected, jobs = alone
    assert jobs == {"train": 3}
    workdir = tmp_path / "grouped"
    assert study(workdir, tiny_archive, POLICIES, {"size": 2, "fuse": False}) == runs  # the same run ids
    jobs = training_jobs(snakemake(workdir, TABLE))
    assert sorted(jobs.values()) == [1, 1] and "train" in jobs  # a group of two, one run alone
    assert_same(results(workdir, runs), expected)
    assert "Nothing to be done" in snakemake(workdir, TABLE, "-n").stdout


def test_a_killed_group_job_resumes_every_run(tmp_path, tiny_archive, alone):
    runs, expected, _ = alone
    workdir = tmp_path / "killed"
    study(workdir, tiny_archive, POLICIES, {"size": 3, "fuse": False}, fork_server=False)
    first, second = list(runs)[:2]
    out = workdir / "killed.out"
    process = start_snakemake(snakemake_command(workdir, TABLE), workdir, out, new_session=True)
    resume = workdir / f"results/models/{second}.resume.pt"  # the first run has finished by then
    deadline = time.monotonic() + 600
    while not resume.is_file():
        assert process.poll() is None and time.monotonic() < deadline, out.read_text()[-3000:]
        time.sleep(0.05)
    kill_session(process, workdir)
    snakemake(workdir, "--unlock")
    snakemake(workdir, TABLE, "--rerun-incomplete")
    log = next((workdir / "results/logs/train").glob("group_*.log")).read_text()
    assert f"[{first}] restored from" in log and f"[{second}] resuming after epoch" in log
    assert_same(results(workdir, runs), expected)
    assert not list(workdir.glob("results/models/*.resume.pt"))


def test_fused_runs_agree_and_a_diverging_run_leaves_the_others(tmp_path, tiny_archive, alone):
    """Fused in float32, the runs' first epoch agrees with training alone to float rounding (the
    tiny batches' BatchNorm amplifies the fused convolution's other summation order after that;
    tests/unit/test_fusion.py checks fused training exactly in float64)."""
    runs, expected, _ = alone
    workdir = tmp_path / "fused"
    fused_runs = study(workdir, tiny_archive, [*POLICIES, WILD], {"size": 4, "fuse": True}, epochs=3)
    assert list(training_jobs(snakemake(workdir, TABLE)).values()) == [1]
    got = results(workdir, fused_runs)
    for run_id, (record, weights) in got.items():
        if run_id not in runs:
            assert record["status"] == "diverged" and len(record["curves"]) == 2
            continue
        reference = expected[run_id][0]
        assert record["status"] == "completed" and len(record["curves"]) == 3
        assert record["curves"][0]["train_loss"] == pytest.approx(reference["curves"][0]["train_loss"], rel=1e-4)
        assert record["curves"][0]["val_accuracy"] == reference["curves"][0]["val_accuracy"]
        assert weights.keys() == expected[run_id][1].keys()


@pytest.mark.parametrize("repeats", [1, 2])
def test_the_search_grid_and_rungs_train_in_groups(tmp_path, tiny_archive, repeats):
    """A dry run of a tiny search (2 backbones x 2 inits x 2 learning rates) in groups of 4: the grid's
    8 candidates (each with ``repeats`` seeds) in 2 jobs a seed, every rung's slots of successive
    halving and Hyperband in a group's job."""
    search = {"enabled": True, "backbones": ["resnet18", "mobilenet_v3_small"], "inits": ["pretrained", "scratch"],
              "freezes": ["none"], "lrs": [0.05, 0.01], "random_samples": 2, "rounds": 2, "q": 2, "eta": 2,
              "distributions": {"batch_sizes": [8]}, "min_epochs": 1, "max_epochs": 2, "brackets": 2}  # fmt: skip
    overlay = tiny_study(tiny_archive, source_epochs=1, device="cpu", features={"layers": [], "inits": []},
                         policies=POLICIES[:1], speedups={"enabled": False}, search=search,
                         run_groups={"size": 4, "fuse": False}, repeats=repeats)  # fmt: skip
    write_study(tmp_path, overlay)
    counts = job_counts(snakemake(tmp_path, "results/tables/search.csv", "-n").stdout)
    grid = [rule for rule in counts if rule.startswith("search_grid")]
    first_rung = [rule for rule in counts if rule.startswith("search_first_rung")]
    assert len(grid) == 2 * repeats and all(rule.startswith("search_grid_group_") for rule in grid)
    assert 2 <= len(first_rung) < 12 and all(rule.startswith("search_first_rung_group_") for rule in first_rung)
    later = [rule for rule in counts if rule.startswith("search_next_rung")]
    assert later and all(rule.startswith("search_next_rung_group_") for rule in later)
    assert all(counts[rule] == 1 for rule in grid + first_rung + later)


# A search whose random draws and model-based rounds share one shape (one backbone, init and freeze):
# every method's runs can group.
ONE_SHAPE = {"enabled": True, "backbones": ["resnet18"], "inits": ["scratch"], "freezes": ["none"],
             "lrs": [0.1, 0.05, 0.02, 0.01], "random_samples": 3, "rounds": 2, "q": 2, "eta": 2, "min_epochs": 1,
             "max_epochs": 2, "brackets": 1, "distributions": {"batch_sizes": [8]},
             "replay": {"seeds": 2, "q": 1, "startup": 1}}  # fmt: skip
SEARCH_FOLDERS = ("grid", "random", "sh/b0/rung0", "sh/b0/rung1", *(f"{m}/round{r}" for m in ("tpe", "gp_ucb",
                  "cost_gp_ucb") for r in (0, 1)))  # fmt: skip


def search_records(workdir) -> dict:
    """Every search run's record (timings and the group bookkeeping aside), by path."""
    out = {}
    for folder in SEARCH_FOLDERS:
        for path in sorted((workdir / "results/search" / folder).glob("*.json")):
            if path.name not in ("ranking.json", "promoted.json", "suggested.json"):
                record = {k: v for k, v in json.loads(path.read_text()).items() if k not in VARYING}
                record["curves"] = [{k: v for k, v in c.items() if k not in TIMING_KEYS} for c in record["curves"]]
                out[f"{folder}/{path.name}"] = record
    return out


def run_search(workdir, archive, size: int):
    overlay = tiny_study(archive, device="cpu", features={"layers": [], "inits": []}, policies=POLICIES[:1],
                         speedups={"enabled": False}, search=ONE_SHAPE, run_groups={"size": size, "fuse": False},
                         source=None)  # fmt: skip
    write_study(workdir, overlay)
    return snakemake(workdir, "results/tables/search.csv")


def test_random_draws_and_model_based_rounds_train_in_groups_as_they_would_alone(tmp_path, tiny_archive):
    """The whole search, one job per run and in groups of 4 (one after another): random search's
    draws and every round's trials (chosen at run time by the round's suggest job) train in group jobs,
    to the records of one job per run; search.csv counts a group's job once."""
    alone, grouped = tmp_path / "alone", tmp_path / "grouped"
    run_search(alone, tiny_archive, 1)
    run = run_search(grouped, tiny_archive, 4)
    counts = job_counts(run.stdout + run.stderr)
    for method in ("random", "trial"):
        rules = [rule for rule in counts if rule.startswith(f"search_{method}")]
        assert rules and all(rule.startswith(f"search_{method}_group_") for rule in rules), counts
    assert sum(counts[r] for r in counts if r.startswith("search_trial_group_")) == 3 * 2  # 3 methods x 2 rounds
    expected = search_records(alone)
    trials = [path for path in expected if "/round" in path]
    assert len(trials) == 3 * 2 * 2 and all(any(p.startswith(f) for p in expected) for f in SEARCH_FOLDERS)
    assert search_records(grouped) == expected
    table = {t: pd.read_csv(w / "results/tables/search.csv").set_index("method") for t, w in
             (("alone", alone), ("grouped", grouped))}  # fmt: skip
    assert (table["alone"].loc["tpe", "jobs"], table["grouped"].loc["tpe", "jobs"]) == (4, 2)
    assert table["grouped"].loc["random", "jobs"] == 1
