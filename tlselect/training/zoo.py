"""Any timm or torchvision classification model as a staged backbone: building, stage discovery,
pattern expansion and pretrained weights.

A model's stages are found once, on a dummy image, and kept as plain data (a
:class:`tlselect.core.backbones.BackboneSpec`), so the config check can read them without torch
(:mod:`tlselect.core.backbones` asks this module in a subprocess and caches the answer):

- the model is cut into *units*: the top-level modules in the order its forward calls them, where
  a plain ``nn.Sequential`` holding a stage boundary is opened into its children;
- the boundaries are timm's ``feature_info`` modules, or, for torchvision, every unit that shrinks
  the spatial size (the head starts at the global pool: the first unit whose output is no longer
  an image map, or a 1x1 map from a larger one);
- stage 1 runs the model's own ``forward_features`` (timm) or ``forward`` (torchvision) until the
  first unit of stage 2, so the operations between modules at its start (a ViT's position
  embedding and class token) stay in; later stages run their units in order; timm's head is its
  ``forward_head``, torchvision's the units after the last stage (a global pool and flatten put
  back where the forward does them functionally);
- the stages composed must reproduce the model's output; where they do not (a skip connection across
  stages, operations between modules after stage 1), the model's stages cannot be found and
  :class:`tlselect.core.backbones.BackboneError` says so.
"""

from __future__ import annotations

import fnmatch
import json
import sys
from pathlib import Path

import torch
import torchvision
from torch import nn

from tlselect.core.backbones import BACKBONES, POOL_FLATTEN, TIMM_PREFIX, BackboneError, BackboneSpec, spec_to_dict

DISCOVERY_RESOLUTION = 128  # large enough that every downsampling (32x in all) of an ImageNet model shows


def _timm():
    import timm  # imported where used: most studies never need it

    return timm


def library_and_name(name: str) -> tuple[str, str]:
    """``("timm" | "torchvision", model name)``: a ``timm.`` prefix asks timm; a bare name is
    torchvision's when torchvision has it, else timm's."""
    if name.startswith(TIMM_PREFIX):
        return "timm", name[len(TIMM_PREFIX) :]
    if name in torchvision.models.list_models(module=torchvision.models):
        return "torchvision", name
    if _timm().is_model(name):
        return "timm", name
    raise BackboneError(
        f"unknown backbone {name!r}: neither torchvision.models.list_models() nor timm.list_models() has it; "
        "check the spelling (patterns such as 'resnet*' list the matches)"
    )


def expand(patterns: list[str], cap: int) -> list[str]:
    """Names and patterns (fnmatch: ``resnet*``, ``efficientnet_b[0-2]``) as model names, in the
    order given, each once; a pattern matching more than ``cap`` models is an error naming some."""
    names: list[str] = []
    for pattern in patterns:
        if pattern in BACKBONES or not any(c in pattern for c in "*?["):
            matches = [pattern]
        elif pattern.startswith(TIMM_PREFIX):
            matches = [TIMM_PREFIX + m for m in _timm().list_models(pattern[len(TIMM_PREFIX) :])]
        else:
            tv = torchvision.models.list_models(module=torchvision.models)
            matches = sorted(fnmatch.filter(tv, pattern))
            matches += [m for m in _timm().list_models(pattern) if m not in matches]
        if not matches:
            raise BackboneError(f"search.backbones: pattern {pattern!r} matches no torchvision or timm model")
        if len(matches) > cap:
            raise BackboneError(
                f"search.backbones: pattern {pattern!r} matches {len(matches)} models ({', '.join(matches[:6])}, ...), "
                f"more than search.max_backbones ({cap}); narrow the pattern or raise search.max_backbones"
            )
        names += [m for m in matches if m not in names]
    return names


