"""What a backend is: the interface FusedResidual calls.

A backend computes the whole block in one of two modes:

- forward_eval(parts, folded, x): inference with BN folded into the convolutions
  (`folded` is a FoldedBlock, already in x's dtype and memory format).
- forward_train(parts, x, groups=None): training with batch statistics; updates the
  running statistics of every BN of the block (parts.bns()) exactly as
  nn.BatchNorm2d does, and is differentiable with respect to x and every parameter
  of the block. groups: None, or a tuple with one entry per BN of parts.bns() for a
  block with synchronized BNs, a group (not None) meaning that BN's statistics and
  backward reductions are all-reduced over it (resnet_fused/distributed.py).

- forward_frozen(parts, x): every BN normalises with its running statistics while
  autograd records (frozen-BN fine-tuning: torchvision's FrozenBatchNorm2d, or
  nn.BatchNorm2d in eval inside a model in train()): per stage relu(conv * s + t)
  with s, t from the running statistics, no statistics pass and no running update;
  differentiable with respect to x, every conv parameter and the weight/bias of a BN
  that has them as parameters.

`parts` is the block resolved by its spec (spec.Parts): its stages in order, each
(conv: nn.Conv2d, bn: BatchNorm or None, relu: bool), and the shortcut (None: the
identity; else conv and an optional BN), the modules themselves (read their weight,
bias, stride, padding, dilation, groups, running statistics, momentum, eps).
x has already been validated (rank, channels, dtype, device) and is contiguous in
its memory format (NCHW or channels_last); the result must be in that format.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class FoldedConv(NamedTuple):
    """One convolution with its BN folded in, in the activation dtype and layout."""
    w: torch.Tensor
    b: Optional[torch.Tensor]   # None only for the shortcut (its bias rides in the last
    # stage's), unless the last stage is gated (relu(g * y + sc): the shortcut keeps it)
    stride: int
    padding: int
    dilation: int
    groups: int


class FoldedBlock(NamedTuple):
    """Eval-mode weights of a block: one FoldedConv per stage of the main path, and the
    projection shortcut's (None: identity). The last stage's bias also holds the
    shortcut's folded bias (its conv bias, through its BN when present), so the last
    kernel adds only conv(x, shortcut.w) or x."""
    stages: tuple
    shortcut: Optional[FoldedConv]


def gate_reason(parts, backend: str, what: str = "gated branches") -> Optional[str]:
    """Why `backend` declines a block whose branch is gated (spec.Gate) when it has no
    kernels for `what`, or None for an ungated block."""
    if parts.gates:
        paths = ", ".join(type(g.module).__name__ if g.module is not None
                          else f"a constant scale {g.value!r}" for g in parts.gates)
        return (f"the {backend} backend has no kernels for {what} yet, and this "
                f"block's branch is gated ({paths})")
    return None


class Backend:
    """Base class: subclasses set `name` and implement the methods below."""

    name: str = "?"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        """None when this backend can run on `device`, else a sentence saying why not."""
        raise NotImplementedError

    def unsupported_dtype_reason(self, dtype: torch.dtype, device: torch.device) -> Optional[str]:
        """None when `dtype` activations are supported on `device`, else why not."""
        raise NotImplementedError

    def unsupported_block_reason(self, parts, training: bool) -> Optional[str]:
        """None when this backend computes the block `parts` (a spec.Parts: its stages'
        convolutions and BNs) in this mode, else a sentence saying why not; `auto` then
        takes the next backend of its order, an explicit backend raises with it."""
        return None

    def forward_eval(self, parts, folded: FoldedBlock, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_train(self, parts, x: torch.Tensor, groups=None) -> torch.Tensor:
        raise NotImplementedError

    def forward_frozen(self, parts, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<resnet_fused backend {self.name}>"
