"""BatchNorm folding for eval mode, cached while the block's state is unchanged.

In eval, bn(conv(x)) = conv(x, W * s) + (b - mean) * s + beta with
s = gamma / sqrt(running_var + eps): the block becomes two convolutions with bias.
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
torch.inference_mode()) keep no version, so such blocks refold on every call.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import nn

from .backends.base import FoldedBlock


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
    scale = bn.weight.to(acc) * torch.rsqrt(bn.running_var.to(acc) + bn.eps)
    return w * scale.view(-1, 1, 1, 1), (b - bn.running_mean.to(acc)) * scale + bn.bias.to(acc)


def fold_block(block, dtype: torch.dtype, memory_format: torch.memory_format) -> FoldedBlock:
    """The FoldedBlock of `block` for activations of `dtype` and `memory_format`."""
    w1, b1 = fold_conv_bn(block.conv1, block.bn1)
    w2, b2 = fold_conv_bn(block.conv2, block.bn2)
    w3 = None
    stride3 = padding3 = 0
    if block.conv3 is not None:
        w3, b3 = fold_conv_bn(block.conv3, block.bn3)
        b2 = b2 + b3  # the shortcut's bias rides in K2's epilogue bias
        stride3, padding3 = block.conv3.stride[0], block.conv3.padding[0]
        w3 = w3.to(dtype).contiguous(memory_format=memory_format)
    return FoldedBlock(
        w1=w1.to(dtype).contiguous(memory_format=memory_format), b1=b1.to(dtype),
        w2=w2.to(dtype).contiguous(memory_format=memory_format), b2=b2.to(dtype),
        w3=w3, stride1=block.conv1.stride[0], padding1=block.conv1.padding[0],
        padding2=block.conv2.padding[0], stride3=stride3, padding3=padding3)


def block_tensors(block):
    """Every parameter and buffer of the block's convolutions and BNs, read straight off
    their dicts (Module.parameters() walks the module tree)."""
    for m in (block.conv1, block.bn1, block.conv2, block.bn2, block.conv3, block.bn3):
        if m is not None:
            yield from (t for t in m._parameters.values() if t is not None)
            yield from (t for t in m._buffers.values() if t is not None)


_VERSION = operator.attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr
_SUBMODULES = ("conv1", "bn1", "conv2", "bn2", "conv3", "downsample")


def _slots(block) -> list:
    """(dict, key) of every object the fold reads: the block's submodules (the
    downsample's too), each conv's weight and bias, each BN's weight, bias, running
    statistics and eps."""
    slots = [(block._modules, n) for n in _SUBMODULES]
    ds = block._modules.get("downsample")
    if ds is not None:
        slots += [(ds._modules, n) for n in ds._modules]
    for conv in (block.conv1, block.conv2, block.conv3):
        if conv is not None:
            slots += [(conv._parameters, "weight"), (conv._parameters, "bias")]
    for bn in (block.bn1, block.bn2, block.bn3):
        if bn is not None:
            slots += [(bn._parameters, "weight"), (bn._parameters, "bias"),
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

    def __init__(self, block, dtype, memory_format, result: FoldedBlock):
        slots = _slots(block)
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


def folded(block, dtype: torch.dtype, memory_format: torch.memory_format) -> FoldedBlock:
    """The cached FoldedBlock, refolded when what it was folded from changed.

    Under torch.compile the fold is traced every call instead, so the compiler can
    constant-fold it (freezing) or fuse it.
    """
    if torch.compiler.is_compiling():
        return fold_block(block, dtype, memory_format)
    cache = block.__dict__.get("_fold_cache")
    if cache is not None and cache.valid(dtype, memory_format):
        return cache.folded
    with torch.no_grad():
        result = fold_block(block, dtype, memory_format)
    try:
        block.__dict__["_fold_cache"] = FoldCache(block, dtype, memory_format, result)
    except RuntimeError:
        if not any(t.is_inference() for t in block_tensors(block)):
            raise
        block.__dict__.pop("_fold_cache", None)  # no versions to watch: fold every call
    return result
