"""Horizontal fusion: B runs of one architecture trained as one network.

After Wang et al., "Horizontally Fused Training Array" (HFTA, MLSys 2021), section 3: runs of the
same shape are stacked along the channels, so that one grouped convolution (``groups=B``; a
depthwise one, ``groups=B*C``) does the work of B, one BatchNorm over ``B*C`` channels keeps every
run's statistics apart (they are per channel), and linear layers become one batched matmul. The
input is the B runs' batches stacked along the channels too, ``(N, B*3, H, W)``, so each run may
see its own images (its own data order and augmentation).

Unlike HFTA's fused modules, a :class:`FusedStagedNet` holds no tensors of its own: every weight,
gradient, BatchNorm running statistic and optimizer state stays in the B member networks (ordinary
:class:`~tlselect.training.models.StagedNet`). Each step concatenates the members' weights
(the concatenation's backward hands each member its own slice of the gradient) and copies the
updated running statistics back. So each run keeps its own ordinary optimizer (SGD or AdamW with
its own learning rate, momentum and weight decay), its state dict is its member's, unchanged, and
going from B networks to the fused one and back is exact by construction. (``torch.func``'s
``stack_module_state`` with ``vmap`` would stack the weights instead, but BatchNorm's in-place
running-statistic updates do not run under ``vmap``'s functional calls, which these backbones
need in every training step.)

Dropout draws each run's mask from that run's own generator, as the run's unfused ``nn.Dropout``
draws from torch's global one on a CPU; on a GPU the masks are drawn on the CPU and copied (the
same masks as on a CPU, not those of an unfused run on the GPU, which come from CUDA's generator).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torchvision.models.mobilenetv3 import InvertedResidual, MobileNetV3
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import SqueezeExcitation

from tlselect.core.errors import TLSelectError
from tlselect.training.models import Preprocess, StagedNet

# Modules whose own forward combines their children only channel by channel (adds, products,
# activations): fused children make them fused.
CONTAINERS = (nn.Sequential, BasicBlock, Bottleneck, InvertedResidual, SqueezeExcitation, ResNet, MobileNetV3)
# Modules without tensors that work channel by channel: the fused network uses them as they are.
STATELESS = (nn.ReLU, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.MaxPool2d, nn.AdaptiveAvgPool2d,
             nn.Identity, nn.Flatten)  # fmt: skip


class FusionError(TLSelectError):
    """Networks that cannot be fused: the message names the module and why."""


def _same(members: list[nn.Module], *attributes: str) -> None:
    for name in attributes:
        values = {repr(getattr(m, name)) for m in members}
        if len(values) > 1:
            raise FusionError(f"cannot fuse {type(members[0]).__name__}s that differ in {name}: {sorted(values)}")


class FusedConv2d(nn.Module):
    """B convolutions as one grouped convolution over channel-stacked inputs."""

    def __init__(self, members: list[nn.Conv2d]):
        super().__init__()
        _same(members, "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")
        if members[0].padding_mode != "zeros":
            raise FusionError(f"cannot fuse a convolution with padding mode {members[0].padding_mode!r}")
        if len({m.bias is None for m in members}) > 1:
            raise FusionError("cannot fuse convolutions with and without a bias")
        self.members = list(members)  # a plain list: the members' tensors are theirs, not this module's
        self.groups = len(members) * members[0].groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.members[0]
        weight = torch.cat([m.weight for m in self.members])
        bias = None if first.bias is None else torch.cat([m.bias for m in self.members])
        return nn.functional.conv2d(x, weight, bias, first.stride, first.padding, first.dilation, self.groups)


class FusedBatchNorm2d(nn.Module):
    """B BatchNorms as one over ``B*C`` channels; each member keeps its running statistics."""

    def __init__(self, members: list[nn.BatchNorm2d]):
        super().__init__()
        _same(members, "num_features", "eps", "momentum", "affine", "track_running_stats")
        if members[0].momentum is None or not members[0].track_running_stats:
            raise FusionError("cannot fuse a BatchNorm without running statistics or with a cumulative average")
        self.members = list(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, members = self.members[0], self.members
        mean = torch.cat([m.running_mean for m in members])
        var = torch.cat([m.running_var for m in members])
        weight = torch.cat([m.weight for m in members]) if first.affine else None
        bias = torch.cat([m.bias for m in members]) if first.affine else None
        out = nn.functional.batch_norm(x, mean, var, weight, bias, self.training, first.momentum, first.eps)
        if self.training:  # batch_norm updated the concatenated statistics: each member takes its slice
            with torch.no_grad():
                count = first.num_features
                torch._foreach_copy_([m.running_mean for m in members], list(mean.split(count)))
                torch._foreach_copy_([m.running_var for m in members], list(var.split(count)))
                torch._foreach_add_([m.num_batches_tracked for m in members], 1)
        return out


class FusedLinear(nn.Module):
    """B linear layers as one batched matmul: ``(N, B*in)`` to ``(N, B*out)``."""

    def __init__(self, members: list[nn.Linear]):
        super().__init__()
        _same(members, "in_features", "out_features")
        if any(m.bias is None for m in members):
            raise FusionError("cannot fuse linear layers without a bias")
        self.members = list(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size, first = len(self.members), self.members[0]
        weight = torch.stack([m.weight for m in self.members])  # (B, out, in)
        bias = torch.stack([m.bias for m in self.members])  # (B, out)
        runs = x.reshape(len(x), size, first.in_features).transpose(0, 1)  # (B, N, in)
        out = torch.baddbmm(bias.unsqueeze(1), runs, weight.transpose(1, 2))  # (B, N, out)
        return out.transpose(0, 1).reshape(len(x), size * first.out_features)


class FusedDropout(nn.Module):
    """B dropouts, each run's mask drawn from its own generator as an unfused CPU run draws it."""

    def __init__(self, members: list[nn.Dropout], generators: list[torch.Generator]):
        super().__init__()
        _same(members, "p")
        self.p, self.generators = members[0].p, generators

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        runs = x.reshape(len(x), len(self.generators), -1)
        # what torch's CPU dropout does: a Bernoulli(1 - p) mask in the input's shape, divided by 1 - p
        masks = [
            torch.empty(runs[:, b].shape, dtype=x.dtype).bernoulli_(1 - self.p, generator=g).div_(1 - self.p)
            for b, g in enumerate(self.generators)
        ]
        return x * torch.stack(masks, 1).to(x.device).view_as(x)


