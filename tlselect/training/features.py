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

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tlselect.core.files import allocate, atomic_path, verify
from tlselect.data.tensors import load_split
from tlselect.training.loop import resolve_device
from tlselect.training.models import StagedNet, initialize
from tlselect.training.options import TrainingError

DTYPES = {"float16": np.float16, "float32": np.float32}
SPLITS = ("train", "val", "test")


def chunk_rows(memory_mb: float, in_shape: tuple, out_shape: tuple) -> int:
    """Images per chunk so that one chunk's float32 input and output fit in ``memory_mb``."""
    per_image = 4 * (int(np.prod(in_shape)) + int(np.prod(out_shape)))
    return max(1, int(memory_mb * 2**20) // per_image)


def run_stages(model: StagedNet, chunk, start: int, stop: int, device: torch.device | str) -> np.ndarray:
    """Stages ``start..stop-1`` over one chunk: uint8 images at ``start`` 0, else cached activations."""
    x = chunk if start == 0 else torch.from_numpy(np.asarray(chunk, dtype=np.float32))
    return model(x.to(device), start=start, stop=stop).float().cpu().numpy()


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
        return run_stages(model, chunk, start, stop, device)

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
def extract_by_content(
    model: StagedNet,
    inputs,
    hashes: list[str],
    store,
    start: int,
    stop: int,
    out_path: Path,
    memory_mb: float = 1024,
    dtype: str = "float16",
    device: torch.device | str = "cpu",
) -> tuple[tuple, int]:
    """:func:`extract_range` through a :class:`tlselect.training.store.FeatureStore`: the rows whose
    image ``hashes`` the store lacks are computed (chunk by chunk, each chunk a shard), then every row
    is written to ``out_path`` from the store. Returns the per-image shape and the rows computed."""
    model.eval()

    def run(chunk):
        return run_stages(model, chunk, start, stop, device)

    out_shape = run(inputs[:1]).shape[1:]
    rows = chunk_rows(memory_mb, tuple(inputs.shape[1:]), out_shape)
    todo = store.missing(hashes)
    for i in range(0, len(todo), rows):
        picked = todo[i : i + rows]
        store.add([hashes[j] for j in picked], run(inputs[picked]).astype(DTYPES[dtype]))
    with atomic_path(out_path, checksum=True) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=DTYPES[dtype], shape=(len(inputs), *out_shape))
        allocate(tmp)
        for i in range(0, len(inputs), rows):
            out[i : i + rows] = store.get(hashes[i : i + rows])
        out.flush()
        del out
    return out_shape, len(todo)


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


def _print(message: str) -> None:
    print(message, flush=True)


def cache_layer(
    inputs: str | Path,
    out: str | Path,
    layer: str,
    from_layer: str = "",
    backbone: str = "resnet18",
    init: str = "scratch",
    weights: str | None = None,
    resolution: int = 32,
    seed: int = 0,
    dtype: str = "float16",
    memory_mb: float = 1024,
    device: str = "auto",
    log=_print,
    data: str | Path | None = None,
    store: str | Path | None = None,
) -> None:
    """Cache ``layer``'s activations of every split into ``out/{train,val,test}.npy``: one step of the
    staged plan. With ``from_layer`` empty, ``inputs`` is the folder of the decoded ``{split}.pt``;
    otherwise it is ``from_layer``'s cached folder, which must come before ``layer``, and only the
    stages between them run. The model is ``backbone`` with ``init`` (``weights``: the init's weights
    file; ``seed`` seeds a scratch init); at most ``memory_mb`` of activations are held at once.

    With ``store`` (a folder) and ``data`` (the decoded ``{split}.pt``), the activations are kept
    by image content (:mod:`tlselect.training.store`): only images the store lacks run through the
    stages, so a grown data set computes its new images only."""
    inputs_dir, out_dir = Path(inputs), Path(out)
    torch_device = resolve_device(device)
    torch.manual_seed(seed)
    model = StagedNet(backbone, 2, resolution)
    initialize(model, init, weights or None)
    model.to(torch_device)
    stop = model.stage_index(layer) + 1
    start = model.stage_index(from_layer) + 1 if from_layer else 0
    if start >= stop:
        raise TrainingError(f"--from-layer {from_layer} does not come before --layer {layer}")
    layer_store = None
    if store:
        from tlselect.training.store import FeatureStore, image_hashes, store_key

        key = store_key(backbone, init, resolution, seed, weights or "")
        layer_store = FeatureStore(Path(store) / f"{key}-{layer}-{dtype}")
    for split in SPLITS:
        t0 = time.perf_counter()
        if start == 0:
            x, _ = load_split(inputs_dir / f"{split}.pt")
        else:
            x = open_features(inputs_dir / f"{split}.npy")
        if layer_store is None:
            shape = extract_range(model, x, start, stop, out_dir / f"{split}.npy", memory_mb, dtype, torch_device)
            done = f"{len(x)}"
        else:
            hashes = image_hashes(load_split(Path(data) / f"{split}.pt")[0])
            shape, computed = extract_by_content(
                model, x, hashes, layer_store, start, stop, out_dir / f"{split}.npy", memory_mb, dtype, torch_device
            )
            done = f"{computed} of {len(x)} (the rest from the store)"
        log(
            f"{layer} {split}: {done} x {shape} ({dtype}) from "
            f"{from_layer or 'images'} in {time.perf_counter() - t0:.1f}s"
        )
