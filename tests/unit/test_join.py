"""Downstream models on the join: pooling as the probes pool, the plan under a memory budget,
chunked fitting (the same model up to rounding whatever the chunk size, close to the in-memory one) and the
join, features-only and columns-only runs in the registry."""

import json

import numpy as np
import pytest
import torch
from helpers import SCHEMA, default_config
from snakemake.utils import validate

from tlselect.config import merged
from tlselect.core.files import atomic_path
from tlselect.core.registry import read_record
from tlselect.runs import join_runs
from tlselect.training.join import JoinedSplit, adaptive_pool, fit_run, fit_sgd, make_model, plan


def synthetic(n=400, channels=16, side=2, classes=3, seed=0):
    """Activations whose per-class mean differs in a few channels, and two table columns: one
    informative one-hot of the class (half the time right), one noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    x = rng.normal(size=(n, channels, side, side)).astype(np.float16)
    x[:, :classes] += (np.eye(classes)[labels] * 1.5)[:, :, None, None].astype(np.float16)
    hint = np.where(rng.random(n) < 0.5, labels, rng.integers(0, classes, n))
    columns = np.concatenate([np.eye(classes)[hint], rng.normal(size=(n, 1))], axis=1).astype(np.float32)
    return x, labels, columns


@pytest.mark.parametrize("side, pool", [(4, 2), (3, 2), (5, 1), (2, 0)])
def test_pooling_matches_the_probes(side, pool):
    x = np.random.default_rng(0).normal(size=(5, 3, side, side)).astype(np.float16)
    expected = torch.from_numpy(x.astype(np.float32))
    if pool:
        expected = torch.nn.functional.adaptive_avg_pool2d(expected, pool)
    np.testing.assert_allclose(adaptive_pool(x, pool), expected.reshape(5, -1).numpy(), rtol=1e-5, atol=1e-6)


def test_the_plan_fits_in_memory_chunks_reduces_or_refuses():
    x, labels, columns = synthetic()
    train = JoinedSplit(np.arange(400), labels, columns, x, pool=0)  # 400 x (64 + 4)
    need = 400 * 68 * 12 / 2**20
    logistic, boosting = {"C": 1.0}, {"max_leaf_nodes": 31}
    assert plan("logistic", logistic, train, 1.0, "chunk", 8)["chose"] == "in_memory"
    assert plan("logistic", logistic, train, need * 1.5, "chunk", 8)["chose"] == "chunked"  # chunks: the other half
    assert plan("logistic", logistic, train, need / 2, "chunk", 8)["chose"] == "chunked"
    # boosting's histograms (31 leaves x 68 columns x 256 bins x 20 bytes, 10.3 MB, plus 1.5 MB) do
    # not fit 4 MB, those of 12 columns after PCA (1.8 MB plus 1.5 MB) do
    reduced = plan("boosting", boosting, train, 4, "chunk", 8)
    assert reduced["chose"] == "pca" and reduced["reduced_width"] == 12
    assert plan("boosting", boosting, train, 20, "chunk", 8)["chose"] == "in_memory"
    assert plan("boosting", boosting, train, 3, "chunk", 8)["chose"] == "refused"
    assert plan("logistic", logistic, train, need / 2, "pca", 8)["chose"] == "pca"
    refused = plan("logistic", logistic, train, need / 2, "refuse", 8)
    assert refused["chose"] == "refused" and refused["need_mb"] == round(need, 3)
    columns_only = JoinedSplit(np.arange(400), labels, np.repeat(columns, 40, axis=1))
    assert plan("boosting", boosting, columns_only, 0.1, "chunk", 8)["why"] == "no features to reduce by PCA"


def test_chunks_change_only_rounding_and_stay_close_to_the_in_memory_model():
    x, labels, columns = synthetic()
    train = JoinedSplit(np.arange(300), labels[:300], columns[:300], x[:300], pool=1)
    test = JoinedSplit(np.arange(300, 400), labels[300:], columns[300:], x, pool=1)
    train.fit_scaler(50)
    test.mean, test.scale = train.mean, train.scale
    hyper, classes = {"C": 1.0, "max_iter": 300}, np.arange(3)
    fitted = [
        fit_sgd(make_model("logistic", hyper, 0, 300, sgd=True), train, rows, 5, 0, classes) for rows in (70, 300)
    ]
    # the same steps in the same order: only SGD's weight rescaling at each chunk's end rounds differently
    np.testing.assert_allclose(fitted[0].coef_, fitted[1].coef_, atol=1e-4)
    in_memory = make_model("logistic", hyper, 0).fit(train.chunk(np.arange(300)), train.labels)
    whole = test.chunk(np.arange(100))
    chunked_acc = (fitted[0].predict(whole) == test.labels).mean()
    memory_acc = (in_memory.predict(whole) == test.labels).mean()
    assert memory_acc > 0.6 and abs(chunked_acc - memory_acc) <= 0.06


def write_inputs(tmp_path, n=(300, 60, 60)):
    """The table job's columns.npz and one cached layer's {split}.npy (with checksums)."""
    x, labels, columns = synthetic(sum(n))
    bounds = np.cumsum((0, *n))
    arrays = {"names": np.array(["c=0", "c=1", "c=2", "noise"]), "num_classes": np.array(3),
              "data_checksum": np.array("abc")}  # fmt: skip
    (tmp_path / "layer").mkdir()
    for split, lo, hi in zip(("train", "val", "test"), bounds[:-1], bounds[1:], strict=True):
        keep = np.arange(hi - lo)[1:]  # the first image of each split has no row
        arrays |= {
            f"{split}_columns": columns[lo:hi][keep],
            f"{split}_rows": keep,
            f"{split}_labels": labels[lo:hi][keep],
        }
        with atomic_path(tmp_path / "layer" / f"{split}.npy", checksum=True) as tmp, open(tmp, "wb") as handle:
            np.save(handle, x[lo:hi])
    with atomic_path(tmp_path / "columns.npz", checksum=True) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    return tmp_path / "columns.npz", tmp_path / "layer"


def join_config(**join):
    config = merged(default_config(validated=False), {"data": {"table": {"example": True}}, "join": join,
                                                      "features": {"layers": ["layer2", "layer3"]}})  # fmt: skip
    validate(config, SCHEMA)
    return config


def test_join_runs_are_per_model_layer_and_inputs():
    runs = join_runs(join_config())
    names = sorted(spec.name for spec in runs.values())
    assert names == sorted(
        [f"{inputs}_{model}_{layer}" for model in ("logistic", "boosting") for inputs in ("join", "features")
         for layer in ("layer2", "layer3")] + ["columns_logistic", "columns_boosting"]
    )  # fmt: skip
    assert all(spec.features is None for spec in runs.values() if spec.settings["inputs"] == "columns")
    other = join_runs(join_config(over_budget="refuse"))
    assert not set(runs) & set(other)  # the budget's choice is part of the id
    assert join_runs(merged(join_config(), {"data": {"table": {"example": False}}})) == {}


@pytest.mark.parametrize("memory_mb", [64, 0.2])
def test_join_features_and_columns_runs_are_records_in_the_registry(tmp_path, memory_mb):
    columns, layer = write_inputs(tmp_path)
    specs = join_runs(join_config(models={"logistic": {}, "boosting": {"max_iter": 20}}, pca_width=8))
    budget = {"memory_mb": memory_mb, "pool": 0}
    records = {}
    for run_id, spec in specs.items():
        if spec.settings["layer"] not in ("", "layer2"):
            continue
        settings = {**spec.settings, **budget}
        features = layer if spec.features else None
        fit_run(settings, columns, features, tmp_path / f"{run_id}.json", run_id, log=lambda _: None)
        records[spec.name] = read_record(tmp_path / f"{run_id}.json")
    assert set(records) == {f"{i}_{m}{'_layer2' if i != 'columns' else ''}" for i in ("join", "features", "columns")
                            for m in ("logistic", "boosting")}  # fmt: skip
    chosen = {name: r["join"]["plan"]["chose"] for name, r in records.items()}
    for name, record in records.items():
        assert record["kind"] == "join" and record["status"] == (
            "refused" if chosen[name] == "refused" else "completed"
        )
        assert record["data"] == {"train": 299, "val": 59, "test": 59}
        assert len(record["metrics"].get("val_correct", "x" * 59)) == 59
        widths = {"join": (64, 4), "features": (64, 0), "columns": (0, 4)}[name.split("_")[0]]
        assert (record["join"]["feature_width"], record["join"]["table_width"]) == widths
    if memory_mb == 64:
        assert set(chosen.values()) == {"in_memory"}
        assert records["join_logistic_layer2"]["metrics"]["test_accuracy"] > max(
            records["features_logistic_layer2"]["metrics"]["test_accuracy"],
            records["columns_logistic"]["metrics"]["test_accuracy"],
        )
    else:  # 299 rows x 68 columns x 12 bytes is 0.23 MB: the join does not fit
        assert chosen["join_logistic_layer2"] == chosen["features_logistic_layer2"] == "chunked"
        assert chosen["columns_logistic"] == "in_memory"
        # boosting's histograms alone exceed 0.2 MB, even after PCA
        assert {chosen[f"{i}_boosting{layer}"] for i, layer in (("join", "_layer2"), ("features", "_layer2"),
                                                              ("columns", ""))} == {"refused"}  # fmt: skip
        assert records["join_logistic_layer2"]["metrics"]["test_accuracy"] > 0.6


def test_a_join_over_the_budget_runs_in_chunks_within_it(tmp_path):
    columns, layer = write_inputs(tmp_path, n=(3000, 100, 100))
    spec = next(s for s in join_runs(join_config(chunk_epochs=2)).values() if s.name == "join_logistic_layer2")
    settings = {**spec.settings, "memory_mb": 2, "pool": 0}  # 2999 rows x 68 columns x 12 bytes: 2.3 MB
    record = fit_run(settings, columns, layer, tmp_path / "r.json", spec.id, log=lambda _: None)
    chosen = record["join"]["plan"]
    assert chosen["chose"] == "chunked" and chosen["need_mb"] > 2 and chosen["rows_per_chunk"] < 2999
    assert chosen["peak_mb"] <= 2


def test_a_refused_join_says_so_with_the_size(tmp_path):
    columns, layer = write_inputs(tmp_path)
    spec = next(s for s in join_runs(join_config(over_budget="refuse")).values() if s.name == "join_logistic_layer2")
    settings = {**spec.settings, "memory_mb": 0.01}
    record = fit_run(settings, columns, layer, tmp_path / "r.json", spec.id, log=lambda _: None)
    assert record["status"] == "refused" and record["metrics"]["test_accuracy"] is None
    assert record["join"]["plan"]["need_mb"] > record["join"]["plan"]["budget_mb"] == 0.01
    assert record["join"]["plan"]["peak_mb"] < 0.01  # nothing of the join was read
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "refused"


def test_the_report_sentence_compares_the_join_with_each_part_alone():
    import pandas as pd

    from tlselect.report.answer import join_sentence

    rows = [("join", "layer3", 0.80, 0.78), ("join", "layer4", 0.82, 0.74), ("features", "layer3", 0.70, 0.71),
            ("columns", "", 0.50, 0.52)]  # fmt: skip
    runs = pd.DataFrame(
        [
            {
                "kind": "join",
                "model": "logistic",
                "inputs": i,
                "layer": layer,
                "status": "completed",
                "val_accuracy": v,
                "test_accuracy": t,
                "val_images": 250,
                "test_images": 500,
            }
            for i, layer, v, t in rows
        ]  # fmt: skip
    )
    text = join_sentence(runs)
    # the best join on validation is layer4's (test 0.74), 3.0 points over the features alone (0.71)
    assert "logistic: join on layer4 0.740" in text and "features on layer3 0.710" in text
    assert "columns 0.520" in text and "the join gains 3.0 points over the better of the other two" in text
    assert join_sentence(runs.assign(kind="probe")).startswith("No table beside the images")
