"""Many users, one cluster: multi-tenant model selection after ease.ml.

Li, Zhong, Liu, Wu, Zhang, "Ease.ml: Towards Multi-tenant Resource Sharing for Machine Learning
Workloads", PVLDB 11(5), 2018. Several tenants (users) each bring a task and a pool of candidates;
one cluster trains one job at a time (or ``q`` per scheduling round), and a global scheduler
decides whose candidate runs next so that the (weighted) average accuracy over the tenants rises
fastest. Two levels, as in the paper:

- each tenant's own strategy picks *which* of its candidates: cost-aware GP-UCB (the paper's
  Section 3, a_t = argmax_k mu(k) + sqrt(beta_t / c_k) sigma(k)), plain GP-UCB, or random, all
  :mod:`tlselect.search.strategies` as the single-study search uses them (:func:`next_candidate`);
- the global scheduler picks *whose* (:func:`choose`):

  ``round_robin``: the tenant with the fewest jobs so far, ties in config order (the paper's
  baseline heuristic, Section 5);
  ``random``: a seeded uniform draw among the tenants that still have candidates;
  ``greedy``: the paper's GREEDY (Section 4): the tenant whose best upper confidence bound exceeds
  its best validation accuracy so far by the most, ``w_i (max_k UCB_i(k) - best_i)``
  (:func:`potential`; ``w_i``: the tenant's weight in the objective, 1 by default). The GP of a
  tenant is fitted on its accuracies scaled by their spread (a diverged run at its worst accuracy),
  and sigma is that of an arm's mean, without the observation noise (:func:`_ucb`): every tenant
  first gets :data:`WARMUP` jobs, round robin, before potentials compare;
  ``hybrid``: ease.ml's hybrid of GREEDY and round robin (Section 4), which keeps GREEDY from
  starving tenants. This module's reading of it: GREEDY among the tenants that still improve (a
  tenant whose last ``patience`` jobs did not raise its best accuracy is set aside), as long as
  the best weighted gain among them exceeds ``threshold`` (accuracy); otherwise round robin over
  every tenant with candidates left, which also gives a set-aside tenant its turns.

Everything is a function of the tenants' histories (:class:`Tenant`), so a scheduling job of the
workflow (:mod:`tlselect.search.tenant_jobs`) and the replay on recorded curves
(:func:`replay_run`) choose alike. Pending jobs of the same round count as observed at their
arm's posterior mean (GP-BUCB, as :func:`tlselect.search.strategies.ucb_suggest` does).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd

from tlselect.core.registry import RegistryError
from tlselect.search import replay, strategies

SCHEDULERS = ("round_robin", "random", "greedy", "hybrid")
STRATEGIES = ("cost_gp_ucb", "gp_ucb", "random")
# What a tenant's GP sees: "types", its model types (the model search's arms, whose hyperparameters a
# pull draws in a seeded order), or "candidates", every candidate an arm of its own with the features
# of all its parameters (ease.ml's arms are a user's candidate models).
ARMS = ("types", "candidates")
# GREEDY and hybrid serve every tenant this many jobs, round robin, before comparing potentials.
WARMUP = 2
# The least spread of a tenant's accuracies its GP is scaled by (a point of accuracy).
SCALE_FLOOR = 0.01


@dataclasses.dataclass
class Tenant:
    """One tenant's grid and pulls: ``history`` holds ``(params, validation accuracy, seconds)``
    of every finished job (accuracy None: diverged, counted as 0)."""

    name: str
    points: list[dict]
    history: list[tuple[dict, float | None, float]] = dataclasses.field(default_factory=list)
    strategy: str = "cost_gp_ucb"
    weight: float = 1.0
    seed: int = 0
    arms_of: str = "types"

    @property
    def arm(self):
        """The function giving a candidate's arm (:data:`ARMS`)."""
        return strategies.arm_of if self.arms_of == "types" else strategies.point_key

    def untried(self) -> list[dict]:
        tried = {strategies.point_key(p) for p, _, _ in self.history}
        return [p for p in self.points if strategies.point_key(p) not in tried]

    def best(self) -> float:
        """The best validation accuracy so far (0 before the first result)."""
        return max((v or 0.0 for _, v, _ in self.history), default=0.0)

    def arms(self) -> list[tuple]:
        return sorted({self.arm(p) for p in self.points})

    def stalled(self, patience: int) -> bool:
        """Whether its last ``patience`` jobs left its best accuracy where it was."""
        values = [v or 0.0 for _, v, _ in self.history]
        return len(values) > patience and max(values[-patience:]) <= max(values[:-patience])


