"""Aggregation: registry records -> comparison table, per-epoch curves and a Markdown summary.

Models are chosen on validation accuracy; test accuracy is reported next to it, never used to
choose.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from tlselect.core.files import atomic_path, write_text
from tlselect.core.registry import rank, read_record
from tlselect.report.answer import answer, pareto_front, probability_best

COLUMNS = [
    "run_id",
    "kind",
    "name",
    "backbone",
    "init",
    "freeze",
    "layer",
    "model",
    "inputs",
    "epochs",
    "lr",
    "batch_size",
    "augment",
    "precision",
    "cache_features",
    "status",
    "trainable_params",
    "total_params",
    "val_accuracy",
    "best_val_accuracy",
    "test_accuracy",
    "train_seconds",
    "eval_seconds",
    "wall_seconds",
    "images_per_second",
    "resumed_from_epoch",
    "val_images",
    "test_images",
    "p_best",
    "selected",
]


def runs_table(records: list[dict]) -> pd.DataFrame:
    """One row per run; ``selected`` marks the run :func:`tlselect.core.registry.rank` puts first.

    Policies and probes are both candidates: a probe is a frozen backbone with a trained head; so
    are the downstream models on the table beside the images (kind ``join``, with their ``model``
    and ``inputs``: the join, the features or the columns alone).
    """
    rows = []
    for r in records:
        c = r["config"]
        rows.append(
            {
                "run_id": r["run_id"],
                "kind": r["kind"],
                "name": r["name"],
                "backbone": c["backbone"],
                "init": c["init"],
                "freeze": c.get("freeze", ""),
                "layer": c.get("layer") or "",
                "model": c.get("model", ""),
                "inputs": c.get("inputs", ""),
                "epochs": c.get("epochs"),
                "lr": c.get("lr"),
                "batch_size": c.get("batch_size"),
                "augment": c.get("augment", False),
                "precision": c.get("precision", ""),
                "cache_features": c.get("cache_features", False),
                "status": r["status"],
                "trainable_params": r["parameters"]["trainable"],
                "total_params": r["parameters"]["total"],
                "val_accuracy": r["metrics"]["val_accuracy"],
                "best_val_accuracy": r["metrics"]["best_val_accuracy"],
                "test_accuracy": r["metrics"]["test_accuracy"],
                "train_seconds": r["timings"]["train_seconds"] + r["timings"]["cache_seconds"],
                "eval_seconds": r["timings"]["eval_seconds"],
                "wall_seconds": r["timings"]["wall_seconds"],
                "images_per_second": r["throughput_images_per_second"],
                "resumed_from_epoch": r.get("resumed_from_epoch"),
                "val_images": r.get("data", {}).get("val"),
                "test_images": r.get("data", {}).get("test"),
            }
        )
    table = pd.DataFrame(rows, columns=COLUMNS[:-2])
    hits = {r["run_id"]: r["metrics"]["val_correct"] for r in records if r["metrics"].get("val_correct")}
    table["p_best"] = table["run_id"].map(probability_best(hits))
    best = rank(records)[0] if records else None
    chosen = best["run_id"] if best and best["status"] == "completed" else None
    table["selected"] = table["run_id"] == chosen
    return table.sort_values(["val_accuracy", "run_id"], ascending=[False, True], na_position="last").reset_index(
        drop=True
    )


def curves_table(records: list[dict]) -> pd.DataFrame:
    rows = [{"run_id": r["run_id"], "kind": r["kind"], "name": r["name"], **c} for r in records for c in r["curves"]]
    return pd.DataFrame(rows)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if value <= 1 else f"{value:.1f}"
    return "" if value is None or value is pd.NA else str(value)


def markdown_table(frame: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


ANSWER_START, ANSWER_END = "<!-- answer -->", "<!-- /answer -->"


def summary_markdown(table: pd.DataFrame, source_seconds: float | None = None, plans: str = "") -> str:
    """Markdown report: the answer (:func:`tlselect.report.answer.answer`), the Pareto front, the
    plan, the comparison table."""
    shown = table[
        [
            "name",
            "kind",
            "init",
            "freeze",
            "layer",
            "status",
            "val_accuracy",
            "test_accuracy",
            "train_seconds",
            "trainable_params",
        ]  # fmt: skip
    ]
    # the markers let the front page of `snakemake --report` include the answer (report/workflow.rst)
    parts = ["# Transfer-learning study: summary", "", ANSWER_START, answer(table), ANSWER_END, ""]
    front = pareto_front(table)
    front_names = ", ".join(f"{r.name} ({r.init})" for r in front.itertuples())
    parts += ["", f"Pareto front (validation accuracy vs training time): {front_names}."]
    if source_seconds is not None:
        parts.append(f"The source model took {source_seconds:.1f} s to pretrain, once, for every run with init source.")
    if plans:
        parts += ["", plans]
    parts += ["", markdown_table(shown), ""]
    return "\n".join(parts)


PLAN_COLUMNS = ["device_key", "knob", "value", "against", "gain", "kept", "images_per_second", "rounds", "spread",
                "margin", "note"]  # fmt: skip


def plan_table(records: list[dict]) -> pd.DataFrame:
    """The measured execution plans the runs used: per device, each knob tried, its gain and whether it was kept."""
    rows, seen = [], set()
    for r in records:
        plan = r.get("plan") or {}
        if plan.get("device_key") and plan["device_key"] not in seen:
            seen.add(plan["device_key"])
            rows += [{"device_key": plan["device_key"], **m} for m in plan.get("measurements", [])]
    return pd.DataFrame(rows, columns=PLAN_COLUMNS)


def plan_summary(plans: pd.DataFrame) -> str:
    """One line per device: the knobs its plan enabled, with their measured gains."""
    lines = []
    for key, rows in plans.groupby("device_key", sort=True):
        kept = rows[rows["kept"] == True]  # noqa: E712 (a column of booleans and missing values)
        parts = [f"{r.knob}={r.value} ({r.gain:.2f}x vs {r.against})" for r in kept.itertuples()]
        lines.append(f"Execution plan measured on `{key}`: " + (", ".join(parts) or "the defaults") + ".")
    return "\n".join(lines)


def optimizations_table(benchmark: dict) -> pd.DataFrame:
    """The benchmark's rows (one per optimization, with its speedup and goal) plus the device."""
    table = pd.DataFrame(benchmark["rows"])
    table.insert(0, "device", benchmark["hardware"].get("cuda_device") or benchmark["device"])
    return table


