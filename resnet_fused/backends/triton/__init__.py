"""The `triton` backend: implicit-GEMM convolutions with fused prologues/epilogues.

Eval: one kernel per stage (eval_ops.py): relu(conv(y, W') + b') for every stage but
the last, then relu(conv(y, W') + b' + shortcut) with a projection shortcut as a
second GEMM into the same accumulator (two kernels for a basic block, three for a
bottleneck); ResNet-D's pooled shortcut the same, its GEMM averaging each window of x
as it loads it (pool.py). Training: train.py (the fused training path, one op
block_train for any chain of stages, basic or bottleneck, and with every BN frozen:
forward_frozen); a synchronized block whose
BNs are not all synchronized over one process group goes the composite way
(CompositeBackend.forward_train: ATen convolutions around this backend's BN ops of
bn.py). Grouped or dilated convolutions are declined (unsupported_block_reason), so
`auto` routes such blocks to native or torch. A gated last stage (README.md, Design,
"Gates and pooled shortcuts"): eval through eval_ops' conv_bias_pool and
gate_shortcut_relu (gate_pool_shortcut_relu beside a pooled shortcut), training with a
drop path through block_train's `gate`, with an SE or ECA gate through train_gated.py,
either beside a pooled shortcut too; gates inside the chain are declined.

Runs on CUDA GPUs of compute capability >= 8.0, and on CPU through Triton's
interpreter when TRITON_INTERPRET=1 was set before anything imported triton.language
(Triton binds its own helpers then, our kernels when they are defined; torch._dynamo,
and so `import resnet_fused`, imports triton.language).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

import triton  # noqa: F401  (ImportError here makes the registry report the backend unavailable)

from ..base import FoldedBlock, gate_reason
from ..composite import CompositeBackend, branch_gate, eval_branch_gate
from ...spec import CHANNEL
from . import bn  # noqa: F401  (defines the resnet_fused_triton BN ops)
from . import conv as _conv
from . import conv_bwd as _conv_bwd
from . import eval_ops  # noqa: F401  (defines the resnet_fused_triton eval ops)
from . import gate as _gate
from . import launcher
from .pool import pool_stride, pool_unsupported_reason, shortcut_pool
# train defines block_train; imported here, never while tracing.
from .train import block_group, train_block, train_unsupported_reason
from .train_gated import train_gated_block

# Every op is defined by now: tell torch which kernels its triton_ops run (launcher.py).
# Under the interpreter the ops are custom_ops, which torch keeps no kernel list for.
launcher.declare_kernels(launcher.NS, (bn, _conv, _conv_bwd, _gate))

# Where to set TRITON_INTERPRET: before anything imports triton.language, which binds
# Triton's own helpers once (launcher._language_interpreted); torch._dynamo imports it,
# and `import resnet_fused` imports torch._dynamo.
_WHERE = ("set it in the environment before Python starts (`TRITON_INTERPRET=1 python ...`), "
          "or in os.environ before importing resnet_fused, torch._dynamo or triton")
_CPU_HINT = "Triton needs a CUDA GPU; to use its interpreter on CPU, " + _WHERE


class TritonBackend(CompositeBackend):
    name = "triton"
    namespace = launcher.NS

    def unavailable_reason(self, device) -> Optional[str]:
        device = torch.device(device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return "CUDA is not available"
            major, minor = torch.cuda.get_device_capability(device)
            if major < 8:
                return (f"the triton backend needs a GPU of compute capability >= 8.0 "
                        f"(tensor-core bf16/tf32); {torch.cuda.get_device_name(device)} is "
                        f"{major}.{minor}")
            return None
        if device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") != "1":
                return _CPU_HINT
            if not launcher.INTERPRET:
                return ("TRITON_INTERPRET=1 was set after resnet_fused's Triton kernels were "
                        "defined, so they are compiled for a GPU; " + _WHERE)
            if not launcher.LANGUAGE_INTERPRETED:
                return ("TRITON_INTERPRET=1 was set after triton.language was imported (torch "
                        "imports it with torch._dynamo), so Triton's own helpers (tl.sum, "
                        "tl.cdiv, ...) are compiled for a GPU and interpreted kernels would "
                        "fail with \"Cannot call @triton.jit'd outside of the scope of a "
                        "kernel\"; " + _WHERE)
            return None
        return f"Triton does not run on {device.type} devices; " + _CPU_HINT

    def unsupported_dtype_reason(self, dtype: torch.dtype, device) -> Optional[str]:
        device = torch.device(device)
        if dtype not in launcher.DTYPES:
            return f"the triton backend supports float32, float16 and bfloat16, not {dtype}"
        if dtype == torch.bfloat16 and device.type == "cpu":
            return ("the triton backend on CPU runs Triton's interpreter, whose bfloat16 "
                    "arithmetic is wrong; use float32 or float16 there (bfloat16 runs on CUDA)")
        return None

    def unsupported_block_reason(self, parts, training: bool) -> Optional[str]:
        # The implicit GEMM (conv.py) and its backward are dense: no grouped (ResNeXt)
        # or dilated (segmentation backbones) variant.
        # A pooled shortcut (ResNet-D): the window average rides in the projection
        # GEMM's loader (pool.py), for the pools it covers. Gates: _gate_reason.
        reason = self._gate_reason(parts, training)
        if reason is not None:
            return reason
        if parts.shortcut is not None and parts.shortcut.pool is not None:
            reason = pool_unsupported_reason(parts.shortcut.pool, parts.shortcut.conv)
            if reason is not None:
                return reason
        sts = parts.stages + ((parts.shortcut,) if parts.shortcut is not None else ())
        for st in sts:
            c = st.conv
            if c.groups != 1 or c.dilation[0] != 1:
                return (f"the triton backend computes dense convolutions only, and this "
                        f"block has a {c.kernel_size[0]}x{c.kernel_size[1]} convolution with "
                        f"groups={c.groups}, dilation={c.dilation[0]}")
        return None

    def forward_eval(self, parts, folded: FoldedBlock, x: torch.Tensor) -> torch.Tensor:
        """CompositeBackend's stage walk over this namespace's eval ops (a gated last
        stage: conv_bias_pool, the gate, gate_shortcut_relu); with a pooled shortcut the
        join is conv_bias_pool_shortcut_relu (ungated) or gate_pool_shortcut_relu
        (gated), whose projection GEMM averages x's windows as it loads them (the
        pooled x is never written)."""
        pool = shortcut_pool(parts)
        if pool is None:
            return super().forward_eval(parts, folded, x)
        ops, y = self.ops, x
        for f in folded.stages[:-1]:   # (gates inside the chain are declined)
            y = ops.conv_bias_relu(y, f.w, f.b, f.stride, f.padding, f.dilation, f.groups)
        last, sc, stride = folded.stages[-1], folded.shortcut, pool_stride(parts)
        bias = last.b
        if sc.b is not None:   # a gated last stage (fold.py keeps the shortcut's bias)
            gate = eval_branch_gate(parts, ops, y, last)
            if gate is not None:
                return ops.gate_pool_shortcut_relu(gate[1], gate[0], x, sc.w, sc.b,
                                                   pool.kernel, stride, pool.ceil_mode)
            bias = bias + sc.b   # only sample gates, in eval: the identity
        return ops.conv_bias_pool_shortcut_relu(y, last.w, bias, x, sc.w, last.padding,
                                                pool.kernel, stride, pool.ceil_mode)

    def _gate_reason(self, parts, training: bool) -> Optional[str]:
        """Gates on the last stage are computed in eval (conv_bias_pool, then the
        gates' modules on (N, C, 1, 1), then gate_shortcut_relu, or beside a pooled
        shortcut gate_pool_shortcut_relu) and in training (sample gates and constant
        scales: block_train's `gate`; channel gates: train_gated.py; either beside a
        pooled shortcut too); not yet: a gate inside the chain (RegNet's SE before the
        last 1x1) or synchronized BNs in training."""
        if not parts.gates:
            return None
        if any(g.stage != len(parts.stages) - 1 for g in parts.gates):
            return gate_reason(parts, self.name, "a gate inside the chain of convolutions")
        if not training:
            return None
        if train_unsupported_reason(parts) is not None:
            return gate_reason(parts, self.name, "training gated branches outside block_train "
                               f"({train_unsupported_reason(parts)})")
        if any(isinstance(bn, nn.SyncBatchNorm) for bn in parts.bns()):
            return gate_reason(parts, self.name, "training gated branches with synchronized "
                               "BatchNorm")
        return None

    @staticmethod
    def _sample_gate(parts, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The product of the last stage's sample gates (and constant scales), drawn now
        as their modules draw (the block's only RNG calls, so drawing before the
        convolutions keeps the plain block's order), for block_train's `gate`; None for
        an ungated block."""
        if not parts.gates:
            return None
        return branch_gate(parts, x, None)

    def forward_train(self, parts, x: torch.Tensor, groups=None) -> torch.Tensor:
        group = block_group(groups, parts)
        if group is None or train_unsupported_reason(parts) is not None:
            # BNs synchronized over different groups (or some local): one collective
            # per BN, which the fused block does not do; the composite path does. A
            # chain the training kernels lack (not 1x1/3x3 'same'): the same.
            if parts.gates and group is None:
                # (_gate_reason declined the other case.) The composite's gated join
                # needs the gate ops this namespace lacks.
                raise ValueError("the triton backend trains a gated block only with all "
                                 "its BNs local or synchronized over one group; use "
                                 "backend='torch' for this block")
            return super().forward_train(parts, x, groups)
        if any(g.kind == CHANNEL for g in parts.gates):
            if group:
                raise ValueError("the triton backend trains a channel-gated block with local "
                                 "BNs only, this one's are synchronized; use "
                                 "backend='torch' for this block")
            return train_gated_block(parts, x)
        return train_block(parts, x, group, gate=self._sample_gate(parts, x))

    def forward_frozen(self, parts, x: torch.Tensor) -> torch.Tensor:
        """The fused training block with every BN frozen (block_train's `running`):
        running statistics in the prologues and the join, no statistics in the
        epilogues, no update; the backward without the statistics terms. A chain the
        training kernels lack goes the composite way (bn_frozen_act)."""
        if train_unsupported_reason(parts) is not None or any(
                g.kind == CHANNEL for g in parts.gates):
            # (A channel-gated block: ATen convolutions and BN around the gates'
            # modules, until block_train takes channel gates.)
            return super().forward_frozen(parts, x)
        return train_block(parts, x, frozen=True, gate=self._sample_gate(parts, x))


__all__ = ["TritonBackend"]
