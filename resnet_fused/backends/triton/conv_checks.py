"""Input checks of the triton backend's public convolution ops, eval_ops.py's
resnet_fused_triton::conv_bias_relu, conv_bias_shortcut_relu,
conv_bias_pool_shortcut_relu, conv_bias_pool, gate_shortcut_relu and
gate_pool_shortcut_relu.

This is where user input to the Triton convolutions is validated, once, with an error
that names the op and what was wrong; conv.py's conv2d_nhwc only asserts what
its in-package callers guarantee.
"""
from __future__ import annotations

import torch

from ...ops import conv_out_hw
from .launcher import DTYPES as _DTYPES, NS
from .pool import pool_out_hw


def _tensor(op: str, name: str, t, dims: int, axes: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{NS}::{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{NS}::{op}: {name} must be {dims}-D ({axes}), got shape "
                         f"{tuple(t.shape)}")
    return t


def _activation(op: str, name: str, t) -> torch.Tensor:
    _tensor(op, name, t, 4, "N, C, H, W")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{NS}::{op}: {name} dtype must be float32, float16 or bfloat16, "
                        f"got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{NS}::{op}: {name} is empty (shape {tuple(t.shape)})")
    return t


def _weight(op: str, name: str, w, act: torch.Tensor, act_name: str) -> None:
    """w [K, C, R, S]: floating (it is cast to the activation dtype), act's channels
    and device."""
    _tensor(op, name, w, 4, "K, C, R, S")
    if not w.is_floating_point():
        raise TypeError(f"{NS}::{op}: {name} must be floating point, got {w.dtype}")
    if w.shape[1] != act.shape[1]:
        raise ValueError(f"{NS}::{op}: {name} expects {w.shape[1]} input channels, "
                         f"{act_name} has {act.shape[1]}")
    if w.device != act.device:
        raise ValueError(f"{NS}::{op}: {name} is on {w.device}, {act_name} on {act.device}")


def _bias(op: str, bias, K: int, device) -> None:
    _tensor(op, "bias", bias, 1, "K")
    if bias.shape[0] != K:
        raise ValueError(f"{NS}::{op}: bias must have shape ({K},), got {tuple(bias.shape)}")
    if not bias.is_floating_point():
        raise TypeError(f"{NS}::{op}: bias must be floating point, got {bias.dtype}")
    if bias.device != device:
        raise ValueError(f"{NS}::{op}: bias is on {bias.device}, the activation on {device}")