def build_network(spec: BackboneSpec, num_classes: int, resolution: int) -> nn.Module:
    """The library's network for ``spec``, random init, its classifier sized for ``num_classes``."""
    if spec.library == "timm":
        timm = _timm()
        try:  # a ViT's position embedding is sized for its input
            return timm.create_model(spec.builder, num_classes=num_classes, img_size=resolution)
        except TypeError:
            return timm.create_model(spec.builder, num_classes=num_classes)
    net = torchvision.models.get_model(spec.builder, weights=None)
    replace_linear(net, spec.classifier, num_classes)
    return net


def replace_linear(net: nn.Module, path: str, num_classes: int) -> None:
    """Swap the ``nn.Linear`` at ``path`` for a fresh one with ``num_classes`` outputs."""
    old = net.get_submodule(path)
    parent_path, _, leaf = path.rpartition(".")
    parent = net.get_submodule(parent_path) if parent_path else net
    setattr(parent, leaf, nn.Linear(old.in_features, num_classes))


def _plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _units(net: nn.Module, opens) -> list[str]:
    """Module paths of the units: ``net``'s children, a child opened into its own when ``opens(path, module)``."""
    out = []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if _plain_sequential(child) and opens(path, child):
                walk(path + ".", child)
            else:
                out.append(path)

    walk("", net)
    return out


