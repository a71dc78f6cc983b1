"""Atomic file output: write to a temporary file beside the target, then rename it into place.

Readers (aggregation, the notebook, a parallel job) therefore never see a half-written file, and
a job killed mid-write leaves at most a stray temporary file, never a truncated output; the next
write of that target removes it. JSON is written strictly: a non-finite float (the loss of a
diverged run) becomes null, never ``NaN``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_temporaries(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + target.suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes owner-only files; use the usual mode
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def remove_temporaries(target: Path) -> None:
    """Remove the temporaries of ``target`` that killed writers left behind.

    A target has one writer at a time (Snakemake runs one job per output; a plan file is written
    under a lock), so any temporary of it found before a write is a dead writer's.
    """
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp{glob.escape(target.suffix)}"):
        stale.unlink(missing_ok=True)


def finite(data: Any) -> Any:
    """``data`` with every NaN or infinite float, however deeply nested, replaced by None."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [finite(value) for value in data]
    return data


def write_text(target: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def write_json(target: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented, strict JSON (non-finite floats as null), atomically."""
    write_text(target, json.dumps(finite(data), indent=2, sort_keys=False, allow_nan=False) + "\n")


def save_torch(target: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` atomically (tensors and plain containers only, so loading needs no pickle code)."""
    import torch

    with atomic_path(target) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | os.PathLike, map_location: str = "cpu", mmap: bool = False) -> Any:
    """Load a file written by :func:`save_torch`; never executes pickled code.

    ``mmap``: tensors map the file (copy-on-write) instead of being read into memory at once.
    """
    import torch

    return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