def _int(op: str, name: str, v, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{NS}::{op}: {name} must be an int >= {lo}, got {v!r}")


def _dense(op: str, dilation, groups) -> None:
    """The implicit GEMM has no grouped or dilated variant: refused here, by name."""
    _int(op, "dilation", dilation, 1)
    _int(op, "groups", groups, 1)
    if groups != 1 or dilation != 1:
        raise ValueError(f"{NS}::{op}: the Triton convolutions compute groups=1, "
                         f"dilation=1 only, got groups={groups}, dilation={dilation}; use "
                         "the native or torch backend for grouped or dilated convolutions")


def _out_hw(op: str, x: torch.Tensor, w: torch.Tensor, stride: int, padding: int):
    P, Q = conv_out_hw(x.shape[2], x.shape[3], w.shape[2], w.shape[3], stride, padding)
    if P <= 0 or Q <= 0:
        raise ValueError(f"{NS}::{op}: empty output {P}x{Q} for input {tuple(x.shape[2:])}, "
                         f"kernel {tuple(w.shape[2:])}, stride {stride}, padding {padding}")
    return P, Q


def _conv_bias_inputs(op, x, weight, bias, stride, padding, dilation, groups) -> None:
    """The checks of one dense convolution with a bias, named after `op`."""
    _activation(op, "x", x)
    _int(op, "stride", stride, 1)
    _int(op, "padding", padding, 0)
    _dense(op, dilation, groups)
    _weight(op, "weight", weight, x, "x")
    _bias(op, bias, weight.shape[0], x.device)
    _out_hw(op, x, weight, stride, padding)


def check_conv_bias_relu(x, weight, bias, stride, padding, dilation=1, groups=1) -> None:
    _conv_bias_inputs("conv_bias_relu", x, weight, bias, stride, padding, dilation, groups)


def _join_inputs(op, y, weight, bias, x, padding, dilation=1, groups=1) -> tuple:
    """The checks of the eval joins' main branch and x; the output shape."""
    _activation(op, "y", y)
    _int(op, "padding", padding, 0)
    _dense(op, dilation, groups)
    _weight(op, "weight", weight, y, "y")
    _bias(op, bias, weight.shape[0], y.device)
    out = (y.shape[0], weight.shape[0], *_out_hw(op, y, weight, 1, padding))
    _activation(op, "x", x)
    if x.dtype != y.dtype:
        raise TypeError(f"{NS}::{op}: x dtype {x.dtype} differs from y dtype {y.dtype}")
    if x.device != y.device:
        raise ValueError(f"{NS}::{op}: x is on {x.device}, y on {y.device}")
    return out


def check_conv_bias_shortcut_relu(y, weight, bias, x, shortcut_weight, padding,
                                  shortcut_stride, shortcut_padding, dilation=1,
                                  groups=1) -> None:
    op = "conv_bias_shortcut_relu"
    out = _join_inputs(op, y, weight, bias, x, padding, dilation, groups)
    if shortcut_weight is None:
        if tuple(x.shape) != out:
            raise ValueError(f"{NS}::{op}: the identity shortcut x must have the output "
                             f"shape {out}, got {tuple(x.shape)}")
        return
    _int(op, "shortcut_stride", shortcut_stride, 1)
    _int(op, "shortcut_padding", shortcut_padding, 0)
    _weight(op, "shortcut_weight", shortcut_weight, x, "x")
    sc = (x.shape[0], shortcut_weight.shape[0],
          *_out_hw(op, x, shortcut_weight, shortcut_stride, shortcut_padding))
    if sc != out:
        raise ValueError(f"{NS}::{op}: the projection shortcut conv(x, shortcut_weight) has "
                         f"shape {sc}, the main branch {out}")


def _pooled_shortcut(op, x, shortcut_weight, pool_kernel, pool_stride, ceil_mode) -> tuple:
    """The checks of a pooled shortcut conv(avg_pool2d(x), shortcut_weight); its shape."""
    _int(op, "pool_kernel", pool_kernel, 1)
    _int(op, "pool_stride", pool_stride, 1)
    _weight(op, "shortcut_weight", shortcut_weight, x, "x")
    if tuple(shortcut_weight.shape[2:]) != (1, 1):
        raise ValueError(f"{NS}::{op}: shortcut_weight must be 1x1, got shape "
                         f"{tuple(shortcut_weight.shape)}")
    hw = pool_out_hw(x.shape[2], x.shape[3], pool_kernel, pool_stride, bool(ceil_mode))
    if min(hw) < 1:
        raise ValueError(f"{NS}::{op}: x {tuple(x.shape)} is smaller than the pool's "
                         f"{pool_kernel}x{pool_kernel} window")
    return (x.shape[0], shortcut_weight.shape[0], *hw)


def check_conv_bias_pool_shortcut_relu(y, weight, bias, x, shortcut_weight, padding,
                                       pool_kernel, pool_stride, ceil_mode) -> None:
    op = "conv_bias_pool_shortcut_relu"
    out = _join_inputs(op, y, weight, bias, x, padding)
    sc = _pooled_shortcut(op, x, shortcut_weight, pool_kernel, pool_stride, ceil_mode)
    if sc != out:
        raise ValueError(f"{NS}::{op}: the pooled shortcut conv(avg_pool2d(x), "
                         f"shortcut_weight) has shape {sc}, the main branch {out}")


def check_conv_bias_pool(x, weight, bias, stride, padding, dilation=1, groups=1) -> None:
    """As conv_bias_relu's (the same convolution, no ReLU, plus its pool)."""
    _conv_bias_inputs("conv_bias_pool", x, weight, bias, stride, padding, dilation, groups)


def _gate_join_inputs(op, y, gate, x) -> None:
    """The checks of a gated join's branch y, its gate and x."""
    _activation(op, "y", y)
    _activation(op, "x", x)
    if x.dtype != y.dtype:
        raise TypeError(f"{NS}::{op}: x dtype {x.dtype} differs from y dtype {y.dtype}")
    if x.device != y.device:
        raise ValueError(f"{NS}::{op}: x is on {x.device}, y on {y.device}")
    N, K = y.shape[:2]
    _tensor(op, "gate", gate, 4, "N, C, 1, 1")
    if (not gate.is_floating_point() or gate.device != y.device
            or gate.shape[0] not in (1, N) or gate.shape[1] not in (1, K)
            or gate.shape[2:] != (1, 1)):
        raise ValueError(f"{NS}::{op}: gate must be a floating tensor on {y.device} of shape "
                         f"({N} or 1, {K} or 1, 1, 1), got {tuple(gate.shape)} {gate.dtype} "
                         f"on {gate.device}")


def check_gate_shortcut_relu(y, gate, x, shortcut_weight, shortcut_bias, shortcut_stride,
                             shortcut_padding) -> None:
    op = "gate_shortcut_relu"
    _gate_join_inputs(op, y, gate, x)
    if shortcut_weight is None:
        if shortcut_bias is not None:
            raise ValueError(f"{NS}::{op}: shortcut_bias without shortcut_weight")
        if x.shape != y.shape:
            raise ValueError(f"{NS}::{op}: the identity shortcut x must have y's shape "
                             f"{tuple(y.shape)}, got {tuple(x.shape)}")
        return
    _int(op, "shortcut_stride", shortcut_stride, 1)
    _int(op, "shortcut_padding", shortcut_padding, 0)
    _weight(op, "shortcut_weight", shortcut_weight, x, "x")
    if shortcut_bias is not None:
        _bias(op, shortcut_bias, shortcut_weight.shape[0], x.device)
    sc = (x.shape[0], shortcut_weight.shape[0],
          *_out_hw(op, x, shortcut_weight, shortcut_stride, shortcut_padding))
    if sc != tuple(y.shape):
        raise ValueError(f"{NS}::{op}: the projection shortcut conv(x, shortcut_weight) has "
                         f"shape {sc}, the branch y {tuple(y.shape)}")


def check_gate_pool_shortcut_relu(y, gate, x, shortcut_weight, shortcut_bias, pool_kernel,
                                  pool_stride, ceil_mode) -> None:
    op = "gate_pool_shortcut_relu"
    _gate_join_inputs(op, y, gate, x)
    sc = _pooled_shortcut(op, x, shortcut_weight, pool_kernel, pool_stride, ceil_mode)
    if shortcut_bias is not None:
        _bias(op, shortcut_bias, shortcut_weight.shape[0], x.device)
    if sc != tuple(y.shape):
        raise ValueError(f"{NS}::{op}: the pooled shortcut conv(avg_pool2d(x), "
                         f"shortcut_weight) has shape {sc}, the branch y {tuple(y.shape)}")


__all__ = ["check_conv_bias_pool", "check_conv_bias_pool_shortcut_relu",
           "check_conv_bias_relu", "check_conv_bias_shortcut_relu",
           "check_gate_pool_shortcut_relu", "check_gate_shortcut_relu"]
