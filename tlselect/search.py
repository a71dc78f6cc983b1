"""Model search over a candidate pool: the static plans of its methods, promotion and the comparison.

The pool (``search`` in ``config.yaml``; :func:`tlselect.runs.candidate_runs`) is the product of
backbones, inits, generic freeze depths, learning rates and input resolutions; Hyperband's brackets
draw seeded samples of it. Successive halving (SH) and Hyperband (HB, Li et al., JMLR 2018) are
unrolled statically: how many candidates each rung keeps and for how many epochs is known from the
config alone (:func:`brackets`); which candidates survive is decided at run time by
:func:`promote`, from the previous rung's registry records, on validation accuracy only. Survivors
continue their previous rung's checkpoint (``--continue-from``), never retrain. Random search
draws from the space (:func:`tlselect.runs.random_runs`); the model-based methods suggest their
rounds at run time (:func:`tlselect.strategies.suggest`). :func:`compare` tabulates them all.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from tlselect.atomic import write_json
from tlselect.backbones import BACKBONES
from tlselect.config import ConfigError, check_init
from tlselect.registry import RegistryError, rank
from tlselect.runs import candidate_runs, resolve_init

# Methods trained in rounds of suggestions (tlselect.strategies), after the statically planned ones.
MODEL_BASED = ("tpe", "gp_ucb", "cost_gp_ucb")
METHODS = ("grid", "random", "sh", "hb", *MODEL_BASED)


def check(config: dict) -> None:
    """Reject a search block that cannot run; the message names the key."""
    search = config["search"]
    for backbone in search["backbones"]:
        if backbone not in BACKBONES:
            raise ConfigError(f"search.backbones: unknown backbone {backbone!r}; known: {', '.join(BACKBONES)}")
    for init in search["inits"]:
        check_init("search.inits", resolve_init(config, init))
    for key in ("lr", "weight_decay", "label_smoothing"):
        low, high = search["distributions"][key]
        if low > high:
            raise ConfigError(f"search.distributions.{key}: the low bound {low} exceeds the high bound {high}")
    if search["min_epochs"] > search["max_epochs"]:
        raise ConfigError(
            f"search.min_epochs ({search['min_epochs']}) must not exceed search.max_epochs ({search['max_epochs']})"
        )
    if not search["enabled"]:
        return
    pool = len(candidate_runs(config))
    if not pool:
        raise ConfigError("search: the candidate pool is empty (scratch is never frozen); add an init or freezes: none")
    if search["rounds"] * search["q"] > pool:
        raise ConfigError(
            f"search.rounds x search.q ({search['rounds']} x {search['q']}) exceeds the pool's {pool} candidates: "
            "GP-UCB trains each grid point at most once"
        )


def sample(candidates: list[str], count: int, seed: int, stream: str) -> list[str]:
    """A seeded sample of ``count`` candidates (all when ``count`` exceeds them), in pool order."""
    chosen = set(random.Random(f"{seed}-{stream}").sample(sorted(candidates), min(count, len(candidates))))
    return [c for c in candidates if c in chosen]


@dataclass(frozen=True)
class Bracket:
    """One successive-halving bracket: candidates at rung 0, survivors and epochs per rung."""

    candidates: tuple[str, ...]
    keep: tuple[int, ...]  # candidates trained at each rung
    epochs: tuple[int, ...]  # total epochs a candidate has trained after each rung

    @property
    def rungs(self) -> int:
        return len(self.keep)

    def cost(self) -> int:
        """Epochs trained in all: survivors continue, so a rung costs only its extra epochs."""
        return sum(k * (e - p) for k, e, p in zip(self.keep, self.epochs, (0, *self.epochs), strict=False))


def _rungs(n: int, s: int, eta: int, max_epochs: int, min_epochs: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    keep = tuple(max(1, n // eta**i) for i in range(s + 1))
    epochs = tuple(max(min_epochs, round(max_epochs / eta ** (s - i))) for i in range(s + 1))
    return keep, epochs


def max_bracket(search: dict) -> int:
    """s_max = floor(log_eta(max_epochs / min_epochs)): the most aggressive bracket's rungs minus one."""
    ratio, s = search["max_epochs"] / search["min_epochs"], 0
    while search["eta"] ** (s + 1) <= ratio * (1 + 1e-9):
        s += 1
    return s


