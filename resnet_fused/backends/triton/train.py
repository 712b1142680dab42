"""Training forward + backward of the whole residual block on the fused Triton path
(README.md, Design, "Data flow": training).

The differentiable unit is ONE functional op, `resnet_fused_triton::block_train`, with
registered autograd whose backward is `resnet_fused_triton::block_train_backward`.
torch.library forbids register_autograd on ops that mutate their inputs, so the running
statistics are updated AFTER the unit, by the mutating `bn_finalize` op fed with the
batch statistics the unit returns (its invstd/scale/shift outputs are unused).

Forward (5 kernels + 3 tiny ones; BN'd projection +2, D2L projection +0):
  c1, (m1, v1) = conv(x, w1) + b1        stats in the conv epilogue (conv.py)
  finalize1 -> scale1, shift1            tiny, no running-stat update
  c2, (m2, v2) = conv(relu(scale1*c1 + shift1), w2) + b2
                                         bn1 + ReLU in conv2's input prologue, padding
                                         zero after the transform; stats epilogue
  finalize2 -> scale2, shift2            tiny
  identity:   out, mask = relu(bn2(c2) + x)              one elementwise pass, 1-bit mask
  BN'd proj:  c3, (m3, v3) = conv(x, w3) + b3; finalize3;
              out, mask = relu(bn2(c2) + bn3(c3))        one elementwise pass
  D2L proj:   out, mask = relu(conv(x, w3) + b3 + scale2*c2 + shift2)
                                         the final pass IS the projection GEMM's
                                         epilogue (BN-transformed residual + ReLU +
                                         mask): the shortcut is never written

Backward (block_train_backward; conv_bwd.py, bn.py):
  BN2 reductions  sum(g), sum(g*xhat2), g = grad_out*mask       one read of grad_out, c2
                  [+ BN3's sum(g*xhat3) on c3 in the same pass]
  dZ1 = dgrad(G2, w2) * [y1 > 0]         G2 = bn2-backward-apply(g, c2) built in the
                                         prologue; dReLU recomputed from c1; BN1
                                         reductions in the epilogue
  dW2 = wgrad(G2, y1)                    both operands rebuilt in the prologue
  [dW3 = wgrad(G3, x)]                   G3 = g or bn3-backward-apply(g, c3)
  dW1 = wgrad(G1, x)                     G1 = bn1-backward-apply(dZ1, c1) in the prologue
  dX  = dgrad(G1, w1) + g | + dgrad(G3, w3)
                                         identity: g = grad_out*mask added in the
                                         epilogue; projection: a second GEMM into the
                                         same accumulator (never written out)

Synchronized BN (nn.SyncBatchNorm children, resnet_fused/distributed.py; `group` names
the process group, "" for none): each conv's epilogue statistics are combined across
the group (one all-reduce per BN) before the finalize that the next kernel's prologue
or the final pass reads; in backward the BN2 (+BN3) reductions are all-reduced (one
collective) before their coefficients feed conv2's dgrad, and the BN1 reductions of
that dgrad's epilogue (one more) before conv1's wgrad/dgrad prologues.

Saved for backward: x, c1, c2 (c3 only for a BN'd projection), the 1-bit mask and a
[7, C] fp32 tensor of batch means/variances and the (global) count. Nothing of y1,
bn2(c2), the shortcut or out is kept. Backward temporaries: dZ1 (c1-sized) plus fp32 weight-gradient buffers.

No host synchronisation anywhere: every data-dependent value stays on the device.
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import distributed
from ...ops import memory_format_of, momentum_arg
from .bn import NS, bn_act_impl, bn_backward_coef, define_op, finalize_impl
from .bn import _bn_bwd_coef_kernel, _BC
from .conv import Epilogue, Prologue, ResidualAdd, conv2d_nhwc
from .conv_bwd import (GradOperand, GradResidual, ReluBnEpilogue, SecondDgrad, conv_dgrad,
                       conv_wgrad)
from .launcher import launch

import triton

_CL = torch.channels_last


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


def _out_hw(h: int, w: int, stride: int) -> tuple[int, int]:
    """Output size of the block's 3x3, padding-1 convolution with `stride`."""
    return (h + 2 - 3) // stride + 1, (w + 2 - 3) // stride + 1


