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

import dataclasses
import math
import multiprocessing
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from threadpoolctl import threadpool_limits

from tlselect.core.registry import RegistryError, rank
from tlselect.core.settings import freeze_depth
from tlselect.search import brackets, strategies
from tlselect.search.space import SAMPLED, Space

METHODS = ("grid", "random", "sh", "hb", "asha", "bohb", "tpe", "gp_ucb", "cost_gp_ucb")
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


# A pool as a table (benchmarks/pools/*.csv): one row per candidate and epoch.
POOL_COLUMNS = ("name", "backbone", "init", "freeze", "lr", "resolution", *SAMPLED,
                "epoch", "val_accuracy", "seconds", "test_accuracy")  # fmt: skip


def pool_frame(rows: dict[str, Candidate]) -> pd.DataFrame:
    """``rows`` as a long table of :data:`POOL_COLUMNS`: one row per candidate and epoch (empty
    validation accuracy once diverged; the test accuracy repeated on each of a candidate's rows)."""
    out = []
    for row in rows.values():
        params = {k: row.params[k] for k in POOL_COLUMNS[1:9]}
        for epoch, (val, seconds) in enumerate(zip(row.val, row.seconds, strict=True), 1):
            out.append({"name": row.name, **params, "epoch": epoch, "val_accuracy": val, "seconds": seconds,
                        "test_accuracy": row.test})  # fmt: skip
    return pd.DataFrame(out, columns=list(POOL_COLUMNS))


def read_pool(path) -> dict[str, Candidate]:
    """``{candidate: row}`` from a pool table (:func:`pool_frame`), checked: every column, epochs 1..E."""
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as error:
        raise RegistryError(f"cannot read the pool table {path}: {error}") from error
    missing = [c for c in POOL_COLUMNS if c not in frame.columns]
    if missing:
        raise RegistryError(f"the pool table {path} lacks the columns {', '.join(missing)}; expected {POOL_COLUMNS}")
    out = {}
    for name, group in frame.groupby("name", sort=True):
        group = group.sort_values("epoch")
        if list(group["epoch"]) != list(range(1, len(group) + 1)):
            raise RegistryError(f"the pool table {path}: candidate {name} lacks some of epochs 1..{len(group)}")
        first = group.iloc[0]
        params = {k: first[k].item() if hasattr(first[k], "item") else first[k] for k in POOL_COLUMNS[1:9]}
        out[name] = Candidate(
            name=name,
            params=params,
            val=tuple(None if pd.isna(v) else float(v) for v in group["val_accuracy"]),
            seconds=tuple(float(s) for s in group["seconds"]),
            test=None if pd.isna(first["test_accuracy"]) else float(first["test_accuracy"]),
        )
    if not out:
        raise RegistryError(f"the pool table {path} holds no candidate")
    return out


def table(records: list[dict]) -> dict[str, Candidate]:
    """``{candidate: row}`` from the grid's registry records. With repeats, a candidate's seeds (its
    records of one name) are one row: the mean over them of the validation accuracy after each
    epoch (None from the first epoch any seed diverged) and of the test accuracy, and the seconds
    of all of them (what training the candidate costs)."""
    seeds: dict[str, list[dict]] = {}
    for record in records:
        seeds.setdefault(record["name"], []).append(record)
    out = {}
    for name, runs in seeds.items():
        config = runs[0]["config"]
        params = {k: config[k] for k in ("backbone", "init", "lr", "resolution", *SAMPLED)}
        params["freeze"] = freeze_depth(config["backbone"], config["freeze"])
        curves = [r["curves"] for r in runs]
        val = [[c["val_accuracy"] for c in curve] for curve in curves]
        tests = [r["metrics"]["test_accuracy"] for r in runs]
        out[name] = Candidate(
            name=name,
            params=params,
            val=tuple(_mean(v) for v in zip(*val, strict=False)),
            seconds=tuple(
                sum(c["train_seconds"] + c["eval_seconds"] for c in epoch) for epoch in zip(*curves, strict=False)
            ),
            test=_mean(tests),
        )
    return out


def _mean(values) -> float | None:
    """The mean of ``values``; None when one is None."""
    return None if any(v is None for v in values) else sum(values) / len(values)