def fused_preprocess(preprocess: Preprocess, size: int) -> Preprocess:
    """The members' preprocessing (normalization, resizing) for ``size`` runs' channel-stacked images."""
    fused = Preprocess(preprocess.resolution)
    fused.mean, fused.std = preprocess.mean.repeat(1, size, 1, 1), preprocess.std.repeat(1, size, 1, 1)
    return fused


def fuse_modules(members: list[nn.Module], generators: list[torch.Generator], fused: dict) -> nn.Module:
    """The fused counterpart of ``members`` (one module of each network, same place); ``fused`` maps
    the first member's modules to theirs, so the stages can find them."""
    first = members[0]
    if len({type(m) for m in members}) > 1:
        raise FusionError(f"cannot fuse modules of different types: {sorted({type(m).__name__ for m in members})}")
    if isinstance(first, nn.Conv2d):
        result = FusedConv2d(members)
    elif isinstance(first, nn.BatchNorm2d):
        result = FusedBatchNorm2d(members)
    elif isinstance(first, nn.Linear):
        result = FusedLinear(members)
    elif isinstance(first, nn.Dropout):
        result = FusedDropout(members, generators)
    elif isinstance(first, STATELESS):
        result = first
    elif isinstance(first, CONTAINERS) and not first._parameters and not first._buffers:
        result = copy.copy(first)  # its attributes (a block's use_res_connect, ...), other children
        result._modules = {
            name: fuse_modules([m.get_submodule(name) for m in members], generators, fused) for name in first._modules
        }
    else:
        raise FusionError(
            f"cannot fuse {type(first).__name__}: no fused form of it (tlselect/training/fusion.py); "
            "train these runs one after another"
        )
    fused[id(first)] = result
    return result


class FusedStagedNet(StagedNet):
    """B networks (:class:`StagedNet`) of one backbone, resolution, class count and freeze depth as one
    network: ``forward`` takes ``(N, B*3, H, W)`` (run ``b``'s images in channels ``3b..3b+2``) and
    returns ``(N, B*classes)`` logits; :meth:`split` makes them ``(N, B, classes)``. Its stages,
    frozen prefix (in eval mode) and head are StagedNet's; its tensors are the members'."""

    def __init__(self, members: list[StagedNet], generators: list[torch.Generator] | None = None):
        nn.Module.__init__(self)
        _same(members, "backbone", "frozen_through")
        _same([m.preprocess for m in members], "resolution")
        self.members = list(members)
        self.generators = generators or [torch.default_generator] * len(members)
        first = members[0]
        self.spec, self.backbone, self.stage_names = first.spec, first.backbone, first.stage_names
        self.frozen_through = first.frozen_through
        self.preprocess = fused_preprocess(first.preprocess, len(members))
        fused = {id(first.preprocess): self.preprocess}
        self.net = fuse_modules([m.net for m in members], self.generators, fused)
        self._stage_modules = [[fused[id(module)] for module in stage] for stage in first._stage_modules]
        self.train(first.training)

    def split(self, logits: torch.Tensor) -> torch.Tensor:
        """``(N, B*classes)`` logits as ``(N, B, classes)``: run ``b``'s are ``[:, b]``."""
        return logits.view(len(logits), len(self.members), -1)


def fused_step(fused: FusedStagedNet, x: torch.Tensor, labels: list, optimizers: list, scalers: list, autocast,
               smoothing: list[float]) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
    """One optimizer step of B fused runs on their batches stacked along the channels (``x``, on the
    device and prepared): one forward and one backward, each run with its own loss (label smoothing
    ``smoothing[b]``), optimizer and gradient scaler, inside ``autocast``. Returns the logits,
    ``(N, B, classes)``, and the B losses."""
    with autocast:
        logits = fused.split(fused(x))
    losses = [
        nn.functional.cross_entropy(logits[:, b].float(), y, label_smoothing=s)
        for b, (y, s) in enumerate(zip(labels, smoothing, strict=True))
    ]
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    # one backward for all: each run's loss reaches only its own weights
    sum(scaler.scale(loss) for scaler, loss in zip(scalers, losses, strict=True)).backward()
    for optimizer, scaler in zip(optimizers, scalers, strict=True):
        scaler.step(optimizer)
        scaler.update()
    return logits, losses
