"""Backbones as tables of ordered stages: plain data, importable without torch.

A backbone is a table entry (:data:`BACKBONES`: the torchvision constructor, its ImageNet weights
and its ordered stages written out) or any other timm or torchvision classification model, whose
stages :mod:`tlselect.training.zoo` finds. Config checks, run specs and the Snakefile read these
tables without importing torch or timm: :func:`resolve` asks the zoo in a subprocess, once, and
keeps its answer in a per-user cache keyed by the timm and torchvision versions
(:func:`cache_file`); :mod:`tlselect.training.models` builds the networks from them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from tlselect.core.errors import TLSelectError
from tlselect.core.files import write_json

TIMM_PREFIX = "timm."  # a name that asks timm even where torchvision has the same name
POOL_FLATTEN = "pool_flatten"  # a head step: global average pool (if still a map), then flatten
CACHE_ENV = "TLSELECT_BACKBONE_CACHE"  # the cache file (default: $XDG_CACHE_HOME/tlselect/backbones.json)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a torchvision backbone and cut it into ordered stages."""

    builder: str  # torchvision.models constructor name
    weights: str  # torchvision weights enum member, e.g. "ResNet18_Weights.IMAGENET1K_V1"
    stages: tuple[tuple[str, tuple[str, ...]], ...]  # stage name -> torchvision attribute paths
    head: tuple[str, ...]  # attribute paths run after the last stage ("flatten" flattens)
    classifier: str  # attribute path of the final nn.Linear, replaced for the task's classes
    library: str = "torchvision"  # or "timm"
    entry: str = ""  # the network's method stage 1 runs through (until stage 2's first module); "": run modules

    @property
    def stage_names(self) -> list[str]:
        return [name for name, _ in self.stages]


def _resnet(builder: str, weights: str) -> BackboneSpec:
    return BackboneSpec(
        builder=builder,
        weights=weights,
        stages=(
            ("stem", ("conv1", "bn1", "relu", "maxpool")),
            ("layer1", ("layer1",)),
            ("layer2", ("layer2",)),
            ("layer3", ("layer3",)),
            ("layer4", ("layer4",)),
        ),
        head=("avgpool", "flatten", "fc"),
        classifier="fc",
    )


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": _resnet("resnet18", "ResNet18_Weights.IMAGENET1K_V1"),
    "resnet50": _resnet("resnet50", "ResNet50_Weights.IMAGENET1K_V2"),
    "mobilenet_v3_small": BackboneSpec(
        builder="mobilenet_v3_small",
        weights="MobileNet_V3_Small_Weights.IMAGENET1K_V1",
        stages=(
            ("stem", ("features.0",)),
            ("block1", ("features.1",)),
            ("block2", ("features.2", "features.3")),
            ("block3", ("features.4", "features.5", "features.6", "features.7", "features.8")),
            ("block4", ("features.9", "features.10", "features.11", "features.12")),
        ),
        head=("avgpool", "flatten", "classifier"),
        classifier="classifier.3",
    ),
}

NO_FREEZE = "none"


class BackboneError(TLSelectError, ValueError):
    """An unknown backbone or stage name."""


_RESOLVED: dict[str, BackboneSpec] = {}


def spec_to_dict(spec: BackboneSpec) -> dict:
    return asdict(spec)


def spec_from_dict(data: dict) -> BackboneSpec:
    stages = tuple((name, tuple(paths)) for name, paths in data["stages"])
    return BackboneSpec(**{**data, "stages": stages, "head": tuple(data["head"])})


def backbone_spec(name: str) -> BackboneSpec:
    """The stages of ``name``: a table entry, or a model :func:`resolve` found (resolved now if not yet)."""
    if name in BACKBONES:
        return BACKBONES[name]
    if name not in _RESOLVED:
        resolve([name])
    return _RESOLVED[name]


def versions_key() -> str:
    """The library versions a found model's stages depend on."""
    found = []
    for package in ("timm", "torchvision", "torch"):
        try:
            found.append(f"{package}={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            found.append(f"{package}=none")
    return " ".join(found)


def cache_file() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tlselect" / "backbones.json"
    return Path(os.environ.get(CACHE_ENV, default))


def _cached() -> dict:
    try:
        data = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if data.get("versions") == versions_key() else {}


def resolve(patterns: list[str], cap: int = 1000) -> list[str]:
    """Names and patterns (``resnet*``, ``efficientnet_b[0-2]``) expanded into model names, each one's
    stages found and checked; table entries and cached answers cost nothing, the rest one
    subprocess (torch and timm stay out of this process). Raises :class:`BackboneError` naming the
    model and the fix."""
    cache = _cached()
    patterns_cache, specs_cache = cache.get("patterns", {}), cache.get("specs", {})
    key = f"{cap} {' '.join(patterns)}"
    names = patterns_cache.get(key)
    if names is None or any(n not in BACKBONES and n not in specs_cache for n in names):
        known = ",".join(specs_cache)  # found before: the subprocess lists them without building them again
        command = [sys.executable, "-m", "tlselect.training.zoo", str(cap), known, *patterns]
        done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parents[2])
        try:
            answer = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise BackboneError(
                f"could not list backbones {patterns} (python -m tlselect.training.zoo failed: "
                f"{done.stderr.strip()[-600:]}); is timm installed (requirements.txt)?"
            ) from None
        if "error" in answer:
            raise BackboneError(answer["error"])
        names = answer["names"]
        specs_cache = {**specs_cache, **answer["specs"]}
        patterns_cache = {**patterns_cache, key: names}
        cache_file().parent.mkdir(parents=True, exist_ok=True)
        write_json(cache_file(), {"versions": versions_key(), "patterns": patterns_cache, "specs": specs_cache})
    _RESOLVED.update({n: spec_from_dict(specs_cache[n]) for n in names if n not in BACKBONES})
    return names