# =========================================================================== forward
def _block_train(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
                 g1: torch.Tensor, beta1: torch.Tensor,
                 w2: torch.Tensor, b2: Optional[torch.Tensor],
                 g2: torch.Tensor, beta2: torch.Tensor,
                 w3: Optional[torch.Tensor], b3: Optional[torch.Tensor],
                 g3: Optional[torch.Tensor], beta3: Optional[torch.Tensor],
                 stride: int, pad3: int, eps1: float, eps2: float, eps3: float,
                 group: str = ""
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor, torch.Tensor]:
    """Returns (out, c1, c2, c3, mask, stats); c1, c2, c3 ([0] unless the projection
    has a BN), mask and stats = [m1, v1, m2, v2, m3, v3, count] are for backward and the
    running statistics (m3/v3 zero without bn3; count: every element the values per
    channel, over the whole group when synchronized)."""
    P, Q = _out_hw(x.shape[2], x.shape[3], stride)
    count = n = x.shape[0] * P * Q  # values per channel of each BN: this rank's, the group's
    c1, _, m1, v1 = conv2d_nhwc(x, w1, stride, 1, epilogue=Epilogue(b1), stats=True)
    if group:
        m1, v1, n = distributed.combine_stats(m1, v1, count, group)
    _, sc1, sh1 = finalize_impl(m1, v1, g1, beta1, eps1)
    c2, _, m2, v2 = conv2d_nhwc(c1, w2, 1, 1, prologue=Prologue(sc1, sh1, relu=True),
                                epilogue=Epilogue(b2), stats=True)
    if group:
        m2, v2, _ = distributed.combine_stats(m2, v2, count, group)
    inv2, sc2, sh2 = finalize_impl(m2, v2, g2, beta2, eps2)
    m3 = v3 = torch.zeros_like(m2)
    c3 = _empty(x)
    if w3 is None:
        out, mask = bn_act_impl(c2, m2, inv2, g2, beta2, residual=x)
    elif g3 is None and c2.shape[1] % 8 == 0:
        # D2L projection (no BN): the final pass is the projection GEMM's epilogue,
        # relu(conv(x, w3) + b3 + scale2*c2 + shift2) with the mask, so the shortcut is
        # never written out and re-read.
        out, mask, _, _ = conv2d_nhwc(x, w3, stride, pad3,
                                      residual=ResidualAdd(c2, sc2, sh2),
                                      epilogue=Epilogue(b3, relu=True, mask=True))
    elif g3 is None:
        # Channel counts that are not a multiple of 8 would split a mask byte across
        # two tiles: the shortcut goes through memory and the elementwise pass.
        sc = conv2d_nhwc(x, w3, stride, pad3, epilogue=Epilogue(b3)).out
        out, mask = bn_act_impl(c2, m2, inv2, g2, beta2, residual=sc)
    else:
        c3, _, m3, v3 = conv2d_nhwc(x, w3, stride, pad3, epilogue=Epilogue(b3), stats=True)
        if group:
            m3, v3, _ = distributed.combine_stats(m3, v3, count, group)
        inv3, _, _ = finalize_impl(m3, v3, g3, beta3, eps3)
        out, mask = bn_act_impl(c2, m2, inv2, g2, beta2, residual=c3,
                                res_bn=(m3, inv3, g3, beta3))
    n_row = torch.full_like(m1, n) if not group else n.to(m1.dtype).expand_as(m1)
    stats = torch.stack([m1, v1, m2, v2, m3, v3, n_row])
    return out, c1, c2, c3, mask, stats


