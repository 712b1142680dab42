"""The `triton` backend: implicit-GEMM convolutions with fused prologues/epilogues.

Eval: two kernels per block (eval_ops.py): K1 relu(conv(x, W1') + b1'), K2
relu(conv(y1, W2') + b2' + shortcut) with a projection shortcut as a second GEMM
into the same accumulator. Training: train.py (the fused training path, one op
block_train); a synchronized block whose BNs are not all synchronized over one
process group goes the composite way instead (CompositeBackend.forward_train: ATen
convolutions around this backend's BN ops of bn.py).

Runs on CUDA GPUs of compute capability >= 8.0, and on CPU through Triton's
interpreter when TRITON_INTERPRET=1 was set before resnet_fused was imported
(kernels are bound to the interpreter when they are defined).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

import triton  # noqa: F401  (ImportError here makes the registry report the backend unavailable)

from ..composite import CompositeBackend
from . import bn  # noqa: F401  (defines the resnet_fused_triton BN ops)
from . import conv as _conv
from . import conv_bwd as _conv_bwd
from . import eval_ops  # noqa: F401  (defines the resnet_fused_triton eval ops)
from . import launcher
# train defines block_train; imported here, never while tracing.
from .train import block_group, parts_of, train_block

# Every op is defined by now: tell torch which kernels its triton_ops run (launcher.py).
# Under the interpreter the ops are custom_ops, which torch keeps no kernel list for.
launcher.declare_kernels(launcher.NS, (bn, _conv, _conv_bwd))

_CPU_HINT = ("Triton needs a CUDA GPU; on CPU set TRITON_INTERPRET=1 before importing "
             "resnet_fused to use the interpreter")


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
                        "defined; set it before importing resnet_fused")
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

    # forward_eval: CompositeBackend's K1 -> K2 over this namespace's eval ops.

    def forward_train(self, block, x: torch.Tensor, groups=None) -> torch.Tensor:
        parts = parts_of(block)
        group = block_group(groups, parts)
        if group is None:
            # BNs synchronized over different groups (or some local): one collective
            # per BN, which the fused block does not do; the composite path does.
            return super().forward_train(block, x, groups)
        return train_block(parts, x, group)


__all__ = ["TritonBackend"]
