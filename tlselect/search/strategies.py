"""Model-based search strategies over :mod:`tlselect.search.space`: TPE (Optuna) and (cost-aware) GP-UCB.

Both are stateless functions of earlier results, so the registry stays the one source of truth:
the same records give the same suggestions.

- :func:`tpe_suggest` rebuilds an Optuna study in memory from ``(params, validation accuracy)``
  pairs, with the model choice and its conditional hyperparameters defined by run (a freeze depth
  is a stage of the chosen backbone, and scratch is never frozen), and asks ``q`` trials at once:
  pending ones count as the worst value so far (``constant_liar``). The sampler is Optuna's default
  independent TPE, seeded.
- :func:`gp_ucb` picks a model type (an arm: backbone x init x freeze depth) by
  a_t = argmax_k mu(k) + sqrt(beta_t / c_k) sigma(k) (ease.ml's cost-aware GP-UCB; plain GP-UCB
  is c_k = 1), with mu and sigma from a scikit-learn Gaussian process over one-hot arm features
  (an RBF kernel on them, :func:`default_kernel`). :func:`ucb_suggest` turns picks into grid points:
  a pull trains the arm's next untried grid point in a seeded order; ``q`` pulls at once count the
  earlier ones of the round as observed at their posterior mean (GP-BUCB, Desautels et al. 2014),
  which shrinks their sigma and spreads the round.

:func:`suggest` is what the workflow's suggest job of each round asks (rules/search.smk).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import optuna
from sklearn.exceptions import ConvergenceWarning
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, WhiteKernel

from tlselect.core.settings import freeze_stage
from tlselect.search.space import SAMPLED, Space

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _define(trial, space: Space, discrete: bool) -> dict:
    """The define-by-run space: suggest a candidate's parameters on ``trial``, return them.

    ``discrete``: the grid's values only (lr from the grid's list, the sampled ones at their defaults
    or, where the grid varies them, from its ``choices``).
    """
    backbone = trial.suggest_categorical("backbone", space.backbones)
    init = trial.suggest_categorical("init", space.inits)
    depths = space.freeze_choices(init)
    depth = depths[0]
    if len(depths) > 1:  # a stage of this backbone: a parameter per backbone
        stages = {freeze_stage(backbone, d): d for d in depths}
        depth = stages[trial.suggest_categorical(f"freeze_{backbone}", tuple(stages))]
    params = {"backbone": backbone, "init": init, "freeze": depth}
    params["resolution"] = trial.suggest_categorical("resolution", space.resolutions)
    if discrete:
        chosen = {k: trial.suggest_categorical(k, v) for k, v in space.choices.items()}
        return {**params, "lr": trial.suggest_categorical("lr", space.lrs), **space.defaults, **chosen}
    return {
        **params,
        "lr": trial.suggest_float("lr", *space.lr, log=True),
        "weight_decay": trial.suggest_float("weight_decay", *space.weight_decay, log=True),
        "label_smoothing": trial.suggest_float("label_smoothing", *space.label_smoothing),
        "batch_size": trial.suggest_categorical("batch_size", space.batch_sizes),
    }


def _optuna_params(params: dict) -> dict:
    """A candidate's parameters under the names :func:`_define` suggests them by."""
    stage = freeze_stage(params["backbone"], params["freeze"])
    return {**params, f"freeze_{params['backbone']}": stage}


def point_key(params: dict) -> tuple:
    return tuple(sorted((k, params[k]) for k in ("backbone", "init", "freeze", "lr", "resolution", *SAMPLED)))


def _frozen(space: Space, params: dict, discrete: bool, value: float | None) -> optuna.trial.FrozenTrial:
    fixed = optuna.trial.FixedTrial(_optuna_params(params))
    _define(fixed, space, discrete)
    state = optuna.trial.TrialState.RUNNING if value is None else optuna.trial.TrialState.COMPLETE
    return optuna.trial.create_trial(state=state, value=value, params=fixed.params, distributions=fixed.distributions)


