"""Search strategies replayed on a tabular benchmark: the grid's records, at no training cost.

Every grid run records its validation accuracy and seconds per epoch under a constant learning
rate, so training a candidate for e epochs (or continuing it from e' to e) can be looked up
instead of run, as HPO benchmarks do (HPOBench, LCBench, NAS-Bench-201). Each method is replayed
for many seeds; after every job its incumbent is the best run (:func:`tlselect.core.registry.rank`, on
validation accuracy) among those trained for the most epochs so far. Its regret is the grid's best
test accuracy minus the incumbent's test accuracy at the end of its full-length grid run (test
accuracy is recorded per run, not per epoch). Compute is counted in epochs and seconds, as
shares of the whole grid's.

Methods: random search (grid runs in seeded order), successive halving and Hyperband (the
workflow's own brackets and promotion, :func:`tlselect.search.brackets.unroll` and
:func:`tlselect.search.brackets.promote`; Hyperband loops over its brackets with fresh samples),
TPE over the grid's discrete space in rounds of ``q``, GP-UCB and cost-aware GP-UCB over model types, one pull at a time
(:func:`tlselect.search.strategies.ucb_suggest`, as the workflow's own GP-UCB jobs choose).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from threadpoolctl import threadpool_limits

from tlselect.core.registry import RegistryError, rank
from tlselect.core.settings import freeze_depth
from tlselect.search import brackets, strategies
from tlselect.search.space import SAMPLED, Space

METHODS = ("random", "sh", "hb", "tpe", "gp_ucb", "cost_gp_ucb")
SHARES = (1 / 9, 1 / 5, 1 / 3, 1.0)


@dataclass(frozen=True)
class Candidate:
    """One grid run as a table row: its parameters, per-epoch validation accuracy and seconds, test accuracy."""

    name: str
    params: dict
    val: tuple  # validation accuracy after each epoch (None once diverged)
    seconds: tuple  # training + evaluation seconds of each epoch
    test: float | None  # test accuracy at the end of the run

    @property
    def arm(self) -> tuple[str, str, str]:
        return self.params["backbone"], self.params["init"], self.params["freeze"]


def table(records: list[dict]) -> dict[str, Candidate]:
    """``{candidate: row}`` from the grid's registry records."""
    out = {}
    for record in records:
        config, curves = record["config"], record["curves"]
        params = {k: config[k] for k in ("backbone", "init", "lr", "resolution", *SAMPLED)}
        params["freeze"] = freeze_depth(config["backbone"], config["freeze"])
        out[record["name"]] = Candidate(
            name=record["name"],
            params=params,
            val=tuple(c["val_accuracy"] for c in curves),
            seconds=tuple(c["train_seconds"] + c["eval_seconds"] for c in curves),
            test=record["metrics"]["test_accuracy"],
        )
    return out


class Replay:
    """One replayed search: the compute it spent and its incumbent after every job."""

    def __init__(self, rows: dict[str, Candidate]):
        self.rows = rows
        self.epochs, self.seconds = 0, 0.0
        self.level, self.best = 0, None  # the incumbent: best record at the most epochs so far
        self.trace = []  # (epochs, seconds, incumbent name) after every job

    def train(self, name: str, epochs: int, start: int = 0) -> dict:
        """Train ``name`` from ``start`` (a checkpoint) to ``epochs``; the record it would leave."""
        row = self.rows[name]
        ran = row.val[start:epochs]
        self.epochs += len(ran)
        self.seconds += sum(row.seconds[start:epochs])
        val = row.val[epochs - 1] if len(row.val) >= epochs else None
        record = {"name": name, "status": "completed" if val is not None else "diverged", "metrics": {}}
        record["metrics"] = {"val_accuracy": val, "test_accuracy": row.test}
        if epochs > self.level:
            self.level, self.best = epochs, record
        elif epochs == self.level:
            self.best = rank([self.best, record])[0]
        self.trace.append((self.epochs, self.seconds, self.best["name"]))
        return record


def _bracket(replay: Replay, bracket: brackets.Bracket, order: np.random.RandomState) -> None:
    previous, names = None, list(bracket.candidates)
    for rung, epochs in enumerate(bracket.epochs):
        if rung:
            kept = brackets.promote({f"{r['name']}.json": r for r in previous}, bracket.keep[rung])
            names = [k["candidate"] for k in kept]
        start = bracket.epochs[rung - 1] if rung else 0
        previous = [replay.train(names[i], epochs, start) for i in order.permutation(len(names))]


