"""Run specs (tlselect.runs): stable ids, one spec per kind of run, flags the trainer accepts.

The dry run of the default study (the Snakefile parsed without torch, the jobs' priorities) is in
tests/workflow/test_runs_workflow.py."""

import copy
import sys

import numpy as np
import pytest
from helpers import REPO, default_config

from tlselect import runs
from tlselect.core import settings
from tlselect.search.space import Space
from tlselect.training.options import PROBE_UNUSED, TrainConfig, config_from_args


def every_spec(config):
    """One spec of each kind the workflow trains."""
    config["pretrained"] = "source"
    return [
        next(iter(runs.policy_runs(config).values())),
        next(iter(runs.probe_runs(config).values())),
        runs.source_run(config),
        next(iter(runs.candidate_runs(config).values())),
    ]


def test_run_ids_of_existing_configs_stay_the_same():
    """Ids name the files of a user's results/: they must not change with the code that computes them."""
    config = default_config()
    assert "finetune-resnet18-imagenet-45429538" in runs.policy_runs(config)
    assert "mobilenet_v3_small-imagenet-most-lr0.02-r32-964728cd" in runs.candidate_runs(config)
    config["pretrained"] = "source"  # the source model's settings are part of the id
    assert "finetune-resnet18-source-87e9df7d" in runs.policy_runs(config)
    assert "scratch-resnet18-scratch-aa8b6de9" in runs.policy_runs(config)
    assert "resnet18-source-most-lr0.1-r32-3181193e" in runs.candidate_runs(config)


def test_run_ids_are_readable_stable_and_local():
    config = default_config()
    before = runs.policy_runs(config)
    assert runs.policy_runs(copy.deepcopy(config)) == before
    config["policies"][3]["lr"] = 0.01
    after = runs.policy_runs(config)
    changed = set(before) ^ set(after)
    assert len(changed) == 2 and all(r.startswith("freeze_most-") for r in changed)


def test_source_settings_reach_the_ids_of_runs_that_start_from_it():
    config = default_config()
    config["pretrained"] = "source"
    before = {**runs.policy_runs(config), **runs.probe_runs(config), **runs.candidate_runs(config)}
    config["source"]["train"]["epochs"] += 1
    after = {**runs.policy_runs(config), **runs.probe_runs(config), **runs.candidate_runs(config)}
    changed = {before[r].name for r in set(before) - set(after)}
    assert changed and all(before[r].settings["init"] == "source" for r in set(before) - set(after))
    assert not any(before[r].settings["init"] == "source" for r in set(before) & set(after))


def test_every_kind_has_its_flags_round_trip_through_the_cli():
    for spec in every_spec(default_config()):
        parsed = config_from_args(spec.flags().split())
        for key, value in spec.settings.items():
            assert getattr(parsed, key) == value, (spec.kind, key)
        assert parsed.kind == spec.kind and parsed.name == spec.name


def test_probe_specs_hold_only_what_a_probe_uses():
    config = default_config()
    probes = runs.probe_runs(config)
    assert len(probes) == len(config["features"]["layers"]) * len(config["features"]["inits"])
    for spec in probes.values():
        assert not PROBE_UNUSED & set(spec.settings), spec.settings
        assert spec.features == (
            spec.settings["backbone"],
            settings.init_label(spec.settings["init"]),
            spec.settings["layer"],
        )
        assert spec.name == f"probe_{spec.settings['layer']}" and spec.id.startswith(spec.name)


def test_needs_name_the_weights_of_the_runs_init_and_backbone():
    config = default_config()
    for pretrained in ("source", "imagenet"):
        config["pretrained"] = pretrained
        for spec in [*runs.candidate_runs(config).values(), *runs.policy_runs(config).values()]:
            init, backbone = spec.settings["init"], spec.settings["backbone"]
            assert spec.weights == (None if init == "scratch" else (pretrained, backbone))
        for spec in runs.probe_runs(config).values():
            assert spec.weights is None  # a probe reads cached features, never weights
    config["pretrained"] = "source"
    assert runs.source_backbones(runs.candidate_runs(config).values()) == sorted(config["search"]["backbones"])
    assert runs.source_run(config).weights is None


def test_candidates_are_named_by_their_id_and_overrides_win_in_flags():
    spec = next(iter(runs.candidate_runs(default_config()).values()))
    assert spec.name == spec.id and spec.kind == "candidate"
    parsed = config_from_args(spec.flags(epochs=3, keep_state=True).split())
    assert parsed.epochs == 3 and parsed.keep_state and isinstance(parsed, TrainConfig)


def test_the_candidate_config_is_enough_for_a_candidates_spec_and_the_space():
    config = default_config()
    config["search"].update(inits=["source", "scratch"], freezes=["none", "early", "most"])
    context, space = runs.candidate_config(config), Space.from_config(config)
    assert Space.from_config(context) == space
    rng = np.random.RandomState(0)
    for params in [*space.grid(), *(space.sample(rng) for _ in range(10))]:
        assert runs.candidate_spec(context, params) == runs.candidate_spec(config, params)


@pytest.mark.parametrize("size", [100, 1000])
def test_dag_scale_pools_have_the_size_they_name(size):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import dag_scale

    config = default_config()
    config["search"].update(dag_scale.overlay(size)["search"])
    assert len(runs.candidate_runs(config)) == size
