"""Failure and recovery (issue 5): every fault is provoked for real and must end in a clear state.

Killed jobs resume, outputs are atomic, bad data, weights and configs are refused with messages
naming the culprit and the fix, divergence is a recorded result, runs are deterministic, a missing
network fails fast, and parallel jobs do not interfere. The workflow tests run snakemake on the
tiny generated archive of ``conftest.py``.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision
import yaml
from conftest import PINNED_PLAN, REPO, strict_json
from snakemake.utils import validate

from tlselect.config import ConfigError, check, merged
from tlselect.core.files import atomic_path, load_torch, write_json
from tlselect.core.registry import read_record
from tlselect.data import fetch, folders
from tlselect.report.plots import draw
from tlselect.runs import policy_runs
from tlselect.training.options import TrainConfig
from tlselect.training.trainer import train

sys.path.insert(0, str(REPO / "scripts"))
import evaluate as evaluate_cli  # noqa: E402
import prepare_data  # noqa: E402
import train as train_cli  # noqa: E402

SCHEMA = str(REPO / "schemas" / "config.schema.yaml")
STUDY_FIGURES = ("accuracy_vs_time", "accuracy_by_policy", "validation_curves", "accuracy_by_layer")
TIMING_KEYS = {"train_seconds", "eval_seconds"}


def quiet(_):
    pass


def small_tensors(folder: Path, classes: int = 3, sizes=(("train", 24), ("val", 12), ("test", 12))) -> Path:
    """Decoded splits of a learnable toy task, small enough for a few quick epochs."""
    generator = torch.Generator().manual_seed(5)
    folder.mkdir(parents=True)
    for split, n in sizes:
        labels = torch.arange(n) % classes
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
        images[:, 0] = (labels[:, None, None] * 80).to(torch.uint8)
        torch.save({"images": images, "labels": labels}, folder / f"{split}.pt")
    return folder


def without_timings(curves: list[dict]) -> list[dict]:
    return [{k: v for k, v in c.items() if k not in TIMING_KEYS} for c in curves]


# ---------------------------------------------------------------------------------------------
# Workflow helpers: a study of our own (the repository's config.yaml under a small overlay)


def make_study(workdir: Path, archive: Path, policies: list[dict], **train_settings) -> dict:
    """Write ``workdir/tiny.yaml`` (policies without probes or a source model); return the run ids' settings."""
    workdir.mkdir(parents=True, exist_ok=True)
    overlay = {
        "data": {
            "archive": str(archive),
            "name": "tiny",
            "train_per_class": 8,
            "val_per_class": 2,
            "test_per_class": 4,
        },
        "threads": 1,
        "device": "cpu",
        "train": {"batch_size": 8, **train_settings},
        "plan": PINNED_PLAN,
        "features": {"layers": []},
        "policies": policies,
    }
    base = yaml.safe_load((REPO / "config.yaml").read_text())
    if "speedups" in base:  # the optimizations benchmark needs ImageNet weights: not a reliability matter
        overlay["speedups"] = {"enabled": False}
    if "search" in base:  # the model search (tests/test_search_workflow.py) is no reliability matter either
        overlay["search"] = {"enabled": False}
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(overlay))
    config = merged(base, overlay)
    validate(config, SCHEMA)
    return policy_runs(config)


def snakemake_command(workdir: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "snakemake", *args, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
        "--cores", "2", "--configfile", str(REPO / "config.yaml"), str(workdir / "tiny.yaml"),
    ]  # fmt: skip


def snakemake_env() -> dict:
    return dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")


def table_args(folder: Path) -> list[str]:
    """scripts/tables.py's output arguments for tables in ``folder``."""
    return [
        arg
        for name in ("runs.csv", "curves.csv", "summary.md", "plans.csv")
        for arg in (f"--{name[:-4]}", str(folder / name))
    ]


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        snakemake_command(workdir, *args), cwd=workdir, env=snakemake_env(), capture_output=True, text=True, timeout=600
    )
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def train_processes(workdir: Path) -> list[int]:
    """Pids of the ``scripts/train.py`` interpreters running in ``workdir`` (read from /proc).

    A child an interpreter forks shows the same command line until it execs (torch runs
    ``ldconfig -p`` at import, ``platform.processor()`` runs ``uname -p``): more pids than jobs.
    """
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if len(argv) > 1 and argv[1].endswith(b"scripts/train.py") and os.readlink(entry / "cwd") == str(workdir):
                pids.append(int(entry.name))
        except OSError:  # gone meanwhile
            continue
    return pids


