"""The op layer: one way to define an op, and the fakes and autograd of every op.

Each backend implements the ops of resnet_fused/schemas.py under its own namespace
(schemas.NAMESPACES). Python backends define each op with `define_op(namespace,
name, fn)`, which takes the schema from schemas.py, the mutated arguments from it,
and registers the op as

- `torch.library.triton_op` when the backend passes `traceable_triton=True` (Triton
  kernels compiled for a GPU: torch.compile then traces into the kernels, and the
  op's Python body is its own fake), else
- `torch.library.custom_op` with the shared fake implementation of FAKES (shapes,
  dtypes, strides) so torch.compile and torch.library.opcheck can trace it without
  running it (the torch backend, and Triton under its CPU interpreter, whose kernels
  cannot be traced);

then the op layer's autograd for the differentiable ops (AUTOGRAD). The C++ extension
defines its ops in TORCH_LIBRARY (csrc/schemas.h) and calls `register_op_layer` for
the fakes and autograd. The autograd, per op:
    bn_act                  -> <ns>::bn_act_backward (training BN + residual + ReLU)
    bn_frozen_act           -> <ns>::bn_frozen_act_backward (frozen BN: running stats)
    conv_bias_relu          -> dReLU, then ATen's convolution_backward
    conv_bias_shortcut_relu -> dReLU, then convolution_backward of both GEMMs
    conv_bias_pool_shortcut_relu -> the same, the shortcut's through its pool
    block_train             -> <ns>::block_train_backward
    bn_pool                 -> <ns>::bn_pool_backward (the pool of a gated branch)
    bn_gate_act             -> <ns>::bn_gate_act_backward (gate * BN + residual + ReLU)
    gate_shortcut_relu      -> dReLU, the gate's sum, the shortcut's conv backward
    gate_pool_shortcut_relu -> the same, the shortcut's through its pool
    conv_bias_pool          -> the pool's gradient spread over H, W, the conv backward
    block_branch            -> <ns>::block_branch_backward (a channel-gated block's stages)
    gate_join_train         -> <ns>::gate_join_train_backward (its gated join)
(eval-mode ops are differentiable so a model in eval mode still gives input and
parameter gradients when autograd is on, e.g. for saliency maps).

The op boundary passes flat tensors; on the Python side the long argument lists of
the training block are named tuples whose fields are the schema's names
(BlockTrainArgs, BlockTrainOut, BlockTrainBackwardArgs, BlockTrainGrads), so each
position is written once, in schemas.py.
"""
from __future__ import annotations

import functools
import inspect
from collections import namedtuple

import torch

from .compile_cache import key_compile_caches
from .schemas import COMMON_OPS, SCHEMAS

# Compiled graphs cached on disk name our ops, not their code: key them by it
# (compile_cache.py), before any op is defined.
key_compile_caches()

_REGISTERED: set[tuple[str, str]] = set()


# --------------------------------------------------------------------------- schemas
@functools.lru_cache(maxsize=None)
def _parsed(name: str):
    return torch._C.parse_schema(SCHEMAS[name])


def arg_names(name: str) -> tuple[str, ...]:
    """The argument names of op `name`, in schema order."""
    return tuple(a.name for a in _parsed(name).arguments)


def mutated_args(name: str) -> tuple[str, ...]:
    """The arguments op `name` writes (declared Tensor(a!) in its schema)."""
    return tuple(a.name for a in _parsed(name).arguments
                 if a.alias_info is not None and a.alias_info.is_write)


def tensor_args(name: str) -> tuple[str, ...]:
    """The arguments of op `name` that are tensors or lists of them (Tensor, Tensor?,
    Tensor[], Tensor?[])."""
    opt = torch._C.OptionalType.ofTensor()
    lists = (torch._C.ListType(torch._C.TensorType.get()), torch._C.ListType(opt))
    return tuple(a.name for a in _parsed(name).arguments
                 if a.type.isSubtypeOf(opt) or a.type in lists)


def args_tuple(name: str):
    """A namedtuple class of op `name`'s arguments (fields: the schema's names, with
    its defaults)."""
    args = _parsed(name).arguments
    defaults = []
    for a in reversed(args):
        if not a.has_default_value():
            break
        defaults.insert(0, a.default_value)
    return namedtuple(f"{name}_args", [a.name for a in args], defaults=defaults)


