"""Failure and recovery: every fault is provoked for real and must end in a clear state.

A stopped training resumes, outputs are atomic, bad data, weights and configs are refused with
messages naming the culprit and the fix, divergence is a recorded result, subsets are
deterministic, and a missing network fails fast. The same through snakemake (a job killed and
resumed, parallel jobs, a bad config stopping the run): tests/workflow/test_reliability_workflow.py.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import pickle
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import (
    REPO,
    SCHEMA,
    crash_in_epoch_two,
    default_config,
    quiet,
    small_tensors,
    strict_json,
    tiny_data,
    truncate,
    without_timings,
)
from snakemake.utils import validate

from tlselect.config import ConfigError, check
from tlselect.core.files import atomic_path, load_torch, write_json
from tlselect.core.registry import read_record
from tlselect.data import fetch, folders
from tlselect.report.plots import draw
from tlselect.training.options import TrainConfig
from tlselect.training.trainer import train

sys.path.insert(0, str(REPO / "scripts"))
import prepare_data  # noqa: E402
import tables as tables_cli  # noqa: E402
import train as train_cli  # noqa: E402

STUDY_FIGURES = ("accuracy_vs_time", "accuracy_by_policy", "validation_curves", "accuracy_by_layer")


def table_args(folder: Path) -> list[str]:
    """scripts/tables.py's output arguments for tables in ``folder``."""
    return [
        arg
        for name in ("runs.csv", "curves.csv", "summary.md", "plans.csv")
        for arg in (f"--{name[:-4]}", str(folder / name))
    ]


# ---------------------------------------------------------------------------------------------
# Resume: a training stopped mid-run resumes with the uninterrupted run's RNG and schedule


def test_resume_restores_the_global_rng_and_the_lr_schedule(tmp_path):
    # mobilenet_v3_small's head has dropout, which draws from torch's global RNG
    tensors = small_tensors(tmp_path / "data", sizes=(("train", 32), ("val", 12), ("test", 12)))
    cfg = TrainConfig(
        data=str(tensors), out=str(tmp_path / "killed/m.pt"), backbone="mobilenet_v3_small", epochs=2,
        batch_size=16, precision="float32", device="cpu", seed=3, warmup_epochs=1, schedule="cosine",
    )  # fmt: skip

    crash_in_epoch_two(cfg)
    state = load_torch(Path(cfg.out).with_suffix(".resume.pt"))
    assert {"model", "optimizer", "generator", "torch_rng", "curves", "config"} <= set(state)
    resumed = train(cfg, log=quiet)
    straight = train(dataclasses.replace(cfg, out=str(tmp_path / "straight/m.pt")), log=quiet)
    assert resumed["resumed_from_epoch"] == 1
    assert without_timings(resumed["curves"]) == without_timings(straight["curves"])
    assert resumed["metrics"] == straight["metrics"]


# ---------------------------------------------------------------------------------------------
# Diverged runs: recorded, with strict JSON, and still tables and figures


def test_all_runs_diverged_still_gives_tables_and_every_figure(tmp_path):
    tensors = small_tensors(tmp_path / "data")
    cfg = TrainConfig(data=str(tensors), out=str(tmp_path / "m.pt"), epochs=1, batch_size=8, lr=1e6)
    record = train(dataclasses.replace(cfg, run_id="wild", name="wild", device="cpu"), log=quiet)
    assert record["status"] == "diverged"
    write_json(tmp_path / "wild.json", record)
    assert tables_cli.main([str(tmp_path / "wild.json"), *table_args(tmp_path / "tables")]) == 0
    assert "No run completed" in (tmp_path / "tables/summary.md").read_text()
    for figure in STUDY_FIGURES:
        draw(figure, tmp_path / "tables/runs.csv", tmp_path / "tables/curves.csv", tmp_path / f"{figure}.png")
        assert (tmp_path / f"{figure}.png").read_bytes()[:4] == b"\x89PNG"