def load_records(paths: list[str | Path]) -> list[dict]:
    """Read and validate every record; a bad one is an error naming its file, never skipped."""
    return [read_record(p) for p in paths]


def write_csv(frame: pd.DataFrame, path: str | Path) -> None:
    """Write ``frame`` as CSV without its index, atomically (:func:`tlselect.core.files.atomic_path`)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def write_study_tables(
    records: list[str | Path], runs: str | Path, curves: str | Path, summary: str | Path, plans: str | Path,
    source_record: str | Path | None = None,
) -> str:  # fmt: skip
    """The study's tables from its registry records: ``runs`` (:func:`runs_table`), ``curves``
    (:func:`curves_table`), ``plans`` (:func:`plan_table`, the source pretraining's plan too) and the
    Markdown ``summary`` (with the source pretraining's seconds, when ``source_record`` is given).
    Returns the summary."""
    loaded = load_records(records)
    source = read_record(source_record) if source_record else None
    table = runs_table(loaded)
    write_csv(table, runs)
    write_csv(curves_table(loaded), curves)
    plan_rows = plan_table([*loaded, *([source] if source else [])])
    write_csv(plan_rows, plans)
    source_seconds = source["timings"]["wall_seconds"] if source else None
    text = summary_markdown(table, source_seconds, plan_summary(plan_rows))
    write_text(summary, text)
    return text


def write_optimizations_table(benchmark: str | Path, out: str | Path) -> pd.DataFrame:
    """The optimizations benchmark's JSON (``scripts/speedups.py``'s output) as a table written to ``out``."""
    table = optimizations_table(json.loads(Path(benchmark).read_text()))
    write_csv(table, out)
    return table
