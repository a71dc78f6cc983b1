"""Run groups as the workflow forms them: which runs share a job (tlselect.runs.run_groups), the
``run_groups`` config block and its auto values, a group job's command line, and a group's finished
runs restored from the keep folder instead of trained again."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, SCHEMA, default_config, quiet, small_tensors
from snakemake.utils import validate

from tlselect.config import ConfigError, load_and_check, merged, run_group_settings
from tlselect.core.files import unshared_files
from tlselect.core.registry import read_record
from tlselect.runs import policy_runs, probe_runs, run_groups
from tlselect.training.groups import train_group
from tlselect.training.options import TrainConfig, group_job, job_config

POLICIES = [{"name": f"p{i}", "init": "scratch", "freeze": "none", "lr": 0.01 * (i + 1)} for i in range(5)]


def study(**blocks) -> dict:
    config = merged(default_config(validated=False), {"device": "cpu", "policies": POLICIES, **blocks})
    validate(config, SCHEMA)
    return config


def test_size_one_groups_nothing_and_larger_sizes_cut_one_shape_in_config_order():
    specs = policy_runs(study())
    assert run_groups(specs, 1) == {}
    ids = list(specs)
    assert list(run_groups(specs, 2).values()) == [ids[0:2], ids[2:4]]  # the fifth run: a job of its own
    assert list(run_groups(specs, 3).values()) == [ids[0:3], ids[3:5]]
    assert list(run_groups(specs, 8).values()) == [ids]
    assert run_groups(specs, 2) == run_groups(policy_runs(study()), 2)  # the same config, the same groups


def test_runs_of_another_shape_or_probes_share_no_group():
    policies = [*POLICIES[:3], {"name": "frozen", "init": "pretrained", "freeze": "layer3"},
                {"name": "frozen2", "init": "pretrained", "freeze": "layer3", "lr": 0.3},
                {"name": "long", "init": "scratch", "freeze": "none", "epochs": 30}]  # fmt: skip
    config = study(policies=policies, pretrained="source", features={"layers": ["layer1", "layer2"]})
    specs = policy_runs(config)
    names = [[specs[m].name for m in members] for members in run_groups(specs, 8).values()]
    assert names == [["p0", "p1", "p2"], ["frozen", "frozen2"]]  # "long" trains other epochs: alone
    assert run_groups(probe_runs(config), 8) == {}


def test_repeats_of_a_policy_share_its_group():
    specs = policy_runs(study(policies=POLICIES[:1], repeats=3))
    assert list(run_groups(specs, 4).values()) == [list(specs)]


def test_changing_one_run_changes_only_its_group():
    before = run_groups(policy_runs(study()), 2)
    changed = [dict(p, lr=0.5) if p["name"] == "p3" else p for p in POLICIES]
    after = run_groups(policy_runs(study(policies=changed)), 2)
    assert len(set(before) & set(after)) == 1 and len(after) == 2
    (kept,) = set(before) & set(after)
    assert before[kept] == after[kept] and next(iter(before)) == kept  # p0 and p1's group


@pytest.mark.parametrize(
    ("block", "message"),
    [({"size": 0}, "run_groups.size: 0"), ({"size": "big"}, "run_groups.size: 'big'"),
     ({"size": True}, "run_groups.size: True"), ({"fuse": "maybe"}, "run_groups.fuse: 'maybe'")],
)  # fmt: skip
def test_bad_run_groups_are_refused_naming_the_key(block, message):
    config = merged(default_config(validated=False), {"run_groups": block})
    with pytest.raises(ConfigError, match=message):
        load_and_check(config, SCHEMA, lambda data, schema: validate(data, schema))


@pytest.fixture
def no_plans(tmp_path, monkeypatch):
    """A study folder and plan cache without plan files."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TLSELECT_PLAN_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_auto_is_one_unfused_on_a_cpu_and_eight_fused_on_cuda_without_a_plan(no_plans):
    assert run_group_settings(study()) == (1, False)
    assert run_group_settings(study(device="cuda")) == (8, False)  # fusion changes results: pinned off
    assert run_group_settings(study(device="cuda", run_groups={"fuse": "auto"})) == (8, True)
    assert run_group_settings(study(run_groups={"size": 3, "fuse": True})) == (3, True)


