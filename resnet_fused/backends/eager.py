"""The eager backend: training as PyTorch computes the plain block, eval folded.

Training: each stage's convolution and BatchNorm through PyTorch's own kernels (ATen's
convolution and native batch_norm, which also updates the running statistics), its
ReLU, then the shortcut, the add and the last ReLU, in place where torchvision's
BasicBlock and Bottleneck write them in place. The result is the plain block's,
operation for operation (gates and a shortcut's pool: the user's modules, in the
plain block's order). On a CPU none of the fused training paths is faster: the
composite of our schema ops (the torch backend) makes more passes than ATen's one-pass
CPU batch_norm, writes and reads the 1-bit ReLU mask, and calls a custom op per step;
the C++ CPU kernels (native) are loops, not oneDNN's vectorised ones. bench/NOTES.md
has the figures. So `auto` takes this backend on CPU: a converted block trains as
fast as the plain one (the module resolves its children once and calls no module
per BN, so its own host work is a few microseconds).

Frozen BN (training with every BN on its running statistics): ATen's convolution and
batch_norm in inference mode per stage, the ReLUs, the add.

Eval: BN folded into the convolutions' weights and bias (fewer passes over memory
than the plain block's conv, BN, ReLU), computed by the torch backend's functions
called directly: through their custom ops each call costs ~45 us of dispatch on a
CPU, which at ResNet-18 sizes ate the gain (bench/NOTES.md). While torch.export traces
the block it takes the ops themselves, so an exported graph keeps one fused op per
stage (serving.export checks that).

SyncBatchNorm: a BN whose group is given is synchronized through
distributed.batch_norm_sync (one all-reduce of the statistics, one of the backward's
sums), as the composite backends' shortcut BN is; without a group,
distributed.batch_norm_local (nn.BatchNorm2d's computation without the module call; a
SyncBatchNorm with nothing to synchronise; momentum=None without a host sync).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import distributed
from ..reference import conv_forward, frozen_batch_norm
from . import torch_ops
from .composite import TorchBackend, inner_gates, shortcut_input


def _bn(c: torch.Tensor, bn, group) -> torch.Tensor:
    if group is not None:
        return distributed.batch_norm_sync(c, bn, group)
    return distributed.batch_norm_local(c, bn)


class EagerBackend(TorchBackend):
    """PyTorch's own kernels in training, the torch backend's folded ops in eval."""

    name = "eager"

    def unsupported_dtype_reason(self, dtype, device) -> Optional[str]:
        if dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            return None
        return f"the eager backend supports floating dtypes, not {dtype}"

    def forward_train(self, parts, x: torch.Tensor, groups=None) -> torch.Tensor:
        """The plain block's training forward (reference.plain_parts_forward) with the
        BNs of `groups` synchronized. In place only on fresh results whose producer
        keeps its input, not its output, for the backward (ATen's batch_norm,
        distributed's _SyncBn, the add), so autograd is unaffected."""
        n = len(parts.stages)
        if groups is None:
            groups = (None,) * (n + 1)
        y = x
        for i, st in enumerate(parts.stages):
            y = conv_forward(st.conv, y)
            if st.bn is not None:
                y = _bn(y, st.bn, groups[i])
            if st.relu:
                y = y.relu_() if st.bn is not None else torch.relu(y)
            y = inner_gates(parts, i, y)
        sc = x
        if parts.shortcut is not None:
            sc = conv_forward(parts.shortcut.conv, shortcut_input(parts, x))
            if parts.shortcut.bn is not None:
                sc = _bn(sc, parts.shortcut.bn, groups[n] if len(groups) > n else None)
        if parts.stages[-1].bn is not None and not parts.gates:
            return y.add_(sc).relu_()
        return torch.relu(y + sc)

    def forward_frozen(self, parts, x: torch.Tensor) -> torch.Tensor:
        """The plain block with every BN frozen, through PyTorch's own kernels: ATen's
        convolution and batch_norm with the running statistics (inference mode), the
        ReLUs and the add in place on fresh results, as forward_train."""
        y = x
        for i, st in enumerate(parts.stages):
            y = frozen_batch_norm(conv_forward(st.conv, y), st.bn)
            if st.relu:
                y = y.relu_()
            y = inner_gates(parts, i, y)
        sc = x
        if parts.shortcut is not None:
            sc = conv_forward(parts.shortcut.conv, shortcut_input(parts, x))
            if parts.shortcut.bn is not None:
                sc = frozen_batch_norm(sc, parts.shortcut.bn)
        if parts.gates:  # the gates' modules keep what they saved for the backward
            return torch.relu(y + sc)
        return y.add_(sc).relu_()

    def folded_ops(self):
        """The torch backend's functions themselves (no custom-op dispatch), but its ops
        while torch.export traces, so an exported graph keeps one fused op per stage."""
        return super().folded_ops() if torch.compiler.is_exporting() else torch_ops
