"""What the tests share besides fixtures (those are in ``conftest.py``): the repository's paths and
default config, generated images and tensors, the tiny study over ``tiny_archive``, and running
Snakemake on it.

Test modules import from here (``from helpers import ...``), never from each other.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SCHEMA = str(REPO / "schemas" / "config.schema.yaml")
CLASSES = ("cat", "dog", "frog")
# Workflow tests pin the execution plan (no calibration per test); the `study` fixture (conftest.py) measures it.
PINNED_PLAN = {"precision": "float32", "channels_last": False, "threads": "all", "compile": False,
               "eval_batch_size": 64, "cudnn_benchmark": False}  # fmt: skip
TIMING_KEYS = {"train_seconds", "eval_seconds"}
SNAKEMAKE_LIMIT_S = 900  # one snakemake run of a tiny study


# ---------------------------------------------------------------------------------------------
# The repository's config


def default_config(*, validated: bool = True) -> dict:
    """The repository's ``config.yaml``: checked against the schema, which fills in every default
    (``validated=False``: as written)."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    if validated:
        from snakemake.utils import validate

        validate(config, SCHEMA)
    return config


# ---------------------------------------------------------------------------------------------
# Generated data


def write_image_folder(root: Path, classes=CLASSES, train: int = 12, test: int = 6, size: int = 32) -> Path:
    """An image folder whose classes differ in mean colour (learnable), JPEG and PNG mixed."""
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", train), ("test", test)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = torch.zeros(3, size, size)
                base[label % 3] = 160
                noise = torch.randint(0, 90, (3, size, size), generator=generator)
                pixels = (base + noise).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
                suffix = ".png" if i % 2 else ".jpg"
                Image.fromarray(pixels).save(folder / f"{i:04d}{suffix}")
    return root


def small_tensors(folder: Path, classes: int = 3, sizes=(("train", 24), ("val", 12), ("test", 12))) -> Path:
    """Decoded splits of a learnable toy task, small enough for a few quick epochs."""
    generator = torch.Generator().manual_seed(5)
    folder.mkdir(parents=True)
    for split, n in sizes:
        labels = torch.arange(n) % classes
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
        images[:, 0] = (labels[:, None, None] * 80).to(torch.uint8)
        torch.save({"images": images, "labels": labels}, folder / f"{split}.pt")
    return folder


def flip_byte(path: Path) -> None:
    """Damage ``path``: one bit of its middle byte flipped."""
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0x01
    path.write_bytes(bytes(content))


def truncate(path: Path) -> None:
    """Damage ``path``: its second half cut off."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def strict_json(path: Path):
    """Parse a JSON file as strict parsers do: NaN and Infinity are errors, not numbers."""

    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return json.loads(Path(path).read_text(), parse_constant=refuse)


# ---------------------------------------------------------------------------------------------
# Training in the test process


def quiet(_):
    """A training log that prints nothing."""


def without_timings(curves: list[dict]) -> list[dict]:
    """A record's curves without the per-epoch timings (which differ from run to run)."""
    return [{k: v for k, v in c.items() if k not in TIMING_KEYS} for c in curves]


def crash_in_epoch_two(cfg) -> None:
    """Train ``cfg`` (two epochs) and stop it as a kill would, once the first epoch's resume file is written."""
    from tlselect.training.trainer import train

    def crash(message):
        if "epoch 2/2" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=crash)


# ---------------------------------------------------------------------------------------------
# The tiny study: the repository's config.yaml under an overlay ``tiny.yaml`` over ``tiny_archive``


def tiny_data(archive: Path) -> dict:
    """The ``data`` block of a tiny study over ``tiny_archive`` (8 train, 2 val, 4 test per class)."""
    return {"archive": str(archive), "name": "tiny", "train_per_class": 8, "val_per_class": 2, "test_per_class": 4}


def tiny_study(archive: Path, *, source_epochs: int | None = None, **blocks) -> dict:
    """The overlay of a tiny study over ``archive``: its data, one thread per job, the pinned plan,
    one epoch in batches of 8, then ``blocks`` (a block given as None is left out: ``plan=None``
    measures the plan). ``source_epochs``: init "pretrained" is the source model, pretrained for
    that many epochs on 4 images per class (1 of them for validation)."""
    study = {"data": tiny_data(archive), "threads": 1, "plan": PINNED_PLAN, "train": {"epochs": 1, "batch_size": 8}}
    if source_epochs is not None:
        study["pretrained"] = "source"
        study["source"] = {"train_per_class": 4, "val_per_class": 1, "train": {"epochs": source_epochs}}
    study.update(blocks)
    return {key: value for key, value in study.items() if value is not None}