def tpe_suggest(
    space: Space,
    history: list[tuple[dict, float | None]],
    q: int,
    seed: int,
    *,
    pending: list[dict] = (),
    discrete: bool = False,
    startup: int = 10,
) -> list[dict]:
    """``q`` new candidates' parameters from TPE, given finished ``(params, validation accuracy)`` pairs.

    A diverged run (value None) counts as accuracy 0. ``pending`` are trials still training. In
    the ``discrete`` space a suggestion that repeats a known point is told its known value (or,
    when pending, failed) and asked again; after 3 q repeats, a seeded draw of an unseen grid point.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)
        study = optuna.create_study(direction="maximize", sampler=sampler)
        known = {}
        for params, value in history:
            known[point_key(params)] = 0.0 if value is None else value
            study.add_trial(_frozen(space, params, discrete, known[point_key(params)]))
        taken = {point_key(p) for p in pending}
        for params in pending:
            study.add_trial(_frozen(space, params, discrete, None))
        out, repeats = [], 0
        while len(out) < q:
            trial = study.ask()
            params = _define(trial, space, discrete)
            key = point_key(params)
            if discrete and (key in known or key in taken) and repeats < 3 * q:
                repeats += 1
                if key in known:
                    study.tell(trial, known[key])
                else:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            if discrete and (key in known or key in taken):
                unseen = [p for p in space.grid() if point_key(p) not in known and point_key(p) not in taken]
                if not unseen:
                    break
                params = unseen[np.random.RandomState(seed + len(known) + len(taken)).choice(len(unseen))]
                key = point_key(params)
            taken.add(key)
            out.append(params)
    return out


def arm_features(arms: list[tuple]) -> np.ndarray:
    """One-hot features of each arm's factors, concatenated: arms sharing a backbone, init or depth
    are closer, so the GP's RBF kernel shares what one arm teaches about the others."""
    columns = []
    for factor in range(len(arms[0])):
        values = sorted({arm[factor] for arm in arms})
        columns.append(np.array([[arm[factor] == v for v in values] for arm in arms], dtype=float))
    return np.hstack(columns)


def ucb_beta(t: int, arms: int, delta: float = 0.1) -> float:
    """beta_t = 2 log(|D| t^2 pi^2 / (6 delta)): Srinivas et al. 2010, Theorem 1 (finite decision set D).

    With it, GP-UCB's cumulative regret is below sqrt(C1 T beta_T gamma_T) with probability 1 - delta.
    """
    return 2 * math.log(arms * t**2 * math.pi**2 / (6 * delta))


def default_kernel():
    """RBF over the one-hot arm features + observation noise, fixed as GP-UCB's analysis assumes a known kernel.

    On standardized accuracies: arms differing in one factor correlate 0.78, in two 0.61, in three
    0.47 (length scale 2); noise variance 0.3 (the spread of an arm's other hyperparameters).
    """
    return RBF(2.0, "fixed") + WhiteKernel(0.3, "fixed")


def posterior(arms: list[tuple], observations: list[tuple[tuple, float]], kernel=None,
              normalize: bool = True, latent: bool = False) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """mu(k) and sigma(k) of every arm from a GP fitted on ``(arm, validation accuracy)`` observations
    (``normalize``: on the observations standardized; else as given, prior mean 0). sigma is that
    of an observation (the kernel's noise included), or with ``latent`` that of the arm's mean
    accuracy, which shrinks to 0 as an arm is observed again and again."""
    features = arm_features(arms)
    index = {arm: i for i, arm in enumerate(arms)}
    gp = GaussianProcessRegressor(kernel or default_kernel(), normalize_y=normalize, random_state=0)
    if observations:
        with warnings.catch_warnings():  # a noise level at its bound is expected for near-exact repeats
            warnings.simplefilter("ignore", ConvergenceWarning)
            gp.fit(features[[index[a] for a, _ in observations]], np.array([v for _, v in observations]))
    mu, sigma = gp.predict(features, return_std=True)
    if latent:  # less the kernel's noise term (its WhiteKernel), on the scale of the observations
        fitted = getattr(gp, "kernel_", gp.kernel)
        parts = (fitted, getattr(fitted, "k1", None), getattr(fitted, "k2", None))
        noise = sum(k.noise_level for k in parts if isinstance(k, WhiteKernel))
        scale = getattr(gp, "_y_train_std", 1.0) if normalize else 1.0
        sigma = np.sqrt(np.maximum(np.square(sigma) - noise * scale**2, 0.0))
    return np.atleast_1d(mu), np.atleast_1d(sigma)  # one arm: scikit-learn squeezes to 0-d


def gp_ucb(
    arms: list[tuple],
    observations: list[tuple[tuple, float]],
    t: int,
    *,
    costs: dict | None = None,
    available: list[tuple] | None = None,
    delta: float = 0.1,
    kernel=None,
) -> tuple:
    """The arm to pull at step ``t`` (1-based): argmax_k mu(k) + sqrt(beta_t / c_k) sigma(k).

    ``costs`` are c_k (:func:`relative_costs`); None is plain GP-UCB (c_k = 1). ``available``: the
    arms that still have an untried configuration (default all). Ties go to the first arm.
    """
    scores = ucb_bound(arms, *posterior(arms, observations, kernel), t, costs=costs, delta=delta)
    best, choice = -math.inf, None
    for arm, score in zip(arms, scores, strict=True):
        if available is not None and arm not in available:
            continue
        if score > best:
            best, choice = score, arm
    return choice