def _block_train_fake(x, w1, b1, g1, beta1, w2, b2, g2, beta2, w3, b3, g3, beta3,
                      stride, pad3, eps1, eps2, eps3, group=""):
    N, _, H, W = x.shape
    K = w1.shape[0]
    P, Q = _out_hw(H, W, stride)
    act = x.new_empty((N, K, P, Q)).contiguous(memory_format=_CL)
    c3 = torch.empty_like(act) if (w3 is not None and g3 is not None) else _empty(x)
    mask = x.new_empty(((N * K * P * Q + 7) // 8,), dtype=torch.uint8)
    stats = x.new_empty((7, K), dtype=torch.float32)
    return act, torch.empty_like(act), torch.empty_like(act), c3, mask, stats


# =========================================================================== backward
def _coef_from_red(red, mean, invstd, weight, M):
    C = mean.shape[0]
    coef = torch.empty((4, C), device=mean.device, dtype=torch.float32)
    gw = torch.empty((C,), device=mean.device, dtype=torch.float32)
    gb = torch.empty((C,), device=mean.device, dtype=torch.float32)
    launch(_bn_bwd_coef_kernel, (triton.cdiv(C, _BC),), red, mean, invstd, weight,
           coef, gw, gb, C, M, BC=_BC)
    return coef, gw, gb


def _global_coef(coef, invstd, sum_g, sum_gx, count):
    """The apply coefficients [a, b, d, mean] (see bn._bn_bwd_coef_kernel) with the
    group's reductions and count: b = -a*invstd*sum(g*xhat)/N, d = -a*sum(g)/N."""
    a = coef[0]
    return torch.stack([a, -a * invstd * sum_gx / count, -a * sum_g / count, coef[3]])


def _block_train_backward(grad_out: torch.Tensor, x: torch.Tensor, c1: torch.Tensor,
                          c2: torch.Tensor, c3: torch.Tensor, mask: torch.Tensor,
                          stats: torch.Tensor,
                          w1: torch.Tensor, g1: torch.Tensor, beta1: torch.Tensor,
                          w2: torch.Tensor, g2: torch.Tensor,
                          w3: Optional[torch.Tensor], g3: Optional[torch.Tensor],
                          has_b1: bool, has_b2: bool, has_b3: bool,
                          stride: int, pad3: int, eps1: float, eps2: float, eps3: float,
                          group: str = ""
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor]:
    """(dx, dw1, db1, dg1, dbeta1, dw2, db2, dg2, dbeta2, dw3, db3, dg3, dbeta3); the
    gradients of absent parameters are empty [0] tensors."""
    N, _, H, W = x.shape
    _, K, P, Q = c2.shape
    M = N * P * Q
    m1, v1, m2, v2, m3, v3, n = stats.unbind(0)
    n = n[0]  # the values per channel (the group's, when synchronized)
    inv1, sc1, sh1 = finalize_impl(m1, v1, g1, beta1, eps1)
    inv2, _, _ = finalize_impl(m2, v2, g2, g2, eps2)
    ss1 = torch.stack([sc1, sh1])

    # BN2 backward reductions -> G2 = a*g + b*(c2 - m2) + d, never materialised. A BN'd
    # projection's bn3 sees the same g: its reductions ride in the same pass.
    if w3 is not None and g3 is not None:
        inv3, _, _ = finalize_impl(m3, v3, g3, g3, eps3)
        (coef2, dg2, dbeta2), (coef3, dg3, dbeta3) = bn_backward_coef(
            grad_out, mask, c2, m2, inv2, g2, second=(c3, m3, inv3, g3))
    else:
        coef2, dg2, dbeta2 = bn_backward_coef(grad_out, mask, c2, m2, inv2, g2)
    if group:
        # One all-reduce for BN2's and BN3's sums; dg/dbeta stay local (DDP reduces them).
        local = [dbeta2, dg2] + ([dbeta3, dg3] if w3 is not None and g3 is not None else [])
        total = distributed.all_reduce_sum(torch.stack(local), group)
        coef2 = _global_coef(coef2, inv2, total[0], total[1], n)
        if len(local) == 4:
            coef3 = _global_coef(coef3, inv3, total[2], total[3], n)
    G2 = GradOperand(grad_out, mask=mask, c=c2, coef=coef2)
    dz1, red1 = conv_dgrad(G2, w2, (P, Q), 1, 1,
                           relu_bn=ReluBnEpilogue(c1, ss1, torch.stack([m1, inv1])))
    dw2, db2 = conv_wgrad(G2, c1, w2.shape, 1, 1, x_bnrelu=ss1, need_db=has_b2)
    if group:
        total1 = distributed.all_reduce_sum(red1, group)
        a1 = g1.to(torch.float32) * inv1
        coef1 = _global_coef(torch.stack([a1, a1, a1, m1]), inv1, total1[0], total1[1], n)
        dg1, dbeta1 = red1[1].clone(), red1[0].clone()  # outputs may not alias
    else:
        coef1, dg1, dbeta1 = _coef_from_red(red1, m1, inv1, g1, M)

    if g3 is None:
        dg3 = dbeta3 = None
    dw3 = db3 = res = sec = None
    if w3 is None:
        res = GradResidual(grad_out, mask)                  # identity: g = grad_out*mask
    else:
        G3 = GradOperand(grad_out, mask) if g3 is None else GradOperand(grad_out, mask, c3, coef3)
        dw3, db3 = conv_wgrad(G3, x, w3.shape, stride, pad3, need_db=has_b3)
        # The shortcut's data gradient: a second GEMM into conv1's dgrad accumulator.
        sec = SecondDgrad(G3, w3, pad3)

    G1 = GradOperand(dz1, c=c1, coef=coef1)
    dw1, db1 = conv_wgrad(G1, x, w1.shape, stride, 1, need_db=has_b1)
    dx = conv_dgrad(G1, w1, (H, W), stride, 1, residual=res, second=sec).dx

    def wt(t, like):       # weight-shaped gradient in the parameter's dtype and layout
        return _empty(x) if t is None else t.to(like.dtype).contiguous()

    def vec(t, like):
        return _empty(x) if t is None or like is None else t.to(like.dtype)

    return (dx, wt(dw1, w1), vec(db1, w1), vec(dg1, g1), vec(dbeta1, beta1),
            wt(dw2, w2), vec(db2, w2), vec(dg2, g2), vec(dbeta2, g2),
            wt(dw3, w3) if w3 is not None else _empty(x), vec(db3, w3), vec(dg3, g3),
            vec(dbeta3, g3))


def _block_train_backward_fake(grad_out, x, c1, c2, c3, mask, stats, w1, g1, beta1, w2, g2,
                               w3, g3, has_b1, has_b2, has_b3, stride, pad3, eps1, eps2, eps3,
                               group=""):
    K = w1.shape[0]

    def vec(flag, like):
        return like.new_empty((K,)) if flag else _empty(x)

    has_w3, has_g3 = w3 is not None, g3 is not None
    return (torch.empty_like(x), torch.empty_like(w1, memory_format=torch.contiguous_format),
            vec(has_b1, w1), torch.empty_like(g1), torch.empty_like(beta1),
            torch.empty_like(w2, memory_format=torch.contiguous_format), vec(has_b2, w2),
            torch.empty_like(g2), g2.new_empty((K,)),
            (torch.empty_like(w3, memory_format=torch.contiguous_format) if has_w3
             else _empty(x)),
            vec(has_w3 and has_b3, w3 if has_w3 else x), vec(has_g3, g3 if has_g3 else x),
            vec(has_g3, g3 if has_g3 else x))


block_train_op = define_op("block_train", _block_train, None, (), _block_train_fake)
block_train_backward_op = define_op("block_train_backward", _block_train_backward, None, (),
                                    _block_train_backward_fake)


# =========================================================================== autograd
def _setup(ctx, inputs, output):
    (x, w1, b1, g1, beta1, w2, b2, g2, beta2, w3, b3, g3, beta3,
     stride, pad3, eps1, eps2, eps3, group) = inputs
    out, c1, c2, c3, mask, stats = output
    ctx.mark_non_differentiable(c1, c2, c3, mask, stats)
    ctx.save_for_backward(x, c1, c2, c3, mask, stats, w1, g1, beta1, w2, g2, w3, g3)
    ctx.cfg = (b1 is not None, b2 is not None, b3 is not None, stride, pad3, eps1, eps2, eps3,
               group)


def _backward(ctx, grad_out, *_unused):
    x, c1, c2, c3, mask, stats, w1, g1, beta1, w2, g2, w3, g3 = ctx.saved_tensors
    has_b1, has_b2, has_b3, stride, pad3, eps1, eps2, eps3, group = ctx.cfg
    grad_out = grad_out.contiguous(memory_format=_CL)
    (dx, dw1, db1, dg1, dbeta1, dw2, db2, dg2, dbeta2, dw3, db3, dg3,
     dbeta3) = torch.ops.resnet_fused_triton.block_train_backward(
        grad_out, x, c1, c2, c3, mask, stats, w1, g1, beta1, w2, g2, w3, g3,
        has_b1, has_b2, has_b3, stride, pad3, eps1, eps2, eps3, group)
    has_w3, has_g3 = w3 is not None, g3 is not None
    return (dx, dw1, db1 if has_b1 else None, dg1, dbeta1,
            dw2, db2 if has_b2 else None, dg2, dbeta2,
            dw3 if has_w3 else None, db3 if (has_w3 and has_b3) else None,
            dg3 if has_g3 else None, dbeta3 if has_g3 else None,
            None, None, None, None, None, None)


torch.library.register_autograd(f"{NS}::block_train", _backward, setup_context=_setup)


# =========================================================================== entry
def _check_conv(conv, name, kernel_sizes, stride, in_ch, out_ch):
    k = conv.kernel_size[0]
    if (conv.kernel_size[0] != conv.kernel_size[1] or k not in kernel_sizes
            or tuple(conv.stride) != (stride, stride) or tuple(conv.padding) != (k // 2, k // 2)
            or tuple(conv.dilation) != (1, 1) or conv.groups != 1):
        raise ValueError(
            f"triton train_block: {name} must be a {' or '.join(f'{s}x{s}' for s in kernel_sizes)}"
            f" convolution with stride {stride}, 'same' padding, no dilation or groups; got "
            f"kernel {tuple(conv.kernel_size)}, stride {tuple(conv.stride)}, padding "
            f"{tuple(conv.padding)}, dilation {tuple(conv.dilation)}, groups {conv.groups}")
    if conv.in_channels != in_ch or conv.out_channels != out_ch:
        raise ValueError(f"triton train_block: {name} maps {conv.in_channels}->"
                         f"{conv.out_channels} channels, expected {in_ch}->{out_ch}")


def _bn_params(bn, dtype_like: torch.Tensor):
    """(weight, bias) of a BatchNorm; ones/zeros for affine=False."""
    if bn.weight is not None:
        return bn.weight, bn.bias
    C = bn.num_features
    return (torch.ones(C, device=dtype_like.device, dtype=torch.float32),
            torch.zeros(C, device=dtype_like.device, dtype=torch.float32))


def _update_running(bn, mean, var, count) -> None:
    if not bn.track_running_stats or bn.running_mean is None:
        return
    if isinstance(count, torch.Tensor):  # the group's count, a device tensor
        distributed.finalize_global(mean, var, count, bn)
        return
    w, b = _bn_params(bn, mean)
    momentum = momentum_arg(bn)
    torch.ops.resnet_fused_triton.bn_finalize(mean, var, w.detach(), b.detach(),
                                              bn.running_mean, bn.running_var,
                                              bn.num_batches_tracked, momentum, float(bn.eps),
                                              count)


def _group_name(groups, bns) -> str:
    """The one process group name of a synchronized block ("" for none)."""
    if groups is None:
        return ""
    mine = [g for g, bn in zip(groups, bns) if bn is not None]
    if any(g is None for g in mine) or len({g.group_name for g in mine}) != 1:
        raise NotImplementedError(
            "triton train_block: synchronized BatchNorm needs every BN of the block "
            "synchronized over the same process group (convert_sync_batchnorm does that); "
            "use backend='torch' or 'native' for a mix")
    return mine[0].group_name


def train_block(block, x: torch.Tensor, groups=None) -> torch.Tensor:
    """Training forward of the block (batch statistics), differentiable in x and every
    parameter; updates the running statistics of bn1, bn2 (and bn3) as nn.BatchNorm2d.
    x: NCHW or channels_last contiguous; the output has x's memory format.
    groups: (group of bn1, bn2, bn3) of a synchronized block (resnet_fused/distributed.py)."""
    conv1, conv2, conv3 = block.conv1, block.conv2, getattr(block, "conv3", None)
    bn1, bn2, bn3 = block.bn1, block.bn2, getattr(block, "bn3", None)
    N, Cin, H, W = x.shape
    s = conv1.stride[0]
    K = conv1.out_channels
    _check_conv(conv1, "conv1", (3,), s, Cin, K)
    _check_conv(conv2, "conv2", (3,), 1, K, K)
    if conv3 is not None:
        _check_conv(conv3, "conv3", (1, 3), s, Cin, K)
    elif s != 1 or Cin != K:
        raise ValueError(f"triton train_block: an identity shortcut needs stride 1 and equal "
                         f"channels, got stride {s} and {Cin}->{K} channels")
    if bn3 is not None and conv3 is None:
        raise ValueError("triton train_block: bn3 without a projection conv3")
    for name, bn in (("bn1", bn1), ("bn2", bn2), ("bn3", bn3)):
        if bn is not None and bn.num_features != K:
            raise ValueError(f"triton train_block: {name} has {bn.num_features} features, the "
                             f"block {K} channels")
    P, Q = _out_hw(H, W, s)
    if N * P * Q <= 1:
        raise ValueError(f"triton train_block: batch statistics need more than one value per "
                         f"channel, got N*P*Q = {N * P * Q} (input {tuple(x.shape)})")

    dt = x.dtype
    fmt = memory_format_of(x)
    xc = x.contiguous(memory_format=_CL)

    def cw(conv):   # conv weights/bias in the activation dtype (a no-op when they are)
        return conv.weight.to(dt), (conv.bias.to(dt) if conv.bias is not None else None)

    w1, b1 = cw(conv1)
    w2, b2 = cw(conv2)
    w3 = b3 = g3 = beta3 = None
    pad3 = 0
    if conv3 is not None:
        w3, b3 = cw(conv3)
        pad3 = conv3.padding[0]
        if bn3 is not None:
            g3, beta3 = _bn_params(bn3, x)
    g1, beta1 = _bn_params(bn1, x)
    g2, beta2 = _bn_params(bn2, x)
    group = _group_name(groups, (bn1, bn2, bn3))
    out, c1, c2, c3, mask, stats = torch.ops.resnet_fused_triton.block_train(
        xc, w1, b1, g1, beta1, w2, b2, g2, beta2, w3, b3, g3, beta3, s, pad3,
        float(bn1.eps), float(bn2.eps), float(bn3.eps) if bn3 is not None else 1e-5, group)
    count = stats[6, 0] if group else N * P * Q
    _update_running(bn1, stats[0], stats[1], count)
    _update_running(bn2, stats[2], stats[3], count)
    if bn3 is not None:
        _update_running(bn3, stats[4], stats[5], count)
    return out.contiguous(memory_format=fmt)


__all__ = ["train_block", "block_train_op", "block_train_backward_op"]
