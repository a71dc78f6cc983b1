"""TPE and (cost-aware) GP-UCB: seeded determinism, TPE's conditional space, GP-UCB's rule against a
hand-computed Gaussian-process posterior."""

import math

import numpy as np
import pytest
from helpers import default_config
from sklearn.gaussian_process.kernels import RBF, WhiteKernel

from tlselect.core.backbones import BACKBONES, NO_FREEZE
from tlselect.runs import candidate_spec
from tlselect.search import strategies
from tlselect.search.space import Space


@pytest.fixture
def config():
    config = default_config(validated=False)
    config["search"]["backbones"] = ["resnet18", "mobilenet_v3_small", "resnet50"]
    config["search"]["freezes"] = ["none", "early", "most"]
    return config


def _history(space, n, seed):
    rng = np.random.RandomState(seed)
    points = [space.sample(rng) for _ in range(n)]
    return [(p, 0.5 + 0.3 * (p["backbone"] == "resnet50") - abs(math.log10(p["lr"]) + 1.5) / 10) for p in points]


@pytest.mark.parametrize("discrete", [False, True])
def test_tpe_is_seeded_and_respects_the_conditional_space(config, discrete):
    space = Space.from_config(config)
    history = _history(space, 14, 0)
    if discrete:
        values = np.random.RandomState(1).uniform(0.5, 0.9, size=24)
        history = [(g, v) for g, v in zip(space.grid()[::3], values, strict=False)]
    first = strategies.tpe_suggest(space, history, 4, seed=3, discrete=discrete, startup=5)
    assert first == strategies.tpe_suggest(space, history, 4, seed=3, discrete=discrete, startup=5)
    assert len(first) == 4
    many = []
    for seed in range(6):
        many += strategies.tpe_suggest(space, history, 4, seed=seed, discrete=discrete, startup=5)
    for params in many:
        stage = candidate_spec(config, params).settings["freeze"]
        assert stage == NO_FREEZE or stage in BACKBONES[params["backbone"]].stage_names
        assert params["init"] != "scratch" or params["freeze"] == "none"
    assert len({p["freeze"] for p in many}) > 1
    if discrete:
        grid = space.grid()
        seen = [h for h, _ in history]
        assert all(p in grid and p not in seen for p in many)
        assert all(len({tuple(sorted(p.items())) for p in strategies.tpe_suggest(space, history, 4, seed=s,
                                                                                 discrete=True)}) == 4
                   for s in range(2))  # fmt: skip


def test_pending_trials_are_not_suggested_again(config):
    space = Space.from_config(config)
    grid = space.grid()
    history = [(g, 0.5) for g in grid[:-3]]
    assert strategies.tpe_suggest(space, history, 5, 0, pending=grid[-3:-1], discrete=True) == [grid[-1]]


def test_gp_ucb_matches_the_formula_by_hand():
    arms = [("a", "x"), ("b", "x"), ("b", "y")]
    observations = [(arms[0], 0.6), (arms[1], 0.8)]
    kernel = RBF(1.0, "fixed") + WhiteKernel(0.01, "fixed")
    # by hand: one-hot features a,b | x,y; squared distances 2 (arm 0-1), 2 (1-2), 4 (0-2)
    x = np.array([[1, 0, 1, 0], [0, 1, 1, 0], [0, 1, 0, 1]], dtype=float)
    k = np.exp(-0.5 * ((x[:, None] - x[None]) ** 2).sum(-1))
    y = np.array([0.6, 0.8])
    mean, std = y.mean(), y.std()
    gram = k[:2, :2] + 0.01 * np.eye(2)
    mu = mean + std * k[:, :2] @ np.linalg.solve(gram, (y - mean) / std)
    var = std**2 * (1 + 0.01 - np.einsum("ij,ji->i", k[:, :2], np.linalg.solve(gram, k[:2, :])))
    got_mu, got_sigma = strategies.posterior(arms, observations, kernel)
    np.testing.assert_allclose(got_mu, mu, atol=1e-8)
    np.testing.assert_allclose(got_sigma, np.sqrt(var), atol=1e-8)
    t = 3
    beta = 2 * math.log(3 * t**2 * math.pi**2 / (6 * 0.1))
    assert strategies.ucb_beta(t, 3) == pytest.approx(beta)
    costs = {arms[0]: 0.5, arms[1]: 1.0, arms[2]: 20.0}
    plain = int(np.argmax(mu + np.sqrt(beta) * np.sqrt(var)))
    aware = int(np.argmax(mu + np.sqrt(beta / np.array([0.5, 1.0, 20.0])) * np.sqrt(var)))
    assert plain != aware  # the case is made so that cost changes the choice
    assert strategies.gp_ucb(arms, observations, t, kernel=kernel) == arms[plain]
    assert strategies.gp_ucb(arms, observations, t, costs=costs, kernel=kernel) == arms[aware]
    assert strategies.gp_ucb(arms, observations, t, kernel=kernel, available=[arms[1]]) == arms[1]


