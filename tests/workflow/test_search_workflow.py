"""The model search in the workflow: snakemake on a tiny archive with a tiny pool (2 backbones x 2
inits), every search method (TPE and the GP-UCBs in 2 rounds of 2), the proxies, the replay, the
report section; the same records give the same suggestion file; a re-run has nothing to do."""

import json
import sys

import pandas as pd
import pytest
import yaml
from helpers import REPO, default_config, job_counts, snakemake, strict_json, tiny_study, write_study

from tlselect.config import merged
from tlselect.core.registry import read_record
from tlselect.runs import candidate_config
from tlselect.search import replay

sys.path.insert(0, str(REPO / "scripts"))
import search as search_cli  # noqa: E402


@pytest.fixture(scope="module")
def search_study(tmp_path_factory, tiny_archive):
    workdir = tmp_path_factory.mktemp("search")
    tiny = tiny_study(
        tiny_archive,
        source_epochs=1,
        policies=[{"name": "finetune", "init": "pretrained", "freeze": "none"}],
        features={"layers": [], "inits": []},
        speedups={"enabled": False},
        search={"enabled": True, "backbones": ["resnet18", "mobilenet_v3_small"],
                "inits": ["pretrained", "scratch"], "freezes": ["none"], "lrs": [0.05], "random_samples": 2,
                "rounds": 2, "q": 2, "distributions": {"batch_sizes": [8]},
                "eta": 2, "min_epochs": 1, "max_epochs": 2, "brackets": 2,
                "replay": {"seeds": 3, "q": 2, "startup": 2}, "shift": {"seeds": 3}},
    )  # fmt: skip
    write_study(workdir, tiny)
    snakemake(workdir)
    return workdir


def test_search_compares_every_method(search_study):
    table = pd.read_csv(search_study / "results/tables/search.csv").set_index("method")
    assert list(table.index) == ["grid", "random", "sh", "hb", "tpe", "gp_ucb", "cost_gp_ucb"]
    # pool of 4 at 2 epochs; SH: 4 at 1 epoch, 2 continue to 2; HB: (2 at 1, 1 to 2) + (2 at 2);
    # random: 2 draws at 2 epochs; the model-based: 2 rounds of 2 trials at 2 epochs
    assert table["epochs"].to_dict() == {"grid": 8, "random": 4, "sh": 4 + 2, "hb": 2 + 1 + 4, "tpe": 8,
                                         "gp_ucb": 8, "cost_gp_ucb": 8}  # fmt: skip
    assert table.loc["grid", "candidates"] == 4 and (table["wall_seconds"] > 0).all()
    assert table["p_best"].between(0, 1).all()  # the chosen one's chance of being the best it chose from
    grid = [read_record(p) for p in (search_study / "results/search/grid").glob("*.json")]
    best = max(grid, key=lambda r: (r["metrics"]["val_accuracy"], [-ord(c) for c in r["name"]]))
    assert table.loc["grid", "val_accuracy"] == best["metrics"]["val_accuracy"]
    promoted = json.loads((search_study / "results/search/sh/b0/rung1/promoted.json").read_text())["slots"]
    ranking = json.loads((search_study / "results/search/sh/b0/rung0/ranking.json").read_text())["ranking"]
    assert promoted == ranking[: len(promoted)] and len(promoted) < len(ranking)
    assert "kept" in (search_study / "results/logs/search/sh/b0/rung1/promote.log").read_text()
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
    assert "Mean regret" in outputs
    assert (search_study / "results/source/mobilenet_v3_small.pt").is_file()
    shift = pd.read_csv(search_study / "results/tables/shift.csv")  # SHiFT's successive halving over data
    assert set(shift["model"]) == {
        f"{b}/{i}" for b in ("resnet18", "mobilenet_v3_small") for i in ("source", "scratch")
    }
    summary = json.loads((search_study / "results/search/shift/summary.json").read_text())
    assert "Successive halving over data picks" in outputs and summary["winner"] in outputs
    assert min(summary["computed"].values()) < summary["full_proxy_images"] / 4  # dropped early
    # against fine-tuning: each arm's best grid run, as in proxies.csv, over search.shift.seeds orders
    finetuned = {f"{b}/{i}": v for b, i, v in zip(proxies["backbone"], proxies["init"],
                                                  proxies["finetune_val_accuracy"], strict=True)}  # fmt: skip
    assert summary["finetune_val_accuracy"] == pytest.approx(finetuned)
    seed = merged(default_config(validated=False), yaml.safe_load((search_study / "tiny.yaml").read_text()))["seed"]
    assert [s["seed"] for s in summary["seeds"]] == [seed, seed + 1, seed + 2]  # search.shift.seeds: 3
    assert summary["seeds"][0]["winner"] == summary["winner"]
    tau = summary["finetune_tau"]
    assert tau["seeds"] == 0 if tau["tau"] is None else -1 <= tau["low"] <= tau["tau"] <= tau["high"] <= 1


