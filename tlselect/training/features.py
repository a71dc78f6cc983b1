"""Per-layer feature cache (VISTA's staged plan): each stage's activations from the previous one's.

The workflow materializes stage outputs one stage at a time: the first stage reads the decoded
uint8 images, every later stage reads the previous stage's cached activations, so the shared
prefix is never recomputed and adding a layer runs one more stage only. Activations are written
chunk by chunk into ``.npy`` files (float16 by default) through a memory map, so an extraction
holds at most ``memory_mb`` of activations at once, however large the data. Each file carries a
checksum (:mod:`tlselect.core.files`), checked when read; probes read them back with optional
adaptive pooling.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from tlselect.core.files import allocate, atomic_path, verify
from tlselect.training.models import StagedNet

DTYPES = {"float16": np.float16, "float32": np.float32}


def chunk_rows(memory_mb: float, in_shape: tuple, out_shape: tuple) -> int:
    """Images per chunk so that one chunk's float32 input and output fit in ``memory_mb``."""
    per_image = 4 * (int(np.prod(in_shape)) + int(np.prod(out_shape)))
    return max(1, int(memory_mb * 2**20) // per_image)


@torch.no_grad()
def extract_range(
    model: StagedNet,
    inputs,
    start: int,
    stop: int,
    out_path: Path,
    memory_mb: float = 1024,
    dtype: str = "float16",
    device: torch.device | str = "cpu",
) -> tuple:
    """Run stages ``start..stop-1`` over ``inputs``, streaming the outputs into ``out_path`` (.npy).

    ``inputs`` are uint8 images (a tensor) when ``start`` is 0, else the cached activations of
    stage ``start - 1`` (a tensor or a memory-mapped array). Returns the output's per-image shape.
    """
    model.eval()

    def run(chunk):
        x = chunk if start == 0 else torch.from_numpy(np.asarray(chunk, dtype=np.float32))
        return model(x.to(device), start=start, stop=stop).float().cpu().numpy()

    out_shape = run(inputs[:1]).shape[1:]
    rows = chunk_rows(memory_mb, tuple(inputs.shape[1:]), out_shape)
    with atomic_path(out_path, checksum=True) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=DTYPES[dtype], shape=(len(inputs), *out_shape))
        allocate(tmp)
        for i in range(0, len(inputs), rows):
            out[i : i + rows] = run(inputs[i : i + rows])
        out.flush()
        del out
    return out_shape


@torch.no_grad()
def extract_all_in_memory(
    model: StagedNet, images: torch.Tensor, layers: list[str], batch: int = 256, amp_dtype=None
) -> dict:
    """One staged pass: every requested layer's outputs for ``images``, the prefix computed once.

    ``amp_dtype`` (e.g. ``torch.bfloat16``) runs the stages under autocast.
    """
    model.eval()
    wanted = {model.stage_index(layer): layer for layer in layers}
    outs: dict[str, list] = {layer: [] for layer in layers}
    for i in range(0, len(images), batch):
        x = images[i : i + batch]
        for stage in range(0, max(wanted) + 1):
            with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                x = model(x, start=stage, stop=stage + 1)
            if stage in wanted:
                outs[wanted[stage]].append(x.to(torch.float16))
    return {layer: torch.cat(chunks) for layer, chunks in outs.items()}


def open_features(path: Path) -> np.ndarray:
    """A cached activations file, checked against its checksum, memory-mapped read-only."""
    return np.load(verify(path), mmap_mode="r", allow_pickle=False)


def load_features(path: Path, pool: int = 0) -> torch.Tensor:
    """Cached activations as float32, adaptively average-pooled to ``pool`` x ``pool`` (0: as stored)."""
    x = torch.from_numpy(np.asarray(open_features(path), dtype=np.float32))
    if pool and x.dim() == 4 and x.shape[-1] > pool:
        x = nn.functional.adaptive_avg_pool2d(x, pool)
    return x