def next_candidate(tenant: Tenant, delta: float = 0.1) -> dict | None:
    """The tenant's own strategy's next grid point (None once every point was tried)."""
    if tenant.strategy == "random":
        untried = {strategies.point_key(p) for p in tenant.untried()}
        order = np.random.RandomState(tenant.seed).permutation(len(tenant.points))
        return next((tenant.points[i] for i in order if strategies.point_key(tenant.points[i]) in untried), None)
    cost_aware = tenant.strategy == "cost_gp_ucb"
    asked = strategies.ucb_suggest(
        tenant.points, tenant.history, 1, tenant.seed, cost_aware=cost_aware, delta=delta, arm=tenant.arm
    )
    return asked[0] if asked else None


def _ucb(tenant: Tenant, delta: float) -> tuple[list[tuple], np.ndarray, np.ndarray]:
    """Every arm's upper confidence bound and posterior mean, in accuracy.

    To compare tenants, the GP is fitted on the tenant's results centred and divided by
    max(their spread, :data:`SCALE_FLOOR`) (the strategies' own GP standardizes them, which makes a
    tenant whose results barely differ look as uncertain as one whose results differ a lot). A
    diverged run enters at the tenant's worst accuracy that did not diverge: counted as 0, it would
    make the spread, and with it the bound, of a tenant whose large learning rates diverge many times
    that of the others, and GREEDY would serve it alone. sigma is the posterior's of the arm's mean
    accuracy, without the kernel's observation noise, so that a tenant's bound shrinks as its arms
    are observed (GP-UCB's bound is on the function; Srinivas et al. 2010).
    """
    arms = tenant.arms()
    worst = min((v for _, v, _ in tenant.history if v is not None), default=0.0)
    values = np.array([worst if v is None else v for _, v, _ in tenant.history])
    mean = float(values.mean()) if len(values) else 0.0
    scale = max(float(values.std()) if len(values) else 0.0, SCALE_FLOOR)
    observations = [(tenant.arm(p), (v - mean) / scale) for (p, _, _), v in zip(tenant.history, values, strict=True)]
    aware = tenant.strategy == "cost_gp_ucb"
    costs = strategies.arm_costs(tenant.points, tenant.history, tenant.arm) if aware else None
    mu, sigma = strategies.posterior(arms, observations, normalize=False, latent=True)
    scores = strategies.ucb_bound(arms, mu, sigma, len(observations) + 1, costs=costs, delta=delta)
    return arms, mean + scale * scores, mean + scale * mu


def potential(tenant: Tenant, delta: float = 0.1) -> float:
    """GREEDY's gain of serving ``tenant`` (ease.ml, Section 4): the best upper confidence bound over its
    arms that still have untried points, minus its best accuracy so far (cost-aware when its strategy is;
    a random strategy is scored by plain GP-UCB). -inf once it has nothing left to try."""
    open_arms = {tenant.arm(p) for p in tenant.untried()}
    if not open_arms:
        return -math.inf
    arms, scores, _ = _ucb(tenant, delta)
    return float(max(s for arm, s in zip(arms, scores, strict=True) if arm in open_arms)) - tenant.best()


