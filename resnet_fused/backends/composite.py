"""The composite block: ATen convolutions plus the schema ops of one namespace.

Shared by the `torch` backend (ops in resnet_fused_torch, Python/ATen), the `native`
backend (ops in resnet_fused, the C++/CUDA extension) and the `triton` backend (its
eval, and its training of blocks the fused op cannot take: resnet_fused_triton's BN
ops): the data flow is the same, only the kernels behind the ops differ.

The block is walked by its stages (spec.py; two for a basic block, three for a
bottleneck):
Training:  each stage c = conv(y); stats -> finalize (running stats) -> y = bn_act(c),
           the last one's bn_act adding the shortcut (its BN in training mode) as the
           residual before the ReLU
Frozen:    every BN with its running statistics (FrozenBatchNorm2d, or BNs in eval while
           autograd records): each stage c = conv(y); y = bn_frozen_act(c) (no
           statistics pass, no finalize), the last one adding the shortcut (its BN
           frozen too, through ATen's batch_norm) before the ReLU; the backward
           applies the mask and the scale in one pass per stage
Eval:      y = conv_bias_relu(y) for every stage but the last, then
           conv_bias_shortcut_relu(y, x) on folded weights.

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
from ..reference import conv_forward, frozen_batch_norm, frozen_stats
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

    def shortcut_train(self, parts, x: torch.Tensor, group=None) -> torch.Tensor:
        sc = parts.shortcut
        if sc is None:
            return x
        y = conv_forward(sc.conv, x)
        if sc.bn is not None:
            # The downsample BN: ATen's BatchNorm (one block per stage has it, and
            # it is off the main path).
            if group is not None:
                return distributed.batch_norm_sync(y, sc.bn, group)
            y = distributed.batch_norm_local(y, sc.bn)
        return y

    def forward_train(self, parts, x: torch.Tensor, groups=None) -> torch.Tensor:
        """Each stage: its conv, then bn_act_train (BN + ReLU); the last stage's takes
        the shortcut as its residual. groups: one per BN of parts.bns() (the main
        path's in order, then the shortcut's), or None."""
        n = len(parts.stages)
        if groups is None:
            groups = (None,) * (n + 1)
        y = x
        for i, st in enumerate(parts.stages[:-1]):
            y = self.bn_act_train(conv_forward(st.conv, y), st.bn, None, groups[i])
        last = parts.stages[-1]
        c = conv_forward(last.conv, y)
        residual = self.shortcut_train(parts, x, groups[n] if len(groups) > n else None)
        return self.bn_act_train(c, last.bn, residual, groups[n - 1])

    def bn_act_frozen(self, c: torch.Tensor, bn,
                      residual: Optional[torch.Tensor]) -> torch.Tensor:
        """relu(c * s + t [+ residual]) with s, t of bn's running statistics."""
        mean, invstd = frozen_stats(bn, c)
        if residual is not None:
            residual = like_format(residual, c)
        out, _ = self.ops.bn_frozen_act(c, mean, invstd, bn.weight, bn.bias, residual)
        return out

    def forward_frozen(self, parts, x: torch.Tensor) -> torch.Tensor:
        """Each stage: its conv, then bn_act_frozen; the last stage's takes the shortcut
        (conv and frozen BN: ATen's, off the main path) as its residual."""
        y = x
        for st in parts.stages[:-1]:
            y = self.bn_act_frozen(conv_forward(st.conv, y), st.bn, None)
        last = parts.stages[-1]
        c = conv_forward(last.conv, y)
        residual = x
        if parts.shortcut is not None:
            residual = conv_forward(parts.shortcut.conv, x)
            if parts.shortcut.bn is not None:
                residual = frozen_batch_norm(residual, parts.shortcut.bn)
        return self.bn_act_frozen(c, last.bn, residual)

    def folded_ops(self):
        """What forward_eval calls conv_bias_relu and conv_bias_shortcut_relu on: the
        namespace's ops."""
        return self.ops

    def forward_eval(self, parts, folded: FoldedBlock, x: torch.Tensor) -> torch.Tensor:
        """conv_bias_relu for every stage but the last, conv_bias_shortcut_relu for the
        last (the projection a second GEMM into its accumulator, or x added)."""
        ops = self.folded_ops()
        y = x
        for f in folded.stages[:-1]:
            y = ops.conv_bias_relu(y, f.w, f.b, f.stride, f.padding, f.dilation, f.groups)
        last, sc = folded.stages[-1], folded.shortcut
        return ops.conv_bias_shortcut_relu(
            y, last.w, last.b, x, None if sc is None else sc.w, last.padding,
            0 if sc is None else sc.stride, 0 if sc is None else sc.padding,
            last.dilation, last.groups)


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