def run(method: str, rows: dict[str, Candidate], settings: dict, seed: int) -> Replay:
    """Replay ``method`` with ``seed``; ``settings``: eta, min_epochs, max_epochs, brackets, q, startup, delta."""
    replay, names, top = Replay(rows), sorted(rows), settings["max_epochs"]
    budget = len(rows) * top
    rng = np.random.RandomState(seed)
    if method == "random":
        for i in rng.permutation(len(names)):
            replay.train(names[i], top)
    elif method in ("sh", "hb"):
        for i in range(1 if method == "sh" else 10**6):
            for bracket in brackets.unroll(names, settings, seed * 1000 + i, method):
                _bracket(replay, bracket, rng)
            if replay.epochs >= budget:
                break
    else:
        by_key = {strategies.point_key(r.params): r.name for r in rows.values()}
        points = [rows[name].params for name in names]
        history = []
        if method == "tpe":
            space = Space.of_grid(points)
            if {strategies.point_key(p) for p in space.grid()} != set(by_key):
                raise RegistryError("the grid's records do not cover the product of their own values; rerun the grid")
        for round_ in range(len(rows)):
            if method == "tpe":
                asked = strategies.tpe_suggest(
                    space,
                    [(p, v) for p, v, _ in history],
                    settings["q"],
                    seed * 1000 + round_,
                    discrete=True,
                    startup=settings["startup"],
                )
            else:
                asked = strategies.ucb_suggest(
                    points, history, 1, seed, cost_aware=method == "cost_gp_ucb", delta=settings["delta"]
                )
            if not asked:
                break
            for params in asked:
                before = replay.seconds
                record = replay.train(by_key[strategies.point_key(params)], top)
                history.append((params, record["metrics"]["val_accuracy"], replay.seconds - before))
    return replay


def regrets(replay: Replay, rows: dict[str, Candidate], shares, axis: str) -> list[float]:
    """Regret (points) of the incumbent at each share of the grid's compute (NaN before the first job)."""
    column = 0 if axis == "epochs" else 1
    total = sum(len(r.val) for r in rows.values()) if axis == "epochs" else sum(sum(r.seconds) for r in rows.values())
    best = max(r.test or 0.0 for r in rows.values())
    spent = np.array([step[column] for step in replay.trace])
    out = []
    for share in shares:
        i = np.searchsorted(spent, share * total * (1 + 1e-9), side="right") - 1
        out.append(math.nan if i < 0 else 100 * (best - (rows[replay.trace[i][2]].test or 0.0)))
    return out


def summarize(values: np.ndarray) -> tuple[float, float, float, int]:
    """Mean, 95% t-interval and count of the finite values."""
    values = values[np.isfinite(values)]
    if not len(values):
        return math.nan, math.nan, math.nan, 0
    mean = float(values.mean())
    half = (
        float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
        if len(values) > 1
        else 0.0
    )
    return mean, mean - half, mean + half, len(values)


def curves(rows: dict[str, Candidate], settings: dict, seeds: int, shares, methods=METHODS) -> pd.DataFrame:
    """Mean regret with its 95% interval per method, axis (epochs, seconds) and share of the grid's compute."""
    if not rows:
        raise RegistryError("the replay needs the grid's records; none were given")
    out = []
    for method in methods:
        with threadpool_limits(1):  # the GP's solves are tiny: threads only add overhead
            replays = [run(method, rows, settings, seed) for seed in range(seeds)]
        for axis in ("epochs", "seconds"):
            matrix = np.array([regrets(r, rows, shares, axis) for r in replays])
            for j, share in enumerate(shares):
                mean, low, high, n = summarize(matrix[:, j])
                out.append({"method": method, "axis": axis, "share": share, "regret_points": mean,
                            "ci95_low": low, "ci95_high": high, "seeds": n})  # fmt: skip
    return pd.DataFrame(out)


def anytime(records: list[dict], settings: dict, seeds: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every method replayed on the grid's ``records`` for ``seeds`` seeds: its anytime :func:`curves`
    (41 shares of the grid's compute from 1/100 to 1, plus :data:`SHARES`, for the figure) and
    ``replay.csv``'s rows (the curves at :data:`SHARES`). ``settings``: eta, min_epochs, max_epochs,
    brackets, q, startup and delta."""
    shares = sorted({*np.geomspace(1 / 100, 1, 41), *SHARES})
    curve = curves(table(records), settings, seeds, shares)
    return curve, curve[curve["share"].isin(SHARES)]
