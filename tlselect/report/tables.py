"""Aggregation: registry records -> comparison table, per-epoch curves and a Markdown summary.

Models are chosen on validation accuracy; test accuracy is reported next to it, never used to
choose.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from tlselect.core.files import atomic_path, write_text
from tlselect.core.registry import configuration, rank, read_record
from tlselect.report.answer import answer, pareto_front, probability_best, t_interval

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
    "train_images",
    "val_images",
    "test_images",
    "seed",
    "fold",
    "row",
    "runs",
    "repeats",
    "folds",
    "val_low",
    "val_high",
    "test_low",
    "test_high",
    "p_best",
    "selected",
]

# The kinds of row of runs.csv, in the table's order: a configuration's mean over its repeats and
# folds, one run, the selected configuration retrained on every training image (folds), their mean.
ROWS = ("mean", "run", "refit", "refit mean")


def run_row(r: dict, row: str = "run") -> dict:
    """One record as a row of :func:`runs_table`. Policies and probes are both candidates: a probe is a
    frozen backbone with a trained head; so are the downstream models on the table beside the images
    (kind ``join``, with their ``model`` and ``inputs``: the join, the features or the columns alone)."""
    c = r["config"]
    return {
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
        "val_accuracy": r["metrics"]["val_accuracy"] if row == "run" else None,  # a refit trained on them
        "best_val_accuracy": r["metrics"]["best_val_accuracy"] if row == "run" else None,
        "test_accuracy": r["metrics"]["test_accuracy"],
        "train_seconds": r["timings"]["train_seconds"] + r["timings"]["cache_seconds"],
        "eval_seconds": r["timings"]["eval_seconds"],
        "wall_seconds": r["timings"]["wall_seconds"],
        "images_per_second": r["throughput_images_per_second"],
        "resumed_from_epoch": r.get("resumed_from_epoch"),
        "train_images": r.get("data", {}).get("train"),
        "val_images": r.get("data", {}).get("val") if row == "run" else None,
        "test_images": r.get("data", {}).get("test"),
        "seed": r["seed"],
        "fold": c.get("fold") or None,
        "row": row,
    }


def repeat_scores(records: list[dict], metric: str) -> list[float | None]:
    """One score per seed: the mean of ``metric`` over that seed's folds (its only run without folds)."""
    seeds: dict[int, list] = {}
    for r in records:
        seeds.setdefault(r["seed"], []).append(r["metrics"][metric])
    return [None if None in values else sum(values) / len(values) for values in seeds.values()]


def mean_row(records: list[dict], row: str = "mean") -> dict:
    """A configuration's repeats and folds as one row: the first run's settings, each accuracy's mean
    over the seeds (a seed's score the mean over its folds) with its 95% t-interval over the seeds
    (over the folds, with one seed), and the mean cost of one run."""
    rows = [run_row(r, row) for r in records]
    statuses = [r["status"] for r in records]
    seeds = sorted({r["seed"] for r in records})
    folds = {r["config"].get("fold") or 0 for r in records}
    one = {**rows[0], "run_id": "", "seed": None, "fold": None, "row": row, "runs": len(records),
           "repeats": len(seeds), "folds": len(folds - {0}) or None}  # fmt: skip
    one["status"] = "completed" if set(statuses) == {"completed"} else next(s for s in statuses if s != "completed")
    per_seed = len(seeds) > 1 or len(records) == 1
    for split in ("val", "test"):
        metric = f"{split}_accuracy"
        if row != "mean" and split == "val":
            continue
        scores = repeat_scores(records, metric) if per_seed else [r["metrics"][metric] for r in records]
        one[metric], one[f"{split}_low"], one[f"{split}_high"] = t_interval(scores)
        if one["status"] != "completed":
            one[metric] = None
    if row == "mean":
        one["best_val_accuracy"] = t_interval([r["metrics"]["best_val_accuracy"] for r in records])[0]
        one["val_images"] = sum(r["data"]["val"] for r in records) // len(seeds)  # a seed's folds cover them
    for key in ("train_seconds", "eval_seconds", "wall_seconds", "images_per_second"):
        one[key] = t_interval([x[key] for x in rows])[0]
    return one