# ---------------------------------------------------------------------------------------------
# Resume: SIGKILL a real training job under snakemake, re-run, get the uninterrupted result


def test_sigkilled_training_job_resumes_through_snakemake(tmp_path, tiny_archive):
    workdir = tmp_path / "study"
    (run_id,) = make_study(workdir, tiny_archive, [{"name": "steady", "init": "scratch", "freeze": "none"}], epochs=6)
    target = f"results/registry/{run_id}.json"
    resume_file = workdir / f"results/models/{run_id}.resume.pt"

    job = subprocess.Popen(
        snakemake_command(workdir, target),
        cwd=workdir,
        env=snakemake_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: snakemake, the job's shell, python, tee
    )
    deadline = time.monotonic() + 300
    while not resume_file.is_file():  # the first epoch checkpoint: the job is mid-run
        assert job.poll() is None, "snakemake ended before the first epoch checkpoint"
        assert time.monotonic() < deadline, "no epoch checkpoint after 300 s"
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)  # like a node crash: the job and snakemake die at once
    job.wait()
    for pid in train_processes(workdir):  # belt and braces: nothing of the killed job survives
        with contextlib.suppress(ProcessLookupError):  # it may be exiting already
            os.kill(pid, signal.SIGKILL)

    done = len(load_torch(resume_file)["curves"])
    assert 1 <= done < 6
    assert not (workdir / target).exists()

    locked = snakemake(workdir, target, check=False)  # a killed snakemake leaves its lock behind
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
    snakemake(workdir, "--unlock")
    snakemake(workdir, target, "--rerun-incomplete")

    record = read_record(workdir / target)
    assert record["status"] == "completed" and record["resumed_from_epoch"] == done
    assert f"resuming after epoch {done}" in (workdir / f"results/logs/train/{run_id}.log").read_text()
    assert not resume_file.exists()  # cleaned after success
    assert record["seed"] == 0

    settings = {**record["config"], "data": str(workdir / "results/data"), "out": str(tmp_path / "straight.pt")}
    straight = train(TrainConfig(**{**settings, "record": ""}), log=quiet)
    assert straight["resumed_from_epoch"] is None
    assert without_timings(record["curves"]) == without_timings(straight["curves"])  # losses and LR schedule
    assert record["metrics"] == straight["metrics"]


def crash_in_epoch_two(cfg: TrainConfig) -> None:
    """Train ``cfg`` (two epochs) and stop it as a kill would, once the first epoch's resume file is written."""

    def crash(message):
        if "epoch 2/2" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=crash)


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
# Two training jobs in parallel; one of them diverges; tables, figures and notebook follow


def job_interval(workdir: Path, run_id: str) -> tuple[float, float]:
    """When the training job of ``run_id`` ran, from its Snakemake benchmark file.

    The file holds the job's wall time in seconds (``s``), and Snakemake touches it as the job ends.
    """
    path = workdir / f"results/benchmarks/train/{run_id}.tsv"
    end = path.stat().st_mtime
    return end - float(pd.read_csv(path, sep="\t")["s"].iloc[0]), end


