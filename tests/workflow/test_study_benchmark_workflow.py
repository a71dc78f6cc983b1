"""The study-level benchmark runs both studies on the same images and reports each run side by side."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml
from helpers import PINNED_PLAN, REPO


def test_study_benchmark_compares_the_plain_script_and_the_workflow(tmp_path, tiny_archive):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"plan": PINNED_PLAN, "train": {"batch_size": 4},
                                       "data": {"name": "tiny"}}))  # fmt: skip
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/study.py"), "--archive", str(tiny_archive), "--out", str(out),
         "--workdir", str(tmp_path / "work"), "--cores", "1", "--workers", "0", "--source-classes", "cat", "dog",
         "--classes", "dog", "frog", "--source-per-class", "4", "--source-val-per-class", "1",
         "--train-per-class", "8", "--val-per-class", "2", "--test-per-class", "4", "--source-epochs", "1",
         "--epochs", "1", "--plain-batch-size", "4", "--overlay", str(overlay), "--device-label", "test"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    raw = json.loads((out / "study-benchmark-test.json").read_text())
    runs = ("source", "scratch", "finetune", "freeze_early", "freeze_most", "linear_probe")
    for name in runs:
        for side in ("plain", "workflow"):
            assert raw[side][name]["seconds"] > 0, (side, name)
        assert 0 <= raw["plain"][name]["val_accuracy"] <= 1
    # The source model: 4 images per class of two classes, 1 of each for validation, one epoch.
    assert raw["workflow"]["source"]["config"]["epochs"] == 1
    assert raw["speedup"] == raw["plain_wall_seconds"] / raw["workflow_wall_seconds"]
    report = (out / "study-benchmark-test.md").read_text()
    assert all(f"| {name} |" in report for name in runs) and "whole study, end to end" in report
    assert "Bound: the bare training step" in report
