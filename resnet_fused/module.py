"""FusedResidual, the drop-in block.

FusedResidual has the parameters and buffers of the block it replaces, under the
same names, so state_dict, torch.save/load, deepcopy, .to(), .half() and
channels_last behave as for the plain block:
- built directly or from a D2L Residual: conv1, conv2, [conv3], bn1, bn2;
- converted from torchvision's BasicBlock: conv1, bn1, conv2, bn2,
  [downsample = Sequential(conv, BatchNorm2d)], so torchvision checkpoints load.
Converting whole models: conversion.py (fuse_model).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import backends, distributed
from .blocks import BlockParts, block_parts, check_parts
from .fold import block_tensors, folded
from .plan import MIXED, PLAN_CACHE_SIZE, TRAIN, check_input, make_plan
from .reference import plain_block_forward

# One C call saying whether any autocast region is active, so the common call skips
# the per-device query (the public torch.is_autocast_enabled(device) decides after it).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


class FusedResidual(nn.Module):
    """A ResNet basic block computed by fused kernels.

    Same constructor as D2L's Residual(input_channels, num_channels, use_1x1conv,
    strides), plus `backend` ("auto", "torch", "native", "triton"). Training mode
    uses batch statistics and updates the running statistics as nn.BatchNorm2d
    does; eval mode folds BN into the convolutions (cached). The output keeps the
    input's memory format (NCHW or channels_last). BN children that are
    nn.SyncBatchNorm (convert_sync_batchnorm, before or after conversion) normalise
    over their process group in training (resnet_fused/distributed.py).
    """

    def __init__(self, input_channels: int, num_channels: int, use_1x1conv: bool = False,
                 strides: int = 1, *, backend: str = "auto"):
        super().__init__()
        # Mirrors reference.Residual.__init__ on purpose: the same modules created in the
        # same order, so the same seed gives the same weights as the plain block.
        self.conv1 = nn.Conv2d(input_channels, num_channels, kernel_size=3, padding=1,
                               stride=strides)
        self.conv2 = nn.Conv2d(num_channels, num_channels, kernel_size=3, padding=1)
        if use_1x1conv:
            self.conv3 = nn.Conv2d(input_channels, num_channels, kernel_size=1, stride=strides)
        self.bn1 = nn.BatchNorm2d(num_channels)
        self.bn2 = nn.BatchNorm2d(num_channels)
        self._layout = "d2l"
        self.backend = backends.check_name(backend)
        check_parts(self._block_parts())

    # conv3 / bn3 live in `conv3` (D2L) or in `downsample` (torchvision names).
    @property
    def conv3(self) -> Optional[nn.Conv2d]:
        if "conv3" in self._modules:
            return self._modules["conv3"]
        ds = self._modules.get("downsample")
        return ds[0] if ds is not None else None

    @property
    def bn3(self) -> Optional[nn.BatchNorm2d]:
        ds = self._modules.get("downsample")
        return ds[1] if ds is not None else None

    @property
    def in_channels(self) -> int:
        return self.conv1.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv1.out_channels

    @property
    def stride(self) -> int:
        return self.conv1.stride[0]

    def _block_parts(self) -> BlockParts:
        """This block's parts (blocks.block_parts asks the block itself)."""
        return BlockParts(self.conv1, self.bn1, self.conv2, self.bn2, self.conv3, self.bn3,
                          self._layout)

    @classmethod
    def from_residual(cls, block: nn.Module, backend: str = "auto") -> "FusedResidual":
        """A FusedResidual computing `block` (D2L Residual, its 3x3-projection variant,
        or torchvision's BasicBlock). It shares `block`'s parameters and buffers (the
        same tensors); deepcopy the block first for an independent copy. Raises
        ConversionError saying why when the block does not fit."""
        p = block_parts(block)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        mine = {"conv1": p.conv1, "bn1": p.bn1, "conv2": p.conv2, "bn2": p.bn2}
        if p.conv3 is not None:
            if p.layout == "torchvision":
                mine["downsample"] = block._modules["downsample"]
            else:
                mine["conv3"] = p.conv3
        # Register in the source block's order, so state_dict keys come out in its order.
        order = [n for n in block._modules if n in mine]
        for name in order + [n for n in mine if n not in order]:
            setattr(self, name, mine[name])
        if p.layout == "torchvision" and p.conv3 is None:
            self.downsample = None
        self._layout = p.layout
        self.backend = backends.check_name(backend)
        # The block's own flag only: self.train() would also reset the submodules, and a
        # BN deliberately left in eval (frozen BN) must stay so.
        self.training = block.training
        return self

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"

    # Derived state, kept in __dict__: "_plans" (plan.py, per input signature) and
    # "_fold_cache" (fold.py). Neither is saved or copied (it holds tensors and backend
    # objects); a copy plans and folds again on its first call.
    _DERIVED = ("_plans", "_fold_cache")

    def __getstate__(self):
        state = self.__dict__.copy()
        for name in self._DERIVED:
            state.pop(name, None)
        return state

    def _apply(self, fn, *args, **kwargs):
        for name in self._DERIVED:  # .to()/.half(): plan and fold for the new tensors
            self.__dict__.pop(name, None)
        return super()._apply(fn, *args, **kwargs)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            check_input(self, x)
        compiling = torch.compiler.is_compiling()
        if (compiling or _any_autocast()) and torch.is_autocast_enabled(x.device.type):
            # The block runs in the autocast dtype (convolutions autocast to it anyway;
            # BN statistics accumulate in float32 inside the ops). The output is in
            # that dtype, as the plain blocks' in-place `Y += X` / `out += identity`
            # leaves it.
            check_input(self, x, dtype=False)
            dev = x.device.type
            with torch.autocast(dev, enabled=False):
                return self._run(x.to(torch.get_autocast_dtype(dev)), compiling, True)
        return self._run(x, compiling, False)

    def _run(self, x: torch.Tensor, compiling: bool, autocast: bool) -> torch.Tensor:
        # The BatchNorm modules' own modes decide, as in the plain block: a model in
        # train() whose BNs were put in eval() (frozen-BN fine-tuning) normalises with
        # running statistics. Read off the dicts: this runs on every call.
        mods = self._modules
        bn1, bn2, ds = mods["bn1"], mods["bn2"], mods.get("downsample")
        bn3 = None if ds is None else tuple(ds._modules.values())[1]  # = self.bn3
        modes = ((bn1.training, bn2.training) if bn3 is None
                 else (bn1.training, bn2.training, bn3.training))
        plan = (make_plan(self, x, modes, autocast) if compiling
                else self._plan(x, modes, autocast))
        if plan.copy:
            x = x.contiguous(memory_format=plan.memory_format)
        if plan.mode == TRAIN:
            groups = distributed.block_groups((bn1, bn2, bn3), x.device)
            return plan.backend.forward_train(self, x, groups=groups)
        if plan.mode == MIXED:  # no fused path computes a mix of BN modes
            return plain_block_forward(self, x)
        if torch.is_grad_enabled() and not torch.compiler.is_exporting() and (
                x.requires_grad or any(t.requires_grad for t in block_tensors(self))):
            # Eval while autograd records (frozen-BN fine-tuning, saliency maps):
            # unfolded, so every gradient, BN's weight and bias included, has the plain
            # block's numerics (a bf16-folded weight would round the gradient of gamma).
            # Inference under torch.no_grad()/inference_mode() takes the folded kernels,
            # and so does torch.export, which traces with grad mode on: an exported eval
            # model is served, and must keep the fused ops in its graph.
            return plain_block_forward(self, x)
        return plan.backend.forward_eval(self, folded(self, x.dtype, plan.memory_format), x)

    def _plan(self, x: torch.Tensor, modes: tuple, autocast: bool):
        """The plan of x's signature (plan.py): kept per signature, made on a miss."""
        w = self._modules["conv1"]._parameters["weight"]
        try:
            key = (x.shape, x.stride(), x.dtype, x.device, self.backend, modes, autocast,
                   self._modules["conv1"], w.dtype, w.device)
        except RuntimeError:  # a tensor without strides (sparse, mkldnn): say what it is
            check_input(self, x)
            raise
        plans = self.__dict__.get("_plans")
        plan = plans.get(key) if plans is not None else None
        if plan is None:
            plan = make_plan(self, x, modes, autocast)  # raises for a bad input: nothing is kept
            if plans is None or len(plans) >= PLAN_CACHE_SIZE:
                plans = self.__dict__["_plans"] = {}
            plans[key] = plan
        return plan
