"""The triton backend's eval ops: K1 conv_bias_relu and K2 conv_bias_shortcut_relu.

Registered with torch.library.triton_op (kernels launched through launcher.py, which
uses wrap_triton while tracing), so
torch.compile(fullgraph=True) traces into the Triton kernels instead of treating the
ops as opaque, and the Python body doubles as the fake implementation. Schemas are
those of resnet_fused/schemas.py. Autograd (for gradients through an eval-mode
model) is the op layer's (resnet_fused/ops.py): dReLU plus ATen's
convolution_backward.

Layout: the kernels work on channels_last tensors. NCHW inputs are converted once
on entry and the result is returned NCHW (the schemas' rule: outputs keep the
memory format of the first activation argument).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import triton_op

from ... import ops as op_layer
from ...schemas import SCHEMAS
from .conv import Epilogue, ResidualAdd, SecondGemm, conv2d_nhwc
from .conv_checks import check_conv_bias_relu, check_conv_bias_shortcut_relu
from .launcher import INTERPRET

NS = "resnet_fused_triton"


def _schema_tail(name: str) -> str:
    return SCHEMAS[name][len(name):]


def _restore_format(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return out.contiguous(memory_format=op_layer.memory_format_of(like))


def _op(name: str):
    """triton_op on a GPU; an opaque custom_op with the op layer's fake under the interpreter.

    Under TRITON_INTERPRET=1 an interpreted kernel cannot be traced (torch 2.14's
    wrap_triton hands it back unwrapped, 2.11's rejects it): a triton_op's fake (its
    own body) would run the kernel on fake tensors, and torch.compile would have no
    kernel node to put in the graph. There the op is opaque, which is all a compiler
    can do with an interpreted kernel.

    triton_op's `schema=` is honoured from torch 2.14 on; older torch (2.11 on the GPU
    image) infers it from the annotations: the same signature with `SymInt` for `int`.
    """
    schema = _schema_tail(name)

    def register(fn):
        if INTERPRET:
            op = torch.library.custom_op(f"{NS}::{name}", fn, mutates_args=(), schema=schema)
            op.register_fake(op_layer.FAKES[name])
            return op
        return triton_op(f"{NS}::{name}", fn, mutates_args=(), schema=schema)

    return register


@_op("conv_bias_relu")
def conv_bias_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int,
                   padding: int) -> torch.Tensor:
    check_conv_bias_relu(x, weight, bias, stride, padding)
    out = conv2d_nhwc(x, weight.to(x.dtype), stride, padding,
                      epilogue=Epilogue(bias, relu=True)).out
    return _restore_format(out, x)


@_op("conv_bias_shortcut_relu")
def conv_bias_shortcut_relu(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            x: torch.Tensor, shortcut_weight: Optional[torch.Tensor],
                            padding: int, shortcut_stride: int,
                            shortcut_padding: int) -> torch.Tensor:
    check_conv_bias_shortcut_relu(y, weight, bias, x, shortcut_weight, padding,
                                  shortcut_stride, shortcut_padding)
    if shortcut_weight is None:
        # Identity shortcut: x is the residual added in the epilogue.
        out = conv2d_nhwc(y, weight.to(y.dtype), 1, padding, residual=ResidualAdd(x),
                          epilogue=Epilogue(bias, relu=True)).out
    else:
        # Projection: a second GEMM over x into the same accumulator; its folded
        # bias is already inside `bias`.
        second = SecondGemm(x, shortcut_weight.to(y.dtype), shortcut_stride, shortcut_padding)
        out = conv2d_nhwc(y, weight.to(y.dtype), 1, padding, second=second,
                          epilogue=Epilogue(bias, relu=True)).out
    return _restore_format(out, y)


# Fakes were registered with each op above (interpreter) or come from triton_op itself.
op_layer.register_op_layer(NS, fakes=False,
                           names=("conv_bias_relu", "conv_bias_shortcut_relu"))

__all__ = ["NS", "conv_bias_relu", "conv_bias_shortcut_relu"]
