"""FusedResidual, the drop-in block, for basic and bottleneck blocks alike.

FusedResidual holds a BlockSpec (spec.py: its stages and shortcut by module path)
and the user's modules under the user's names, so state_dict, torch.save/load,
deepcopy, .to(), .half() and channels_last behave as for the plain block:
- built directly or from a D2L Residual: conv1, conv2, [conv3], bn1, bn2;
- converted from torchvision's BasicBlock / Bottleneck or timm's: conv1, bn1, conv2,
  bn2, [conv3, bn3], [downsample = Sequential(conv, BatchNorm2d)], so their
  checkpoints load.
Converting whole models: conversion.py (fuse_model).
"""
from __future__ import annotations

import torch
from torch import fx, nn

from . import backends, distributed, spec, tracing
from .blocks import ConversionError, block_stride, bn_training, check_parts
from .fold import block_tensors, folded
from .matching import spec_of
from .plan import EMPTY, MIXED, PLAN_CACHE_SIZE, TRAIN, check_input, make_plan
from .reference import plain_parts_forward

# One C call saying whether any autocast region is active, so the common call skips
# the per-device query (the public torch.is_autocast_enabled(device) decides after it).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


class FusedResidual(nn.Module):
    """A ResNet residual block (basic or bottleneck) computed by fused kernels.

    Same constructor as D2L's Residual(input_channels, num_channels, use_1x1conv,
    strides), plus `backend` ("auto", "torch", "native", "triton", "eager"). Training mode
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
        self._spec = spec.D2L_PROJECTION if use_1x1conv else spec.D2L_IDENTITY
        self.backend = backends.check_name(backend)
        check_parts(self._spec, self.parts())

    def parts(self) -> spec.Parts:
        """The modules the spec names, looked up now (dict lookups: every call uses it;
        a SyncBatchNorm conversion swaps BN objects under the same names)."""
        return spec.resolve(self, self._spec)

    @property
    def in_channels(self) -> int:
        return self.parts().stages[0].conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.parts().stages[-1].conv.out_channels

    @property
    def stride(self) -> int:
        return block_stride(self.parts())

    @classmethod
    def from_residual(cls, block: nn.Module, backend: str = "auto") -> "FusedResidual":
        """A FusedResidual computing what `block` computes (its forward is traced and
        matched: matching.py; D2L's Residual, torchvision's and timm's BasicBlock and
        Bottleneck among others). It shares `block`'s parameters and buffers (the same
        tensors); deepcopy the block first for an independent copy. Raises
        ConversionError naming the part that does not fit."""
        block_spec = spec_of(block)
        check_parts(block_spec, spec.resolve(block, block_spec))
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        # The top-level children the spec's paths start with, in the source block's
        # order (state_dict keys and their order are the source's); its None children
        # too (torchvision's `downsample = None`), which hold nothing.
        tops = {p.split(".")[0] for p in block_spec.module_paths()}
        for name, child in block._modules.items():
            if name in tops or child is None:
                self._modules[name] = child
        self._spec = block_spec
        self._source_class = type(block).__name__  # what explain() reports
        self.backend = backends.check_name(backend)
        # The block's own flag only: self.train() would also reset the submodules, and a
        # BN deliberately left in eval (frozen BN) must stay so.
        self.training = block.training
        if list(self.state_dict()) != list(block.state_dict()):
            # matching.py checked every parameter and buffer; this also covers a
            # module's extra state, so a checkpoint never loses an entry.
            lost = set(block.state_dict()) - set(self.state_dict())
            raise ConversionError(f"its state_dict entries {sorted(lost)} would not be "
                                  "kept by the fused block")
        return self

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"

    # Derived state, kept in __dict__: "_plans" (plan.py, per input signature),
    # "_fold_cache" (fold.py) and "_resolution" (_resolved()). None is saved or copied (it
    # holds tensors, modules and backend objects); a copy plans, folds and resolves
    # again on its first call.
    _DERIVED = ("_plans", "_fold_cache", "_resolution")

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
            if isinstance(x, fx.Proxy):  # torch.fx: one call_module node (tracing.py)
                return tracing.fx_call(self, x)
            check_input(self, x)
        compiling = torch.compiler.is_compiling()
        # ONNX export (torch.export or TorchScript tracing underneath) and
        # torch.jit.trace record what tracing.py says.
        if compiling or tracing.jit_tracing():
            if torch.onnx.is_in_onnx_export():
                return tracing.onnx_forward(self, x)
            if not compiling:
                return tracing.jit_forward(self, x)
        return self._call(x, compiling)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling it.
        raise tracing.script_error()

    def _call(self, x: torch.Tensor, compiling: bool) -> torch.Tensor:
        """forward of a tensor; compiling: traced once per graph (torch.compile,
        torch.export, torch.jit.trace), so nothing is kept."""
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
        # running statistics. Read off the modules: this runs on every call.
        if compiling:  # traced once per graph: resolved as written, nothing kept
            parts = self.parts()
            bns, sync = parts.bns(), True
        else:
            parts, bns, sync, _ = self._resolved()
        # A frozen BN (torchvision's FrozenBatchNorm2d) never trains, whatever its flag.
        modes = tuple([bn_training(bn) for bn in bns])
        plan = (make_plan(self, x, modes, autocast) if compiling
                else self._plan(parts, x, modes, autocast))
        if plan.copy:
            x = x.contiguous(memory_format=plan.memory_format)
        if plan.mode == TRAIN:
            groups = distributed.block_groups(bns, x.device, self._spec) if sync else None
            return plan.backend.forward_train(parts, x, groups=groups)
        if plan.mode in (MIXED, EMPTY):  # no fused path computes a mix of BN modes;
            # an empty batch computes nothing, as the plain block does
            return plain_parts_forward(parts, x)
        if torch.is_grad_enabled() and not torch.compiler.is_exporting() and (
                x.requires_grad or any(t.requires_grad for t in block_tensors(parts))) and (
                not torch.jit.is_tracing()):
            # Every BN on its running statistics while autograd records (frozen-BN
            # fine-tuning, saliency maps): the frozen path, unfolded, so every gradient,
            # BN's weight and bias included, is computed from the unrounded parameters
            # (a bf16-folded weight would round the gradient of gamma).
            # Inference under torch.no_grad()/inference_mode() takes the folded kernels,
            # and so does torch.export, which traces with grad mode on: an exported eval
            # model is served, and must keep the fused ops in its graph. So does
            # torch.jit.trace, whose check re-traces under no_grad (tracing.py).
            return plan.backend.forward_frozen(parts, x)
        return plan.backend.forward_eval(
            parts, folded(self, parts, x.dtype, plan.memory_format), x)

    def _resolved(self) -> tuple:
        """(parts, bns, sync, edges): parts() and its BNs, whether any is an
        nn.SyncBatchNorm, and every (owner, name, child) step of the spec's module
        paths. Kept, and re-checked on each call by identity along those steps, which
        is what resolving does without building the tuples again: a CPU training step
        pays several times the isolated cost of every line of Python before its
        kernels (bench/NOTES.md), and this is most of the block's own. A replaced child
        (a SyncBatchNorm conversion swaps the BNs under the same names) fails the
        check and is resolved anew."""
        r = self.__dict__.get("_resolution")
        if r is not None:
            for owner, name, child in r[3]:
                if owner._modules.get(name) is not child:
                    break
            else:
                return r
        parts = self.parts()
        bns = parts.bns()
        edges = {}
        # A channel gate's `f` calls the gate's submodules: a replaced one re-resolves too.
        inner = tuple(f"{gs.path}.{n.target}" for gs, gp in zip(self._spec.gates, parts.gates)
                      if gp.fn is not None for n in gp.fn.graph.nodes
                      if n.op == "call_module")
        for path in self._spec.module_paths() + inner:
            owner = self
            for name in path.split("."):
                child = owner._modules[name]
                edges[(id(owner), name)] = (owner, name, child)
                owner = child
        r = (parts, bns, any(isinstance(b, nn.SyncBatchNorm) for b in bns),
             tuple(edges.values()))
        self.__dict__["_resolution"] = r
        return r

    def _plan(self, parts, x: torch.Tensor, modes: tuple, autocast: bool):
        """The plan of x's signature (plan.py): kept per signature, made on a miss."""
        conv1 = parts.stages[0].conv
        w = conv1._parameters["weight"]
        try:
            key = (x.shape, x.stride(), x.dtype, x.device, self.backend, modes, autocast,
                   conv1, w.dtype, w.device)
        except RuntimeError:  # a tensor without strides (sparse, mkldnn): say what it is
            check_input(self, x)
            raise
        plans = self.__dict__.get("_plans")
        plan = plans.get(key) if plans is not None else None
        if plan is None:
            # raises for a bad input: nothing is kept
            plan = make_plan(self, x, modes, autocast)
            if plans is None or len(plans) >= PLAN_CACHE_SIZE:
                plans = self.__dict__["_plans"] = {}
            plans[key] = plan
        return plan