def test_gp_ucb_is_seeded_and_costs_are_relative(config):
    arms = Space.from_config(config).arms()
    observations = [(arms[i], 0.5 + 0.05 * i) for i in (0, 3, 5, 3)]
    choices = {strategies.gp_ucb(arms, observations, 5) for _ in range(3)}
    assert len(choices) == 1
    costs = strategies.relative_costs(arms[:3], {arms[0]: [1.0, 3.0], arms[1]: [6.0]})
    assert costs == {arms[0]: 0.5, arms[1]: 1.5, arms[2]: 1.0}


@pytest.mark.parametrize("method", ["tpe", "gp_ucb", "cost_gp_ucb"])
def test_a_round_is_seeded_by_its_history_and_valid(config, method):
    space = Space.from_config(config)
    grid = space.grid()
    rng = np.random.RandomState(0)  # TPE's trials are draws from the distributions, GP-UCB's grid points
    points = [space.sample(rng) for _ in range(6)] if method == "tpe" else grid[::7]
    history = [(p, 0.5 + 0.01 * i, 10.0 * (1 + (p["backbone"] == "resnet50"))) for i, p in enumerate(points)]
    first = strategies.suggest(method, space, history, 2, 3, seed=0)
    assert first == strategies.suggest(method, space, list(history), 2, 3, seed=0) and len(first) == 3
    seen = [p for p, _, _ in history]
    for params in first:
        assert params not in seen and (params["init"] != "scratch" or params["freeze"] == "none")
        if method != "tpe":  # the GP-UCBs pull grid points, three different ones
            assert params in grid and first.count(params) == 1
    if method == "tpe":
        assert strategies.suggest(method, space, history, 2, 3, seed=1) != first


def test_cost_aware_gp_ucb_pulls_the_cheaper_of_two_equal_arms():
    fixed = {"init": "imagenet", "freeze": "none", "resolution": 32, "weight_decay": 0.0, "label_smoothing": 0.0}
    points = [{"backbone": b, "lr": lr, **fixed, "batch_size": 0} for b in ("a_slow", "b_fast") for lr in (0.01, 0.1)]
    history = [(points[0], 0.7, 100.0), (points[2], 0.7, 1.0)]  # same accuracy, 100x the seconds
    (plain,) = strategies.ucb_suggest(points, history, 1, 0, cost_aware=False)
    (aware,) = strategies.ucb_suggest(points, history, 1, 0, cost_aware=True)
    assert (plain["backbone"], aware["backbone"]) == ("a_slow", "b_fast")  # a tie goes to the first arm
    assert {p["lr"] for p in strategies.ucb_suggest(points, history, 2, 0, cost_aware=False)} == {0.1}


def test_the_latent_sigma_shrinks_with_repeats_and_the_observation_sigma_keeps_the_noise(config):
    arms = Space.from_config(config).arms()[:3]
    noise = strategies.default_kernel().k2.noise_level
    for repeats in (1, 4, 16):
        observations = [(arms[0], 0.5 + 0.01 * (i % 2)) for i in range(repeats)] + [(arms[1], 0.4)]
        _, observed = strategies.posterior(arms, observations, normalize=False)
        _, latent = strategies.posterior(arms, observations, normalize=False, latent=True)
        assert np.allclose(latent**2, observed**2 - noise)
        assert observed[0] > math.sqrt(noise) and latent[0] < math.sqrt(noise / repeats) + 1e-9
    # an arm never observed keeps more uncertainty than an observed one
    assert latent[2] > latent[1] > latent[0]


def test_candidate_arms_let_the_gp_see_the_learning_rate():
    points = [{"backbone": b, "init": "scratch", "freeze": "none", "lr": lr, "resolution": 32, "weight_decay": 0.0,
               "label_smoothing": 0.0, "batch_size": 8} for b in ("a", "b") for lr in (0.01, 0.1, 1.0)]  # fmt: skip
    # lr 1.0 diverged on backbone a; the other rates did well
    history = [(points[0], 0.8, 1.0), (points[1], 0.82, 1.0), (points[2], None, 1.0), (points[3], 0.79, 1.0)]
    # b at lr 0.1 before b at lr 1.0: what a's lr 1.0 taught
    assert strategies.ucb_suggest(points, history, 1, 0, cost_aware=True, arm=strategies.point_key) == [points[4]]
    history[2] = (points[2], 0.95, 1.0)  # and b at lr 1.0 first once a's lr 1.0 was the best
    assert strategies.ucb_suggest(points, history, 1, 0, cost_aware=True, arm=strategies.point_key) == [points[5]]
    # with nothing observed every candidate ties: the seed's order breaks the tie, the model types' sorted order
    key = strategies.point_key
    firsts = [strategies.ucb_suggest(points, [], 1, seed, cost_aware=False, arm=key) for seed in range(8)]
    assert len({strategies.point_key(first[0]) for first in firsts}) > 1
    assert {strategies.ucb_suggest(points, [], 1, seed, cost_aware=False)[0]["backbone"] for seed in range(8)} == {"a"}
    costs = strategies.arm_costs(points, [(points[0], 0.8, 1.0), (points[3], 0.8, 3.0)], strategies.point_key)
    assert costs[strategies.point_key(points[1])] == 0.5 and costs[strategies.point_key(points[5])] == 1.5