def choose(scheduler: str, tenants: list[Tenant], rng: np.random.RandomState, delta: float = 0.1,
           threshold: float = 0.01, patience: int = 3, gains=None) -> Tenant | None:  # fmt: skip
    """The tenant whose candidate runs next under ``scheduler`` (None when no tenant has one left).

    ``gains``: a function ``tenant -> potential`` to use instead of :func:`potential` (a cache).
    """
    open_ = [t for t in tenants if t.untried()]
    if not open_:
        return None
    fewest = min(open_, key=lambda t: len(t.history))  # round robin; min keeps the config order on ties
    if scheduler == "round_robin":
        return fewest
    if scheduler == "random":
        return open_[rng.randint(len(open_))]
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; known: {', '.join(SCHEDULERS)}")
    cold = [t for t in open_ if len(t.history) < WARMUP]
    if cold:  # a GP's scale comes from the tenant's own results: serve each WARMUP times first
        return min(cold, key=lambda t: len(t.history))
    gain = gains or (lambda t: potential(t, delta))
    live = open_ if scheduler == "greedy" else [t for t in open_ if not t.stalled(patience)]
    weighted = [t.weight * gain(t) for t in live]
    if scheduler == "greedy" or (live and max(weighted) > threshold):
        return live[int(np.argmax(weighted))]
    return fewest  # hybrid: no tenant that still improves has a gain worth it


def schedule(tenants: list[Tenant], scheduler: str, q: int, seed: int, round_: int, delta: float = 0.1,
             threshold: float = 0.01, patience: int = 3, gains=None) -> list[tuple[str, dict]]:  # fmt: skip
    """Round ``round_``'s ``q`` jobs: ``(tenant name, candidate params)`` each, from the histories.

    A tenant chosen twice in a round gets its next point with the first believed at its arm's
    posterior mean (and the tenant's mean seconds). The histories given are not changed.
    """
    tenants = [dataclasses.replace(t, history=list(t.history)) for t in tenants]
    out = []
    for slot in range(q):
        rng = np.random.RandomState([seed, round_, slot])
        tenant = choose(scheduler, tenants, rng, delta, threshold, patience, gains if slot == 0 else None)
        if tenant is None:
            break
        params = next_candidate(tenant, delta)
        out.append((tenant.name, params))
        if slot == q - 1:
            break
        arms, _, mu = _ucb(tenant, delta)
        seconds = [s for _, _, s in tenant.history]
        believed = float(mu[arms.index(tenant.arm(params))])
        tenant.history.append((params, believed, float(np.mean(seconds)) if seconds else 1.0))
    return out


# --- replay on recorded learning curves ------------------------------------------------------------


def read_pools(path) -> dict[str, dict[str, replay.Candidate]]:
    """``{task: {candidate: row}}`` from a pool table (one row per task, candidate and epoch:
    the candidate's parameters, ``val_accuracy``, ``seconds`` and ``test_accuracy``), the rows of
    :class:`tlselect.search.replay.Candidate`."""
    frame = pd.read_csv(path)
    needed = {"task", "candidate", "epoch", "val_accuracy", "seconds", "test_accuracy", "backbone", "init", "freeze"}
    missing = needed - set(frame.columns)
    if missing:
        raise RegistryError(f"{path}: the pool table lacks the columns {sorted(missing)}")
    keys = [c for c in ("backbone", "init", "freeze", "lr", "resolution", *replay.SAMPLED) if c in frame.columns]
    pools = {}
    for (task, name), rows in frame.sort_values("epoch").groupby(["task", "candidate"], sort=True):
        first = rows.iloc[0]
        params = {k: first[k].item() if hasattr(first[k], "item") else first[k] for k in keys}
        test = first["test_accuracy"]
        pools.setdefault(task, {})[name] = replay.Candidate(
            name=name,
            params=params,
            val=tuple(None if pd.isna(v) else float(v) for v in rows["val_accuracy"]),
            seconds=tuple(float(s) for s in rows["seconds"]),
            test=None if pd.isna(test) else float(test),
        )
    return pools