@pytest.fixture(scope="module")
def parallel_study(tmp_path_factory, tiny_archive):
    """The whole workflow with two policies, run with --cores 2 while its outputs are watched."""
    workdir = tmp_path_factory.mktemp("parallel")
    ids = make_study(
        workdir,
        tiny_archive,
        [
            {"name": "steady", "init": "scratch", "freeze": "none"},
            {"name": "wild", "init": "scratch", "freeze": "none", "lr": 1.0e6},  # diverges
        ],
        epochs=3,
    )
    seen = {"notebook_job": 0, "notebooks": 0, "partial": []}
    job = subprocess.Popen(
        snakemake_command(workdir, "results/report/solution.html", "results/tables/summary.md"),
        cwd=workdir,
        env=snakemake_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = []
    reader = threading.Thread(target=lambda: output.extend(job.stdout), daemon=True)
    reader.start()
    notebook = workdir / "results/report/solution.ipynb"

    def look():
        if notebook.parent.is_dir() and not notebook.with_suffix(".html").exists():
            seen["notebook_job"] += 1  # the notebook job runs: Snakemake made its output folder, the HTML is not there
        records = [p for p in workdir.glob("results/registry/*.json") if not p.name.startswith(".")]  # no temporaries
        for path in [notebook, *records, workdir / "results/data/subset.json"]:
            try:
                text = path.read_text()
            except FileNotFoundError:
                continue
            try:
                content = json.loads(text)
            except json.JSONDecodeError:
                seen["partial"].append(str(path))
                continue
            if path == notebook:
                seen["notebooks"] += 1
                code = [c for c in content["cells"] if c["cell_type"] == "code"]
                if any(c.get("execution_count") is None for c in code):
                    seen["partial"].append(f"{path} (cells not yet executed)")

    while job.poll() is None:
        look()
        time.sleep(0.05)
    look()  # and once after the end, when every output is in place
    reader.join(timeout=10)
    assert job.returncode == 0, "".join(output)[-6000:]
    by_policy = {spec.name: run_id for run_id, spec in ids.items()}
    return workdir, by_policy, seen


def test_two_training_jobs_run_in_parallel_without_interfering(parallel_study):
    workdir, by_policy, _ = parallel_study
    (start_a, end_a), (start_b, end_b) = (job_interval(workdir, run_id) for run_id in by_policy.values())
    assert start_a < end_b and start_b < end_a, f"the two training jobs never ran at the same time: {by_policy}"
    for policy, run_id in by_policy.items():
        record = read_record(workdir / f"results/registry/{run_id}.json")
        assert record["run_id"] == run_id and record["name"] == policy and record["kind"] == "policy"
        checkpoint = load_torch(workdir / f"results/models/{run_id}.pt")
        assert checkpoint["run_id"] == run_id and checkpoint["status"] == record["status"]
    leftovers = [p.name for folder in ("models", "registry") for p in (workdir / "results" / folder).iterdir()]
    expected = (".pt", ".pt.crc32", ".json")  # checkpoint, its checksum, record
    assert sorted(leftovers) == sorted(f"{r}{s}" for r in by_policy.values() for s in expected)
    # and the parallel run gives exactly what a run on its own gives
    record = read_record(workdir / f"results/registry/{by_policy['steady']}.json")
    alone = dict(record["config"], data=str(workdir / "results/data"), out=str(workdir / "alone.pt"), record="")
    reference = train(TrainConfig(**alone), log=quiet)
    assert record["metrics"] == reference["metrics"]
    assert without_timings(record["curves"]) == without_timings(reference["curves"])


def test_diverged_run_is_recorded_and_shown_in_tables_figures_and_notebook(parallel_study):
    workdir, by_policy, _ = parallel_study
    record = read_record(workdir / f"results/registry/{by_policy['wild']}.json")
    assert record["status"] == "diverged" and record["metrics"]["test_accuracy"] is None
    assert (
        "the run diverged; lower the learning rate"
        in (workdir / f"results/logs/train/{by_policy['wild']}.log").read_text()
    )
    table = pd.read_csv(workdir / "results/tables/runs.csv").set_index("name")
    assert table.loc["wild", "status"] == "diverged" and not table.loc["wild", "selected"]
    assert table.loc["steady", "status"] == "completed" and table.loc["steady", "selected"]
    assert "Diverged (non-finite loss): wild" in (workdir / "results/tables/summary.md").read_text()
    for figure in STUDY_FIGURES:
        assert (workdir / f"results/figures/{figure}.png").read_bytes()[:4] == b"\x89PNG"
    notebook = json.loads((workdir / "results/report/solution.ipynb").read_text())
    outputs = "".join(json.dumps(cell.get("outputs", [])) for cell in notebook["cells"])
    assert "**Diverged**: wild" in outputs and "Traceback" not in outputs


def test_no_reader_sees_a_half_written_notebook_record_or_subset(parallel_study):
    workdir, _, seen = parallel_study
    assert seen["notebook_job"] > 0, "the outputs were never watched while the notebook job ran"
    assert seen["notebooks"] > 0 and seen["partial"] == []
    assert not list((workdir / "results").rglob(".*.tmp*")) and not list((workdir / "results").rglob(".notebook.*"))
    assert (workdir / "results/report/solution.html").stat().st_size > 10_000


def test_every_json_output_is_strict_and_a_diverged_loss_is_null(parallel_study):
    workdir, by_policy, _ = parallel_study
    outputs = sorted((workdir / "results").rglob("*.json"))
    assert len(outputs) == 3  # subset.json and the two records
    for path in outputs:
        strict_json(path)  # NaN or Infinity would raise
    wild = strict_json(workdir / f"results/registry/{by_policy['wild']}.json")
    assert wild["status"] == "diverged"
    assert None in [curve[loss] for curve in wild["curves"] for loss in ("train_loss", "val_loss")]


def test_every_record_carries_the_seed(parallel_study):
    workdir, by_policy, _ = parallel_study
    subset = json.loads((workdir / "results/data/subset.json").read_text())
    for run_id in by_policy.values():
        record = read_record(workdir / f"results/registry/{run_id}.json")
        assert record["seed"] == record["config"]["seed"] == subset["seed"] == 0


def test_all_runs_diverged_still_gives_tables_and_every_figure(tmp_path):
    tensors = small_tensors(tmp_path / "data")
    cfg = TrainConfig(data=str(tensors), out=str(tmp_path / "m.pt"), epochs=1, batch_size=8, lr=1e6)
    record = train(dataclasses.replace(cfg, run_id="wild", name="wild", device="cpu"), log=quiet)
    assert record["status"] == "diverged"
    write_json(tmp_path / "wild.json", record)
    assert evaluate_cli.main([str(tmp_path / "wild.json"), *table_args(tmp_path / "tables")]) == 0
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
    files = sorted((REPO / "tlselect").glob("*.py")) + sorted((REPO / "scripts").glob("*.py"))
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
    assert evaluate_cli.main([str(good_record), str(bad), *table_args(out)]) == 2
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


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


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
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["data"].update({"archive": str(archive), "train_per_class": 8, "val_per_class": 2, "test_per_class": 4})
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


def test_bad_config_stops_snakemake_before_any_job(tmp_path, tiny_archive):
    make_study(tmp_path, tiny_archive, [{"name": "steady", "init": "scratch", "freeze": "none"}])
    tiny = yaml.safe_load((tmp_path / "tiny.yaml").read_text())
    tiny["data"]["train_per_class"] = 50
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    result = snakemake(tmp_path, check=False)
    assert result.returncode != 0
    assert "invalid configuration: data.train_per_class" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "resources").exists()


def test_archive_listing_is_cheap_and_matches_the_extracted_folder(tiny_archive, tmp_path):
    counts = fetch.archive_image_counts(tiny_archive)
    fetch.extract_archive(tiny_archive, tmp_path / "tiny")
    layout = folders.scan_image_folder(tmp_path / "tiny")
    assert counts == {split: {c: len(files) for c, files in classes.items()} for split, classes in layout.items()}


# ---------------------------------------------------------------------------------------------
# No network: the download fails fast and names the offline options


def test_download_without_network_fails_fast_naming_offline_options(tmp_path, monkeypatch, capsys):
    def blackholed(address, timeout=None, *args, **kwargs):  # packets dropped: wait out the timeout
        time.sleep(min(timeout, 30) if isinstance(timeout, int | float) else 30)
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
    start = time.monotonic()
    assert prepare_data.main(["fetch", "--dest", str(tmp_path / "resources/cifar10")]) == 2
    elapsed = time.monotonic() - start
    error = capsys.readouterr().err
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert "cannot reach www.cs.toronto.edu" in error
    assert "data.archive" in error and "resources/<data.name>/" in error  # both offline options
    assert socket.getdefaulttimeout() == before
    assert not (tmp_path / "resources/cifar10").exists()