class Replay:
    """One replayed search: the compute it spent and its incumbent after every job."""

    def __init__(self, rows: dict[str, Candidate]):
        self.rows = rows
        self.epochs, self.seconds = 0, 0.0
        self.level, self.best = 0, None  # the incumbent: best record at the most epochs so far
        self.trace = []  # (epochs, seconds, incumbent name) after every job
        self.results = []  # (candidate, epochs) of every job, in the order its result came

    def charge(self, name: str, epochs: int, start: int = 0) -> None:
        """Pay for training ``name`` from ``start`` (a checkpoint) to ``epochs``."""
        row = self.rows[name]
        self.epochs += len(row.val[start:epochs])
        self.seconds += sum(row.seconds[start:epochs])

    def result(self, name: str, epochs: int) -> dict:
        """The record ``name`` leaves after ``epochs``; the incumbent and the trace take it in."""
        row = self.rows[name]
        val = row.val[epochs - 1] if len(row.val) >= epochs else None
        record = {"name": name, "status": "completed" if val is not None else "diverged", "metrics": {}}
        record["metrics"] = {"val_accuracy": val, "test_accuracy": row.test}
        if epochs > self.level:
            self.level, self.best = epochs, record
        elif epochs == self.level:
            self.best = rank([self.best, record])[0]
        self.trace.append((self.epochs, self.seconds, self.best["name"]))
        self.results.append((name, epochs))
        return record

    def train(self, name: str, epochs: int, start: int = 0) -> dict:
        """Train ``name`` from ``start`` (a checkpoint) to ``epochs``; the record it would leave."""
        self.charge(name, epochs, start)
        return self.result(name, epochs)


def _bracket(replay: Replay, bracket: brackets.Bracket, order: np.random.RandomState) -> list[tuple[int, list[dict]]]:
    """Run a successive-halving bracket; ``(epochs, records)`` of each rung."""
    previous, names, out = None, list(bracket.candidates), []
    for rung, epochs in enumerate(bracket.epochs):
        if rung:
            kept = brackets.promote({f"{r['name']}.json": r for r in previous}, bracket.keep[rung])
            names = [k["candidate"] for k in kept]
        start = bracket.epochs[rung - 1] if rung else 0
        previous = [replay.train(names[i], epochs, start) for i in order.permutation(len(names))]
        out.append((epochs, previous))
    return out


