"""The model search in the workflow: snakemake on a tiny archive with a tiny pool (2 backbones x 2
inits), every search method, the proxies, the report section; then a re-run has nothing to do."""

import json

import pandas as pd
import pytest
import yaml
from conftest import PINNED_PLAN, strict_json
from test_workflow import job_counts, snakemake

from tlselect import replay
from tlselect.registry import read_record

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def search_study(tmp_path_factory, tiny_archive):
    workdir = tmp_path_factory.mktemp("search")
    tiny = {
        "data": {"archive": str(tiny_archive), "name": "tiny", "train_per_class": 8, "val_per_class": 2,
                 "test_per_class": 4},
        "pretrained": "source",
        "threads": 1,
        "source": {"train_per_class": 4, "val_per_class": 1, "train": {"epochs": 1}},
        "train": {"epochs": 1, "batch_size": 8},
        "plan": PINNED_PLAN,
        "policies": [{"name": "finetune", "init": "pretrained", "freeze": "none"}],
        "features": {"layers": [], "inits": []},
        "benchmarks": {"enabled": False},
        "search": {"enabled": True, "backbones": ["resnet18", "mobilenet_v3_small"],
                   "inits": ["pretrained", "scratch"], "freezes": ["none"], "lrs": [0.05], "random_samples": 2,
                   "eta": 2, "min_epochs": 1, "max_epochs": 2, "brackets": 2,
                   "replay": {"seeds": 3, "q": 2, "startup": 2}},
    }  # fmt: skip
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    snakemake(workdir)
    return workdir


def test_search_compares_every_method(search_study):
    table = pd.read_csv(search_study / "results/tables/search.csv").set_index("method")
    assert list(table.index) == ["grid", "random", "sh", "hb"]
    # pool of 4 at 2 epochs; SH: 4 at 1 epoch, 2 continue to 2; HB: (2 at 1, 1 to 2) + (2 at 2)
    assert table["epochs"].to_dict() == {"grid": 8, "random": 4, "sh": 4 + 2, "hb": 2 + 1 + 4}
    assert table.loc["grid", "candidates"] == 4 and (table["wall_seconds"] > 0).all()
    grid = [read_record(p) for p in (search_study / "results/search/grid").glob("*.json")]
    best = max(grid, key=lambda r: (r["metrics"]["val_accuracy"], [-ord(c) for c in r["name"]]))
    assert table.loc["grid", "val_accuracy"] == best["metrics"]["val_accuracy"]
    promoted = json.loads((search_study / "results/search/sh/b0/rung1/promoted.json").read_text())["slots"]
    for slot in promoted:
        record = read_record(search_study / f"results/search/sh/b0/rung1/slot{slot['slot']}.json")
        assert record["continued_from"] == slot["checkpoint"] and record["name"] == slot["candidate"]
    proxies = pd.read_csv(search_study / "results/tables/proxies.csv")
    assert sorted(zip(proxies["backbone"], proxies["init"], proxies["layer"], strict=True)) == [
        ("mobilenet_v3_small", "scratch", "block4"), ("mobilenet_v3_small", "source", "block4"),
        ("resnet18", "scratch", "layer4"), ("resnet18", "source", "layer4"),
    ]  # fmt: skip
    assert proxies["logme"].notna().all() and proxies["finetune_val_accuracy"].notna().all()
    assert set(pd.read_csv(search_study / "results/tables/proxy_tau.csv")["proxy"]) == {
        "logme", "knn_accuracy", "linear_probe_accuracy"
    }  # fmt: skip
    for figure in ("search_compute", "proxy_vs_finetune"):
        assert (search_study / f"results/figures/{figure}.png").read_bytes()[:4] == b"\x89PNG"
    notebook = json.loads((search_study / "results/report/solution.ipynb").read_text())
    outputs = "".join(json.dumps(cell.get("outputs", [])) for cell in notebook["cells"])
    assert "of the grid" in outputs and "weighted Kendall tau" in outputs and "Error" not in outputs
    assert (search_study / "results/source/mobilenet_v3_small.pt").is_file()


def test_the_replay_of_successive_halving_chooses_what_the_real_run_chose(search_study):
    table = pd.read_csv(search_study / "results/tables/search.csv").set_index("method")
    rows = replay.table([read_record(p) for p in (search_study / "results/search/grid").glob("*.json")])
    plan = {"eta": 2, "min_epochs": 1, "max_epochs": 2, "brackets": 2}
    assert replay.run("sh", rows, plan, seed=0).trace[-1][2] == table.loc["sh", "chosen"]
    regrets = pd.read_csv(search_study / "results/tables/replay.csv")
    assert set(regrets["method"]) == set(replay.METHODS) and (regrets["seeds"] <= 3).all()
    assert (search_study / "results/figures/replay_anytime.png").read_bytes()[:4] == b"\x89PNG"


def test_every_search_json_output_is_strict(search_study):
    outputs = sorted((search_study / "results").rglob("*.json"))
    assert any(path.name == "promoted.json" for path in outputs)
    for path in outputs:
        strict_json(path)  # NaN or Infinity would raise


def test_search_rerun_has_nothing_to_do(search_study):
    assert "Nothing to be done" in snakemake(search_study, "--dry-run").stdout


def test_a_larger_budget_adds_a_rung_and_keeps_the_others(search_study):
    original = (search_study / "tiny.yaml").read_text()
    tiny = yaml.safe_load(original)
    tiny["search"]["max_epochs"] = 4  # eta 2: SH rungs keep 4, 2, 1 at 1, 2, 4 epochs (was 4, 2 at 1, 2)
    (search_study / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    try:
        out = snakemake(search_study, "--dry-run").stdout
    finally:
        (search_study / "tiny.yaml").write_text(original)
    assert "output: results/search/sh/b0/rung2/slot0.pt" in out
    assert "output: results/search/sh/b0/rung0/" not in out and "output: results/search/sh/b0/rung1/" not in out
    assert job_counts(out).get("extract_features", 0) == 0