def runs_table(records: list[dict], refits: list[dict] = ()) -> pd.DataFrame:
    """One row per run (``row`` run); with repeats or folds (a configuration, in the sense of
    :func:`tlselect.core.registry.configuration`, of several runs) also one ``mean`` row per
    configuration (:func:`mean_row`); the ``refits`` (the selected configuration retrained on every
    training image, one per seed) as ``refit`` rows, and their ``refit mean`` with several seeds.

    ``selected`` marks the candidate :func:`tlselect.core.registry.rank` puts first (the mean row of its
    configuration, where there is one), ``p_best`` each candidate's probability of being the best
    (:func:`tlselect.report.answer.probability_best`, over validation images and repeats). Policies
    and probes are both candidates: a probe is a frozen backbone with a trained head.
    """
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(configuration(r), []).append(r)
    aggregated = any(len(group) > 1 for group in groups.values())
    rows = [run_row(r) for r in records] + [run_row(r, "refit") for r in refits]
    if aggregated:
        rows += [mean_row(group) for group in groups.values()]
    if len(refits) > 1:
        rows.append(mean_row(list(refits), "refit mean"))
    table = pd.DataFrame(rows, columns=COLUMNS[:-2])
    table = table.astype({column: "Int64" for column in ("seed", "fold", "runs", "repeats", "folds")})
    best = rank(records)[0] if records else None
    chosen = configuration(best) if best and best["status"] == "completed" else None
    keys = [configuration(r) for r in records] + [None] * len(refits)
    keys += list(groups) if aggregated else []
    keys += [None] * (len(table) - len(keys))
    competing = table["row"] == ("mean" if aggregated else "run")
    hits = {key: validation_hits(group) for key, group in groups.items()}
    p_best = probability_best({key: h for key, h in hits.items() if h})
    table["p_best"] = [p_best.get(key) if take else None for key, take in zip(keys, competing, strict=True)]
    table["selected"] = [key == chosen and take for key, take in zip(keys, competing, strict=True)]
    order = table["row"].map(ROWS.index)
    return (
        table.assign(_order=order)
        .sort_values(["_order", "val_accuracy", "run_id"], ascending=[True, False, True], na_position="last")
        .drop(columns="_order")
        .reset_index(drop=True)
    )


def validation_hits(records: list[dict]) -> list[str] | None:
    """A configuration's per-image validation hits, one string per seed (its folds' in fold order,
    together the whole training subset); None if a run has none."""
    if not all(r["metrics"].get("val_correct") for r in records):
        return None
    seeds: dict[int, list[dict]] = {}
    for r in records:
        seeds.setdefault(r["seed"], []).append(r)
    return [
        "".join(r["metrics"]["val_correct"] for r in sorted(runs, key=lambda r: r["config"].get("fold") or 0))
        for runs in seeds.values()
    ]


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
        + (["row", "seed", "fold", "runs", "p_best"] if (table["row"] != "run").any() else [])
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
        parts = [f"{r.knob}={r.value}" + (f" ({r.gain:.2f}x vs {r.against})" if pd.notna(r.gain) else "")
                 for r in kept.itertuples()]  # fmt: skip
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
    source_record: str | Path | None = None, refits: list[str | Path] = (),
) -> str:  # fmt: skip
    """The study's tables from its registry records: ``runs`` (:func:`runs_table`), ``curves``
    (:func:`curves_table`), ``plans`` (:func:`plan_table`, the source pretraining's plan too) and the
    Markdown ``summary`` (with the source pretraining's seconds, when ``source_record`` is given);
    ``refits``: the records of the selected configuration retrained on every fold. Returns the summary."""
    loaded = load_records(records)
    source = read_record(source_record) if source_record else None
    table = runs_table(loaded, load_records(refits))
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
