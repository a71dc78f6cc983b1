"""A disk that is full for chosen files: writes to them fail with ENOSPC, as the kernel's would.

:func:`patches` lists the replacements for ``open`` (builtins and io) and ``os.posix_fallocate``:
a file opened for writing whose path contains ``part`` takes ``free`` bytes, then every write
raises ``OSError(ENOSPC)``; reserving more than ``free`` bytes for it fails the same way. Tests
apply them with ``monkeypatch``; a workflow test applies them in every Python process Snakemake
starts through :func:`sitecustomize` (a ``sitecustomize.py`` on ``PYTHONPATH``).
"""

from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path

_open, _fallocate = builtins.open, os.posix_fallocate


def no_space(name) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(name))


class _FullFile:
    """A writable file that accepts ``free`` bytes, then fails every write with ENOSPC."""

    def __init__(self, file, free: int):
        self._file, self._free = file, free

    def write(self, data):
        size = len(data) if isinstance(data, str) else memoryview(data).nbytes
        if size > self._free:
            raise no_space(self._file.name)
        self._free -= size
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def patches(part: str, free: int) -> list[tuple[object, str, object]]:
    """``(object, attribute, replacement)`` triples that make files whose path holds ``part`` full."""

    def full_open(file, mode="r", *args, **kwargs):
        opened = _open(file, mode, *args, **kwargs)
        writing = any(flag in mode for flag in "wax+")
        named = not isinstance(file, int)  # an open file descriptor: not a path
        return _FullFile(opened, free) if writing and named and part in os.fspath(file) else opened

    def full_fallocate(fd, offset, length):
        if length > free and part in os.readlink(f"/proc/self/fd/{fd}"):
            raise no_space(fd)
        return _fallocate(fd, offset, length)

    return [(builtins, "open", full_open), (io, "open", full_open), (os, "posix_fallocate", full_fallocate)]


def sitecustomize(folder: Path, part: str, free: int) -> Path:
    """Write ``folder/sitecustomize.py`` applying :func:`patches` at start-up; put ``folder`` on PYTHONPATH."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        f"import sys\nsys.path.append({str(Path(__file__).parent)!r})\nimport full_disk\n"
        f"for target, name, value in full_disk.patches({part!r}, {free}):\n    setattr(target, name, value)\n"
    )
    return folder