def replay_run(pools: dict[str, dict[str, replay.Candidate]], scheduler: str, strategy: str, budget: float,
               seed: int, delta: float = 0.1, threshold: float = 0.01, patience: int = 3,
               weights: dict[str, float] | None = None, arms: str = "types",
               cache: dict | None = None) -> list[tuple[int, float, float, str]]:  # fmt: skip
    """One replayed multi-tenant run: jobs (each a candidate trained to its full length, looked up in
    its tenant's pool) until the seconds spent reach ``budget`` (a share of all pools' seconds).

    Returns ``(jobs, share of the seconds, global regret in points, the job's tenant)`` after every
    job. The global regret is the weighted mean over tenants of (the pool's best test accuracy - the
    test accuracy of the tenant's incumbent, its best run on validation so far; a tenant without
    one counts as accuracy 0). ``arms``: what every tenant's GP sees (:data:`ARMS`). ``cache``: a
    dict shared by the runs of one seed (of any scheduler): a tenant's choices and GREEDY's gain
    depend on its own history alone, so its n-th candidate and its gain after n jobs are the same
    under every scheduler (:func:`_cached`).
    """
    weights = weights or {}
    names = sorted(pools)
    tenants = [
        Tenant(
            task,
            [pools[task][c].params for c in sorted(pools[task])],
            strategy=strategy,
            weight=weights.get(task, 1.0),
            seed=seed * 1000 + i,
            arms_of=arms,
        )  # fmt: skip
        for i, task in enumerate(names)
    ]
    by_key = {task: {strategies.point_key(r.params): c for c, r in pools[task].items()} for task in names}
    runs = {task: replay.Replay(pools[task]) for task in names}
    best = {task: max(r.test or 0.0 for r in pools[task].values()) for task in names}
    total = sum(sum(r.seconds) for pool in pools.values() for r in pool.values())
    cache = {} if cache is None else cache

    def gain(tenant):
        return _cached(cache, "gain", tenant, lambda: potential(tenant, delta))

    trace, spent, jobs = [], 0.0, 0
    while spent < budget * total * (1 - 1e-9):
        # schedule()'s one job of round `jobs`, its draws and choices alike
        tenant = choose(scheduler, tenants, np.random.RandomState([seed, jobs, 0]), delta, threshold, patience, gain)
        if tenant is None:
            break
        task, run = tenant.name, runs[tenant.name]
        params = _cached(cache, "next", tenant, lambda: next_candidate(tenant, delta))  # noqa: B023
        name = by_key[task][strategies.point_key(params)]
        before = run.seconds
        record = run.train(name, len(pools[task][name].val))
        tenant.history.append((params, record["metrics"]["val_accuracy"], run.seconds - before))
        spent, jobs = spent + run.seconds - before, jobs + 1
        regret = sum(
            t.weight * (best[t.name] - ((runs[t.name].best or {}).get("metrics", {}).get("test_accuracy") or 0.0))
            for t in tenants
        ) / sum(t.weight for t in tenants)
        trace.append((jobs, spent / total, 100 * regret, task))
    return trace


