"""Atomic, checked file output: write to a temporary file beside the target, then rename it into place.

Readers (aggregation, the notebook, a parallel job) therefore never see a half-written file, and
a job killed mid-write leaves at most a stray temporary file, which the next write of that target
removes. A write that finds the disk full (ENOSPC, or EDQUOT) removes its temporary, keeps the
previous file and raises :class:`DiskFull`, naming the file and its filesystem's free space. JSON
is strict: a non-finite float becomes null.

Files that later jobs read back (checkpoints, resume files, decoded tensors, cached features)
carry a CRC-32 (zlib's, as in zip) in a sidecar, ``<file>.crc32``, written before the file is
renamed into place; formats and memory maps stay as they are. :func:`verify` checks it on every
read (2.5x cheaper than SHA-256; random damage slips through once in 2**32): a corrupt file
raises :class:`CorruptFile` and moves to ``<file>.corrupt``, which the Snakefile makes a target
of the next run (Snakemake alone skips a missing intermediate file whose downstream outputs
exist). Writing the file anew removes the corrupt copy; a file without a sidecar is read unchecked.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tlselect.core.errors import TLSelectError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(TLSelectError):
    """A write found no space (or no quota) left; the previous file is kept."""


class CorruptFile(TLSelectError):
    """A file's content no longer matches its checksum; it has been moved aside to ``<file>.corrupt``."""


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, checksum: bool = False) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``target`` on success.

    ``checksum``: also write ``target``'s sidecar checksum (:func:`verify` checks it).
    """
    target = Path(target)
    with _naming_a_full_disk(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_temporaries(target)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + target.suffix, dir=target.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes owner-only files; use the usual mode
            if checksum:  # first: a file in place always has its own checksum beside it
                write_text(checksum_path(target), f"{file_digest(tmp_path)}  {target.name}\n")
            os.replace(tmp_path, target)
            if checksum:
                corrupt_path(target).unlink(missing_ok=True)  # computed anew: the corrupt copy has served
        finally:
            tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def _naming_a_full_disk(target: Path) -> Iterator[None]:
    """Turn a failed write whose cause is a full disk (however wrapped, e.g. by torch) into DiskFull."""
    try:
        yield
    except Exception as error:
        cause = error
        while cause is not None and not (isinstance(cause, OSError) and cause.errno in DISK_FULL):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise DiskFull(
            f"{os.strerror(cause.errno).lower()} writing {target} ({_free_space(target.parent)}); "
            "any previous version of it is kept and no temporary file is left. Free space there, then run the "
            "same command again"
        ) from error


def _free_space(folder: Path) -> str:
    """'filesystem of <mount point>: N MiB free' for the filesystem holding ``folder``."""
    mount = folder.resolve()
    while not os.path.ismount(mount):
        mount = mount.parent
    return f"filesystem of {mount}: {shutil.disk_usage(mount).free / 2**20:.1f} MiB free"


def allocate(path: str | os.PathLike) -> None:
    """Reserve ``path``'s blocks now, so that a full disk fails here (ENOSPC) rather than in a memory map.

    A memory-mapped file is created sparse; writing its pages on a full disk kills the process
    with SIGBUS. Filesystems that cannot reserve space are left as they are.
    """
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as error:
            if error.errno in DISK_FULL:
                raise


def checksum_path(path: str | os.PathLike) -> Path:
    """The sidecar holding ``path``'s checksum."""
    path = Path(path)
    return path.with_name(path.name + ".crc32")


def corrupt_path(path: str | os.PathLike) -> Path:
    """Where :func:`verify` moves ``path`` when its content no longer matches its checksum."""
    path = Path(path)
    return path.with_name(path.name + ".corrupt")


def file_digest(path: str | os.PathLike) -> str:
    """``path``'s CRC-32 as 8 hex digits, read in 4 MiB blocks."""
    crc, block = 0, bytearray(1 << 22)
    with open(path, "rb", buffering=0) as f:
        while size := f.readinto(block):
            crc = zlib.crc32(memoryview(block)[:size], crc)
    return f"{crc:08x}"


def verify(path: str | os.PathLike) -> Path:
    """``path``, checked against its sidecar checksum; a mismatch moves it aside and raises CorruptFile."""
    path, sidecar = Path(path), checksum_path(path)
    if not sidecar.is_file() or not path.is_file():
        return path
    if file_digest(path) != sidecar.read_text().split(" ")[0]:
        os.replace(path, corrupt_path(path))
        raise CorruptFile(
            f"{path} is corrupt: its content no longer matches the checksum written with it ({sidecar}), as after "
            f"a flipped bit or a truncated write. Moved it to {corrupt_path(path)}: run snakemake again (its "
            "default target) to compute it anew, with everything that reads it; with other targets, add "
            f"--forcerun {path}"
        )
    return path


def remove(path: str | os.PathLike) -> None:
    """Delete ``path``, its checksum sidecar and a corrupt copy (those that exist)."""
    for each in (Path(path), checksum_path(path), corrupt_path(path)):
        each.unlink(missing_ok=True)


def remove_temporaries(target: Path) -> None:
    """Remove the temporaries of ``target`` that killed writers left behind.

    A target has one writer at a time (Snakemake runs one job per output; a plan file is written
    under a lock), so any temporary of it found before a write is a dead writer's.
    """
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp{glob.escape(target.suffix)}"):
        stale.unlink(missing_ok=True)


def stale_resume_files(results: str | os.PathLike, checkpoints: list[str]) -> list[Path]:
    """Resume files (``<checkpoint stem>.resume.pt``) under ``results`` that belong to none of
    ``checkpoints``: left by killed runs that the current config no longer has."""
    kept = {Path(c).with_suffix(".resume.pt") for c in checkpoints}
    return sorted(p for p in Path(results).rglob("*.resume.pt") if p not in kept)


def unshared_files(folder: str | os.PathLike) -> list[Path]:
    """Files under ``folder`` that no other path links to (one hard link): what a run group's keep
    folder (``results/cache/runs``) holds for runs whose checkpoint and record were removed or
    replaced since, the only files there that take space of their own."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.stat().st_nlink == 1)


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
    """``torch.save`` atomically, with a checksum (tensors and plain containers only: loading runs no pickle code)."""
    import torch

    with atomic_path(target, checksum=True) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)  # through a Python file, so a full disk surfaces as OSError(ENOSPC)


def load_torch(path: str | os.PathLike, map_location: str = "cpu", mmap: bool = False) -> Any:
    """Load a file written by :func:`save_torch`, checked first (:func:`verify`); never executes pickled code.

    ``mmap``: tensors map the file (copy-on-write) instead of being read into memory at once.
    """
    import torch

    return torch.load(verify(path), map_location=map_location, weights_only=True, mmap=mmap)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