def ucb_bound(arms: list[tuple], mu, sigma, t: int, *, costs: dict | None = None, delta: float = 0.1) -> np.ndarray:
    """mu(k) + sqrt(beta_t / c_k) sigma(k) of every arm, given its posterior (c_k = 1 when ``costs`` is None)."""
    beta = ucb_beta(t, len(arms), delta)
    return np.array([mu[k] + math.sqrt(beta / (costs[arm] if costs else 1.0)) * sigma[k] for k, arm in enumerate(arms)])


def relative_costs(arms: list[tuple], seconds: dict[tuple, list[float]]) -> dict[tuple, float]:
    """c_k: an arm's mean measured seconds per run over the mean of the measured arms' (1 when unmeasured)."""
    means = {arm: float(np.mean(s)) for arm, s in seconds.items() if s}
    scale = float(np.mean(list(means.values()))) if means else 1.0
    return {arm: means[arm] / scale if arm in means and scale > 0 else 1.0 for arm in arms}


def arm_of(params: dict) -> tuple[str, str, str]:
    """A candidate's model type: ``(backbone, init, freeze depth)``."""
    return params["backbone"], params["init"], params["freeze"]


def arm_costs(points: list[dict], history: list[tuple[dict, float | None, float]], arm=arm_of) -> dict:
    """c_k of every arm (``arm``: a grid point's arm): its model type's :func:`relative_costs`, from
    the seconds of the model type's pulls in ``history`` (an arm finer than a model type, such as a
    single candidate, costs what the runs of its model type cost)."""
    types = sorted({arm_of(p) for p in points})
    by_type = relative_costs(types, {t: [s for p, _, s in history if arm_of(p) == t] for t in types})
    return {arm(p): by_type[arm_of(p)] for p in points}


def ucb_suggest(
    points: list[dict],
    history: list[tuple[dict, float | None, float]],
    q: int,
    seed: int,
    *,
    cost_aware: bool,
    delta: float = 0.1,
    arm=arm_of,
) -> list[dict]:
    """The next ``q`` grid points of (cost-aware) GP-UCB, given every earlier pull.

    ``points``: the grid; ``history``: ``(params, validation accuracy, seconds)`` of each earlier
    pull (a diverged run counts as accuracy 0). c_k comes from the history's seconds. Each arm's
    points are tried in the order of a permutation seeded by ``seed`` alone, so that the same
    history gives the same next point whichever round asks. ``arm``: a grid point's arm, its model
    type by default; :func:`point_key` makes every candidate an arm of its own, its features those of
    all its parameters, so that the GP sees the learning rate and the other hyperparameters too.
    """
    tried = {point_key(p) for p, _, _ in history}
    order = np.random.RandomState(seed).permutation(len(points))
    # ties go to the first arm: of model types the first in sorted order, of finer arms (one point
    # each) the first in the seeded order, so that the seed still varies a search of candidate arms
    arms = sorted({arm(p) for p in points}) if arm is arm_of else list(dict.fromkeys(arm(points[i]) for i in order))
    queues = {a: [] for a in arms}
    for i in order:
        if point_key(points[i]) not in tried:
            queues[arm(points[i])].append(points[i])
    observations = [(arm(p), value or 0.0) for p, value, _ in history]
    costs = arm_costs(points, history, arm) if cost_aware else None
    out = []
    while len(out) < q and any(queues.values()):
        t = len(observations) + 1
        available = [a for a in arms if queues[a]]
        pulled = gp_ucb(arms, observations, t, costs=costs, available=available, delta=delta)
        out.append(queues[pulled].pop(0))
        if len(out) < q:  # the pending pull believed at its posterior mean
            mu, _ = posterior(arms, observations)
            observations.append((pulled, float(mu[arms.index(pulled)])))
    return out


def suggest(method: str, space: Space, history: list[tuple[dict, float | None, float]], round_: int, q: int,
            seed: int, delta: float = 0.1) -> list[dict]:  # fmt: skip
    """Round ``round_``'s ``q`` candidates of ``tpe``, ``gp_ucb`` or ``cost_gp_ucb`` in the workflow.

    ``history``: ``(params, validation accuracy, seconds)`` of every earlier round's trials. TPE
    searches the space's distributions (its first round is its random start-up, seeded by the
    round); the GP-UCBs pull grid points (:func:`ucb_suggest`).
    """
    if method == "tpe":
        return tpe_suggest(space, [(p, v) for p, v, _ in history], q, seed * 1000 + round_, startup=q)
    return ucb_suggest(space.grid(), history, q, seed, cost_aware=method == "cost_gp_ucb", delta=delta)
