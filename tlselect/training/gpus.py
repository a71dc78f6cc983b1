"""Which GPUs a job uses: each device shared by at most N concurrent jobs of one machine, claimed by file locks.

Snakemake's ``--resources gpu=N`` caps how many GPU slots the running jobs ask for together, but
does not say *which* GPU each job gets. A job given ``gpu=k`` (scripts take it as ``--gpus k``)
calls :func:`assign` at start-up, before torch initializes CUDA: it locks a free slot on each of
``k`` distinct devices of the pool and sets ``CUDA_VISIBLE_DEVICES`` to them. Each device has
``per_device`` slots (config ``gpu_jobs_per_device``, scripts' ``--gpu-jobs-per-device``), one lock
file each, so at most that many jobs share a device; slots are taken slot by slot across devices,
so jobs spread over the GPUs before they double up. The locks are ``flock`` locks on open files,
so the kernel drops them when the job ends, however it ends: a killed job's slot is free again at
once. A job given ``gpu=0`` sees no GPU, so ``device: auto`` runs it on the CPU.

The pool is every GPU this process may use: ``$TLSELECT_GPU_SLOTS`` devices when set (simulated
slots, for tests), else the entries of ``$CUDA_VISIBLE_DEVICES`` when it is set (SLURM sets it to
the job's GPUs), else ``torch.cuda.device_count()`` (NVML-based: it leaves CUDA uninitialized).
Lock files live in ``$TLSELECT_GPU_LOCK_DIR``, else in a per-user folder of the machine's temporary
directory; inside a SLURM job in one of its own, since SLURM has already given the job its GPUs.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tlselect.core.errors import TLSelectError

SLOTS_ENV = "TLSELECT_GPU_SLOTS"
LOCK_DIR_ENV = "TLSELECT_GPU_LOCK_DIR"

_held: list[int] = []  # descriptors of the lock files this process holds (closing one frees its GPU)


class GPUError(TLSelectError):
    """A job cannot get the GPUs it was given; the message says why and what to change."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def device_pool() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (indices or UUIDs)."""
    slots = os.environ.get(SLOTS_ENV, "").strip()
    if slots:
        return [str(i) for i in range(int(slots))]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        pool = []
        for entry in (e.strip() for e in visible.split(",")):
            if not entry or entry.startswith("-"):  # CUDA ignores everything from an invalid entry on
                break
            pool.append(entry)
        return pool
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def lock_dir() -> Path:
    """Folder of the lock files: one per device and slot, shared by every job of this user on this machine."""
    if os.environ.get(LOCK_DIR_ENV):
        return Path(os.environ[LOCK_DIR_ENV])
    name = f"tlselect-gpu-slots-{os.getuid()}"
    if os.environ.get("SLURM_JOB_ID"):
        name += f"-slurm-job-{os.environ['SLURM_JOB_ID']}"
    return Path(tempfile.gettempdir()) / name


def _lock_file(folder: Path, device: str, slot: int = 0) -> Path:
    return folder / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', device)}-slot{slot}.lock"


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive lock on ``path``, or None when another job holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    return fd


def _holders(folder: Path, pool: list[str], per_device: int) -> str:
    notes = []
    for device in pool:
        for slot in range(per_device):
            try:
                holder = _lock_file(folder, device, slot).read_text().strip() or "?"
            except OSError:
                holder = "?"
            notes.append(f"GPU {device} slot {slot}: {holder}")
    return "; ".join(notes)


def _try_claim(count: int, pool: list[str], folder: Path, per_device: int) -> dict[str, int] | None:
    """Lock descriptors of a free slot on each of ``count`` distinct devices, or None (holding nothing)."""
    claimed: dict[str, int] = {}
    for slot in range(per_device):
        for device in pool:
            fd = None if device in claimed else _try_lock(_lock_file(folder, device, slot))
            if fd is not None:
                claimed[device] = fd
                if len(claimed) == count:
                    return claimed
    for fd in claimed.values():  # not enough free: hold none while waiting, so no job blocks another
        os.close(fd)
    return None


def claim(
    count: int,
    pool: list[str] | None = None,
    folder: Path | None = None,
    timeout: float | None = None,
    poll: float = 0.5,
    log: Callable[[str], None] = _stderr,
    per_device: int = 1,
) -> list[str]:
    """Lock a slot on each of ``count`` devices of ``pool`` for the rest of this process; wait while too few are free.

    A device has ``per_device`` slots. Returns the claimed devices (the lowest with a free lowest
    slot: slot 0 of every device before slot 1 of any) and sets ``CUDA_VISIBLE_DEVICES`` to them.
    Raises :class:`GPUError` when the pool is smaller than ``count`` or after ``timeout`` seconds.
    """
    if per_device < 1:
        raise GPUError(f"jobs per GPU must be at least 1, not {per_device} (config gpu_jobs_per_device)")
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        raise GPUError("CUDA is already initialized in this process: GPUs must be claimed before it starts")
    pool = device_pool() if pool is None else pool
    folder = lock_dir() if folder is None else folder
    if count > len(pool):
        raise GPUError(
            f"this job asks for {count} GPU(s), but only {len(pool)} exist here ({','.join(pool) or 'none'})"
        )
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    start, waiting = time.monotonic(), False
    while True:
        claimed = _try_claim(count, pool, folder, per_device)
        if claimed:
            _held.extend(claimed.values())
            devices = sorted(claimed, key=pool.index)
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
            shared = f", up to {per_device} jobs each" if per_device > 1 else ""
            log(f"gpus: claimed GPU {','.join(devices)} of {','.join(pool)}{shared} (lock files in {folder})")
            return devices
        if timeout is not None and time.monotonic() - start >= timeout:
            raise GPUError(f"no {count} free GPU(s) after {timeout:g}s; held by {_holders(folder, pool, per_device)}")
        if not waiting:
            log(f"gpus: waiting for {count} free GPU(s); all busy ({_holders(folder, pool, per_device)})")
            waiting = True
        time.sleep(poll)


def job_gpus(gpu: int, gres: str = "") -> int:
    """The GPUs a workflow job is given (its scripts' ``--gpus``): its ``gpu`` resource, or 1 when that
    is 0 but its SLURM ``gres`` is a share of a GPU (``shard`` or ``mps``)."""
    return gpu or int(bool(re.match(r"(shard|mps)\b", str(gres))))


def assign(
    gpus: int | None, device: str = "auto", log: Callable[[str], None] = _stderr, per_device: int = 1
) -> list[str]:
    """Give this job the GPUs its scheduler granted: ``gpus`` is the job's gpu resource.

    ``None`` (a script run by hand, without ``--gpus``) changes nothing. Otherwise a job given no
    GPU, or asking for the CPU, sees none; a job given some claims them (:func:`claim`), or runs
    on the CPU when this machine has no GPU and ``device`` is ``auto``. ``per_device`` jobs may share one GPU.
    """
    if gpus is None:
        return []
    if gpus <= 0 or device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        if device == "cuda":
            raise GPUError(
                "device 'cuda', but this job was given no GPU (its gpu resource is 0): locally drop "
                "--resources gpu=0 or raise it; on SLURM set gpu: 1 for this rule in the profile's set-resources"
            )
        return []
    pool = device_pool()
    if not pool:
        if device == "cuda":
            raise GPUError("device 'cuda', but this machine has no GPU; use device: auto or cpu")
        log("gpus: this job may use a GPU, but there is none here; it runs on the CPU")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return []
    return claim(gpus, pool, log=log, per_device=per_device)