def returns_tuple(name: str):
    """A namedtuple class of op `name`'s returns (fields: the schema's return names;
    result<i> for an unnamed one)."""
    return namedtuple(f"{name}_returns", [r.name or f"result{i}"
                                          for i, r in enumerate(_parsed(name).returns)])


BlockTrainArgs = args_tuple("block_train")
BlockTrainOut = returns_tuple("block_train")
BlockTrainBackwardArgs = args_tuple("block_train_backward")
BlockTrainGrads = returns_tuple("block_train_backward")


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


def conv_out_hw(h: int, w: int, r: int, s: int, stride: int, padding: int, dilation: int = 1):
    r, s = (r - 1) * dilation + 1, (s - 1) * dilation + 1  # the dilated kernel's extent
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


def _fake_bn_frozen_act_backward(grad_out, mask, c, mean, invstd, weight, residual_grad,
                                  param_grads):
    grad_res = torch.empty_like(c) if residual_grad else c.new_empty((0,))
    grad_w = torch.empty_like(mean) if param_grads else mean.new_empty((0,))
    grad_b = torch.empty_like(mean) if param_grads else mean.new_empty((0,))
    return torch.empty_like(c), grad_w, grad_b, grad_res


def _conv_out(x, weight, stride, padding, dilation=1):
    n, _, h, w = x.shape
    ho, wo = conv_out_hw(h, w, weight.shape[2], weight.shape[3], stride, padding, dilation)
    return x.new_empty((n, weight.shape[0], ho, wo)).contiguous(
        memory_format=memory_format_of(x))


def _fake_conv_bias_relu(x, weight, bias, stride, padding, dilation=1, groups=1):
    return _conv_out(x, weight, stride, padding, dilation)


def _fake_conv_bias_shortcut_relu(y, weight, bias, x, shortcut_weight, padding,
                                  shortcut_stride, shortcut_padding, dilation=1, groups=1):
    return _conv_out(y, weight, 1, padding, dilation)


def _fake_conv_bias_pool_shortcut_relu(y, weight, bias, x, shortcut_weight, padding,
                                       pool_kernel, pool_stride, ceil_mode):
    return _conv_out(y, weight, 1, padding)