def test_auto_takes_the_plan_of_this_device(no_plans):
    import os

    import torch

    config = study(threads=2, run_groups={"fuse": "auto"})
    name = f"cpu-some-cpu-{os.cpu_count()}cpu-2t-torch{torch.__version__.split('+')[0]}.json"
    cache = no_plans / "cache"
    cache.mkdir()
    (cache / name).write_text(json.dumps({"plan": {"group_size": 4, "fuse": False}}))
    assert run_group_settings(config) == (4, False)
    (no_plans / "results/plans").mkdir(parents=True)  # the study's copy wins over the cache
    (no_plans / "results/plans" / name).write_text(json.dumps({"plan": {"group_size": 2, "fuse": True}}))
    assert run_group_settings(config) == (2, True)
    # another thread budget: another plan
    assert run_group_settings(study(threads=1, run_groups={"fuse": "auto"})) == (1, False)
    assert run_group_settings(dict(config, run_groups={"size": 1, "fuse": "auto"})) == (1, True)


def test_a_group_jobs_runs_share_its_flags_and_keep_their_own():
    argv = ["--data", "d", "--epochs", "3", "--device", "cpu", "--fuse", "--keep", "k",
            "--run", "--out a.pt --run-id a --lr 0.5", "--run", "--out 'b c.pt' --run-id b --epochs 4"]  # fmt: skip
    job = group_job(argv)
    assert job.fuse and job.keep == "k"
    assert [(r.out, r.run_id, r.lr, r.epochs, r.data) for r in job.runs] == [
        ("a.pt", "a", 0.5, 3, "d"),
        ("b c.pt", "b", TrainConfig().lr, 4, "d"),
    ]
    single = ["--data", "d", "--out", "a.pt", "--device", "cpu"]
    assert group_job(single).runs == [job_config(single)] and not group_job(single).fuse


def test_a_rerun_group_restores_its_finished_runs_from_the_keep_folder(tmp_path):
    data = small_tensors(tmp_path / "data", sizes=(("train", 16), ("val", 8), ("test", 8)))
    configs = [
        TrainConfig(data=str(data), out=str(tmp_path / f"{name}.pt"), record=str(tmp_path / f"{name}.json"),
                    run_id=name, epochs=1, batch_size=8, lr=lr, channels_last=False, device="cpu", threads=1,
                    eval_batch_size=8)
        for name, lr in (("a", 0.05), ("b", 0.01))
    ]  # fmt: skip
    keep = str(tmp_path / "keep")
    first = train_group(configs, log=quiet, fuse=False, keep=keep)
    for config in configs:  # what Snakemake does before it runs the group's job again
        for path in (config.out, config.record):
            (tmp_path / path).unlink()
    lines = []
    again = train_group(configs, log=lines.append, fuse=False, keep=keep)
    assert again == first and [read_record(c.record) for c in configs] == first
    assert sum("restored" in line for line in lines) == 2 and not any("epoch" in line for line in lines)
    changed = [configs[0], TrainConfig(**{**configs[1].__dict__, "lr": 0.02})]  # other settings: trained anew
    (tmp_path / "b.pt").unlink()
    lines.clear()
    train_group(changed, log=lines.append, fuse=False, keep=keep)
    assert any(line.startswith("[b] epoch 1/1") for line in lines) and not any("[a] epoch" in x for x in lines)
    # b's first settings are kept but no output shares them any more: housekeeping removes just those
    stale = unshared_files(keep)
    assert len(stale) == 3 and all(path.name.startswith("b-") for path in stale)
    kept = set(Path(keep).iterdir()) - set(stale)
    subprocess.run([sys.executable, str(REPO / "scripts/housekeeping.py"), "--results", str(tmp_path), "--kept-runs",
                    keep], check=True, capture_output=True)  # fmt: skip
    assert set(Path(keep).iterdir()) == kept and len(kept) == 6 and not unshared_files(keep)
    assert not list(tmp_path.glob(".*.link"))  # restoring over a sidecar that is already the kept one leaves no link