def test_a_diverged_training_writes_a_strict_json_record_with_null_losses(tmp_path):
    tensors = small_tensors(tmp_path / "data")
    argv = [
        "--data", str(tensors), "--out", str(tmp_path / "m.pt"), "--record", str(tmp_path / "wild.json"),
        "--epochs", "2", "--batch-size", "8", "--lr", "1e6", "--device", "cpu",
    ]  # fmt: skip
    assert train_cli.main(argv) == 0
    record = strict_json(tmp_path / "wild.json")  # NaN or Infinity would raise
    assert record["status"] == "diverged" and record["metrics"]["test_loss"] is None
    assert None in [curve[loss] for curve in record["curves"] for loss in ("train_loss", "val_loss")]
    assert read_record(tmp_path / "wild.json") == record  # and the schema accepts the nulls


# ---------------------------------------------------------------------------------------------
# Atomic outputs; aggregation refuses bad records


def test_json_outputs_hold_null_for_non_finite_floats(tmp_path):
    nan, inf = float("nan"), float("inf")
    write_json(tmp_path / "out.json", {"loss": [nan, inf, -inf, 1.5], "nested": {"pair": (nan, 2)}})
    assert strict_json(tmp_path / "out.json") == {"loss": [None, None, None, 1.5], "nested": {"pair": [None, 2]}}


def test_a_writer_dying_midway_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "record.json"
    write_json(target, {"version": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"version": 2, "trunc')
        raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


WRITERS = {"save", "savefig", "to_csv", "write_text", "write_bytes", "dump", "open_memmap", "extractall"}


def _unguarded_writes(path: Path) -> list[str]:
    """Writing calls outside ``with atomic_path(...)`` or ``with tempfile.TemporaryDirectory(...)``."""
    found = []

    def visit(node, guarded):
        if isinstance(node, ast.With):
            names = {
                ast.unparse(item.context_expr.func) for item in node.items if isinstance(item.context_expr, ast.Call)
            }
            guarded = guarded or bool(names & {"atomic_path", "tempfile.TemporaryDirectory"})
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in WRITERS:
            if not guarded and "/proc/" not in ast.unparse(node.func.value):  # kernel knobs are no outputs
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)[:80]}")
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(ast.parse(path.read_text()), False)
    return found


def test_every_output_file_is_written_through_a_temporary_path():
    files = sorted((REPO / "tlselect").rglob("*.py")) + sorted((REPO / "scripts").glob("*.py"))  # every subpackage
    unguarded = [hit for path in files for hit in _unguarded_writes(path)]
    assert unguarded == [], "write through tlselect.core.files (atomic_path, write_json, save_torch):\n" + "\n".join(
        unguarded
    )
    # and the notebook rule executes and converts in a temporary folder, then renames into place
    rule = (REPO / "rules/report.smk").read_text().split("rule notebook:")[1]
    assert (
        "mktemp -d $(dirname {output.notebook})/" in rule
        and "mv $tmp/{wildcards.report}.ipynb {output.notebook}" in rule
    )


@pytest.fixture(scope="module")
def trained_record(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good")
    cfg = TrainConfig(data=str(small_tensors(folder / "data")), out=str(folder / "m.pt"), epochs=1, batch_size=8)
    write_json(folder / "good.json", train(dataclasses.replace(cfg, run_id="good", device="cpu"), log=quiet))
    return folder / "good.json"


@pytest.fixture
def good_record(trained_record, tmp_path) -> Path:
    return Path(shutil.copy(trained_record, tmp_path / "good.json"))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda r: r.pop("metrics"), "'metrics' is a required property"),
        (lambda r: r.update(status="finished"), "at status"),
        (lambda r: r["metrics"].update(val_accuracy=1.5), "at metrics/val_accuracy"),
        (None, "cannot read registry record"),  # a truncated file
    ],
)
def test_aggregation_refuses_a_bad_record_naming_the_file(good_record, damage, message, capsys):
    bad = good_record.with_name("bad-run.json")
    record = json.loads(good_record.read_text())
    if damage is None:
        bad.write_text(good_record.read_text()[:200])
    else:
        damage(record)
        bad.write_text(json.dumps(record))
    out = good_record.parent / "tables"
    assert tables_cli.main([str(good_record), str(bad), *table_args(out)]) == 2
    error = capsys.readouterr().err
    assert str(bad) in error and message in error
    assert not out.exists()  # nothing aggregated from a partial set


# ---------------------------------------------------------------------------------------------
# Bad data: errors before training that name the files and the fix; or skip, recorded


