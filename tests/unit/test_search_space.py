"""The search space: the grid is today's pool, seeded samples follow RandomizedSearchCV's rules and
respect the conditional freeze depth; bad bounds and budgets are config errors."""

import numpy as np
import pytest

from tlselect.config import ConfigError
from tlselect.core.backbones import BACKBONES, NO_FREEZE
from tlselect.runs import candidate_runs, candidate_spec
from tlselect.search import brackets
from tlselect.search.space import Space, draw


def test_the_grid_is_the_pool(config):
    space = Space.from_config(config)
    grid = space.grid()
    assert len(grid) == 12 and len(space.arms()) == 6
    assert [candidate_spec(config, p).id for p in grid] == list(candidate_runs(config))
    assert {(p["weight_decay"], p["batch_size"]) for p in grid} == {(0.0005, 0)}  # the train defaults (0: auto)


def test_samples_are_seeded_within_bounds_and_conditional(config):
    space = Space.from_config(config)
    draws = [space.sample(np.random.RandomState(7)) for _ in range(2)]
    assert draws[0] == draws[1]
    rng = np.random.RandomState(0)
    samples = [space.sample(rng) for _ in range(300)]
    assert len({s["lr"] for s in samples}) > 100
    assert all(0.005 <= s["lr"] <= 0.2 and 1e-5 <= s["weight_decay"] <= 1e-3 for s in samples)
    assert all(0 <= s["label_smoothing"] <= 0.2 and s["batch_size"] in (128, 256) for s in samples)
    assert all(s["freeze"] == "none" for s in samples if s["init"] == "scratch")
    assert {s["freeze"] for s in samples if s["init"] != "scratch"} == {"none", "most"}
    # log-uniform: as many draws below the geometric middle of the bounds as above it
    assert 0.4 < np.mean([s["lr"] < np.sqrt(0.005 * 0.2) for s in samples]) < 0.6
    for s in samples[:20]:
        spec = candidate_spec(config, s)
        stages = BACKBONES[s["backbone"]].stage_names
        assert spec.settings["freeze"] in (NO_FREEZE, *stages) and spec.settings["lr"] == s["lr"]
        assert spec.id == candidate_spec(config, dict(s)).id


def test_draws_are_scipys_draws():
    """The numpy draws equal scipy.stats' rvs bit for bit, so random search's runs keep their ids."""
    stats = pytest.importorskip("scipy.stats")
    for kind, low, high, frozen in [
        ("loguniform", 0.005, 0.2, stats.loguniform(0.005, 0.2)),
        ("uniform", 0.0, 0.2, stats.uniform(0.0, 0.2)),
        ("uniform", 0.05, 0.3, stats.uniform(0.05, 0.3 - 0.05)),
    ]:
        mine, theirs = np.random.RandomState(3), np.random.RandomState(3)
        for _ in range(200):
            assert draw(mine, kind, low, high) == float(frozen.rvs(random_state=theirs))


def test_inverted_bounds_are_a_config_error(config):
    config["search"]["distributions"]["lr"] = [0.1, 0.01]
    with pytest.raises(ConfigError, match="search.distributions.lr"):
        brackets.check(config)


def test_more_trials_than_grid_points_is_a_config_error(config):
    config["search"].update(enabled=True, rounds=5, q=3)  # 15 pulls of a 12-point grid
    with pytest.raises(ConfigError, match="search.rounds x search.q"):
        brackets.check(config)


def test_a_single_batch_size_is_a_valid_distribution(config):
    config["search"]["distributions"]["batch_sizes"] = [8]
    brackets.check(config)
    assert {Space.from_config(config).sample(np.random.RandomState(s))["batch_size"] for s in range(5)} == {8}