def test_random_search_and_every_round_train_what_was_drawn_or_suggested(search_study):
    table = pd.read_csv(search_study / "results/tables/search.csv").set_index("method")
    grid = {read_record(p)["name"] for p in (search_study / "results/search/grid").glob("*.json")}
    drawn = [read_record(p) for p in (search_study / "results/search/random").glob("*.json")]
    assert len(drawn) == 2 and not {r["name"] for r in drawn} & grid and table.loc["random", "candidates"] == 2
    assert all(0.005 <= r["config"]["lr"] <= 0.2 and r["config"]["epochs"] == 2 for r in drawn)
    for method in ("tpe", "gp_ucb", "cost_gp_ucb"):
        trained = set()
        for round_ in range(2):
            folder = search_study / f"results/search/{method}/round{round_}"
            suggested = json.loads((folder / "suggested.json").read_text())["trials"]
            for trial in suggested:
                record = read_record(folder / f"trial{trial['slot']}.json")
                assert record["name"] == trial["candidate"] and record["config"]["epochs"] == 2
                trained.add(record["name"])
        assert len(trained) == 4 and table.loc[method, "chosen"] in trained
        if method != "tpe":
            assert trained == grid  # GP-UCB pulls grid points, each once: 4 pulls of a 4-point pool


def test_the_same_records_give_the_same_suggestion_file(search_study, tmp_path):
    config = merged(default_config(validated=False), yaml.safe_load((search_study / "tiny.yaml").read_text()))
    for method in ("tpe", "gp_ucb", "cost_gp_ucb"):
        earlier = search_study / f"results/search/{method}/round0"
        out = tmp_path / f"{method}.json"
        assert search_cli.main([
            "suggest", "--method", method, "--round", "1", "--q", "2", "--epochs", "2",
            "--context", json.dumps(candidate_config(config)), "--suggested", str(earlier / "suggested.json"),
            "--records", str(earlier / "trial1.json"), str(earlier / "trial0.json"), "--out", str(out),
        ]) == 0  # fmt: skip
        assert out.read_text() == (search_study / f"results/search/{method}/round1/suggested.json").read_text()


def test_the_replay_of_successive_halving_chooses_what_the_real_run_chose(search_study):
    table = pd.read_csv(search_study / "results/tables/search.csv").set_index("method")
    rows = replay.table([read_record(p) for p in (search_study / "results/search/grid").glob("*.json")])
    settings = {"eta": 2, "min_epochs": 1, "max_epochs": 2, "brackets": 2}
    assert replay.run("sh", rows, settings, seed=0).trace[-1][2] == table.loc["sh", "chosen"]
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
    assert "output: results/search/sh/b0/rung0/" not in out and "output: results/search/sh/b0/rung1/slot" not in out
    assert "output: results/search/sh/b0/rung1/ranking.json" in out  # the new rung ranks the old last one
    assert job_counts(out).get("extract_features", 0) == 0