def subset_cli(root: Path, out: Path, *extra: str, train_per_class: int = 12, test_per_class: int = 6) -> int:
    return prepare_data.main(
        ["subset", "--root", str(root), "--out", str(out), "--train-per-class", str(train_per_class),
         "--val-per-class", "2", "--test-per-class", str(test_per_class), "--seed", "0", *extra]
    )  # fmt: skip


@pytest.mark.parametrize(
    "damage, named, fix",
    [
        (
            lambda r: (r / "train/cat/0000.jpg").write_bytes(b"\xff\xd8 not a jpeg"),
            "train/cat/0000.jpg",
            "skip_unreadable",
        ),
        (lambda r: truncate(r / "test/dog/0002.jpg"), "test/dog/0002.jpg", "skip_unreadable"),
        (lambda r: (r / "train/frog/notes.txt").write_text("hi"), "train/frog/notes.txt", "skip_unreadable"),
        (lambda r: [p.unlink() for p in (r / "test/dog").iterdir()], "test: dog", "add images or remove"),
        (lambda r: shutil.rmtree(r / "test"), "test is missing", "train/<class>/* and test/<class>/*"),
        (lambda r: (r / "test/cat").rename(r / "test/kitten"), "only in test ['kitten']", "rename or remove"),
    ],
    ids=["corrupt", "truncated", "non-image", "empty-class", "no-test-split", "class-mismatch"],
)
def test_bad_image_folder_is_an_error_naming_files_and_fix(image_folder, tmp_path, capsys, damage, named, fix):
    damage(image_folder)
    assert subset_cli(image_folder, tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert named in error and fix in error
    assert not (tmp_path / "out" / "subset.json").exists()


def test_skip_unreadable_leaves_bad_files_out_and_records_them(image_folder, tmp_path):
    picked = folders.make_subset(image_folder, None, 8, 2, 4, seed=0)["splits"]
    corrupt, truncated = picked["train"][0][0], picked["test"][0][0]
    (image_folder / corrupt).write_bytes(b"garbage")
    truncate(image_folder / truncated)
    (image_folder / "train/cat/Thumbs.db").write_bytes(b"\0")
    for out in ("a", "b"):
        assert subset_cli(image_folder, tmp_path / out, "--skip-unreadable", train_per_class=8, test_per_class=4) == 0
    subset = json.loads((tmp_path / "a/subset.json").read_text())
    assert subset["skipped"] == {
        "skip_unreadable": True,
        "count": 3,
        "files": sorted([corrupt, truncated, "train/cat/Thumbs.db"]),
    }
    chosen = {f for split in subset["splits"].values() for f, _ in split}
    assert not chosen & set(subset["skipped"]["files"])
    assert len(subset["splits"]["train"]) == 18 and len(subset["splits"]["test"]) == 12  # still stratified
    assert (tmp_path / "a/subset.json").read_bytes() == (tmp_path / "b/subset.json").read_bytes()
    assert load_torch(tmp_path / "a/train.pt")["images"].shape == (18, 3, 32, 32)


def test_same_config_gives_a_byte_identical_subset(image_folder, tmp_path):
    for out in ("a", "b"):
        assert subset_cli(image_folder, tmp_path / out, train_per_class=8, test_per_class=4) == 0
    assert (tmp_path / "a/subset.json").read_bytes() == (tmp_path / "b/subset.json").read_bytes()
    assert json.loads((tmp_path / "a/subset.json").read_text())["skipped"]["count"] == 0
    for split in ("train", "val", "test"):
        a, b = load_torch(tmp_path / f"a/{split}.pt"), load_torch(tmp_path / f"b/{split}.pt")
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])


# ---------------------------------------------------------------------------------------------
# Bad weights


def test_weights_for_another_number_of_classes_replace_the_head_and_say_so(tmp_path):
    weights = tmp_path / "seven_classes.pt"
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), weights)
    cfg = TrainConfig(data=str(small_tensors(tmp_path / "data")), out=str(tmp_path / "m.pt"), epochs=1, batch_size=8)
    record = train(dataclasses.replace(cfg, init=str(weights), freeze="layer4", device="cpu"), log=quiet)
    assert record["status"] == "completed" and record["num_classes"] == 3
    assert record["init"] == {
        "source": str(weights),
        "classifier_replaced": True,
        "skipped_keys": ["fc.bias", "fc.weight"],
    }
    assert load_torch(tmp_path / "m.pt")["model"]["fc.weight"].shape == (3, 512)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pickled-code-ran",))


