"""Features keyed by image content: a model's embedding of an image is computed once, whatever subset,
split or archive the image comes in.

A store is a folder per model (backbone, init, weights, resolution: :func:`store_key`) of shards,
each the rows of some images and their hashes (SHA-256 of the decoded uint8 pixels): SHiFT's
float16 embeddings (:class:`Embedder`: the last stage, globally average-pooled; a transformer's
tokens averaged), or one cached layer's activations (:func:`tlselect.training.features.cache_layer`). An
extraction computes only the images whose hash no shard holds and writes them as one new shard,
atomically, so a grown data set (a new archive with more images per class) costs the new images
only, and a killed extraction keeps every shard it finished. :class:`Embedder` counts what it
computed, which is how the tests and the benchmark see it.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from tlselect.core.files import atomic_path, file_digest, write_text
from tlselect.training.models import StagedNet, initialize


def image_hashes(images: torch.Tensor) -> list[str]:
    """SHA-256 of each uint8 image's pixels (with its shape)."""
    out = []
    for image in images:
        array = np.ascontiguousarray(image.numpy())
        out.append(hashlib.sha256(repr(array.shape).encode() + array.tobytes()).hexdigest())
    return out


def store_key(backbone: str, init: str, resolution: int, seed: int, weights: str = "") -> str:
    """The folder name of a model's store: what its embeddings depend on."""
    identity = {
        "backbone": backbone,
        "init": init,
        "resolution": resolution,
        "seed": seed if not weights else None,  # a scratch model is its seed; a pretrained one its weights
        "weights": file_digest(weights) if weights else "",
    }
    return f"{backbone}-{hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]}"


def embed(x: torch.Tensor) -> torch.Tensor:
    """A stage's output as one vector per image: maps average-pooled, tokens averaged."""
    if x.dim() == 4:
        return x.mean(dim=(2, 3))
    if x.dim() == 3:
        return x.mean(dim=1)
    return x.flatten(1)


class FeatureStore:
    """The shards of one folder: ``hash -> feature row``. A shard is ``<name>.npy`` (the rows, read
    memory-mapped) and ``<name>.hashes`` (one hash a line), written in that order, so a hashes file
    names a complete shard."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.index: dict[str, tuple[Path, int]] = {}
        self._open: dict[Path, np.ndarray] = {}
        for listing in sorted(self.folder.glob("*.hashes")):
            shard = listing.with_suffix(".npy")
            self.index.update((h, (shard, row)) for row, h in enumerate(listing.read_text().split()))

    def missing(self, hashes: list[str]) -> list[int]:
        return [i for i, h in enumerate(hashes) if h not in self.index]

    def add(self, hashes: list[str], rows: np.ndarray) -> None:
        name = hashlib.sha256("".join(hashes).encode()).hexdigest()[:16]
        self.folder.mkdir(parents=True, exist_ok=True)
        shard = self.folder / f"{name}.npy"
        with atomic_path(shard) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, rows, allow_pickle=False)
        write_text(shard.with_suffix(".hashes"), "\n".join(hashes) + "\n")
        self.index.update((h, (shard, row)) for row, h in enumerate(hashes))

    def get(self, hashes: list[str]) -> np.ndarray:
        """The rows of ``hashes``, in order, as float32."""
        out = None
        for i, h in enumerate(hashes):
            shard, row = self.index[h]
            if shard not in self._open:
                self._open[shard] = np.load(shard, mmap_mode="r", allow_pickle=False)
            value = self._open[shard][row]
            if out is None:
                out = np.empty((len(hashes), *value.shape), dtype=np.float32)
            out[i] = value
        return out if out is not None else np.empty((0,), dtype=np.float32)


class Embedder:
    """One model's embeddings of images, from its store, computing (and storing) only what is missing."""

    def __init__(
        self,
        backbone: str,
        init: str,
        store_root: str | Path,
        weights: str = "",
        resolution: int = 32,
        seed: int = 0,
        batch: int = 128,
    ):
        self.backbone, self.init, self.weights = backbone, init, weights
        self.resolution, self.seed, self.batch = resolution, seed, batch
        self.store = FeatureStore(Path(store_root) / store_key(backbone, init, resolution, seed, weights))
        self._model: StagedNet | None = None
        self.computed = 0  # images this embedder ran through the model
        self.seconds = 0.0  # time spent running the model
        self.build_seconds = 0.0  # time spent building it (once, if anything is missing)

    def model(self) -> StagedNet:
        if self._model is None:  # built on first use: a model whose features are all stored never loads
            start = time.perf_counter()
            torch.manual_seed(self.seed)
            self._model = StagedNet(self.backbone, 2, self.resolution)
            initialize(self._model, self.init, self.weights or None)
            self._model.eval()
            self.build_seconds = time.perf_counter() - start
        return self._model

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, hashes: list[str]) -> np.ndarray:
        todo = self.store.missing(hashes)
        if todo:
            model = self.model()
            start = time.perf_counter()
            last = len(model.stage_names)
            outs = [
                embed(model(images[todo[i : i + self.batch]], start=0, stop=last)).float().numpy()
                for i in range(0, len(todo), self.batch)
            ]
            self.store.add([hashes[i] for i in todo], np.concatenate(outs).astype(np.float16))
            self.computed += len(todo)
            self.seconds += time.perf_counter() - start
        return self.store.get(hashes)