def write_study(workdir: Path, study: dict) -> Path:
    """Write ``study`` as ``workdir/tiny.yaml``, the overlay :func:`snakemake_command` reads."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(study))
    return workdir / "tiny.yaml"


def make_study(workdir: Path, archive: Path, policies: list[dict], **train_settings) -> dict:
    """Write a tiny study of ``policies`` (on the CPU, without probes, a source model, the search or the
    speedups benchmark) to ``workdir/tiny.yaml``; return its runs, ``{run_id: spec}``."""
    from snakemake.utils import validate

    from tlselect.config import merged
    from tlselect.runs import policy_runs

    overlay = tiny_study(
        archive,
        device="cpu",
        train={"batch_size": 8, **train_settings},
        features={"layers": []},
        policies=policies,
        speedups={"enabled": False},  # it needs ImageNet weights
        search={"enabled": False},  # tests/workflow/test_search_workflow.py runs the model search
    )
    write_study(workdir, overlay)
    config = merged(default_config(validated=False), overlay)
    validate(config, SCHEMA)
    return policy_runs(config)


# ---------------------------------------------------------------------------------------------
# Running Snakemake


def snakemake_env(**variables: str) -> dict:
    """The environment of a snakemake run: this interpreter's folder first on PATH (the rules call
    ``python``), plus ``variables``."""
    return dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", **variables)


def snakemake_command(
    workdir: Path, *args: str, snakefile: Path | None = REPO / "Snakefile", configfiles=None, cores: int | None = 2
) -> list[str]:
    """``python -m snakemake`` on the repository's workflow in ``workdir`` with ``args``.

    ``configfiles`` defaults to the repository's config.yaml under ``workdir/tiny.yaml`` (see
    :func:`write_study`); ``()`` gives none. ``snakefile=None`` leaves out ``--snakefile`` and
    ``--directory`` (a workflow of the working folder's own); ``cores=None`` leaves out ``--cores``
    (a profile sets the jobs).
    """
    command = [sys.executable, "-m", "snakemake"]
    if snakefile is not None:
        command += ["--snakefile", str(snakefile), "--directory", str(workdir)]
    if cores is not None:
        command += ["--cores", str(cores)]
    command += args
    configfiles = [REPO / "config.yaml", workdir / "tiny.yaml"] if configfiles is None else configfiles
    if configfiles:
        command += ["--configfile", *map(str, configfiles)]
    return command


def snakemake(
    workdir: Path, *args: str, check: bool = True, env: dict | None = None, timeout: float = SNAKEMAKE_LIMIT_S, **how
) -> subprocess.CompletedProcess:
    """Run :func:`snakemake_command` in ``workdir`` (``how``: its keywords) and return the finished process;
    with ``check``, a failed run fails the test showing the end of snakemake's output."""
    result = subprocess.run(
        snakemake_command(workdir, *args, **how),
        cwd=workdir,
        env=env or snakemake_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def start_snakemake(
    command: list[str], cwd: Path, out: Path, *, env: dict | None = None, new_session: bool = False
) -> subprocess.Popen:
    """Start ``command`` (from :func:`snakemake_command`, possibly wrapped) in the background, its
    output (stdout and stderr) going to the file ``out``. ``new_session``: in a session (and process
    group) of its own, so that ``os.killpg`` kills snakemake and every job it started."""
    with open(out, "w") as stream:  # the child keeps its own copy of the file
        return subprocess.Popen(
            command,
            cwd=cwd,
            env=env or snakemake_env(),
            stdout=stream,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=new_session,
        )


def job_counts(dry_run_output: str) -> dict[str, int]:
    """``{rule: jobs}`` from the "Job stats" table of a (dry) run's output."""
    table = dry_run_output.split("Job stats:")[-1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m.group(1) != "total"}


def study_processes(session: int, workdir: Path) -> dict[int, list[str]]:
    """Live processes of ``session`` or working in ``workdir`` (a notebook kernel has its own session)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            state, _ppid, _group, sid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:4]
            if state != "Z" and (int(sid) == session or os.readlink(entry / "cwd").startswith(str(workdir))):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, ValueError):  # gone meanwhile, or a kernel thread
            continue
    return found


def kill_session(process: subprocess.Popen, workdir: Path) -> None:
    """SIGKILL a snakemake started with ``new_session`` (:func:`start_snakemake`) and all its jobs at
    once, as a crash of the machine would; wait until none is left."""
    os.killpg(process.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while left := study_processes(process.pid, workdir):
        assert time.monotonic() < deadline, f"still alive after SIGKILL: {left}"
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    process.wait()
