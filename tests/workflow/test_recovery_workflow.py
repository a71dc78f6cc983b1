"""What a run does with what an earlier one left, through snakemake (tlselect.core.recovery; each part
on its own: tests/unit/test_recovery.py; on SLURM: tests/cluster/test_slurm.py).

A ``<file>.corrupt`` whose file no rule of the configuration makes any more (a policy removed) does
not stop the default run: it is named and moved aside to ``results/.set-aside/``, while a corrupt
file that a rule still makes is computed anew. Outputs that a killed job wrote whole keep their
place although Snakemake had marked them incomplete; a damaged one is computed anew.
"""

from __future__ import annotations

from pathlib import Path
from types import MethodType, SimpleNamespace

import pytest
from helpers import job_counts, make_study, snakemake
from snakemake.persistence.file import FilePersistence

from tlselect.core.files import CorruptFile, corrupt_path, verify

STEADY = {"name": "steady", "init": "scratch", "freeze": "none"}
OTHER = {"name": "other", "init": "scratch", "freeze": "none", "lr": 0.05}


def output(run) -> str:
    return run.stdout + run.stderr


def found_corrupt(path: Path) -> None:
    """Damage ``path`` and read it as a job does: it moves to ``<path>.corrupt``."""
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptFile):
        verify(path)
    assert corrupt_path(path).is_file()


def test_a_corrupt_file_no_rule_makes_any_more_is_set_aside_and_the_default_run_completes(tmp_path, tiny_archive):
    workdir = tmp_path / "study"
    runs = make_study(workdir, tiny_archive, [STEADY, OTHER], epochs=1)
    steady, other = (next(r for r, spec in runs.items() if spec.name == name) for name in ("steady", "other"))
    snakemake(workdir)
    found_corrupt(workdir / f"results/models/{other}.pt")  # a job read it and found it corrupt, then ...
    found_corrupt(workdir / f"results/models/{steady}.pt")
    make_study(workdir, tiny_archive, [STEADY], epochs=1)  # ... the policy "other" left the config

    dry = snakemake(workdir, "-n")  # says what the run will do, moves nothing
    assert f"results/models/{other}.pt.corrupt: no rule of this configuration makes results/models/{other}.pt " \
        f"any more; a run moves it aside to results/.set-aside/models/{other}.pt.corrupt" in output(dry)  # fmt: skip
    assert (workdir / f"results/models/{other}.pt.corrupt").is_file()
    assert job_counts(output(dry))["train"] == 1  # the steady policy's checkpoint, computed anew

    run = snakemake(workdir)  # the default target
    line = (
        f"results/models/{other}.pt.corrupt: no rule of this configuration makes results/models/{other}.pt any "
        f"more; moved it aside to results/.set-aside/models/{other}.pt.corrupt"
    )
    assert output(run).count(line) == 1
    set_aside = workdir / "results/.set-aside/models"
    assert sorted(p.name for p in set_aside.iterdir()) == [f"{other}.pt.corrupt", f"{other}.pt.crc32"]
    models = workdir / "results/models"
    assert sorted(p.name for p in models.iterdir()) == [f"{steady}.pt", f"{steady}.pt.crc32"]  # computed anew
    verify(models / f"{steady}.pt")
    assert "Nothing to be done" in output(snakemake(workdir, "-n"))  # and the set-aside file is left alone


def mark_incomplete(workdir: Path, path: str) -> None:
    """The incomplete mark Snakemake leaves on ``path`` when it dies while the job writing it runs."""
    folder = workdir / ".snakemake/incomplete"
    persistence = SimpleNamespace(_max_len=None)  # what of a FilePersistence its naming needs
    persistence._fetch_max_len = MethodType(FilePersistence._fetch_max_len, persistence)
    mark = Path(FilePersistence._record_path(persistence, str(folder), path))
    mark.parent.mkdir(parents=True, exist_ok=True)
    mark.write_text('{"external_jobid": null}')


def test_outputs_a_killed_job_wrote_whole_are_kept_and_damaged_ones_computed_anew(tmp_path, tiny_archive):
    workdir = tmp_path / "study"
    (run_id,) = make_study(workdir, tiny_archive, [STEADY], epochs=1)
    snakemake(workdir)
    outputs = [f"results/models/{run_id}.pt", f"results/registry/{run_id}.json"]
    written = {path: (workdir / path).stat().st_mtime_ns for path in outputs}
    for path in outputs:  # Snakemake died after the job had written both
        mark_incomplete(workdir, path)
    run = snakemake(workdir)  # the same command (rerun-incomplete: the profile's)
    assert f"kept 2 output(s) an interrupted job wrote whole (marked incomplete): {' '.join(outputs)}" in output(run)
    assert "Nothing to be done" in output(run)
    assert {path: (workdir / path).stat().st_mtime_ns for path in outputs} == written

    checkpoint = workdir / outputs[0]
    checkpoint.write_bytes(checkpoint.read_bytes()[:-100])  # killed mid-write of a file not written whole
    for path in outputs:
        mark_incomplete(workdir, path)
    run = snakemake(workdir)
    assert f"kept 1 output(s) an interrupted job wrote whole (marked incomplete): {outputs[1]}" in output(run)
    assert job_counts(output(run))["train"] == 1  # the job runs again and writes both anew
    verify(checkpoint)
    assert not list((workdir / ".snakemake/incomplete").rglob("*"))