def _called(net: nn.Module, units: list[str], entry, x: torch.Tensor) -> list[tuple[str, tuple, tuple]]:
    """``(path, input shape, output shape)`` of the units ``entry(x)`` calls, in call order (each once)."""
    calls: list[tuple[str, tuple, tuple]] = []
    handles = []
    for path in units:

        def hook(module, args, output, path=path):
            shape_in = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else ()
            shape_out = tuple(output.shape) if isinstance(output, torch.Tensor) else ()
            calls.append((path, shape_in, shape_out))

        handles.append(net.get_submodule(path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            entry(x)
    finally:
        for handle in handles:
            handle.remove()
    seen = [path for path, _, _ in calls]
    if len(seen) != len(set(seen)):
        raise BackboneError("a module runs more than once in the forward pass")
    return calls


def _timm_layout(net: nn.Module, x: torch.Tensor) -> tuple[list[list[str]], tuple[str, ...]]:
    boundaries = [info.get("module", "") for info in getattr(net, "feature_info", []) or []]
    boundaries = [b for b in boundaries if b]
    if len(boundaries) < 2:
        raise BackboneError("timm's feature_info names fewer than two stage modules")

    def opens(path, module):
        return any(b.startswith(path + ".") for b in boundaries)

    calls = [path for path, _, _ in _called(net, _units(net, opens), net.forward_features, x)]
    stages, current, ends = [], [], set(boundaries)
    unplaced = ends - set(calls)
    if unplaced:
        raise BackboneError(f"feature_info's modules {sorted(unplaced)} are not units run in order")
    last_end = max(calls.index(b) for b in boundaries)
    for index, path in enumerate(calls):
        current.append(path)
        if (path in ends and index < last_end) or index == len(calls) - 1:
            stages.append(current)
            current = []
    return stages, ("forward_head",)


def _torchvision_layout(net: nn.Module, x: torch.Tensor) -> tuple[list[list[str]], tuple[str, ...]]:
    calls = _called(net, _units(net, lambda path, module: True), net.forward, x)
    stages: list[list[str]] = []
    head: list[str] = []
    previous_out: tuple = tuple(x.shape)
    for path, shape_in, shape_out in calls:
        image_in, image_out = len(shape_in) == 4, len(shape_out) == 4
        if head or not image_in or not image_out or (shape_out[-2:] == (1, 1) and shape_in[-1] > 1):
            if len(previous_out) == 4 and len(shape_in) == 2:
                head.append(POOL_FLATTEN)  # the forward pools and flattens functionally here
            head.append(path)
        elif not stages or shape_out[-1] < shape_in[-1]:
            stages.append([path])
        else:
            stages[-1].append(path)
        previous_out = shape_out
    return stages, tuple(head)


def discover(name: str) -> BackboneSpec:
    """``name``'s stages, head and classifier, checked: the stages composed give the model's output."""
    if name in BACKBONES:
        return BACKBONES[name]
    library, model_name = library_and_name(name)
    x = torch.rand(1, 3, DISCOVERY_RESOLUTION, DISCOVERY_RESOLUTION)
    if library == "timm":
        net = build_network(BackboneSpec(model_name, "", (), (), "", "timm"), 1000, DISCOVERY_RESOLUTION)
        classifier = net.pretrained_cfg.get("classifier", "")
        find = _timm_layout
    else:
        net = torchvision.models.get_model(model_name, weights=None)
        linears = [path for path, module in net.named_modules() if isinstance(module, nn.Linear)]
        classifier = linears[-1] if linears else ""
        find = _torchvision_layout
    net.eval()
    try:
        if not isinstance(classifier, str) or not isinstance(net.get_submodule(classifier), nn.Linear):
            raise BackboneError(f"its classifier ({classifier!r}) is not one nn.Linear")
        stages, head = find(net, x)
        if len(stages) < 2:
            raise BackboneError(f"only {len(stages)} stage(s) found")
        spec = BackboneSpec(
            builder=model_name,
            weights="",
            stages=tuple((f"stage{i + 1}", tuple(units)) for i, units in enumerate(stages)),
            head=head,
            classifier=classifier,
            library=library,
            entry="forward_features" if library == "timm" else "forward",
        )
        _check_composes(spec, net, x)
    except (BackboneError, RuntimeError, AttributeError) as error:
        raise BackboneError(
            f"backbone {name!r}: its stages cannot be found ({error}); pick another model, or add it to "
            "BACKBONES in tlselect/core/backbones.py with its stages written out (docs/pools.md)"
        ) from None
    return spec


def _check_composes(spec: BackboneSpec, net: nn.Module, x: torch.Tensor) -> None:
    from tlselect.training.models import StagedNet  # the runner that will use the spec

    staged = StagedNet.from_network(spec, net, resolution=x.shape[-1]).eval()
    with torch.no_grad():
        want = net(x)
        got = staged(x)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-3, atol=1e-4):
        raise BackboneError("running the stages in order does not reproduce the model's output")


def pretrained_state_dict(name: str, folder: str = "") -> dict[str, torch.Tensor]:
    """``name``'s pretrained weights: ``folder/<name>.{safetensors,pth,pt}`` when ``folder`` is given,
    else timm's or torchvision's own download (online)."""
    if folder:
        for suffix in (".safetensors", ".pth", ".pt"):
            path = Path(folder) / f"{name}{suffix}"
            if path.is_file():
                if suffix == ".safetensors":
                    from safetensors.torch import load_file

                    return load_file(str(path))
                from tlselect.training.models import load_state_dict_file

                return load_state_dict_file(path)
        raise BackboneError(
            f"weights_folder: no {name}.safetensors, {name}.pth or {name}.pt in {folder}; put the model's "
            "state dict there or leave weights_folder empty to download it"
        )
    library, model_name = library_and_name(name)
    if library == "timm":
        return _timm().create_model(model_name, pretrained=True).state_dict()
    weights = torchvision.models.get_model_weights(model_name).DEFAULT
    return weights.get_state_dict(progress=True)


def main(argv: list[str]) -> None:
    """``python -m tlselect.training.zoo CAP KNOWN NAME_OR_PATTERN...``: prints ``{"names": [...],
    "specs": {...}}`` (the specs of the names neither the table nor the comma-separated ``KNOWN``
    holds) or ``{"error": ...}`` as JSON (what :mod:`tlselect.core.backbones` reads)."""
    try:
        names = expand(argv[2:], int(argv[0]))
        skip = {*BACKBONES, *argv[1].split(",")}
        out = {"names": names, "specs": {n: spec_to_dict(discover(n)) for n in names if n not in skip}}
    except BackboneError as error:
        out = {"error": str(error)}
    print(json.dumps(out))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
