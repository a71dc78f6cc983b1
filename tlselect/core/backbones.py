"""Backbones as tables of ordered stages: plain data, importable without torch.

A backbone is a table entry (:data:`BACKBONES`): the torchvision constructor, its ImageNet weights
and its ordered stages. Config checks, run specs and the Snakefile read these tables without
importing torch; :mod:`tlselect.training.models` builds the networks from them.
"""

from __future__ import annotations

from dataclasses import dataclass

from tlselect.core.errors import TLSelectError


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a torchvision backbone and cut it into ordered stages."""

    builder: str  # torchvision.models constructor name
    weights: str  # torchvision weights enum member, e.g. "ResNet18_Weights.IMAGENET1K_V1"
    stages: tuple[tuple[str, tuple[str, ...]], ...]  # stage name -> torchvision attribute paths
    head: tuple[str, ...]  # attribute paths run after the last stage ("flatten" flattens)
    classifier: str  # attribute path of the final nn.Linear, replaced for the task's classes

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


def backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise BackboneError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}") from None
