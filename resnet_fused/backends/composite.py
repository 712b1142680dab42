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
Gates (spec.Gate) on the last stage: training pools the BN'd branch (bn_pool), runs
each channel gate's `f` on it, draws each sample gate as its module does, and joins
with bn_gate_act(c, ..., gate, residual) = relu(gate * bn(c) + residual); eval computes
the branch conv(y) + bias and its pool (conv_bias_pool), and joins with
gate_shortcut_relu. A gate on an
inner stage (torchvision RegNet's SE before the last 1x1) is its module on that
stage's output. A pooled shortcut (ResNet-D) runs its AvgPool2d before its conv.

A synchronized BN (resnet_fused/distributed.py) takes the same ops with one
all-reduce between channel_stats and the finalize, and one in the backward between
bn_backward_reduce and bn_backward_apply.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import distributed
from ..gates import apply_gate, channel_gate, identity_in_eval, sample_gate, scale_gate
from ..ops import like_format, momentum_arg, stats_dtype
from ..reference import conv_forward, frozen_batch_norm, frozen_stats
from ..spec import CHANNEL
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
        y = conv_forward(sc.conv, shortcut_input(parts, x))
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
            y = inner_gates(parts, i, y)
        last = parts.stages[-1]
        c = conv_forward(last.conv, y)
        residual = self.shortcut_train(parts, x, groups[n] if len(groups) > n else None)
        if parts.stage_gates(n - 1):
            return self.gated_bn_act_train(parts, c, residual, groups[n - 1])
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
        """Each stage: its conv, then bn_act_frozen (an inner stage's gates after it);
        the last stage's takes the shortcut (its pool, conv and frozen BN: ATen's, off
        the main path) as its residual. A gated last stage: its branch through the frozen
        BN, pooled for the channel gates' `f`, and relu(gate * branch + residual)."""
        y = x
        for i, st in enumerate(parts.stages[:-1]):
            y = inner_gates(parts, i, self.bn_act_frozen(conv_forward(st.conv, y), st.bn,
                                                         None))
        last = parts.stages[-1]
        c = conv_forward(last.conv, y)
        residual = x
        if parts.shortcut is not None:
            residual = conv_forward(parts.shortcut.conv, shortcut_input(parts, x))
            if parts.shortcut.bn is not None:
                residual = frozen_batch_norm(residual, parts.shortcut.bn)
        if parts.stage_gates(len(parts.stages) - 1):
            branch = frozen_batch_norm(c, last.bn)
            gate = branch_gate(parts, branch,
                               lambda: branch.mean((2, 3), dtype=stats_dtype(branch)))
            return torch.relu(gate.to(branch.dtype) * branch + like_format(residual, c))
        return self.bn_act_frozen(c, last.bn, residual)

    def gated_bn_act_train(self, parts, c: torch.Tensor, residual: torch.Tensor,
                           group=None) -> torch.Tensor:
        """Training relu(g * bn(c) + residual) for the last stage's gates: the batch
        statistics and finalize as bn_act_train, the branch pooled from c and the BN
        (bn_pool) for each channel gate's `f`, each sample gate drawn as its module
        draws, and one join pass (bn_gate_act) with the product of the gates."""
        bn = parts.stages[-1].bn
        if group is not None:  # synchronized: ATen BN over the group, then the modules
            y = distributed.batch_norm_sync(c, bn, group)
            return torch.relu(inner_gates(parts, len(parts.stages) - 1, y) + residual)
        ops = self.ops
        mean, var = ops.channel_stats(c.detach())
        invstd, _, _ = ops.bn_finalize(mean, var, bn.weight.detach(), bn.bias.detach(),
                                       bn.running_mean, bn.running_var,
                                       bn.num_batches_tracked, momentum_arg(bn),
                                       float(bn.eps), c.numel() // c.shape[1])
        gate = branch_gate(parts, c, lambda: ops.bn_pool(c, mean, invstd, bn.weight,
                                                         bn.bias))
        out, _ = ops.bn_gate_act(c, mean, invstd, bn.weight, bn.bias, gate,
                                 like_format(residual, c))
        return out

    def folded_ops(self):
        """What forward_eval calls conv_bias_relu and conv_bias_shortcut_relu on: the
        namespace's ops."""
        return self.ops

    def forward_eval(self, parts, folded: FoldedBlock, x: torch.Tensor) -> torch.Tensor:
        """conv_bias_relu for every stage but the last, conv_bias_shortcut_relu for the
        last (the projection a second GEMM into its accumulator, or x added)."""
        ops = self.folded_ops()
        y = x
        for i, f in enumerate(folded.stages[:-1]):
            y = ops.conv_bias_relu(y, f.w, f.b, f.stride, f.padding, f.dilation, f.groups)
            y = inner_gates(parts, i, y)
        last, sc = folded.stages[-1], folded.shortcut
        xs = shortcut_input(parts, x)
        bias = last.b
        if sc is not None and sc.b is not None:  # a gated last stage (fold.py)
            gate = eval_branch_gate(parts, ops, y, last)
            if gate is not None:
                return ops.gate_shortcut_relu(gate[1], gate[0], xs, sc.w, sc.b, sc.stride,
                                              sc.padding)
            bias = bias + sc.b   # only sample gates, in eval: the identity
        elif sc is None and parts.stage_gates(len(parts.stages) - 1):
            gate = eval_branch_gate(parts, ops, y, last)
            if gate is not None:
                return ops.gate_shortcut_relu(gate[1], gate[0], xs, None, None, 0, 0)
        return ops.conv_bias_shortcut_relu(
            y, last.w, bias, xs, None if sc is None else sc.w, last.padding,
            0 if sc is None else sc.stride, 0 if sc is None else sc.padding,
            last.dilation, last.groups)


# --------------------------------------------------------------------------- gates
def shortcut_input(parts, x: torch.Tensor) -> torch.Tensor:
    """x through the shortcut's pool (ResNet-D's AvgPool2d; the user's module), if any."""
    sc = parts.shortcut
    return x if sc is None or sc.pool is None else sc.pool(x)


def inner_gates(parts, i: int, y: torch.Tensor) -> torch.Tensor:
    """y through the gate modules of stage i, as the plain block applies them (a gate
    inside the chain, torchvision RegNet's SE before its last 1x1: the user's module
    on the stage's output)."""
    for gate in parts.stage_gates(i):
        y = apply_gate(gate, y)
    return y


def branch_gate(parts, like: torch.Tensor, pooled_branch) -> torch.Tensor:
    """The product of the last stage's gates, in the order the block applies them:
    a channel gate's `f` on the branch pooled so far (pooled_branch(): the mean over H
    and W of the ungated branch, (N, C); the gates before it scale it, since they are
    constant over H and W), a sample gate drawn as its module draws it, a constant
    scale (gates.scale_gate). `like`: the branch (shape, dtype, device)."""
    gate, pooled = None, None
    for gp in parts.stage_gates(len(parts.stages) - 1):
        if gp.kind == CHANNEL:
            if pooled is None:
                pooled = pooled_branch()
            p = pooled if gate is None else pooled * gate.reshape(gate.shape[0], -1)
            g = channel_gate(gp.fn, p, like)
        elif gp.module is None:
            g = scale_gate(gp.value, like)
        else:
            g = sample_gate(gp.module, like)
        gate = g if gate is None else gate * g
    return gate


def eval_branch_gate(parts, ops, y: torch.Tensor, last):
    """(gate, branch) of a gated last stage in eval: the branch conv(y) + bias (folded)
    with its pool (ops.conv_bias_pool where the namespace has it: one kernel on the
    triton backend) and the
    product of its gates, or None when every gate is a sample gate in eval (the
    identity)."""
    gates = parts.stage_gates(len(parts.stages) - 1)
    if all(identity_in_eval(g) for g in gates):
        return None
    if hasattr(ops, "conv_bias_pool"):
        branch, pooled = ops.conv_bias_pool(y, last.w, last.b, 1, last.padding, last.dilation,
                                            last.groups)
    else:  # the native namespace: its eval convolutions are ATen's, and so is this pool
        branch = torch.nn.functional.conv2d(y, last.w, last.b, 1, last.padding,
                                            last.dilation, last.groups)
        pooled = branch.mean((2, 3), dtype=stats_dtype(branch))
    gate = branch_gate(parts, branch, lambda: pooled)
    return gate, branch


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
