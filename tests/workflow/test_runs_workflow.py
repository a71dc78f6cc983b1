"""Run specs in the workflow: a dry run of the default study parses the Snakefile without torch and
gives the study's jobs priority over the search's and the benchmark's."""

import re

import pytest
from helpers import REPO, snakemake, snakemake_env


@pytest.fixture(scope="module")
def full_dry_run(tmp_path_factory):
    """A dry run of the default study with the search and the benchmark turned on from the command
    line, with torch and torchvision made unimportable."""
    tmp_path = tmp_path_factory.mktemp("dry-run")
    for name in ("torch", "torchvision"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('{name} imported while parsing')\n")
    (tmp_path / "work").mkdir()
    return snakemake(
        tmp_path / "work", "-n", "--config", "search={enabled: true}", "speedups={enabled: true}",
        configfiles=[REPO / "config.yaml"], env=snakemake_env(PYTHONPATH=str(tmp_path)), check=False, timeout=120,
    )  # fmt: skip


def test_parsing_the_snakefile_imports_neither_torch_nor_torchvision(full_dry_run):
    result = full_dry_run
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "imported while parsing" not in result.stdout + result.stderr
    assert all(rule in result.stdout for rule in ("train", "probe", "search_grid", "speedups"))


def test_the_study_goes_before_the_search_and_the_benchmark(full_dry_run):
    """Whenever jobs of both are ready, Snakemake starts the higher priority first."""
    priorities: dict[str, set[int]] = {}
    for block in re.split(r"^(?=(?:local)?rule \w+:)", full_dry_run.stdout, flags=re.M):
        name = re.match(r"(?:local)?rule (\w+):", block)
        if name:
            found = re.search(r"^\s+priority: (\d+)", block, re.M)
            priorities.setdefault(name.group(1), set()).add(int(found.group(1)) if found else 0)
    study = {"train", "probe", "extract_features", "tables", "figure", "notebook"}
    later = {"search_grid", "search_first_rung", "search_next_rung", "speedups"}
    assert study | later <= set(priorities)
    assert min(min(priorities[r]) for r in study) > max(max(priorities[r]) for r in later)
    assert "results/report/study.html" in full_dry_run.stdout and "results/report/solution.html" in full_dry_run.stdout