def _cached(cache: dict, what: str, tenant: Tenant, compute):
    """``compute()`` for ``tenant`` as it is now (its name and number of jobs), once per ``cache``."""
    key = (what, tenant.name, len(tenant.history))  # one job at a time: a history only grows
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def tenant_curve(pool: dict[str, replay.Candidate], strategy: str, seed: int, arms: str = "types",
                 limit: float = math.inf, name: str = "", cache: dict | None = None,
                 delta: float = 0.1) -> np.ndarray:  # fmt: skip
    """One tenant's strategy run alone on its pool until every candidate is tried or ``limit`` seconds
    are spent: ``(seconds spent, regret in points)`` after 0, 1, ... jobs. A tenant's own choices
    depend on its history alone, so under any scheduler its n-th job is the n-th of this curve
    (``name`` and ``cache``: the tenant's in :func:`replay_run`)."""
    tenant = Tenant(name, [pool[c].params for c in sorted(pool)], strategy=strategy, seed=seed, arms_of=arms)
    cache = {} if cache is None else cache
    by_key = {strategies.point_key(r.params): c for c, r in pool.items()}
    run, best = replay.Replay(pool), max(r.test or 0.0 for r in pool.values())
    curve = [(0.0, 100 * best)]
    while run.seconds < limit and (params := _cached(cache, "next", tenant, lambda: next_candidate(tenant, delta))):
        name, before = by_key[strategies.point_key(params)], run.seconds
        record = run.train(name, len(pool[name].val))
        tenant.history.append((params, record["metrics"]["val_accuracy"], run.seconds - before))
        incumbent = (run.best or {}).get("metrics", {}).get("test_accuracy") or 0.0
        curve.append((run.seconds, 100 * (best - incumbent)))
    return np.array(curve)


def oracle_share(pools: dict[str, dict[str, replay.Candidate]], strategy: str, seed: int, target: float,
                 budget: float = 1.0, weights: dict[str, float] | None = None, arms: str = "types",
                 cache: dict | None = None, delta: float = 0.1) -> float:  # fmt: skip
    """The least share of all pools' seconds in which any scheduler could bring the global regret to
    ``target`` points, seed ``seed`` (inf: not within ``budget`` of the seconds): an oracle that
    knows every tenant's :func:`tenant_curve` ahead and gives each tenant the number of jobs that
    reach the target in the fewest seconds together (a Pareto front of seconds and summed regret,
    merged tenant by tenant). No scheduler over these tenants' strategies can do better."""
    names, weights = sorted(pools), weights or {}
    total = sum(sum(r.seconds) for pool in pools.values() for r in pool.values())
    front = np.zeros((1, 2))  # (seconds, weighted summed regret) of the tenants merged so far
    for i, task in enumerate(names):
        curve = tenant_curve(pools[task], strategy, seed * 1000 + i, arms, budget * total, task, cache, delta)
        curve[:, 1] *= weights.get(task, 1.0)
        seconds = (front[:, None, 0] + curve[None, :, 0]).ravel()
        regret = (front[:, None, 1] + curve[None, :, 1]).ravel()
        order = np.lexsort((regret, seconds))
        seconds, regret = seconds[order], regret[order]
        better = regret < np.minimum.accumulate(np.r_[np.inf, regret[:-1]])  # below every cheaper one
        front = np.c_[seconds[better], regret[better]]
    reaching = front[front[:, 1] / sum(weights.get(t, 1.0) for t in names) <= target + 1e-9]
    return float(reaching[0, 0] / total) if len(reaching) and reaching[0, 0] <= budget * total else math.inf


def regret_at(trace: list[tuple], share: float) -> float:
    """The global regret after the last job that ended within ``share`` of the pools' seconds (NaN before any)."""
    i = np.searchsorted([step[1] for step in trace], share * (1 + 1e-9), side="right") - 1
    return math.nan if i < 0 else trace[i][2]


def reached(trace: list[tuple], target: float) -> float:
    """The share of the pools' seconds at which the global regret first fell to ``target`` (inf: never)."""
    return next((step[1] for step in trace if step[2] <= target + 1e-9), math.inf)


def _replays(args) -> list[tuple[dict[str, list], dict]]:
    """Every scheduler's run of each seed, and the seed's cache (one per seed, shared by its runs)."""
    from threadpoolctl import threadpool_limits

    pools, schedulers, strategy, budget, seeds, how = args
    out = []
    with threadpool_limits(1):  # the GP's solves are tiny: threads only add overhead
        for seed in seeds:
            cache = {}
            runs = {s: replay_run(pools, s, strategy, budget, seed, **how, cache=cache) for s in schedulers}
            out.append((runs, cache))
    return out


