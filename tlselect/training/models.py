"""Backbone networks run stage by stage, their initializations and freeze-depth policies.

The stage tables live in :mod:`tlselect.core.backbones` (no torch). :class:`StagedNet` runs any
contiguous range of stages, which is what freezing, per-layer feature extraction and cached
training all need. Weights are always kept in
torchvision's own key format (``StagedNet.net``), so torchvision, user and workflow checkpoints
load the same way.
"""

from __future__ import annotations

import socket
import urllib.error
from pathlib import Path

import torch
import torchvision
from torch import nn

from tlselect.core.backbones import NO_FREEZE, POOL_FLATTEN, BackboneError, BackboneSpec, backbone_spec
from tlselect.core.errors import TLSelectError
from tlselect.core.files import save_torch, verify

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Preprocess(nn.Module):
    """uint8 NCHW images -> normalized float, resized to the configured input resolution.

    Float input is taken as already normalized (the naive data path normalizes per image).
    """

    def __init__(self, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std if images.dtype == torch.uint8 else images
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = nn.functional.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", antialias=False)
        return x


class _StageEnd(Exception):
    """Raised by the hook on stage 2's first module: stage 1's output is its input."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value


class StagedNet(nn.Module):
    """A torchvision or timm backbone run stage by stage.

    ``forward(x, start, stop)`` runs stages ``start..stop-1`` (indices into ``stage_names``); with
    ``stop=None`` it also runs the head. Index 0 is the preprocessing, so ``start=0`` takes uint8
    images and stage ``k`` of the backbone is index ``k + 1``.
    """

    def __init__(self, backbone: str, num_classes: int, resolution: int = 32):
        super().__init__()
        spec = backbone_spec(backbone)
        if spec.entry:
            from tlselect.training.zoo import build_network  # timm is imported there, where needed

            net = build_network(spec, num_classes, resolution)
        else:
            net = getattr(torchvision.models, spec.builder)(weights=None)
        self._setup(backbone, spec, net, resolution)
        if not spec.entry:
            self.replace_classifier(num_classes)

    @classmethod
    def from_network(cls, spec: BackboneSpec, net: nn.Module, resolution: int) -> StagedNet:
        """A staged view of an already built ``net`` (sharing its modules)."""
        staged = cls.__new__(cls)
        nn.Module.__init__(staged)
        staged._setup(spec.builder, spec, net, resolution)
        return staged

    def _setup(self, backbone: str, spec: BackboneSpec, net: nn.Module, resolution: int) -> None:
        self.spec = spec
        self.backbone = backbone
        self.preprocess = Preprocess(resolution)
        self.net = net
        # torchvision's MobileNetV3 uses BatchNorm momentum 0.01, tuned for long ImageNet runs: after
        # the few hundred steps of a transfer study its running statistics are still far from the
        # data's and evaluation falls to chance. 0.1 (ResNet's value) tracks them.
        for module in self.net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = 0.1
        self.stage_names = ["input", *self.spec.stage_names]
        self._stage_modules = [[self.preprocess]] + [
            [self.net.get_submodule(path) for path in paths] for _, paths in self.spec.stages
        ]
        # parameters held by the network itself (a ViT's class token and position embedding) are
        # used by stage 1, which runs the network's own entry method up to stage 2
        self._stage_extra = {1: list(self.net.parameters(recurse=False))} if spec.entry else {}
        self.frozen_through: str = NO_FREEZE

    def replace_classifier(self, num_classes: int) -> None:
        from tlselect.training.zoo import replace_linear

        replace_linear(self.net, self.spec.classifier, num_classes)

    def stage_index(self, name: str) -> int:
        """Index (for ``forward``'s start/stop) of the stage called ``name``."""
        if name == NO_FREEZE:
            return 0
        try:
            return self.stage_names.index(name)
        except ValueError:
            raise BackboneError(
                f"backbone {self.backbone} has no stage {name!r}; stages: {', '.join(self.spec.stage_names)}"
            ) from None

    def _run_entry(self, x: torch.Tensor) -> torch.Tensor:
        """Stage 1 through the network's entry method, stopped where stage 2 would start."""

        def stop(module, args):
            raise _StageEnd(args[0])

        handle = self._stage_modules[2][0].register_forward_pre_hook(stop)
        try:
            getattr(self.net, self.spec.entry)(x)
        except _StageEnd as end:
            return end.value
        finally:
            handle.remove()
        raise BackboneError(f"backbone {self.backbone}: stage 2 never ran")

    def forward(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        last = len(self._stage_modules) if stop is None else stop
        for index in range(start, last):
            if index == 1 and self.spec.entry:
                x = self._run_entry(x)
                continue
            for module in self._stage_modules[index]:
                x = module(x)
        if stop is None:
            for path in self.spec.head:
                if path == "flatten":
                    x = torch.flatten(x, 1)
                elif path == POOL_FLATTEN:
                    x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1) if x.dim() == 4 else x, 1)
                elif path == "forward_head":
                    x = self.net.forward_head(x)
                else:
                    x = self.net.get_submodule(path)(x)
        return x

    def freeze_through(self, stage: str) -> None:
        """Freeze every stage up to and including ``stage``: no gradients and BatchNorm in eval mode."""
        stop = self.stage_index(stage) + 1 if stage != NO_FREEZE else 0
        self.frozen_through = stage
        for p in self.parameters():
            p.requires_grad_(True)
        for index, modules in enumerate(self._stage_modules[:stop]):
            for p in self._stage_extra.get(index, []):
                p.requires_grad_(False)
            for module in modules:
                for p in module.parameters():
                    p.requires_grad_(False)
        self.train(self.training)

    def frozen_stop(self) -> int:
        """Index of the first trainable stage (0 when nothing is frozen)."""
        return 0 if self.frozen_through == NO_FREEZE else self.stage_index(self.frozen_through) + 1

    def train(self, mode: bool = True) -> StagedNet:
        super().train(mode)
        for modules in self._stage_modules[: self.frozen_stop()]:
            for module in modules:
                module.eval()
        return self


# ---------------------------------------------------------------------------------------------
# Initializations


class InitError(TLSelectError):
    """A pretrained initialization could not be found or does not fit the backbone."""


def imagenet_weights(backbone: str):
    """The torchvision weights enum member for ``backbone``'s ImageNet weights."""
    enum_name, member = backbone_spec(backbone).weights.split(".")
    return getattr(getattr(torchvision.models, enum_name), member)


def imagenet_weights_path(backbone: str) -> Path:
    """Where torchvision caches ``backbone``'s ImageNet weights (under ``$TORCH_HOME``)."""
    url = imagenet_weights(backbone).url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def download_imagenet_weights(backbone: str, place_at: str | Path | None = None) -> Path:
    """torchvision's ImageNet weights file for ``backbone``, downloaded once into ``$TORCH_HOME``.

    Offline, the error names where to put the file: ``place_at`` (the workflow's weights file)
    and torchvision's cache.
    """
    weights = imagenet_weights(backbone)
    path = imagenet_weights_path(backbone)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    hash_prefix = path.stem.rsplit("-", 1)[-1]
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # a dead network fails in seconds instead of hanging
    try:
        torch.hub.download_url_to_file(weights.url, str(path), hash_prefix=hash_prefix, progress=True)
    except (urllib.error.URLError, OSError) as error:
        where = f"{place_at} or at {path}" if place_at else f"{path} (set TORCH_HOME to choose the folder)"
        raise InitError(
            f"cannot download ImageNet weights for {backbone} from {weights.url} ({error}). "
            f"Offline, place that file at {where}, or use init 'source' (a model this workflow "
            "pretrains) or a path to a state-dict file."
        ) from error
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return path


def fetch_imagenet_weights(backbone: str, dest: str | Path, folder: str = "") -> None:
    """Write ``backbone``'s ImageNet state dict to ``dest`` (the file training jobs read), checked first:
    from ``folder`` (``<backbone>.safetensors``, ``.pth`` or ``.pt``) when given, else downloaded by
    torchvision (a table entry, into ``$TORCH_HOME``) or by timm's or torchvision's own mechanism."""
    if folder or backbone_spec(backbone).entry:
        from tlselect.training.zoo import pretrained_state_dict

        try:
            state = pretrained_state_dict(backbone, folder)
        except (OSError, RuntimeError) as error:
            raise InitError(
                f"cannot download pretrained weights for {backbone} ({error}). Offline, set weights_folder to a "
                f"folder holding {backbone}.safetensors or {backbone}.pth, or use init 'source'."
            ) from error
    else:
        state = load_state_dict_file(download_imagenet_weights(backbone, place_at=dest))
    save_torch(dest, state)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a file: a plain state dict or a workflow checkpoint holding one under 'model'."""
    path = Path(path)
    if not path.is_file():
        raise InitError(f"weights file {path} does not exist")
    verify(path)  # a workflow's own weights file carries a checksum
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle.UnpicklingError and friends: refuse, never execute
        raise InitError(
            f"refusing to load {path}: it is not a plain tensor state dict ({type(error).__name__}: "
            f"{str(error).splitlines()[0]}). Save weights with torch.save(model.state_dict(), path)."
        ) from error
    state = loaded.get("model", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InitError(f"{path} holds no state dict of tensors")
    return state


def load_backbone_weights(model: StagedNet, state: dict[str, torch.Tensor], source: str) -> dict:
    """Load all weights but the classifier from ``state``; the classifier stays freshly initialized.

    Raises :class:`InitError` naming the layers when keys are missing or shapes differ. Returns a
    note for the registry record (which keys were skipped).
    """
    own = model.net.state_dict()
    head_prefix = model.spec.classifier + "."
    body = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
    missing = sorted(k for k in own if not k.startswith(head_prefix) and k not in body)
    unexpected = sorted(k for k in body if k not in own)
    mismatched = sorted(
        f"{k} (file {tuple(v.shape)}, model {tuple(own[k].shape)})"
        for k, v in body.items()
        if k in own and v.shape != own[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing layers: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected layers: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    if mismatched:
        problems.append(f"wrong shapes: {', '.join(mismatched[:8])}{' ...' if len(mismatched) > 8 else ''}")
    if problems:
        raise InitError(f"weights from {source} do not fit backbone {model.backbone}: " + "; ".join(problems))
    model.net.load_state_dict(body, strict=False)
    head_keys = sorted(k for k in state if k.startswith(head_prefix))
    return {"source": source, "classifier_replaced": True, "skipped_keys": head_keys}


def initialize(model: StagedNet, init: str, weights: str | None = None) -> dict:
    """Apply an init: 'scratch', 'imagenet', 'source' or a file path.

    ``weights`` is the file holding the init's weights: the pretrained source model (needed for
    'source'), or the workflow's copy of the ImageNet weights ('imagenet'; without it, torchvision's
    cache under ``$TORCH_HOME``, downloaded when missing).
    """
    if init == "scratch":
        return {"source": "scratch", "classifier_replaced": False, "skipped_keys": []}
    if init == "imagenet":
        path = weights or download_imagenet_weights(model.backbone)
        return load_backbone_weights(model, load_state_dict_file(path), "imagenet")
    if init == "source":
        if not weights:
            raise InitError("init 'source' needs the path of the pretrained source model (--weights)")
        return load_backbone_weights(model, load_state_dict_file(weights), f"source:{weights}")
    return load_backbone_weights(model, load_state_dict_file(init), init)