def brackets(config: dict, method: str, pool: dict | None = None) -> list[Bracket]:
    """The static plan of ``sh`` (one bracket over the whole pool) or ``hb`` (``search.brackets``).

    ``pool``: the config's :func:`tlselect.runs.candidate_runs`, when the caller has it already.
    """
    return plan(list(candidate_runs(config) if pool is None else pool), config["search"], config["seed"], method)


def plan(candidates: list[str], search: dict, seed: int, method: str) -> list[Bracket]:
    """The brackets of ``sh`` or ``hb`` over ``candidates`` with the ``search`` block's eta and epochs.

    Hyperband's bracket ``s`` (from s_max down) starts ceil((s_max+1)/(s+1) * eta^s) candidates,
    a seeded sample of the pool, at max_epochs * eta^-s epochs, and keeps 1/eta of them per rung.
    """
    s_max = max_bracket(search)
    eta, top, low = search["eta"], search["max_epochs"], search["min_epochs"]
    if method == "sh":
        return [Bracket(tuple(candidates), *_rungs(len(candidates), s_max, eta, top, low))]
    plans = []
    for s in range(s_max, max(-1, s_max - search["brackets"]), -1):
        n = min(len(candidates), math.ceil((s_max + 1) / (s + 1) * eta**s))
        chosen = sample(candidates, n, seed, f"hb-{s}")
        plans.append(Bracket(tuple(chosen), *_rungs(n, s, eta, top, low)))
    return plans


def promote(records: dict[str, dict], keep: int) -> list[dict]:
    """The ``keep`` best of the previous rung: ``[{slot, candidate, checkpoint, record, val_accuracy}]``.

    ``records`` maps each record's path to the record; its checkpoint is the same path with ``.pt``.
    """
    paths = {id(r): p for p, r in records.items()}
    ranked = rank(list(records.values()))[:keep]
    return [
        {
            "slot": slot,
            "candidate": r["name"],
            "record": paths[id(r)],
            "checkpoint": str(Path(paths[id(r)]).with_suffix(".pt")),
            "val_accuracy": r["metrics"]["val_accuracy"],
        }
        for slot, r in enumerate(ranked)
    ]


def write_promotion(ranking: str | Path, keep: int, out: str | Path) -> str:
    """Write the promotion file of a rung, the first ``keep`` of the previous rung's ranking file; say what it kept."""
    ranked = json.loads(Path(ranking).read_text())["ranking"]
    write_json(out, {"keep": keep, "slots": ranked[:keep]})
    names = ", ".join(slot["candidate"] for slot in ranked[:keep])
    return f"kept {min(keep, len(ranked))} of {len(ranked)} from {ranking}: {names}"


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
    """One search job: its record, the epochs it continued from, its Snakemake benchmark file."""

    record: dict
    first_epoch: int
    benchmark: str


def compare(jobs: dict[str, list[Job]], finals: dict[str, list[dict]]) -> list[dict]:
    """One row per method: compute spent and the chosen model (best validation accuracy of ``finals``).

    ``jobs[method]`` are every job the method paid for; ``finals[method]`` the runs it chooses from
    (the last rung of every bracket for SH and HB, every job's run for the others). Test accuracy
    is reported.
    """
    rows = []
    for method, method_jobs in jobs.items():
        costs = [job_cost(j.record, j.first_epoch) for j in method_jobs]
        chosen = rank(finals[method])[0]
        rows.append(
            {
                "method": method,
                "candidates": len({j.record["name"] for j in method_jobs}),
                "jobs": len(method_jobs),
                "epochs": sum(e for e, _ in costs),
                "train_seconds": sum(s for _, s in costs),
                "wall_seconds": sum(benchmark_seconds(j.benchmark) for j in method_jobs),
                "chosen": chosen["name"],
                "val_accuracy": chosen["metrics"]["val_accuracy"],
                "test_accuracy": chosen["metrics"]["test_accuracy"],
            }
        )
    grid = next((r for r in rows if r["method"] == "grid"), None)
    for row in rows:
        row["compute_share"] = row["epochs"] / grid["epochs"] if grid and grid["epochs"] else None
        row["wall_share"] = row["wall_seconds"] / grid["wall_seconds"] if grid and grid["wall_seconds"] else None
        gap = (row["test_accuracy"] or 0) - (grid["test_accuracy"] or 0) if grid else None
        row["test_gap_points"] = None if gap is None else 100 * gap
    return rows
