"""The workflow itself: snakemake on a tiny generated archive, every policy, source pretraining.

One full run (the ``study`` fixture of conftest.py), then: a re-run has nothing to do; changing one
policy re-runs only that policy's training and the report; a figure regenerates alone when named.
"""

import json
import re

import pandas as pd
import yaml
from helpers import default_config, job_counts, snakemake, strict_json, tiny_study, write_study

from tlselect.core.registry import read_record


def test_full_run_produces_every_output(study):
    runs = pd.read_csv(study / "results/tables/runs.csv")
    policies = runs[runs["kind"] == "policy"]
    assert sorted(policies["name"]) == ["finetune", "freeze_early", "freeze_most", "linear_probe", "scratch"]
    probes = runs[runs["kind"] == "probe"]
    assert sorted(zip(probes["init"], probes["layer"], strict=True)) == [
        ("scratch", "layer2"), ("scratch", "layer4"), ("source", "layer2"), ("source", "layer4")
    ]  # fmt: skip
    assert runs["selected"].sum() == 1
    for run_id in runs["run_id"]:
        assert (study / f"results/models/{run_id}.pt").is_file()
        record = read_record(study / f"results/registry/{run_id}.json")  # validates against the schema
        kind = "probe" if run_id.startswith("probe_") else "train"
        assert (study / f"results/benchmarks/{kind}/{run_id}.tsv").is_file()
        assert (
            record["data_checksum"] == json.loads((study / "results/data/subset.json").read_text())["source"]["sha256"]
        )
    by_policy = policies.set_index("name")
    assert by_policy.loc["scratch", "init"] == "scratch" and by_policy.loc["finetune", "init"] == "source"
    assert by_policy.loc["linear_probe", "trainable_params"] < by_policy.loc["freeze_most", "trainable_params"]
    assert by_policy.loc["freeze_most", "trainable_params"] < by_policy.loc["finetune", "trainable_params"]
    optimizations = pd.read_csv(study / "results/tables/optimizations.csv")
    assert {"training", "features"} == set(optimizations["suite"]) and (optimizations["speedup"] > 0).all()
    assert "efficiency: trainer epoch vs bare loop" in set(optimizations["optimization"])
    for figure in ("accuracy_vs_time", "accuracy_by_policy", "validation_curves", "accuracy_by_layer", "speedups"):
        assert (study / f"results/figures/{figure}.png").read_bytes()[:4] == b"\x89PNG"
    notebook = json.loads((study / "results/report/solution.ipynb").read_text())
    outputs = "".join(json.dumps(cell.get("outputs", [])) for cell in notebook["cells"])
    assert "**Selected**" in outputs and "The largest speedup is" in outputs and "Error" not in outputs
    assert (study / "results/report/solution.html").stat().st_size > 10_000
    assert (study / "results/source/resnet18.pt").is_file()
    assert "**Selected**: `" in (study / "results/tables/summary.md").read_text()


def test_every_json_output_is_strict(study):
    outputs = sorted((study / "results").rglob("*.json"))
    assert any(path.parent.name == "registry" for path in outputs)
    for path in outputs:
        strict_json(path)  # NaN or Infinity would raise


def test_second_run_has_nothing_to_do(study):
    assert "Nothing to be done" in snakemake(study, "--dry-run").stdout


def dry_run_after(study, change) -> str:
    """The dry run after ``change(tiny_config)``; the study's overlay is restored afterwards."""
    original = (study / "tiny.yaml").read_text()
    tiny = yaml.safe_load(original)
    change(tiny)
    (study / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    try:
        return snakemake(study, "--dry-run").stdout
    finally:
        (study / "tiny.yaml").write_text(original)


def test_changing_one_policy_reruns_only_it_and_the_report(study):
    policies = default_config(validated=False)["policies"]
    policies[3]["lr"] = 0.011  # freeze_most
    out = dry_run_after(study, lambda tiny: tiny.update(policies=policies))
    # the study's notebook and the full one (the benchmark is on here) both show the new table
    assert job_counts(out) == {"train": 1, "tables": 1, "figure": 5, "notebook": 2, "all": 1}
    assert "rule speedups:" not in out  # the speedups benchmark (its figure, though, shows the new table)
    assert re.search(r"results/models/freeze_most-resnet18-source-\w+\.pt", out)


def test_adding_a_layer_runs_only_its_probes(study):
    out = dry_run_after(study, lambda tiny: tiny["features"].update(layers=["layer1", "layer2", "layer4"]))
    # layer1 is already cached (the chain runs stem..layer4): only its two probes are new
    assert job_counts(out) == {"probe": 2, "tables": 1, "figure": 5, "notebook": 2, "all": 1}
    assert len(set(re.findall(r"results/models/(probe_layer1-[\w-]+)\.pt", out))) == 2


def test_one_figure_regenerates_alone(study):
    (study / "results/figures/validation_curves.png").unlink()
    out = snakemake(study, "--dry-run", "results/figures/validation_curves.png").stdout
    assert job_counts(out) == {"figure": 1}


def test_imagenet_weights_come_through_a_workflow_step(tmp_path, tiny_archive, monkeypatch):
    """fetch_weights writes resources/weights/<backbone>-imagenet.pth; training jobs read that file."""
    import torch
    import torchvision

    from tlselect.training.models import imagenet_weights_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # torchvision's cache holds the file, as offline
    cached = imagenet_weights_path("resnet18")
    cached.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), cached)
    tiny = tiny_study(
        tiny_archive,
        pretrained="imagenet",
        policies=[{"name": "finetune", "init": "pretrained", "freeze": "none"}],
        features={"layers": []},
    )
    write_study(tmp_path, tiny)
    result = snakemake(tmp_path, "results/tables/runs.csv")
    assert "rule fetch_weights" in result.stdout + result.stderr
    weights = tmp_path / "resources/weights/resnet18-imagenet.pth"
    assert weights.is_file()
    (record,) = (read_record(p) for p in (tmp_path / "results/registry").glob("*.json"))
    assert (
        record["init"]["source"] == "imagenet"
        and record["config"]["weights"] == "resources/weights/resnet18-imagenet.pth"
    )


def test_housekeeping_removes_only_the_resume_files_of_runs_no_longer_in_the_config(study):
    run_id = next(p.stem for p in (study / "results/registry").glob("finetune-*.json"))
    current = study / f"results/models/{run_id}.resume.pt"  # a run of the config, killed mid-way
    stale = [study / "results/models/finetune-resnet18-source-0ld0ld00.resume.pt", study / "results/x/y.resume.pt"]
    other = study / "results/models/notes.txt"
    for path in (current, *stale, other):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"state")
    try:
        result = snakemake(study, "remove_stale_resume_files")
        assert not any(path.exists() for path in stale) and current.exists() and other.exists()
        log = (study / "results/logs/remove_stale_resume_files.log").read_text()
        assert all(str(path.relative_to(study)) in log for path in stale) and "2 stale resume file(s) removed" in log
        trained = {"train", "probe", "pretrain_source", "extract_features"}
        assert not trained & set(job_counts(snakemake(study, "--dry-run").stdout))  # no run's outputs touched
    finally:
        current.unlink(missing_ok=True)
        other.unlink(missing_ok=True)
    assert result.returncode == 0