def _oracles(args) -> list[float]:
    from threadpoolctl import threadpool_limits

    pools, strategy, budget, seeds, target, how, caches = args
    with threadpool_limits(1):
        return [
            oracle_share(pools, strategy, seed, target, budget, how["weights"], how["arms"], cache, how["delta"])
            for seed, cache in zip(seeds, caches, strict=True)
        ]


def replay_table(pools, schedulers, strategy: str, budget: float, seeds: int, shares, delta: float = 0.1,
                 threshold: float = 0.01, patience: int = 3, weights=None, processes: int = 1,
                 arms: str = "types") -> tuple[pd.DataFrame, pd.DataFrame]:  # fmt: skip
    """Every scheduler replayed for ``seeds`` seeds (in ``processes`` processes): the anytime table
    (mean global regret with its 95% interval at each share of the pools' seconds, ``replay.csv``'s
    columns) and the summary (per scheduler: regret at the budget, the compute to reach round
    robin's mean final regret, and its ratio to round robin's budget, each with its 95% interval;
    and a row ``oracle``: the least compute any scheduler could reach it in, :func:`oracle_share`)."""
    how = {"delta": delta, "threshold": threshold, "patience": patience, "weights": weights, "arms": arms}
    parts = range(processes)
    chunks = [(pools, schedulers, strategy, budget, range(i, seeds, processes), how) for i in parts]
    results = [result for part in _map(_replays, chunks, processes) for result in part]
    done = dict(zip([seed for chunk in chunks for seed in chunk[4]], results, strict=True))
    traces = {s: [done[seed][0][s] for seed in range(seeds)] for s in schedulers}
    rows = []
    for scheduler, runs in traces.items():
        for share in shares:
            mean, low, high, n = replay.summarize(np.array([regret_at(t, share) for t in runs]))
            rows.append({"scheduler": scheduler, "strategy": strategy, "axis": "seconds", "share": share,
                         "regret_points": mean, "ci95_low": low, "ci95_high": high, "seeds": n})  # fmt: skip
    curve = pd.DataFrame(rows)
    summary = []
    if "round_robin" in traces:
        target = float(np.mean([t[-1][2] for t in traces["round_robin"]]))
        for scheduler, runs in traces.items():
            final = replay.summarize(np.array([t[-1][2] for t in runs]))
            to_target = np.array([reached(t, target) for t in runs])
            spent = replay.summarize(to_target / budget)
            summary.append({"scheduler": scheduler, "strategy": strategy, "budget_share": budget,
                            "final_regret_points": final[0], "final_ci95_low": final[1], "final_ci95_high": final[2],
                            "round_robin_final_regret_points": target,
                            "compute_to_round_robin_final": spent[0], "compute_ci95_low": spent[1],
                            "compute_ci95_high": spent[2], "seeds_reaching": spent[3], "seeds": len(runs)})  # fmt: skip
        caches = [[done[seed][1] for seed in range(i, seeds, processes)] for i in parts]
        chunks = [(pools, strategy, budget, range(i, seeds, processes), target, how, caches[i]) for i in parts]
        oracle = [share for part in _map(_oracles, chunks, processes) for share in part]
        spent = replay.summarize(np.array(oracle) / budget)
        summary.append({"scheduler": "oracle", "strategy": strategy, "budget_share": budget,
                        "round_robin_final_regret_points": target, "compute_to_round_robin_final": spent[0],
                        "compute_ci95_low": spent[1], "compute_ci95_high": spent[2], "seeds_reaching": spent[3],
                        "seeds": seeds})  # fmt: skip
    return curve, pd.DataFrame(summary)


def _map(function, chunks: list, processes: int) -> list:
    """``function`` over ``chunks``, in ``processes`` processes."""
    if processes == 1:
        return [function(chunk) for chunk in chunks]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(processes) as pool:
        return list(pool.map(function, chunks))
