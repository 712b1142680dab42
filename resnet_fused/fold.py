"""BatchNorm folding for eval mode, cached on the parameters' versions.

In eval, bn(conv(x)) = conv(x, W * s) + (b - mean) * s + beta with
s = gamma / sqrt(running_var + eps): the block becomes two convolutions with bias.
Folding runs in float32 (float64 for float64 modules) and casts once to the
activation dtype. The result is cached on the module and recomputed when any
parameter or buffer changes: every in-place update (optimizer step,
load_state_dict, running-stat update) bumps the tensor's `_version`, and .to() /
.half() make new tensors (new data_ptr). Inference tensors have no version, so
blocks holding them are folded on every call (see _state_key).
"""
from __future__ import annotations

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
    their dicts: Module.parameters() walks the module tree, and this runs on every eval
    call (a third of a small block's Python overhead went there)."""
    for m in (block.conv1, block.bn1, block.conv2, block.bn2, block.conv3, block.bn3):
        if m is not None:
            yield from (t for t in m._parameters.values() if t is not None)
            yield from (t for t in m._buffers.values() if t is not None)


def _state_key(block, dtype, memory_format):
    """The cache key, or None when a tensor is an inference tensor (made under
    torch.inference_mode(), e.g. a model converted or loaded there): those keep no
    version counter, so an in-place change (a BN recalibration pass, a copy_ inside
    inference mode) could not be seen, and the block is refolded on every call."""
    try:
        return (dtype, memory_format) + tuple((t.data_ptr(), t._version)
                                              for t in block_tensors(block))
    except RuntimeError:
        if any(t.is_inference() for t in block_tensors(block)):
            return None
        raise


def folded(block, dtype: torch.dtype, memory_format: torch.memory_format) -> FoldedBlock:
    """The cached FoldedBlock, refolded when a parameter or buffer changed.

    Under torch.compile the fold is traced every call instead, so the compiler can
    constant-fold it (freezing) or fuse it.
    """
    if torch.compiler.is_compiling():
        return fold_block(block, dtype, memory_format)
    key = _state_key(block, dtype, memory_format)
    cache = block.__dict__.get("_fold_cache")
    if key is not None and cache is not None and cache[0] == key:
        return cache[1]
    with torch.no_grad():
        result = fold_block(block, dtype, memory_format)
    if key is None:
        block.__dict__.pop("_fold_cache", None)
    else:
        block.__dict__["_fold_cache"] = (key, result)
    return result
