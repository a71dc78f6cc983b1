"""The search comparison: for every method, the candidates it tried, the epochs and wall seconds it
spent (from the records and Snakemake's benchmark files), the model it chose (with repeats, on its
mean over its seeds) with a 95% interval on its accuracies, and its probability of being the best
of those it chose from (``p_best``).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from tlselect.core.registry import RegistryError, configuration, rank
from tlselect.report.answer import probability_best, t_interval, wilson


def job_cost(record: dict, first_epoch: int) -> tuple[int, float]:
    """Epochs and training seconds a job spent itself: a continued run's first epochs came before."""
    curves = record["curves"][first_epoch:]
    return len(curves), sum(c["train_seconds"] for c in curves)


def benchmark_seconds(path: str | Path) -> float:
    """Wall seconds of a job from its Snakemake benchmark file (the ``s`` column of its last row)."""
    try:
        with Path(path).open() as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        return float(rows[-1]["s"])
    except (OSError, IndexError, KeyError, ValueError) as error:
        raise RegistryError(f"cannot read the job's wall time from its benchmark file {path}: {error!r}") from error


@dataclass
class Job:
    """One search run: its record, the epochs it continued from, its job's Snakemake benchmark file
    (the runs of a run group name the group's: its seconds count once)."""

    record: dict
    first_epoch: int
    benchmark: str


def compare(jobs: dict[str, list[Job]], finals: dict[str, list[dict]]) -> list[dict]:
    """One row per method: compute spent and the chosen model (best validation accuracy of ``finals``).

    ``jobs[method]`` are every job the method paid for; ``finals[method]`` the runs it chooses from
    (the last rung of every bracket for SH and HB, every job's run for the others). The chosen model
    is the configuration :func:`tlselect.core.registry.rank` puts first (its mean over its seeds,
    with repeats); its validation and test accuracy are that mean, with a 95% interval
    (:func:`accuracy_interval`). ``p_best`` is its probability of the best validation accuracy among
    ``finals[method]`` (:func:`chosen_probability`).
    """
    rows = []
    for method, method_jobs in jobs.items():
        costs = [job_cost(j.record, j.first_epoch) for j in method_jobs]
        chosen = rank(finals[method])[0]
        seeds = [r for r in finals[method] if configuration(r) == configuration(chosen)]
        row = {
            "method": method,
            "candidates": len({j.record["name"] for j in method_jobs}),
            "jobs": len({j.benchmark for j in method_jobs}),  # a run group's runs share one job
            "epochs": sum(e for e, _ in costs),
            "train_seconds": sum(s for _, s in costs),
            "wall_seconds": sum(benchmark_seconds(b) for b in {j.benchmark for j in method_jobs}),
            "chosen": chosen["name"],
            "seeds": len(seeds),
        }
        for split in ("val", "test"):
            keys = (f"{split}_accuracy", f"{split}_low", f"{split}_high")
            row.update(zip(keys, accuracy_interval(seeds, split), strict=True))
        row["p_best"] = chosen_probability(finals[method], chosen)
        rows.append(row)
    grid = next((r for r in rows if r["method"] == "grid"), None)
    for row in rows:
        row["compute_share"] = row["epochs"] / grid["epochs"] if grid and grid["epochs"] else None
        row["wall_share"] = row["wall_seconds"] / grid["wall_seconds"] if grid and grid["wall_seconds"] else None
        gap = (row["test_accuracy"] or 0) - (grid["test_accuracy"] or 0) if grid else None
        row["test_gap_points"] = None if gap is None else 100 * gap
    return rows


def accuracy_interval(seeds: list[dict], split: str) -> tuple[float | None, float, float]:
    """The mean ``split`` accuracy of one configuration's runs (``seeds``) and its 95% interval: a
    t-interval over the seeds, or with one seed the Wilson interval on its images (nan where its
    record lacks their count); (None, nan, nan) unless every seed completed."""
    values = [r["metrics"][f"{split}_accuracy"] for r in seeds]
    if None in values:
        return None, math.nan, math.nan
    if len(values) > 1:
        return t_interval(values)
    return (values[0], *wilson(values[0], seeds[0].get("data", {}).get(split)))


def chosen_probability(finals: list[dict], chosen: dict) -> float:
    """``chosen``'s probability of being the best of the completed ``finals`` (a run chosen from
    twice counts once; a diverged run is never the best), over validation images and each
    configuration's seeds (:func:`tlselect.report.answer.probability_best`); nan where a run lacks
    its hits."""
    done = [r for r in finals if r["status"] == "completed"]
    if chosen not in done or not all(r["metrics"].get("val_correct") for r in done):
        return math.nan
    hits: dict[str, dict[str, str]] = {}
    for r in done:
        hits.setdefault(configuration(r), {})[r["run_id"]] = r["metrics"]["val_correct"]
    return probability_best({name: list(runs.values()) for name, runs in hits.items()})[configuration(chosen)]
