"""What a backend is: the interface FusedResidual calls.

A backend computes the whole block in one of two modes:

- forward_eval(block, folded, x): inference with BN folded into the convolutions
  (`folded` is a FoldedBlock, already in x's dtype and memory format).
- forward_train(block, x, groups=None): training with batch statistics; updates the
  running statistics of block.bn1 / block.bn2 (and block.bn3 when the shortcut has
  one) exactly as nn.BatchNorm2d does, and is differentiable with respect to x and
  every parameter of the block. groups: None, or (group of bn1, bn2, bn3) for a block
  with synchronized BNs, a group (not None) meaning that BN's statistics and backward
  reductions are all-reduced over it (resnet_fused/distributed.py).

`block` is the FusedResidual module; backends read from it only:
    block.conv1, block.conv2 (nn.Conv2d: weight, bias (may be None), stride, padding)
    block.bn1, block.bn2     (nn.BatchNorm2d: weight, bias, running_mean, running_var,
                              num_batches_tracked, momentum (may be None), eps)
    block.conv3              (nn.Conv2d or None: the projection shortcut)
    block.bn3                (nn.BatchNorm2d or None: BN of the projection, torchvision)
x has already been validated (rank, channels, dtype, device) and is contiguous in
its memory format (NCHW or channels_last); the result must be in that format.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class FoldedBlock:
    """Eval-mode weights with BN folded in, in the activation dtype and layout.

    w1, b1: conv1 with bn1 folded (stride = stride1, padding = padding1).
    w2, b2: conv2 with bn2 folded; b2 also holds the folded bias of the projection
            shortcut (conv3 bias, through bn3 when present), so K2 adds only
            conv(x, w3) or x.
    w3:     projection weight with bn3 folded, or None for the identity shortcut.
    """

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    w3: Optional[torch.Tensor]
    stride1: int
    padding1: int
    padding2: int
    stride3: int
    padding3: int


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

    def forward_eval(self, block, folded: FoldedBlock, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_train(self, block, x: torch.Tensor, groups=None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<resnet_fused backend {self.name}>"
