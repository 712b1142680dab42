"""The torch backend's ops: each op of schemas.COMMON_OPS and GATE_OPS as ATen ops.

Defined under the namespace `resnet_fused_torch` with ops.define_op (custom_ops), so
they run on any device and dtype PyTorch supports (float64 included, for gradcheck),
and are the numerical twin of the native and triton kernels: same inputs, same
outputs, same packed mask. They are the reference the op contract test
(tests/test_op_contract.py) holds every backend's ops to, in float64.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F

from .. import graph_capture
from ..ops import define_op, is_channels_last, stats_dtype
from ..schemas import NAMESPACES

NS = NAMESPACES["torch"]
_BIT_WEIGHTS = {}  # device -> the 8 bit weights of pack_mask (graph_capture.py: never
# one made while a CUDA graph captures)


def _physical_flat(t: torch.Tensor) -> torch.Tensor:
    """t's elements in memory order (NHWC order for channels_last)."""
    return (t.permute(0, 2, 3, 1) if is_channels_last(t) else t).reshape(-1)


def pack_mask(positive: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor into the schemas' mask format (bit i%8 of byte i//8)."""
    flat = _physical_flat(positive).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = _BIT_WEIGHTS.get(flat.device)
    if weights is None:
        weights = (2 ** torch.arange(8, device=flat.device)).to(torch.uint8)
        if not graph_capture.capturing(flat):  # made during a capture: the graph's alone
            _BIT_WEIGHTS[flat.device] = weights
    return (flat.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The bool tensor (shape and layout of `like`) that `mask` packs."""
    shifts = torch.arange(8, device=mask.device, dtype=torch.uint8)
    bits = ((mask.unsqueeze(1) >> shifts) & 1).reshape(-1)[: like.numel()].bool()
    if is_channels_last(like):
        n, c, h, w = like.shape
        return bits.view(n, h, w, c).permute(0, 3, 1, 2)
    return bits.view(like.shape)


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def channel_stats(x):
    var, mean = torch.var_mean(x.to(stats_dtype(x)), dim=(0, 2, 3), correction=0)
    return mean, var


def finalize(mean, var, weight, bias, running_mean, running_var, num_batches_tracked,
             momentum: float, eps: float, count):
    """bn_finalize's computation; `count` may be an int or a 0-dim tensor on the device
    (the global count of a synchronized BN, never read on the host)."""
    invstd = torch.rsqrt(var + eps)
    scale = weight.to(mean.dtype) * invstd
    shift = bias.to(mean.dtype) - mean * scale
    num_batches_tracked.add_(1)
    # The factor is a Python float for a fixed momentum (lerp takes a scalar weight):
    # torch.tensor(momentum, device=...) would be a pageable host-to-device copy, a host
    # synchronisation that CUDA-graph capture rejects. momentum=None (cumulative moving
    # average) reads the factor on the device.
    if momentum < 0:
        factor = 1.0 / num_batches_tracked.to(mean.dtype)
    else:
        factor = float(momentum)
    unbiased = var * (count / (count - 1))
    running_mean.copy_(torch.lerp(running_mean.to(mean.dtype), mean, factor))
    running_var.copy_(torch.lerp(running_var.to(mean.dtype), unbiased, factor))
    return invstd, scale, shift


def bn_finalize(mean, var, weight, bias, running_mean, running_var, num_batches_tracked,
                momentum, eps, count):
    return finalize(mean, var, weight, bias, running_mean, running_var,
                    num_batches_tracked, momentum, eps, count)


def bn_act(c, mean, invstd, weight, bias, residual: Optional[torch.Tensor]):
    scale = weight.to(mean.dtype) * invstd
    shift = bias.to(mean.dtype) - mean * scale
    y = c.to(mean.dtype) * _per_channel(scale) + _per_channel(shift)
    if residual is not None:
        y = y + residual.to(mean.dtype)
    y = y.relu_()
    positive = y > 0
    out = torch.empty_like(c)
    out.copy_(y)
    return out, pack_mask(positive)


def _g_xhat(grad_out, mask: Optional[torch.Tensor], c, mean, invstd):
    """g = grad_out * mask (no mask: a BN without ReLU) and xhat, in the stats dtype."""
    acc = mean.dtype
    g = grad_out.to(acc)
    if mask is not None:
        g = g * unpack_mask(mask, c)
    return g, (c.to(acc) - _per_channel(mean)) * _per_channel(invstd)


def _apply(g, xhat, c, invstd, weight, mean_g, mean_gx, residual_grad: bool):
    grad_c_acc = _per_channel(weight.to(invstd.dtype) * invstd) * (
        g - _per_channel(mean_g) - xhat * _per_channel(mean_gx))
    grad_c = torch.empty_like(c)
    grad_c.copy_(grad_c_acc)
    if residual_grad:
        grad_res = torch.empty_like(c)
        grad_res.copy_(g)
    else:
        grad_res = c.new_empty((0,))
    return grad_c, grad_res


def backward_reduce(grad_out, mask: Optional[torch.Tensor], c, mean, invstd):
    """The backward's per-channel reductions (sum g, sum g*xhat): the synchronized BN
    all-reduces them between this pass and backward_apply."""
    g, xhat = _g_xhat(grad_out, mask, c, mean, invstd)
    return g.sum((0, 2, 3)), (g * xhat).sum((0, 2, 3))


def backward_apply(grad_out, mask: Optional[torch.Tensor], c, mean, invstd, weight,
                   mean_g, mean_gx, residual_grad: bool):
    """grad_c = weight * invstd * (g - mean_g - xhat * mean_gx) in c's dtype and layout,
    and g as the residual's gradient when asked; mean_g / mean_gx are the reductions
    divided by the count they were summed over (the global one when synchronized)."""
    g, xhat = _g_xhat(grad_out, mask, c, mean, invstd)
    return _apply(g, xhat, c, invstd, weight, mean_g, mean_gx, residual_grad)


def bn_act_backward(grad_out, mask, c, mean, invstd, weight, residual_grad):
    m = c.numel() // c.shape[1]
    g, xhat = _g_xhat(grad_out, mask, c, mean, invstd)
    grad_bias, grad_weight = g.sum((0, 2, 3)), (g * xhat).sum((0, 2, 3))
    grad_c, grad_res = _apply(g, xhat, c, invstd, weight, grad_bias / m, grad_weight / m,
                              residual_grad)
    return grad_c, grad_weight, grad_bias, grad_res


def bn_frozen_act(c, mean, invstd, weight, bias, residual: Optional[torch.Tensor]):
    return bn_act(c, mean, invstd, weight, bias, residual)


def bn_frozen_act_backward(grad_out, mask, c, mean, invstd, weight, residual_grad,
                           param_grads):
    g, xhat = _g_xhat(grad_out, mask, c, mean, invstd)
    zero = mean.new_zeros(mean.shape)  # no statistics terms: mean and invstd are constants
    grad_c, grad_res = _apply(g, xhat, c, invstd, weight, zero, zero, residual_grad)
    if param_grads:
        return grad_c, (g * xhat).sum((0, 2, 3)), g.sum((0, 2, 3)), grad_res
    return grad_c, mean.new_empty((0,)), mean.new_empty((0,)), grad_res


def conv_bias_relu(x, weight, bias, stride, padding, dilation=1, groups=1):
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups).relu_()


def conv_bias_shortcut_relu(y, weight, bias, x, shortcut_weight: Optional[torch.Tensor],
                            padding, shortcut_stride, shortcut_padding, dilation=1, groups=1):
    out = F.conv2d(y, weight, bias, 1, padding, dilation, groups)
    # In place on the fresh conv result (the add's backward needs neither operand).
    if shortcut_weight is not None:
        out.add_(F.conv2d(x, shortcut_weight, None, shortcut_stride, shortcut_padding))
    else:
        out.add_(x)
    return out.relu_()


# --------------------------------------------------------------------------- gates
def _bn_apply(c, mean, invstd, weight, bias):
    """bn(c) in the statistics dtype."""
    scale = weight.to(mean.dtype) * invstd
    shift = bias.to(mean.dtype) - mean * scale
    return c.to(mean.dtype) * _per_channel(scale) + _per_channel(shift)


def bn_pool(c, mean, invstd, weight, bias):
    # mean_hw(bn(c)) = bn applied to mean_hw(c): BN is affine per channel.
    pooled_c = c.to(mean.dtype).mean((2, 3))
    scale = weight.to(mean.dtype) * invstd
    return (pooled_c - mean) * scale + (bias.to(mean.dtype))


def bn_pool_backward(grad_pooled, c, mean, invstd, weight):
    n, k, h, w = c.shape
    acc = mean.dtype
    gp = grad_pooled.to(acc)
    mxhat = (c.to(acc).mean((2, 3)) - mean) * invstd          # mean_hw(xhat), (N, C)
    grad_bias = gp.sum(0)
    grad_weight = (gp * mxhat).sum(0)
    m = n * h * w
    xhat = (c.to(acc) - _per_channel(mean)) * _per_channel(invstd)
    grad_c_acc = _per_channel(weight.to(acc) * invstd) * (
        (gp / (h * w)).view(n, k, 1, 1) - _per_channel(grad_bias / m)
        - xhat * _per_channel(grad_weight / m))
    grad_c = torch.empty_like(c)
    grad_c.copy_(grad_c_acc)
    return grad_c, grad_weight, grad_bias


def bn_gate_act(c, mean, invstd, weight, bias, gate, residual: Optional[torch.Tensor]):
    y = _bn_apply(c, mean, invstd, weight, bias) * gate.to(mean.dtype)
    if residual is not None:
        y = y + residual.to(mean.dtype)
    y = y.relu_()
    out = torch.empty_like(c)
    out.copy_(y)
    return out, pack_mask(y > 0)


def _sum_to(t: torch.Tensor, shape) -> torch.Tensor:
    """t summed over the dimensions a tensor of `shape` broadcasts along."""
    dims = tuple(i for i, (a, b) in enumerate(zip(t.shape, shape)) if b == 1 and a != 1)
    return t.sum(dims, keepdim=True) if dims else t.clone()


def bn_gate_act_backward(grad_out, mask, c, mean, invstd, weight, bias, gate,
                         residual_grad: bool):
    m = c.numel() // c.shape[1]
    g, xhat = _g_xhat(grad_out, mask, c, mean, invstd)
    y = xhat * _per_channel(weight.to(mean.dtype)) + _per_channel(bias.to(mean.dtype))
    grad_gate = _sum_to(g * y, gate.shape)
    gy = g * gate.to(mean.dtype)
    grad_bias, grad_weight = gy.sum((0, 2, 3)), (gy * xhat).sum((0, 2, 3))
    grad_c, _ = _apply(gy, xhat, c, invstd, weight, grad_bias / m, grad_weight / m, False)
    if residual_grad:
        grad_res = torch.empty_like(c)
        grad_res.copy_(g)
    else:
        grad_res = c.new_empty((0,))
    return grad_c, grad_weight, grad_bias, grad_gate, grad_res


def gate_shortcut_relu(y, gate, x, shortcut_weight: Optional[torch.Tensor],
                       shortcut_bias: Optional[torch.Tensor], shortcut_stride,
                       shortcut_padding):
    out = y * gate.to(y.dtype)
    if shortcut_weight is not None:
        out.add_(F.conv2d(x, shortcut_weight, shortcut_bias, shortcut_stride,
                          shortcut_padding))
    else:
        out.add_(x)
    return out.relu_()


def conv_bias_pool(x, weight, bias, stride, padding, dilation=1, groups=1):
    out = F.conv2d(x, weight, bias.to(x.dtype), stride, padding, dilation, groups)
    return out, out.mean((2, 3), dtype=stats_dtype(out))


for _fn in (channel_stats, bn_finalize, bn_act, bn_act_backward, bn_frozen_act,
            bn_frozen_act_backward, conv_bias_relu, conv_bias_shortcut_relu, bn_pool,
            bn_pool_backward, bn_gate_act, bn_gate_act_backward, conv_bias_pool,
            gate_shortcut_relu):
    define_op(NS, _fn.__name__, _fn)
ops = getattr(torch.ops, NS)
