"""The composite block: ATen convolutions plus the schema ops of one namespace.

Shared by the `torch` backend (ops in resnet_fused_torch, Python/ATen), the `native`
backend (ops in resnet_fused, the C++/CUDA extension) and the `triton` backend (its
eval, and its training of blocks the fused op cannot take: resnet_fused_triton's BN
ops): the data flow is the same, only the kernels behind the ops differ.

Training:  c1 = conv1(x); stats -> finalize (running stats) -> y1 = bn_act(c1)
           c2 = conv2(y1); stats -> finalize -> out = bn_act(c2, residual=shortcut)
Eval:      out = conv_bias_shortcut_relu(conv_bias_relu(x)) on folded weights.

A synchronized BN (resnet_fused/distributed.py) takes the same ops with one
all-reduce between channel_stats and the finalize, and one in the backward between
bn_backward_reduce and bn_backward_apply.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import distributed
from ..ops import like_format, momentum_arg
from ..reference import conv_forward
from ..schemas import NAMESPACES
from .base import Backend, FoldedBlock
from .torch_ops import backward_apply, backward_reduce


class CompositeBackend(Backend):
    """Subclasses set `name` and `namespace` and implement unavailable_reason."""

    namespace: str = ""

    @property
    def ops(self):
        return getattr(torch.ops, self.namespace)

    def bn_act_train(self, c: torch.Tensor, bn: nn.BatchNorm2d,
                     residual: Optional[torch.Tensor], group=None) -> torch.Tensor:
        """Training BatchNorm of c (batch statistics, running update) + residual + ReLU;
        statistics over the process group `group` when given."""
        if group is not None:
            return distributed.bn_act_sync(self, c, bn, residual, group)
        ops = self.ops
        mean, var = ops.channel_stats(c.detach())
        count = c.numel() // c.shape[1]
        momentum = momentum_arg(bn)
        invstd, _, _ = ops.bn_finalize(mean, var, bn.weight.detach(), bn.bias.detach(),
                                       bn.running_mean, bn.running_var,
                                       bn.num_batches_tracked, momentum, float(bn.eps), count)
        if residual is not None:
            residual = like_format(residual, c)
        out, _ = ops.bn_act(c, mean, invstd, bn.weight, bn.bias, residual)
        return out

    # A synchronized BN's backward: two passes around the all-reduce of their sums.
    # ATen ops on the schemas' packed mask (every backend writes the same format): the
    # native bn_act_backward does reduction and apply in one op, with the local sums.
    # Correcting its result to the global sums afterwards would round grad_c twice and
    # cancel where local and global sums differ (small uneven batches), so until a
    # split native kernel exists (reduce | apply) the sync path runs these.
    def bn_backward_reduce(self, grad_out, mask, c, mean, invstd):
        """(sum g, sum g*xhat), g = grad_out * mask."""
        return backward_reduce(grad_out, mask, c, mean, invstd)

    def bn_backward_apply(self, grad_out, mask, c, mean, invstd, weight, mean_g, mean_gx,
                          residual_grad):
        """(grad_c, grad_residual) with the global mean_g = sum g / N and
        mean_gx = sum g*xhat / N."""
        return backward_apply(grad_out, mask, c, mean, invstd, weight, mean_g, mean_gx,
                              residual_grad)

    def shortcut_train(self, block, x: torch.Tensor, group=None) -> torch.Tensor:
        if block.conv3 is None:
            return x
        sc = conv_forward(block.conv3, x)
        if block.bn3 is not None:
            # torchvision's downsample BN: ATen's BatchNorm (3 of 8 blocks in a
            # ResNet-18, none on the main path).
            if group is not None:
                return distributed.batch_norm_sync(sc, block.bn3, group)
            sc = distributed.batch_norm_local(sc, block.bn3)
        return sc

    def forward_train(self, block, x: torch.Tensor, groups=None) -> torch.Tensor:
        g1, g2, g3 = groups if groups is not None else (None, None, None)
        y1 = self.bn_act_train(conv_forward(block.conv1, x), block.bn1, None, g1)
        c2 = conv_forward(block.conv2, y1)
        return self.bn_act_train(c2, block.bn2, self.shortcut_train(block, x, g3), g2)

    def forward_eval(self, block, folded: FoldedBlock, x: torch.Tensor) -> torch.Tensor:
        ops = self.ops
        y1 = ops.conv_bias_relu(x, folded.w1, folded.b1, folded.stride1, folded.padding1)
        return ops.conv_bias_shortcut_relu(y1, folded.w2, folded.b2, x, folded.w3,
                                           folded.padding2, folded.stride3, folded.padding3)


class TorchBackend(CompositeBackend):
    """Portable: ATen ops on any device; float64 too (gradcheck)."""

    name = "torch"
    namespace = NAMESPACES["torch"]

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        return None

    def unsupported_dtype_reason(self, dtype, device) -> Optional[str]:
        if dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            return None
        return f"the torch backend supports floating dtypes, not {dtype}"