def _asha(replay: Replay, names: list[str], settings: dict, rng: np.random.RandomState) -> None:
    """Asynchronous successive halving (Li et al. 2020, "A System for Massively Parallel
    Hyperparameter Tuning", Section 3.2, Algorithms 1 and 2), early-stopping rate 0, on
    ``settings["workers"]`` simulated workers.

    Rung k trains to successive halving's k-th rung epochs (``min_epochs`` x eta^k, up to
    ``max_epochs``). A free worker asks ``get_job``: the best candidate of rung k (from the top
    rung down) that is among the top 1/eta of rung k's completed results and not yet promoted
    continues its checkpoint to rung k+1; failing that, a new candidate (the pool in a seeded
    order) starts at rung 0. Each job takes its candidate's recorded seconds and its result
    arrives when the simulated clock reaches its end. A job's compute is charged when it starts,
    its result counted when it ends; no job starts that would take the compute past the grid's.
    """
    epochs = brackets.unroll(names, settings, 0, "sh")[0].epochs
    eta, budget = settings["eta"], sum(len(replay.rows[n].val) for n in names)
    fresh = [names[i] for i in rng.permutation(len(names))]
    done = [[] for _ in epochs]  # completed records of each rung
    promoted = [set() for _ in epochs]

    def get_job():
        for k in range(len(epochs) - 2, -1, -1):
            for record in rank(done[k])[: len(done[k]) // eta]:
                if record["name"] not in promoted[k] and record["status"] == "completed":
                    return record["name"], k + 1
        return (fresh[0], 0) if fresh else None

    clock, running, idle, started = 0.0, [], settings["workers"], 0  # running: (end, start order, name, rung)
    while True:
        while idle and (job := get_job()) is not None:
            name, k = job
            start = epochs[k - 1] if k else 0
            if replay.epochs + len(replay.rows[name].val[start : epochs[k]]) > budget:
                break
            promoted[k - 1].add(name) if k else fresh.pop(0)
            replay.charge(name, epochs[k], start)
            running.append((clock + sum(replay.rows[name].seconds[start : epochs[k]]), started, name, k))
            idle, started = idle - 1, started + 1
        if not running:
            return
        running.sort()
        clock, _, name, k = running.pop(0)
        done[k].append(replay.result(name, epochs[k]))
        idle += 1


def _bohb_draw(space: Space, pool: list[str], rows: dict[str, Candidate], observed: dict[int, list], n: int,
               settings: dict, rng: np.random.RandomState, seed: int) -> list[str]:  # fmt: skip
    """``n`` distinct candidates for a BOHB bracket (Falkner et al. 2018, "BOHB: Robust and Efficient
    Hyperparameter Optimization at Scale", Section 4 and Algorithm 2): a fraction ``rho`` at
    random; the rest from TPE (:func:`tlselect.search.strategies.tpe_suggest`; Optuna's independent
    TPE stands in for BOHB's multivariate KDE) fitted on the validation accuracies ``observed`` at
    the largest number of epochs with at least N_min + 2 of them (N_min = d + 1, d the pool's
    varying parameters); all at random while no budget has that many."""
    keys = [strategies.point_key(rows[name].params) for name in pool]
    d = sum(len({key[i] for key in keys}) > 1 for i in range(len(keys[0])))
    enough = [b for b, seen in observed.items() if len(seen) >= d + 3]
    modelled = rng.binomial(n, 1 - settings["rho"]) if enough else 0
    chosen = [pool[i] for i in rng.permutation(len(pool))[: n - modelled]]
    if modelled:
        pending = [rows[c].params for c in chosen]
        asked = strategies.tpe_suggest(
            space, observed[max(enough)], modelled, seed, pending=pending, discrete=True, startup=d + 3
        )
        chosen += [dict(zip(keys, pool, strict=True))[strategies.point_key(p)] for p in asked]
    return chosen


def _space(rows: dict[str, Candidate], names: list[str]) -> Space:
    """The discrete space of the pool, which must be the product of its own values (TPE, BOHB)."""
    points = [rows[name].params for name in names]
    space = Space.of_grid(points)
    if {strategies.point_key(p) for p in space.grid()} != {strategies.point_key(p) for p in points}:
        raise RegistryError("the grid's records do not cover the product of their own values; rerun the grid")
    return space


def run(method: str, rows: dict[str, Candidate], settings: dict, seed: int) -> Replay:
    """Replay ``method`` with ``seed``; ``settings``: eta, min_epochs, max_epochs, brackets, q, startup,
    delta, workers (ASHA) and rho (BOHB)."""
    replay, names, top = Replay(rows), sorted(rows), settings["max_epochs"]
    budget = len(rows) * top
    rng = np.random.RandomState(seed)
    if method in ("grid", "random"):
        for i in range(len(names)) if method == "grid" else rng.permutation(len(names)):
            replay.train(names[i], top)
    elif method == "asha":
        _asha(replay, names, settings, rng)
    elif method in ("sh", "hb", "bohb"):
        space = _space(rows, names) if method == "bohb" else None
        observed = {}  # BOHB's observations: epochs -> [(params, validation accuracy)]
        for i in range(1 if method == "sh" else 10**6):
            for j, bracket in enumerate(
                brackets.unroll(names, settings, seed * 1000 + i, "sh" if method == "sh" else "hb")
            ):
                if method == "bohb":
                    drawn = _bohb_draw(space, names, rows, observed, len(bracket.candidates), settings, rng,
                                       seed * 10**5 + i * 100 + j)  # fmt: skip
                    bracket = dataclasses.replace(bracket, candidates=tuple(drawn))
                for epochs, records in _bracket(replay, bracket, rng):
                    observed.setdefault(epochs, []).extend(
                        (rows[r["name"]].params, r["metrics"]["val_accuracy"]) for r in records
                    )
            if replay.epochs >= budget:
                break
    else:
        by_key = {strategies.point_key(r.params): r.name for r in rows.values()}
        points = [rows[name].params for name in names]
        history = []
        space = _space(rows, names) if method == "tpe" else None
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


def _regrets_of_seed(job: tuple) -> list[list[float]]:
    """:func:`regrets` on both axes of one replay: ``job`` is (method, rows, settings, seed, shares)."""
    method, rows, settings, seed, shares = job
    with threadpool_limits(1):  # the GP's solves are tiny: threads only add overhead
        done = run(method, rows, settings, seed)
    return [regrets(done, rows, shares, axis) for axis in ("epochs", "seconds")]


def curves(rows: dict[str, Candidate], settings: dict, seeds: int, shares, methods=METHODS,
           processes: int = 1) -> pd.DataFrame:  # fmt: skip
    """Mean regret with its 95% interval per method, axis (epochs, seconds) and share of the grid's
    compute; the seeds' replays spread over ``processes`` (the same numbers for any count)."""
    if not rows:
        raise RegistryError("the replay needs the grid's records; none were given")
    short = sorted(name for name, row in rows.items() if len(row.val) < settings["max_epochs"])
    if short:
        raise RegistryError(
            f"{len(short)} candidates (first {short[0]}) have fewer than max_epochs = {settings['max_epochs']} "
            "epochs recorded; set max_epochs to the epochs the pool was trained for"
        )
    jobs = [(method, rows, settings, seed, shares) for method in methods for seed in range(seeds)]
    if processes > 1:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            results = pool.map(_regrets_of_seed, jobs, chunksize=max(1, seeds // (4 * processes)))
    else:
        results = [_regrets_of_seed(job) for job in jobs]
    out = []
    for m, method in enumerate(methods):
        for a, axis in enumerate(("epochs", "seconds")):
            matrix = np.array([result[a] for result in results[m * seeds : (m + 1) * seeds]])
            for j, share in enumerate(shares):
                mean, low, high, n = summarize(matrix[:, j])
                out.append({"method": method, "axis": axis, "share": share, "regret_points": mean,
                            "ci95_low": low, "ci95_high": high, "seeds": n})  # fmt: skip
    return pd.DataFrame(out)


def anytime(
    rows: dict[str, Candidate], settings: dict, seeds: int, processes: int = 1
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every method replayed on the pool ``rows`` (:func:`table` of the grid's records, or
    :func:`read_pool`) for ``seeds`` seeds: its anytime :func:`curves` (41 shares of the grid's
    compute from 1/100 to 1, plus :data:`SHARES`, for the figure and :func:`goals`) and
    ``replay.csv``'s rows (the curves at :data:`SHARES`). ``settings``: as :func:`run` takes them."""
    shares = sorted({*np.geomspace(1 / 100, 1, 41), *SHARES})
    curve = curves(rows, settings, seeds, shares, processes=processes)
    return curve, curve[curve["share"].isin(SHARES)]


def goals(curve: pd.DataFrame) -> pd.DataFrame:
    """What the replay says of three goals, from :func:`anytime`'s curve, one row per goal and case:

    - ``a``: the method with the least mean regret at 1/5 of the grid's compute (epochs, seconds);
      met when that mean is within 1 test point of the pool's best;
    - ``b``: TPE and BOHB against random search at 1/3 of the compute; met when the method's 95%
      interval lies wholly below random search's;
    - ``c``: the least share of the grid's seconds at which cost-aware GP-UCB's mean regret reaches
      plain GP-UCB's final one, against the share at which plain GP-UCB first does; met at half or less.
    """
    at = curve.set_index(["axis", "method", "share"]).sort_index()
    out = []
    for axis in ("epochs", "seconds"):
        fifth = at.xs((axis, 1 / 5), level=("axis", "share"))["regret_points"].dropna()
        if len(fifth):
            best = at.loc[(axis, fifth.idxmin(), 1 / 5)]
            out.append({"goal": "a", "axis": axis, "method": fifth.idxmin(), "share": 1 / 5, **_cell(best),
                        "reference": "1 point", "met": bool(best["regret_points"] <= 1.0)})  # fmt: skip
        random = at.loc[(axis, "random", 1 / 3)]
        for method in ("tpe", "bohb"):
            row = at.loc[(axis, method, 1 / 3)]
            out.append({"goal": "b", "axis": axis, "method": method, "share": 1 / 3, **_cell(row),
                        "reference": f"random {random['regret_points']:.2f} [{random['ci95_low']:.2f}, "
                                     f"{random['ci95_high']:.2f}]",
                        "met": bool(row["ci95_high"] < random["ci95_low"])})  # fmt: skip
    seconds = curve[curve["axis"] == "seconds"]
    plain, cost = (seconds[seconds["method"] == m].sort_values("share") for m in ("gp_ucb", "cost_gp_ucb"))
    final = plain["regret_points"].iloc[-1]

    def reached(frame):
        hits = frame[frame["regret_points"] <= final + 1e-9]
        return hits.iloc[0] if len(hits) else None

    first_plain, first_cost = reached(plain), reached(cost)
    out.append({
        "goal": "c", "axis": "seconds", "method": "cost_gp_ucb",
        "share": math.nan if first_cost is None else first_cost["share"],
        **(_cell(first_cost) if first_cost is not None else {}),
        "reference": f"gp_ucb's final {final:.2f} first at {first_plain['share']:.3f} of the grid's seconds",
        "met": first_cost is not None and first_cost["share"] <= first_plain["share"] / 2,
    })  # fmt: skip
    return pd.DataFrame(out)


def _cell(row) -> dict:
    return {k: float(row[k]) for k in ("regret_points", "ci95_low", "ci95_high")}
