"""The op layer: fake (meta) implementations and autograd for every backend's ops.

Each backend defines the ops of resnet_fused/schemas.py under its own namespace
(C++ TORCH_LIBRARY, torch.library.custom_op or triton_op) and then calls
`register_op_layer(namespace, fakes=...)` once. What this registers is the same for
every backend, so it lives here once:

- fake implementations (shapes, dtypes, strides) so torch.compile and
  torch.library.opcheck can trace the ops without running them;
- autograd for the differentiable ops:
    bn_act                 -> <ns>::bn_act_backward (training BN + residual + ReLU)
    conv_bias_relu         -> dReLU, then ATen's convolution_backward
    conv_bias_shortcut_relu-> dReLU, then convolution_backward of both GEMMs
  (eval-mode ops are differentiable so a model in eval mode still gives input and
  parameter gradients when autograd is on, e.g. for saliency maps).
"""
from __future__ import annotations

import torch

from .schemas import SCHEMAS

_REGISTERED: set[tuple[str, str]] = set()


# --------------------------------------------------------------------------- helpers
def stats_dtype(t: torch.Tensor) -> torch.dtype:
    """Per-channel statistics are float32, float64 for float64 activations."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def is_channels_last(t: torch.Tensor) -> bool:
    """True when t is laid out NHWC (and not also plainly NCHW-contiguous)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(
        memory_format=torch.channels_last)


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(t) else torch.contiguous_format


