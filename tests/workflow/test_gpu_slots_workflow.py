"""GPUs in the workflow: a dry run of a tiny study shows the --gpus every job is given; the rules ask
for a GPU unless device is cpu, pass the jobs per GPU on, and the SLURM profile sets the GPUs of every
rule that asks for one. (The GPU slots themselves: tests/unit/test_gpu_slots.py.)"""

import re

import pytest
import yaml
from helpers import REPO, snakemake, tiny_study, write_study


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, tiny_archive):
    """``snakemake --dry-run`` of a tiny study: the --gpus each training job is given, per rule."""
    workdir = tmp_path_factory.mktemp("gpu-dry-run")
    tiny = tiny_study(
        tiny_archive,
        source_epochs=1,
        features={"layers": ["stem"], "inits": ["scratch"]},
        search={"enabled": True},
        speedups={"enabled": True},
        mop={"enabled": True, "partitions": 2},
        tenants={"studies": [{"name": "pets", "data": {"classes": ["cat", "dog"]}, "search": {"inits": ["scratch"]}}],
                 "jobs": 1, "q": 1, "schedulers": ["round_robin"]},
    )  # fmt: skip
    write_study(workdir, tiny)

    def run(*args):
        result = snakemake(workdir, "--dry-run", "--printshellcmds", "--forceall", *args, cores=None, timeout=300)
        given = re.findall(r"scripts/(\w+)\.py .*--gpus (\d+)", result.stdout)
        assert {"train", "extract_features"} <= {script for script, _ in given}
        return {int(n) for _, n in given}, result.stdout

    return run


def gpus_by_rule(dry_run_output: str) -> dict[str, set[int]]:
    """``{rule: --gpus values}`` of a dry run's jobs (each job's block starts with ``rule <name>:``)."""
    rules: dict[str, set[int]] = {}
    for block in re.split(r"^(?=(?:local)?rule \w+:)", dry_run_output, flags=re.M):
        name = re.match(r"(?:local)?rule (\w+):", block)
        if name:
            rules.setdefault(name.group(1), set()).update(int(n) for n in re.findall(r"--gpus (\d+)", block))
    return rules


def test_rules_ask_for_a_gpu_unless_device_is_cpu(dry_run):
    assert dry_run("--config", "device=auto")[0] == {1}
    assert dry_run("--config", "device=auto", "--resources", "gpu=0")[0] == {0}  # the CPU, without editing rules
    assert dry_run("--config", "device=cpu")[0] == {0}


def test_rules_pass_jobs_per_gpu_and_a_slurm_share_is_one_gpu(dry_run):
    given, output = dry_run("--config", "device=auto", "gpu_jobs_per_device=4")
    assert given == {1} and "--gpu-jobs-per-device 4" in output and "--gpu-jobs-per-device 1" not in output
    shard = ("--set-resources", "train:gpu=0", "train:gres=shard:1", "probe:gres=mps:50")
    rules = gpus_by_rule(dry_run("--config", "device=auto", *shard)[1])
    assert rules["train"] == {1} and rules["probe"] == {1}  # SLURM's share of a GPU is the job's GPU


def test_slurm_profile_sets_the_gpus_of_every_rule_that_asks_for_one(dry_run):
    """A GPU rule missing from set-resources would ask SLURM for a GPU on any cluster (device auto)."""
    _, output = dry_run("--config", "device=auto")
    gpu_rules = {rule for rule, given in gpus_by_rule(output).items() if given == {1}}
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    assert {"train", "pretrain_source", "extract_features", "probe", "search_grid", "search_next_rung"} <= gpu_rules
    assert gpu_rules == {rule for rule, resources in profile["set-resources"].items() if "gpu" in resources}
    assert "resources" not in yaml.safe_load((REPO / "profiles/default/config.yaml").read_text())  # read on SLURM too