def _fake_block_train(*args):
    a = BlockTrainArgs(*args)
    N, _, h, w = a.x.shape
    cs = []
    for wi, st in zip(a.w, a.stride):       # 'same' padding: kernel // 2
        h, w = conv_out_hw(h, w, wi.shape[2], wi.shape[3], st, wi.shape[2] // 2)
        cs.append(a.x.new_empty((N, wi.shape[0], h, w)).contiguous(
            memory_format=torch.channels_last))
    out = torch.empty_like(cs[-1])
    bn_sc = a.w_sc is not None and a.g_sc is not None
    stats = [a.x.new_empty((3, c.shape[1]), dtype=torch.float32)
             for c in cs + ([out] if bn_sc else [])]
    return tuple(BlockTrainOut(
        out=out, c=cs, c_sc=torch.empty_like(out) if bn_sc else a.x.new_empty((0,)),
        mask=a.x.new_empty((mask_numel(out),), dtype=torch.uint8), stats=stats))


def _fake_block_train_backward(*args):
    a = BlockTrainBackwardArgs(*args)

    def weight(w):  # weight gradients are NCHW-contiguous, in the weight's dtype
        return (a.x.new_empty((0,)) if w is None
                else torch.empty_like(w, memory_format=torch.contiguous_format))

    def vec(present, like, k):  # (outputs may not alias: a new empty tensor each)
        return like.new_empty((k,)) if present else a.x.new_empty((0,))

    k_sc = a.w_sc.shape[0] if a.w_sc is not None else 0
    return tuple(BlockTrainGrads(
        dx=torch.empty_like(a.x), dw=[weight(w) for w in a.w],
        db=[vec(hb, w, w.shape[0]) for hb, w in zip(a.has_b, a.w)],
        dg=[torch.empty_like(g) for g in a.g], dbeta=[torch.empty_like(b) for b in a.beta],
        dw_sc=weight(a.w_sc), db_sc=vec(a.w_sc is not None and a.has_b_sc, a.w_sc, k_sc),
        dg_sc=vec(a.g_sc is not None, a.g_sc, k_sc),
        dbeta_sc=vec(a.g_sc is not None, a.g_sc, k_sc)))


def _fake_block_branch(x, w, b, g, beta, stride, eps):
    N, _, h, wd = x.shape
    cs = []
    for wi, st in zip(w, stride):       # 'same' padding: kernel // 2
        h, wd = conv_out_hw(h, wd, wi.shape[2], wi.shape[3], st, wi.shape[2] // 2)
        cs.append(x.new_empty((N, wi.shape[0], h, wd)).contiguous(
            memory_format=torch.channels_last))
    stats = [x.new_empty((3, c.shape[1]), dtype=torch.float32) for c in cs]
    return cs[-1], x.new_empty((N, w[-1].shape[0]), dtype=torch.float32), cs[:-1], stats


def _fake_block_branch_backward(grad_c_last, grad_pooled, x, c, c_last, stats, w, g, beta,
                                has_b, stride, eps):
    return (torch.empty_like(x), [torch.empty_like(t, memory_format=torch.contiguous_format)
                                  for t in w],
            [t.new_empty((t.shape[0],)) if hb else x.new_empty((0,)) for hb, t in zip(has_b, w)],
            [torch.empty_like(t) for t in g], [torch.empty_like(t) for t in beta])


def _fake_gate_join_train(c, stats, weight, bias, eps, gate, x, w_sc, b_sc, g_sc, beta_sc,
                          eps_sc, stride_sc, sc_pool=0):
    bn_sc = w_sc is not None and g_sc is not None
    return (torch.empty_like(c), c.new_empty((mask_numel(c),), dtype=torch.uint8),
            torch.empty_like(c) if bn_sc else x.new_empty((0,)),
            x.new_empty((3, c.shape[1]), dtype=torch.float32) if bn_sc else x.new_empty((0,)))


def _fake_gate_join_train_backward(grad_out, mask, c, stats, weight, bias, eps, gate, x, w_sc,
                                   g_sc, c_sc, stats_sc, has_b_sc, stride_sc, eps_sc,
                                   sc_pool=0):
    e = x.new_empty((0,))
    k = c.shape[1]
    return (torch.empty_like(c), torch.empty_like(weight), torch.empty_like(bias),
            torch.empty_like(gate), torch.empty_like(x),
            e if w_sc is None else torch.empty_like(w_sc, memory_format=torch.contiguous_format),
            w_sc.new_empty((k,)) if w_sc is not None and has_b_sc else e,
            e if g_sc is None else torch.empty_like(g_sc),
            e if g_sc is None else torch.empty_like(g_sc))


def _fake_bn_pool(c, mean, invstd, weight, bias):
    return c.new_empty((c.shape[0], c.shape[1]), dtype=mean.dtype)


def _fake_bn_pool_backward(grad_pooled, c, mean, invstd, weight):
    return torch.empty_like(c), torch.empty_like(mean), torch.empty_like(mean)


def _fake_bn_gate_act(c, mean, invstd, weight, bias, gate, residual):
    return _fake_bn_act(c, mean, invstd, weight, bias, residual)


def _fake_bn_gate_act_backward(grad_out, mask, c, mean, invstd, weight, bias, gate,
                               residual_grad):
    grad_res = torch.empty_like(c) if residual_grad else c.new_empty((0,))
    return (torch.empty_like(c), torch.empty_like(mean), torch.empty_like(mean),
            gate.new_empty(gate.shape, dtype=mean.dtype), grad_res)


def _fake_conv_bias_pool(x, weight, bias, stride, padding, dilation=1, groups=1):
    return (_conv_out(x, weight, stride, padding, dilation),
            x.new_empty((x.shape[0], weight.shape[0]), dtype=stats_dtype(x)))


def _fake_gate_shortcut_relu(y, gate, x, shortcut_weight, shortcut_bias, shortcut_stride,
                             shortcut_padding):
    return torch.empty_like(y)


def _fake_gate_pool_shortcut_relu(y, gate, x, shortcut_weight, shortcut_bias, pool_kernel,
                                  pool_stride, ceil_mode):
    return torch.empty_like(y)


FAKES = {
    "bn_pool": _fake_bn_pool,
    "bn_pool_backward": _fake_bn_pool_backward,
    "bn_gate_act": _fake_bn_gate_act,
    "bn_gate_act_backward": _fake_bn_gate_act_backward,
    "gate_shortcut_relu": _fake_gate_shortcut_relu,
    "gate_pool_shortcut_relu": _fake_gate_pool_shortcut_relu,
    "conv_bias_pool": _fake_conv_bias_pool,
    "channel_stats": _fake_channel_stats,
    "bn_finalize": _fake_bn_finalize,
    "bn_act": _fake_bn_act,
    "bn_act_backward": _fake_bn_act_backward,
    "bn_frozen_act": _fake_bn_act,
    "bn_frozen_act_backward": _fake_bn_frozen_act_backward,
    "conv_bias_relu": _fake_conv_bias_relu,
    "conv_bias_shortcut_relu": _fake_conv_bias_shortcut_relu,
    "conv_bias_pool_shortcut_relu": _fake_conv_bias_pool_shortcut_relu,
    "block_train": _fake_block_train,
    "block_train_backward": _fake_block_train_backward,
    "block_branch": _fake_block_branch,
    "block_branch_backward": _fake_block_branch_backward,
    "gate_join_train": _fake_gate_join_train,
    "gate_join_train_backward": _fake_gate_join_train_backward,
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


def _make_bn_frozen_act_backward(ns: str):
    def backward(ctx, grad_out, _grad_mask):
        c, mean, invstd, weight, mask = ctx.saved_tensors
        need_res = ctx.has_residual and ctx.needs_input_grad[5]
        need_w, need_b = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        grad_out = like_format(grad_out.to(c.dtype), c)
        op = getattr(getattr(torch.ops, ns), "bn_frozen_act_backward")
        grad_c, grad_w, grad_b, grad_res = op(grad_out, mask, c, mean, invstd, weight,
                                              need_res, need_w or need_b)
        return (grad_c, None, None, grad_w.to(ctx.param_dtypes[0]) if need_w else None,
                grad_b.to(ctx.param_dtypes[1]) if need_b else None,
                grad_res if need_res else None)

    return backward


def _conv_grads(grad, x, weight, stride, padding, need_x, need_w, dilation=1, groups=1):
    """Input and weight gradients of conv2d(x, weight, stride, padding, dilation,
    groups) (no bias)."""
    if not (need_x or need_w):
        return None, None
    gx, gw, _ = torch.ops.aten.convolution_backward(
        grad, x, weight, None, [stride, stride], [padding, padding], [dilation, dilation],
        False, [0, 0], groups, [need_x, need_w, False])
    return gx, gw


def _conv_bias_relu_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.geometry = (stride, padding, dilation, groups)
    ctx.bias_dtype = bias.dtype


def _conv_bias_relu_backward(ctx, grad_out):
    x, weight, out = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    g = grad_out * (out > 0)
    nx, nw, nb = ctx.needs_input_grad[:3]
    gx, gw = _conv_grads(g, x, weight, stride, padding, nx, nw, dilation, groups)
    gb = g.sum((0, 2, 3), dtype=stats_dtype(g)).to(ctx.bias_dtype) if nb else None
    return gx, gw, gb, None, None, None, None


def _conv_bias_pool_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight)
    ctx.geometry = (stride, padding, dilation, groups)
    ctx.bias_dtype = bias.dtype


def _conv_bias_pool_backward(ctx, grad_out, grad_pooled):
    """The pool's gradient spread over H, W (/ H*W) joins the output's, then the conv's
    backward."""
    x, weight = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    g = grad_out
    if grad_pooled is not None:
        shape = _conv_out(x, weight, stride, padding, dilation).shape
        spread = (grad_pooled / (shape[2] * shape[3])).to(x.dtype)[:, :, None, None]
        g = spread.expand(shape) if g is None else g + spread
    nx, nw, nb = ctx.needs_input_grad[:3]
    gx, gw = _conv_grads(g.contiguous(), x, weight, stride, padding, nx, nw, dilation, groups)
    gb = g.sum((0, 2, 3), dtype=stats_dtype(g)).to(ctx.bias_dtype) if nb else None
    return gx, gw, gb, None, None, None, None


def _conv_bias_shortcut_relu_setup(ctx, inputs, output):
    y, weight, bias, x, w3, padding, stride3, padding3, dilation, groups = inputs
    ctx.save_for_backward(y, weight, x, w3, output)
    ctx.geometry = (padding, stride3, padding3, dilation, groups)
    ctx.has_w3 = w3 is not None
    ctx.bias_dtype = bias.dtype


def _conv_bias_shortcut_relu_backward(ctx, grad_out):
    y, weight, x, w3, out = ctx.saved_tensors
    padding, stride3, padding3, dilation, groups = ctx.geometry
    g = grad_out * (out > 0)
    ny, nw, nb, nx, nw3 = ctx.needs_input_grad[:5]
    gy, gw = _conv_grads(g, y, weight, 1, padding, ny, nw, dilation, groups)
    gb = g.sum((0, 2, 3), dtype=stats_dtype(g)).to(ctx.bias_dtype) if nb else None
    if ctx.has_w3:
        gx, gw3 = _conv_grads(g, x, w3, stride3, padding3, nx, nw3)
    else:
        gx, gw3 = (g if nx else None), None
    return gy, gw, gb, gx, gw3, None, None, None, None, None


def _conv_bias_pool_shortcut_relu_setup(ctx, inputs, output):
    y, weight, bias, x, w3, padding, k, s, ceil_mode = inputs
    ctx.save_for_backward(y, weight, x, w3, output)
    ctx.geometry = (padding, k, s, ceil_mode)
    ctx.bias_dtype = bias.dtype


def _conv_bias_pool_shortcut_relu_backward(ctx, grad_out):
    """conv_bias_shortcut_relu's, the shortcut's through its pool (ATen's, in the
    backward of an eval op only)."""
    y, weight, x, w3, out = ctx.saved_tensors
    padding, k, s, ceil_mode = ctx.geometry
    g = grad_out * (out > 0)
    ny, nw, nb, nx, nw3 = ctx.needs_input_grad[:5]
    gy, gw = _conv_grads(g, y, weight, 1, padding, ny, nw)
    gb = g.sum((0, 2, 3), dtype=stats_dtype(g)).to(ctx.bias_dtype) if nb else None
    pooled = torch.nn.functional.avg_pool2d(x, k, s, 0, ceil_mode, False)
    gp, gw3 = _conv_grads(g, pooled, w3, 1, 0, nx, nw3)
    gx = (torch.ops.aten.avg_pool2d_backward(gp, x, [k, k], [s, s], [0, 0], ceil_mode,
                                             False, None) if nx else None)
    return gy, gw, gb, gx, gw3, None, None, None, None


def _bn_pool_setup(ctx, inputs, output):
    c, mean, invstd, weight, bias = inputs
    ctx.save_for_backward(c, mean, invstd, weight)
    ctx.param_dtypes = (weight.dtype, bias.dtype)


def _make_bn_pool_backward(ns: str):
    def backward(ctx, grad_pooled):
        c, mean, invstd, weight = ctx.saved_tensors
        op = getattr(getattr(torch.ops, ns), "bn_pool_backward")
        grad_c, grad_w, grad_b = op(grad_pooled.contiguous(), c, mean, invstd, weight)
        return (grad_c, None, None, grad_w.to(ctx.param_dtypes[0]),
                grad_b.to(ctx.param_dtypes[1]))

    return backward


def _bn_gate_act_setup(ctx, inputs, output):
    c, mean, invstd, weight, bias, gate, residual = inputs
    ctx.save_for_backward(c, mean, invstd, weight, bias, gate, output[1])
    ctx.has_residual = residual is not None
    ctx.dtypes = (weight.dtype, bias.dtype, gate.dtype)


def _make_bn_gate_act_backward(ns: str):
    def backward(ctx, grad_out, _grad_mask):
        c, mean, invstd, weight, bias, gate, mask = ctx.saved_tensors
        need_res = ctx.has_residual and ctx.needs_input_grad[6]
        grad_out = like_format(grad_out.to(c.dtype), c)
        op = getattr(getattr(torch.ops, ns), "bn_gate_act_backward")
        grad_c, grad_w, grad_b, grad_g, grad_res = op(grad_out, mask, c, mean, invstd,
                                                      weight, bias, gate, need_res)
        return (grad_c, None, None, grad_w.to(ctx.dtypes[0]), grad_b.to(ctx.dtypes[1]),
                grad_g.to(ctx.dtypes[2]), grad_res if need_res else None)

    return backward


def _gate_shortcut_relu_setup(ctx, inputs, output):
    y, gate, x, w3, b3, stride3, padding3 = inputs
    ctx.save_for_backward(y, gate, x, w3, output)
    ctx.geometry = (stride3, padding3)
    ctx.has_w3, ctx.b3_dtype = w3 is not None, None if b3 is None else b3.dtype


def _gated_grads(ctx, grad_out):
    """dReLU, then the gradients of y, the gate and the shortcut bias of a gated eval
    join (ctx: a gate_shortcut_relu or gate_pool_shortcut_relu setup)."""
    y, gate, x, w3, out = ctx.saved_tensors
    g = grad_out * (out > 0)
    ny, ngate, _, _, nb3 = ctx.needs_input_grad[:5]
    gy = g * gate if ny else None
    acc = stats_dtype(g)
    # (sum_to_size: at a 1x1 output there is nothing to reduce; sum over no dims would
    # reduce them all.)
    ggate = ((g.to(acc) * y.to(acc)).sum_to_size(gate.shape).to(gate.dtype)
             if ngate else None)
    gb3 = g.sum((0, 2, 3), dtype=acc).to(ctx.b3_dtype) if nb3 and ctx.b3_dtype else None
    return g, gy, ggate, gb3


def _gate_shortcut_relu_backward(ctx, grad_out):
    _, _, x, w3, _ = ctx.saved_tensors
    stride3, padding3 = ctx.geometry
    g, gy, ggate, gb3 = _gated_grads(ctx, grad_out)
    nx, nw3 = ctx.needs_input_grad[2:4]
    if ctx.has_w3:
        gx, gw3 = _conv_grads(g, x, w3, stride3, padding3, nx, nw3)
    else:
        gx, gw3 = (g if nx else None), None
    return gy, ggate, gx, gw3, gb3, None, None


def _gate_pool_shortcut_relu_setup(ctx, inputs, output):
    y, gate, x, w3, b3, k, s, ceil_mode = inputs
    ctx.save_for_backward(y, gate, x, w3, output)
    ctx.geometry = (k, s, ceil_mode)
    ctx.b3_dtype = None if b3 is None else b3.dtype


def _gate_pool_shortcut_relu_backward(ctx, grad_out):
    """gate_shortcut_relu's, the shortcut's through its pool (ATen's, in the backward of
    an eval op only, as conv_bias_pool_shortcut_relu's)."""
    _, _, x, w3, _ = ctx.saved_tensors
    k, s, ceil_mode = ctx.geometry
    g, gy, ggate, gb3 = _gated_grads(ctx, grad_out)
    nx, nw3 = ctx.needs_input_grad[2:4]
    pooled = torch.nn.functional.avg_pool2d(x, k, s, 0, ceil_mode, False)
    gp, gw3 = _conv_grads(g, pooled, w3, 1, 0, nx, nw3)
    gx = (torch.ops.aten.avg_pool2d_backward(gp, x, [k, k], [s, s], [0, 0], ceil_mode,
                                             False, None) if nx else None)
    return gy, ggate, gx, gw3, gb3, None, None, None


_BWD_TENSORS = frozenset(tensor_args("block_train_backward"))


def _flat(values) -> tuple[list, list]:
    """values (tensors, Nones and lists of them) flattened for save_for_backward, and
    each one's length (None: not a list) to rebuild them."""
    flat, lens = [], []
    for v in values:
        is_list = isinstance(v, (list, tuple))
        flat += list(v) if is_list else [v]
        lens.append(len(v) if is_list else None)
    return flat, lens


def _unflat(flat, lens) -> list:
    out, i = [], 0
    for n in lens:
        out.append(flat[i] if n is None else list(flat[i:i + n]))
        i += 1 if n is None else n
    return out


def _grad_slot(v):
    """How block_train's autograd returns an input's gradient: "tensor", the list's
    length (a list of tensors: a list of gradients) or None (not differentiable: no
    gradient; autograd tracks a list input only when it holds tensors only)."""
    if isinstance(v, torch.Tensor):
        return "tensor"
    if isinstance(v, (list, tuple)) and v and all(isinstance(t, torch.Tensor) for t in v):
        return len(v)
    return None


def _block_train_setup(ctx, inputs, output):
    a, o = BlockTrainArgs(*inputs), BlockTrainOut(*output)
    ctx.mark_non_differentiable(*o.c, o.c_sc, o.mask, *o.stats)
    # What block_train_backward takes besides grad_out, found by name among
    # block_train's arguments and outputs; has_b / has_b_sc say which conv biases exist.
    known = {**a._asdict(), **o._asdict(), "has_b": [t is not None for t in a.b],
             "has_b_sc": a.b_sc is not None, "frozen": a.running is not None}
    wanted = BlockTrainBackwardArgs._fields[1:]
    ctx.tensor_names = [n for n in wanted if n in _BWD_TENSORS]
    flat, ctx.tensor_lens = _flat(known[n] for n in ctx.tensor_names)
    ctx.save_for_backward(*flat)
    ctx.scalars = {n: known[n] for n in wanted if n not in _BWD_TENSORS}
    # One gradient slot per input the op was called with: torch < 2.14 hands the autograd
    # only the arguments given (a defaulted `group` is absent), and checks the count.
    ctx.slots = [_grad_slot(v) for v in inputs]


def _make_block_train_backward(ns: str):
    def backward(ctx, grad_out, *_unused):
        saved = dict(zip(ctx.tensor_names, _unflat(ctx.saved_tensors, ctx.tensor_lens)))
        # block_train's activations are channels_last (backends/triton/train.py).
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        op = getattr(getattr(torch.ops, ns), "block_train_backward")
        grads = BlockTrainGrads(*op(*BlockTrainBackwardArgs(grad_out=grad_out, **saved,
                                                             **ctx.scalars)))._asdict()
        # The gradient of each input: d<name> (a list for a list input), else None.
        # `running` (a frozen block's statistics: constants) has none: a list of Nones.
        # A sample `gate` (a constant) has none either.
        out = tuple(None if slot is None else (
                    grads.get("d" + n) if slot == "tensor" else list(grads["d" + n])
                    if "d" + n in grads else [None] * slot)
                    for n, slot in zip(BlockTrainArgs._fields, ctx.slots))
        # Exactly one entry per input the op received (torch checks the structure).
        return out[:len(ctx.needs_input_grad)]

    return backward


def _block_branch_setup(ctx, inputs, output):
    x, w, b, g, beta, stride, eps = inputs
    c_last, pooled, c, stats = output
    ctx.mark_non_differentiable(*c, *stats)
    flat, ctx.lens = _flat([x, list(c), c_last, list(stats), list(w), list(g), list(beta)])
    ctx.save_for_backward(*flat)
    ctx.scalars = ([t is not None for t in b], list(stride), list(eps))
    ctx.slots = [_grad_slot(v) for v in inputs]


def _make_block_branch_backward(ns: str):
    def backward(ctx, grad_c_last, grad_pooled, *_unused):
        x, c, c_last, stats, w, g, beta = _unflat(ctx.saved_tensors, ctx.lens)
        has_b, stride, eps = ctx.scalars
        if grad_c_last is None:
            grad_c_last = torch.zeros_like(c_last)
        op = getattr(getattr(torch.ops, ns), "block_branch_backward")
        dx, dw, db, dg, dbeta = op(grad_c_last.contiguous(memory_format=torch.channels_last),
                                   grad_pooled, x, c, c_last, stats, w, g, beta, has_b,
                                   stride, eps)
        grads = (dx, list(dw), list(db), list(dg), list(dbeta), None, None)
        return tuple(None if slot is None else gr for gr, slot in zip(grads, ctx.slots))

    return backward


def _gate_join_train_setup(ctx, inputs, output):
    # (torch < 2.14 hands the setup only the arguments given: a defaulted sc_pool is
    # absent.)
    (c, stats, weight, bias, eps, gate, x, w_sc, b_sc, g_sc, beta_sc, eps_sc, stride_sc,
     *sc_pool) = inputs
    out, mask, c_sc, stats_sc = output
    ctx.mark_non_differentiable(mask, c_sc, stats_sc)
    ctx.save_for_backward(mask, c, stats, weight, bias, gate, x, w_sc, g_sc, c_sc, stats_sc)
    ctx.scalars = (eps, b_sc is not None, stride_sc, eps_sc, sc_pool[0] if sc_pool else 0)


def _make_gate_join_train_backward(ns: str):
    def backward(ctx, grad_out, *_unused):
        mask, c, stats, weight, bias, gate, x, w_sc, g_sc, c_sc, stats_sc = ctx.saved_tensors
        eps, has_b_sc, stride_sc, eps_sc, sc_pool = ctx.scalars
        op = getattr(getattr(torch.ops, ns), "gate_join_train_backward")
        (gc, gw, gb, gg, gx, gw_sc, gb_sc, gg_sc, gbeta_sc) = op(
            grad_out.contiguous(memory_format=torch.channels_last), mask, c, stats, weight,
            bias, eps, gate, x, w_sc, g_sc, c_sc, stats_sc, has_b_sc, stride_sc, eps_sc,
            sc_pool)

        def opt(t, present):
            return t if present else None

        grads = (gc, None, gw, gb, None, gg, gx, opt(gw_sc, w_sc is not None),
                 opt(gb_sc, has_b_sc), opt(gg_sc, g_sc is not None),
                 opt(gbeta_sc, g_sc is not None), None, None, None)
        # Exactly one entry per input the op received (torch checks the structure).
        return grads[:len(ctx.needs_input_grad)]

    return backward


# --------------------------------------------------------------------------- entry
def op_name(ns: str, name: str) -> str:
    return f"{ns}::{name}"


# op -> (namespace -> its backward function, its setup_context).
AUTOGRAD = {
    "bn_act": (_make_bn_act_backward, _bn_act_setup),
    "bn_frozen_act": (_make_bn_frozen_act_backward, _bn_act_setup),
    "conv_bias_relu": (lambda ns: _conv_bias_relu_backward, _conv_bias_relu_setup),
    "conv_bias_shortcut_relu": (lambda ns: _conv_bias_shortcut_relu_backward,
                                _conv_bias_shortcut_relu_setup),
    "conv_bias_pool_shortcut_relu": (lambda ns: _conv_bias_pool_shortcut_relu_backward,
                                     _conv_bias_pool_shortcut_relu_setup),
    "block_train": (_make_block_train_backward, _block_train_setup),
    "bn_pool": (_make_bn_pool_backward, _bn_pool_setup),
    "bn_gate_act": (_make_bn_gate_act_backward, _bn_gate_act_setup),
    "gate_shortcut_relu": (lambda ns: _gate_shortcut_relu_backward,
                           _gate_shortcut_relu_setup),
    "gate_pool_shortcut_relu": (lambda ns: _gate_pool_shortcut_relu_backward,
                                _gate_pool_shortcut_relu_setup),
    "conv_bias_pool": (lambda ns: _conv_bias_pool_backward, _conv_bias_pool_setup),
    "block_branch": (_make_block_branch_backward, _block_branch_setup),
    "gate_join_train": (_make_gate_join_train_backward, _gate_join_train_setup),
}


def _register(ns: str, name: str, fake: bool) -> None:
    """Register the shared fake (when `fake`) and the autograd of ns::name, once."""
    if (ns, name) in _REGISTERED:
        return
    if fake:
        torch.library.register_fake(op_name(ns, name), FAKES[name])
    if name in AUTOGRAD:
        make_backward, setup = AUTOGRAD[name]
        torch.library.register_autograd(op_name(ns, name), make_backward(ns),
                                        setup_context=setup)
    _REGISTERED.add((ns, name))


def _check_signature(name: str, fn) -> None:
    """fn's parameters must be the schema's arguments: torch < 2.14 ignores triton_op's
    schema= and infers the schema from fn's signature and annotations."""
    params = tuple(inspect.signature(fn).parameters)
    if params != arg_names(name):
        raise TypeError(f"define_op({name!r}): the function's parameters {params} are not the "
                        f"schema's arguments {arg_names(name)} (resnet_fused/schemas.py)")


def define_op(ns: str, name: str, fn, *, traceable_triton: bool = False):
    """Define the op ns::name of schemas.py with the Python function `fn` (parameters
    named and annotated as the schema's arguments) and register its op layer; returns
    the op.

    traceable_triton: fn launches Triton kernels that torch can trace (compiled for a
    GPU, not Triton's interpreter): a triton_op, whose fake is fn itself. Otherwise a
    custom_op with the shared fake of FAKES.
    """
    _check_signature(name, fn)
    schema, mutates = SCHEMAS[name][len(name):], mutated_args(name)
    if traceable_triton:
        try:
            op = torch.library.triton_op(op_name(ns, name), fn, mutates_args=mutates,
                                         schema=schema)
        except ValueError:
            # torch 2.11's triton_op infers the schema from fn's annotations and ignores
            # `schema`; an optional tensor list (block_train's `running`, Tensor[]?) has
            # no inferred form there. The op is then a custom_op with the shared fake,
            # which torch.compile calls as one opaque op on that torch.
            traceable_triton = False
    if not traceable_triton:
        op = torch.library.custom_op(op_name(ns, name), fn, mutates_args=mutates,
                                     schema=schema)
    _register(ns, name, fake=not traceable_triton)
    return op


def register_op_layer(ns: str, names=COMMON_OPS) -> None:
    """Register the fakes and autograd of the ops `names` of namespace `ns` that were
    defined outside Python (the C++ extension's TORCH_LIBRARY), after they exist."""
    for name in names:
        _register(ns, name, fake=True)