def like_format(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """t made contiguous in ref's memory format (no copy when it already is)."""
    return t.contiguous(memory_format=memory_format_of(ref))


def mask_numel(t: torch.Tensor) -> int:
    return (t.numel() + 7) // 8


def momentum_arg(bn) -> float:
    """bn_finalize's momentum argument: the BN's momentum, -1 for momentum=None (the
    cumulative moving average)."""
    return -1.0 if bn.momentum is None else float(bn.momentum)


def conv_out_hw(h: int, w: int, r: int, s: int, stride: int, padding: int):
    return (h + 2 * padding - r) // stride + 1, (w + 2 * padding - s) // stride + 1


# --------------------------------------------------------------------------- fakes
def _fake_channel_stats(x):
    c = x.shape[1]
    return x.new_empty((c,), dtype=stats_dtype(x)), x.new_empty((c,), dtype=stats_dtype(x))


def _fake_bn_finalize(mean, var, weight, bias, running_mean, running_var,
                      num_batches_tracked, momentum, eps, count):
    return torch.empty_like(mean), torch.empty_like(mean), torch.empty_like(mean)


def _fake_bn_act(c, mean, invstd, weight, bias, residual):
    return torch.empty_like(c), c.new_empty((mask_numel(c),), dtype=torch.uint8)


def _fake_bn_act_backward(grad_out, mask, c, mean, invstd, weight, residual_grad):
    grad_res = torch.empty_like(c) if residual_grad else c.new_empty((0,))
    return torch.empty_like(c), torch.empty_like(mean), torch.empty_like(mean), grad_res


def _conv_out(x, weight, stride, padding):
    n, _, h, w = x.shape
    ho, wo = conv_out_hw(h, w, weight.shape[2], weight.shape[3], stride, padding)
    return x.new_empty((n, weight.shape[0], ho, wo)).contiguous(
        memory_format=memory_format_of(x))


def _fake_conv_bias_relu(x, weight, bias, stride, padding):
    return _conv_out(x, weight, stride, padding)


def _fake_conv_bias_shortcut_relu(y, weight, bias, x, shortcut_weight, padding,
                                  shortcut_stride, shortcut_padding):
    return _conv_out(y, weight, 1, padding)


FAKES = {
    "channel_stats": _fake_channel_stats,
    "bn_finalize": _fake_bn_finalize,
    "bn_act": _fake_bn_act,
    "bn_act_backward": _fake_bn_act_backward,
    "conv_bias_relu": _fake_conv_bias_relu,
    "conv_bias_shortcut_relu": _fake_conv_bias_shortcut_relu,
}
assert FAKES.keys() == SCHEMAS.keys()


# --------------------------------------------------------------------------- autograd
def _bn_act_setup(ctx, inputs, output):
    c, mean, invstd, weight, bias, residual = inputs
    _, mask = output
    ctx.save_for_backward(c, mean, invstd, weight, mask)
    ctx.has_residual = residual is not None
    ctx.param_dtypes = (weight.dtype, bias.dtype)


def _make_bn_act_backward(ns: str):
    def backward(ctx, grad_out, _grad_mask):
        c, mean, invstd, weight, mask = ctx.saved_tensors
        need_res = ctx.has_residual and ctx.needs_input_grad[5]
        grad_out = like_format(grad_out.to(c.dtype), c)
        op = getattr(getattr(torch.ops, ns), "bn_act_backward")
        grad_c, grad_w, grad_b, grad_res = op(grad_out, mask, c, mean, invstd, weight, need_res)
        return (grad_c, None, None, grad_w.to(ctx.param_dtypes[0]),
                grad_b.to(ctx.param_dtypes[1]), grad_res if need_res else None)

    return backward


def _conv_grads(grad, x, weight, stride, padding, need_x, need_w):
    """Input and weight gradients of conv2d(x, weight, stride, padding) (no bias)."""
    if not (need_x or need_w):
        return None, None
    gx, gw, _ = torch.ops.aten.convolution_backward(
        grad, x, weight, None, [stride, stride], [padding, padding], [1, 1], False, [0, 0], 1,
        [need_x, need_w, False])
    return gx, gw


def _conv_bias_relu_setup(ctx, inputs, output):
    x, weight, bias, stride, padding = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.geometry = (stride, padding)
    ctx.bias_dtype = bias.dtype


def _conv_bias_relu_backward(ctx, grad_out):
    x, weight, out = ctx.saved_tensors
    stride, padding = ctx.geometry
    g = grad_out * (out > 0)
    nx, nw, nb = ctx.needs_input_grad[:3]
    gx, gw = _conv_grads(g, x, weight, stride, padding, nx, nw)
    gb = g.sum((0, 2, 3), dtype=stats_dtype(g)).to(ctx.bias_dtype) if nb else None
    return gx, gw, gb, None, None


def _conv_bias_shortcut_relu_setup(ctx, inputs, output):
    y, weight, bias, x, w3, padding, stride3, padding3 = inputs
    ctx.save_for_backward(y, weight, x, w3, output)
    ctx.geometry = (padding, stride3, padding3)
    ctx.has_w3 = w3 is not None
    ctx.bias_dtype = bias.dtype


def _conv_bias_shortcut_relu_backward(ctx, grad_out):
    y, weight, x, w3, out = ctx.saved_tensors
    padding, stride3, padding3 = ctx.geometry
    g = grad_out * (out > 0)
    ny, nw, nb, nx, nw3 = ctx.needs_input_grad[:5]
    gy, gw = _conv_grads(g, y, weight, 1, padding, ny, nw)
    gb = g.sum((0, 2, 3), dtype=stats_dtype(g)).to(ctx.bias_dtype) if nb else None
    if ctx.has_w3:
        gx, gw3 = _conv_grads(g, x, w3, stride3, padding3, nx, nw3)
    else:
        gx, gw3 = (g if nx else None), None
    return gy, gw, gb, gx, gw3, None, None, None


# --------------------------------------------------------------------------- entry
def op_name(ns: str, name: str) -> str:
    return f"{ns}::{name}"


AUTOGRAD = {
    "bn_act": (lambda ns: _make_bn_act_backward(ns), _bn_act_setup),
    "conv_bias_relu": (lambda ns: _conv_bias_relu_backward, _conv_bias_relu_setup),
    "conv_bias_shortcut_relu": (lambda ns: _conv_bias_shortcut_relu_backward,
                                _conv_bias_shortcut_relu_setup),
}


def register_op_layer(ns: str, fakes: bool = True, names=None) -> None:
    """Register fakes (when `fakes`) and autograd for the ops of namespace `ns`.

    Call once per op, after the op exists. `names` limits it to some ops (a namespace
    whose ops are defined in several files registers each file's own); default: all.
    Ops defined with triton_op trace their Python body under fake tensors and need no
    fake, so their backend passes fakes=False.
    """
    for name in (SCHEMAS if names is None else names):
        key = (ns, name)
        if key in _REGISTERED:
            continue
        if fakes:
            torch.library.register_fake(op_name(ns, name), FAKES[name])
        if name in AUTOGRAD:
            make_backward, setup = AUTOGRAD[name]
            torch.library.register_autograd(op_name(ns, name), make_backward(ns),
                                            setup_context=setup)
        _REGISTERED.add(key)