@pytest.mark.parametrize("kind", ["pickled-code", "wrong-shapes", "missing-layers"])
def test_unsafe_or_unfitting_weights_stop_the_training_cli(tmp_path, monkeypatch, capsys, kind):
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "weights.pt"
    state = torchvision.models.resnet18().state_dict()
    if kind == "pickled-code":
        weights.write_bytes(pickle.dumps({"model": _Payload()}, protocol=2))
        expected = "refusing to load"
    elif kind == "wrong-shapes":
        state["layer2.0.conv1.weight"] = torch.zeros(1, 1, 3, 3)
        torch.save(state, weights)
        expected = "wrong shapes: layer2.0.conv1.weight (file (1, 1, 3, 3), model (128, 64, 3, 3))"
    else:
        del state["layer3.1.bn1.weight"]
        torch.save(state, weights)
        expected = "missing layers: layer3.1.bn1.weight"
    tensors = small_tensors(tmp_path / "data")
    argv = ["--data", str(tensors), "--init", str(weights), "--out", "m.pt", "--record", "m.json", "--device", "cpu"]
    assert train_cli.main(argv) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "pickled-code-ran").exists()
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "m.json").exists()


# ---------------------------------------------------------------------------------------------
# Bad config: subset sizes against the archive, before any job runs


def archive_config(archive: Path, **data_settings) -> dict:
    config = default_config(validated=False)
    config["data"].update(tiny_data(archive))
    config["data"].update(data_settings)
    config["source"].update(train_per_class=4, val_per_class=1)
    config["pretrained"] = "source"
    validate(config, SCHEMA)
    return config


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(train_per_class=13), r"data.train_per_class: .* asks for 13 .* only 12 of cat"),
        (dict(test_per_class=7), r"data.test_per_class: .* asks for 7 .* only 6 of cat"),
        (dict(classes=["cat", "bird"]), r"data.classes: \['bird'\] not in"),
        (dict(train_per_class=10), r"source.train_per_class: .* 4 images of class 'cat' .* has 2 more"),
    ],
    ids=["train-too-large", "test-too-large", "unknown-class", "source-too-large"],
)
def test_subset_larger_than_the_archive_is_rejected_naming_the_key(tiny_archive, change, message):
    check(archive_config(tiny_archive))  # the plain tiny study fits
    with pytest.raises(ConfigError, match=message):
        check(archive_config(tiny_archive, **change))


def test_archive_listing_is_cheap_and_matches_the_extracted_folder(tiny_archive, tmp_path):
    counts = fetch.archive_image_counts(tiny_archive)
    fetch.extract_archive(tiny_archive, tmp_path / "tiny")
    layout = folders.scan_image_folder(tmp_path / "tiny")
    assert counts == {split: {c: len(files) for c, files in classes.items()} for split, classes in layout.items()}


# ---------------------------------------------------------------------------------------------
# No network: the download fails fast and names the offline options


def test_download_without_network_fails_fast_naming_offline_options(tmp_path, monkeypatch, capsys):
    waited = []  # what each connection attempt would wait, in seconds, for answers that never come

    def blackholed(address, timeout=None, *args, **kwargs):  # packets dropped: the whole timeout passes
        waited.append(timeout if isinstance(timeout, int | float) else math.inf)  # no timeout: for ever
        raise TimeoutError("timed out")

    def no_dns(*args, **kwargs):
        raise AssertionError("the test must not touch the network")

    class NoDownload:
        url = torchvision.datasets.CIFAR10.url

        def __init__(self, *args, **kwargs):
            raise AssertionError("torchvision's download (with its retries) must not start")

    for proxy in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(socket, "create_connection", blackholed)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", NoDownload)
    before = socket.getdefaulttimeout()
    assert prepare_data.main(["fetch", "--dest", str(tmp_path / "resources/cifar10")]) == 2
    error = capsys.readouterr().err
    assert waited and sum(waited) < 10, f"waits {waited} s for the network"
    assert "cannot reach www.cs.toronto.edu" in error
    assert "data.archive" in error and "resources/<data.name>/" in error  # both offline options
    assert socket.getdefaulttimeout() == before
    assert not (tmp_path / "resources/cifar10").exists()
