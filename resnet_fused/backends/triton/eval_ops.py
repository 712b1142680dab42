"""The triton backend's eval ops: conv_bias_relu (every stage but the last),
conv_bias_shortcut_relu (the last stage with the shortcut) and
conv_bias_pool_shortcut_relu (the same with ResNet-D's pooled shortcut); for a gated
last stage (README.md, Design, "Gates and pooled shortcuts") conv_bias_pool (the branch
conv + bias, with its per-(n, k) sums accumulated in the same epilogue) and
gate_shortcut_relu (relu(gate * branch + shortcut): the projection GEMM's epilogue, or
one elementwise pass for the identity) and gate_pool_shortcut_relu (the same beside a
pooled shortcut: the pooled projection GEMM with the gated epilogue). Dense convolutions only:
groups != 1 or dilation != 1 is refused with an error (conv_checks.py), and the
backend's unsupported_block_reason routes such blocks to another backend.

Defined with resnet_fused.ops.define_op: triton_ops on a GPU (kernels launched through
launcher.py, which uses wrap_triton while tracing), so torch.compile(fullgraph=True)
traces into the Triton kernels instead of treating the ops as opaque, and the Python
body doubles as the fake implementation; under TRITON_INTERPRET=1 opaque custom_ops
with the op layer's fakes (an interpreted kernel cannot be traced). Autograd (for
gradients through an eval-mode model) is the op layer's (resnet_fused/ops.py): dReLU
plus ATen's convolution_backward. The functions keep full annotations: torch 2.11
ignores triton_op's schema= and infers the schema from them.

Layout: the kernels work on channels_last tensors. NCHW inputs are converted once
on entry and the result is returned NCHW (the schemas' rule: outputs keep the
memory format of the first activation argument).
"""
from __future__ import annotations

from typing import Optional

import torch

from ...ops import like_format
from .conv import AvgPool, Epilogue, ResidualAdd, SecondGemm, conv2d_nhwc
from .conv_checks import (check_conv_bias_pool, check_conv_bias_pool_shortcut_relu,
                          check_conv_bias_relu, check_conv_bias_shortcut_relu,
                          check_gate_pool_shortcut_relu, check_gate_shortcut_relu)
from .gate import gate_join_identity, gate_nk
from .launcher import define_triton_op


def conv_bias_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int,
                   padding: int, dilation: int = 1, groups: int = 1) -> torch.Tensor:
    check_conv_bias_relu(x, weight, bias, stride, padding, dilation, groups)
    out = conv2d_nhwc(x, weight.to(x.dtype), stride, padding,
                      epilogue=Epilogue(bias, relu=True)).out
    return like_format(out, x)


def conv_bias_shortcut_relu(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            x: torch.Tensor, shortcut_weight: Optional[torch.Tensor],
                            padding: int, shortcut_stride: int, shortcut_padding: int,
                            dilation: int = 1, groups: int = 1) -> torch.Tensor:
    check_conv_bias_shortcut_relu(y, weight, bias, x, shortcut_weight, padding,
                                  shortcut_stride, shortcut_padding, dilation, groups)
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
    return like_format(out, y)


def conv_bias_pool_shortcut_relu(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                 x: torch.Tensor, shortcut_weight: torch.Tensor,
                                 padding: int, pool_kernel: int, pool_stride: int,
                                 ceil_mode: bool) -> torch.Tensor:
    """ResNet-D's join: the projection GEMM averages x's windows as it loads them
    (conv.py, _pool_gemm_loop), so the pooled x is never written."""
    check_conv_bias_pool_shortcut_relu(y, weight, bias, x, shortcut_weight, padding,
                                       pool_kernel, pool_stride, ceil_mode)
    second = SecondGemm(x, shortcut_weight.to(y.dtype), pool_stride, 0,
                        AvgPool(pool_kernel, bool(ceil_mode)))
    out = conv2d_nhwc(y, weight.to(y.dtype), 1, padding, second=second,
                      epilogue=Epilogue(bias, relu=True)).out
    return like_format(out, y)


def conv_bias_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int,
                   padding: int, dilation: int = 1,
                   groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    check_conv_bias_pool(x, weight, bias, stride, padding, dilation, groups)
    N, K = x.shape[0], weight.shape[0]
    sums = torch.zeros((N, K), device=x.device, dtype=torch.float32)
    out = conv2d_nhwc(x, weight.to(x.dtype), stride, padding, epilogue=Epilogue(bias),
                      pool_sums=sums).out
    # The mean from the sums: N x K floats.
    return like_format(out, x), sums / (out.shape[2] * out.shape[3])


def gate_shortcut_relu(y: torch.Tensor, gate: torch.Tensor, x: torch.Tensor,
                       shortcut_weight: Optional[torch.Tensor],
                       shortcut_bias: Optional[torch.Tensor], shortcut_stride: int,
                       shortcut_padding: int) -> torch.Tensor:
    check_gate_shortcut_relu(y, gate, x, shortcut_weight, shortcut_bias, shortcut_stride,
                             shortcut_padding)
    g = gate_nk(gate, y.shape[0], y.shape[1])
    if shortcut_weight is None:
        y = like_format(y, y)
        return gate_join_identity(y, g, like_format(x, y))
    # The projection GEMM over x with the gated branch as its epilogue's residual.
    out = conv2d_nhwc(x, shortcut_weight.to(y.dtype), shortcut_stride, shortcut_padding,
                      residual=ResidualAdd(y, gate=g),
                      epilogue=Epilogue(shortcut_bias, relu=True)).out
    return like_format(out, y)


def gate_pool_shortcut_relu(y: torch.Tensor, gate: torch.Tensor, x: torch.Tensor,
                            shortcut_weight: torch.Tensor, shortcut_bias: Optional[torch.Tensor],
                            pool_kernel: int, pool_stride: int,
                            ceil_mode: bool) -> torch.Tensor:
    """A gated branch beside ResNet-D's pooled shortcut: the projection GEMM averages
    x's windows as it loads them (conv.py, _pool_gemm_loop) and its epilogue adds the
    gated branch (RES_GATE), one launch; the pooled x is never written."""
    check_gate_pool_shortcut_relu(y, gate, x, shortcut_weight, shortcut_bias, pool_kernel,
                                  pool_stride, ceil_mode)
    g = gate_nk(gate, y.shape[0], y.shape[1])
    out = conv2d_nhwc(x, shortcut_weight.to(y.dtype), pool_stride, 0,
                      pool=AvgPool(pool_kernel, bool(ceil_mode)),
                      residual=ResidualAdd(y, gate=g),
                      epilogue=Epilogue(shortcut_bias, relu=True)).out
    return like_format(out, y)


for _fn in (conv_bias_relu, conv_bias_shortcut_relu, conv_bias_pool_shortcut_relu,
            conv_bias_pool, gate_shortcut_relu, gate_pool_shortcut_relu):
    define_triton_op(_fn.__name__, _fn)
