"""BatchNorm folding for eval mode, cached while the block's state is unchanged.

In eval, bn(conv(x)) = conv(x, W * s) + (b - mean) * s + beta with
s = gamma / sqrt(running_var + eps): each stage of the block (spec.py) becomes a
convolution with bias, the projection shortcut one more (its bias joins the last
stage's).
Folding runs in float32 (float64 for float64 modules) and casts once to the
activation dtype.

The result is cached on the module (FoldCache) and refolded when anything it was
folded from changes, which every way of changing a block shows without reading the
values:
- in-place updates (optimizer step, load_state_dict, the running-statistics update
  of a training step) bump the tensor's `_version`;
- a replaced parameter, buffer, BN eps or submodule (`block.conv1.weight =
  nn.Parameter(...)`, `block.bn1 = ...`, load_state_dict(assign=True)) puts another
  object in its module's dict;
- `.to()` / `.half()` on the block drop the cache (FusedResidual._apply); on a child
  alone, or `p.data = t`, they swap the tensor's storage (another data_ptr).
Writes through `p.data` (`p.data.mul_(2)`) bypass the version counter and are not
seen, as autograd does not see them either. Inference tensors (made under
torch.inference_mode()) keep no version, so such blocks refold on every call. A fold
made while a CUDA graph captures is not cached (graph_capture.py).
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import nn

from . import graph_capture
from .backends.base import FoldedBlock, FoldedConv
from .tracing import jit_tracing
from .blocks import bn_eps


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def fold_conv_bn(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d]):
    """(weight, bias) of conv followed by eval-mode bn, in float32/float64, bias always
    present (zeros when the conv has none)."""
    acc = _acc_dtype(conv.weight)
    w = conv.weight.to(acc)
    b = conv.bias.to(acc) if conv.bias is not None else w.new_zeros(w.shape[0])
    if bn is None:
        return w, b
    scale = bn.weight.to(acc) * torch.rsqrt(bn.running_var.to(acc) + bn_eps(bn))
    return w * scale.view(-1, 1, 1, 1), (b - bn.running_mean.to(acc)) * scale + bn.bias.to(acc)


def _folded_conv(conv: nn.Conv2d, w, b, dtype, memory_format) -> FoldedConv:
    return FoldedConv(w.to(dtype).contiguous(memory_format=memory_format),
                      None if b is None else b.to(dtype), conv.stride[0], conv.padding[0],
                      conv.dilation[0], conv.groups)


def fold_block(parts, dtype: torch.dtype, memory_format: torch.memory_format) -> FoldedBlock:
    """The FoldedBlock of a block (spec.Parts) for activations of `dtype` and
    `memory_format`."""
    raw = [fold_conv_bn(st.conv, st.bn) for st in parts.stages]
    shortcut = None
    if parts.shortcut is not None:
        sc = parts.shortcut
        w3, b3 = fold_conv_bn(sc.conv, sc.bn)
        if parts.stage_gates(len(parts.stages) - 1):
            # relu(g * y + sc): the gate scales the last stage's bias, not the shortcut's
            shortcut = _folded_conv(sc.conv, w3, b3, dtype, memory_format)
        else:
            w_last, b_last = raw[-1]
            raw[-1] = (w_last, b_last + b3)  # the shortcut's bias rides in the last epilogue
            shortcut = _folded_conv(sc.conv, w3, None, dtype, memory_format)
    stages = tuple(_folded_conv(st.conv, w, b, dtype, memory_format)
                   for st, (w, b) in zip(parts.stages, raw))
    return FoldedBlock(stages, shortcut)


def _stages(parts):
    return parts.stages + ((parts.shortcut,) if parts.shortcut is not None else ())


def block_tensors(parts):
    """Every parameter and buffer of the block's convolutions and BNs (a spec.Parts),
    read straight off their dicts (Module.parameters() walks the module tree)."""
    for st in _stages(parts):
        for m in (st.conv, st.bn):
            if m is not None:
                yield from (t for t in m._parameters.values() if t is not None)
                yield from (t for t in m._buffers.values() if t is not None)
    for gate in parts.gates:  # not folded, but a parameter autograd must reach
        if gate.module is not None:
            yield from gate.module.parameters()


_VERSION = operator.attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr


def _path_slots(block, path: str) -> list:
    """(dict, key) of every submodule along `path` ("downsample.0": the block's
    "downsample", then its "0")."""
    slots, m = [], block
    for name in path.split("."):
        slots.append((m._modules, name))
        m = m._modules[name]
    return slots


def _holder(m: nn.Module, name: str) -> dict:
    """The dict of m that holds `name`: _parameters (nn.BatchNorm2d's weight and bias),
    else _buffers (a frozen BN's)."""
    return m._parameters if name in m._parameters else m._buffers


def _slots(block, parts) -> list:
    """(dict, key) of every object the fold reads: the submodules along each path the
    spec names, each conv's weight and bias, each BN's weight, bias, running
    statistics and eps (a frozen BN holds weight and bias as buffers, and may keep no
    eps: blocks.bn_eps)."""
    slots = []
    for path in block._spec.module_paths():
        slots += [sl for sl in _path_slots(block, path) if sl not in slots]
    for st in _stages(parts):
        slots += [(st.conv._parameters, "weight"), (st.conv._parameters, "bias")]
        if st.bn is not None:
            bn = st.bn
            slots += [(_holder(bn, "weight"), "weight"), (_holder(bn, "bias"), "bias"),
                      (bn._buffers, "running_mean"), (bn._buffers, "running_var"),
                      (bn.__dict__, "eps")]
    return slots


class FoldCache:
    """A block's FoldedBlock with what it was folded from: the objects in each slot
    (held, so no other object can reuse their ids or storage while cached) and the
    version and storage address of each tensor among them. `valid` compares them with
    C-level maps: a few microseconds, no Python loop over the tensors."""

    __slots__ = ("dtype", "memory_format", "dicts", "keys", "objects", "tensors",
                 "versions", "ptrs", "folded")

    def __init__(self, block, parts, dtype, memory_format, result: FoldedBlock):
        slots = _slots(block, parts)
        self.dtype, self.memory_format, self.folded = dtype, memory_format, result
        self.dicts = tuple(d for d, _ in slots)
        self.keys = tuple(k for _, k in slots)
        self.objects = tuple(map(dict.get, self.dicts, self.keys))
        self.tensors = tuple(o for o in self.objects if isinstance(o, torch.Tensor))
        self.versions = tuple(map(_VERSION, self.tensors))  # RuntimeError: inference tensor
        self.ptrs = tuple(map(_DATA_PTR, self.tensors))

    def valid(self, dtype, memory_format) -> bool:
        return (dtype == self.dtype and memory_format == self.memory_format
                and all(map(operator.is_, map(dict.get, self.dicts, self.keys),
                            self.objects))
                and tuple(map(_VERSION, self.tensors)) == self.versions
                and tuple(map(_DATA_PTR, self.tensors)) == self.ptrs)


def folded(block, parts, dtype: torch.dtype,
           memory_format: torch.memory_format) -> FoldedBlock:
    """The cached FoldedBlock of `block` (a FusedResidual; parts = block.parts()),
    refolded when what it was folded from changed.

    Under torch.compile the fold is traced every call instead, so the compiler can
    constant-fold it (freezing) or fuse it; under torch.jit.trace too, so the trace
    reads the parameters rather than holding a fold of them as constants.
    """
    if torch.compiler.is_compiling() or jit_tracing():  # (tracing.py: torch.jit.trace)
        return fold_block(parts, dtype, memory_format)
    cache = block.__dict__.get("_fold_cache")
    if cache is not None and cache.valid(dtype, memory_format):
        return cache.folded
    with torch.no_grad():
        result = fold_block(parts, dtype, memory_format)
    if graph_capture.capturing(parts.stages[0].conv.weight):
        # Folded into the graph's memory, computed only when it replays: not for eager
        # calls after the capture (graph_capture.py). The graph refolds on each replay.
        block.__dict__.pop("_fold_cache", None)
        return result
    try:
        block.__dict__["_fold_cache"] = FoldCache(block, parts, dtype, memory_format, result)
    except RuntimeError:
        if not any(t.is_inference() for t in block_tensors(parts)):
            raise
        block.__dict__.pop("_fold_cache", None)  # no versions to watch: fold every call
    return result
