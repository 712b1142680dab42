"""Training forward + backward of the whole residual block on the fused Triton path
(README.md, Design, "Data flow": training).

The differentiable unit is ONE functional op, `resnet_fused_triton::block_train`, with
registered autograd whose backward is `resnet_fused_triton::block_train_backward`.
torch.library forbids register_autograd on ops that mutate their inputs, so the running
statistics are updated AFTER the unit, by the mutating `bn_finalize` op fed with the
batch statistics the unit returns (its invstd/scale/shift outputs are unused).

Both ops' schemas are in resnet_fused/schemas.py, their fakes and block_train's
autograd in the op layer (resnet_fused/ops.py), and they are defined here with
ops.define_op. The op boundary is flat tensors; on the Python side their arguments
and results are ops.py's named tuples (BlockTrainArgs, BlockTrainOut,
BlockTrainBackwardArgs, BlockTrainGrads), whose fields are the schema's names.

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
that dgrad's epilogue (one more) before conv1's wgrad/dgrad prologues. The op takes one
group for the whole block: a block whose BNs are synchronized over different groups
(or only some of them) is not taken (block_group returns None), and the backend runs
it the composite way (backends/triton/__init__.py).

Saved for backward: x, c1, c2 (c3 only for a BN'd projection), the 1-bit mask and a
[7, C] fp32 tensor of batch means/variances and the (global) count. Nothing of y1,
bn2(c2), the shortcut or out is kept. Backward temporaries: dZ1 (c1-sized) plus fp32
weight-gradient buffers.

No host synchronisation anywhere: every data-dependent value stays on the device.
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import distributed
from ...ops import (BlockTrainArgs, BlockTrainGrads, BlockTrainOut, conv_out_hw, like_format,
                    momentum_arg)
from .bn import bn_act_impl, bn_backward_coef, bn_coef, finalize_impl
from .conv import Epilogue, Prologue, ResidualAdd, conv2d_nhwc
from .conv_bwd import (GradOperand, GradResidual, ReluBnEpilogue, SecondDgrad, conv_dgrad,
                       conv_wgrad)
from .launcher import NS, define_triton_op

_CL = torch.channels_last
_OPS = getattr(torch.ops, NS)


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


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
    """block_train (schemas.py): BlockTrainOut(out, c1, c2, c3, mask, stats) as a tuple."""
    P, Q = conv_out_hw(x.shape[2], x.shape[3], 3, 3, stride, 1)
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
    return tuple(BlockTrainOut(out=out, c1=c1, c2=c2, c3=c3, mask=mask, stats=stats))


# =========================================================================== backward
def _global_coef(a, mean, invstd, sum_g, sum_gx, count):
    """The apply coefficients [a, b, d, mean] (see bn._bn_bwd_coef_kernel), a = weight *
    invstd, with the group's reductions and count: b = -a*invstd*sum(g*xhat)/N,
    d = -a*sum(g)/N."""
    return torch.stack([a, -a * invstd * sum_gx / count, -a * sum_g / count, mean])


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
    """block_train_backward (schemas.py): BlockTrainGrads (dx, dw1, ..., dbeta3) as a
    tuple; the gradients of absent parameters are empty [0] tensors."""
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
    bn3 = w3 is not None and g3 is not None
    if bn3:
        inv3, _, _ = finalize_impl(m3, v3, g3, g3, eps3)
        (coef2, dg2, dbeta2), (coef3, dg3, dbeta3) = bn_backward_coef(
            grad_out, mask, c2, m2, inv2, g2, second=(c3, m3, inv3, g3))
    else:
        coef2, dg2, dbeta2 = bn_backward_coef(grad_out, mask, c2, m2, inv2, g2)
    if group:
        # One all-reduce for BN2's and BN3's sums; dg/dbeta stay local (DDP reduces them).
        local = [dbeta2, dg2] + ([dbeta3, dg3] if bn3 else [])
        total = distributed.all_reduce_sum(torch.stack(local), group)
        coef2 = _global_coef(coef2[0], m2, inv2, total[0], total[1], n)
        if bn3:
            coef3 = _global_coef(coef3[0], m3, inv3, total[2], total[3], n)
    G2 = GradOperand(grad_out, mask=mask, c=c2, coef=coef2)
    dz1, red1 = conv_dgrad(G2, w2, (P, Q), 1, 1,
                           relu_bn=ReluBnEpilogue(c1, ss1, torch.stack([m1, inv1])))
    dw2, db2 = conv_wgrad(G2, c1, w2.shape, 1, 1, x_bnrelu=ss1, need_db=has_b2)
    if group:
        total1 = distributed.all_reduce_sum(red1, group)
        coef1 = _global_coef(g1.to(torch.float32) * inv1, m1, inv1, total1[0], total1[1], n)
        dg1, dbeta1 = red1[1].clone(), red1[0].clone()  # outputs may not alias
    else:
        coef1, dg1, dbeta1 = bn_coef(red1, m1, inv1, g1, M)

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

    return tuple(BlockTrainGrads(
        dx=dx, dw1=wt(dw1, w1), db1=vec(db1, w1), dg1=vec(dg1, g1), dbeta1=vec(dbeta1, beta1),
        dw2=wt(dw2, w2), db2=vec(db2, w2), dg2=vec(dg2, g2), dbeta2=vec(dbeta2, g2),
        dw3=wt(dw3, w3), db3=vec(db3, w3), dg3=vec(dg3, g3), dbeta3=vec(dbeta3, g3)))


# The op layer (resnet_fused/ops.py) holds their fakes and block_train's autograd
# (backward = block_train_backward).
define_triton_op("block_train", _block_train)
define_triton_op("block_train_backward", _block_train_backward)


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


def _update_running(bn, mean, var, count) -> None:
    """bn's running statistics from the batch statistics block_train returned."""
    if isinstance(count, torch.Tensor):  # the group's count, a device tensor
        distributed.finalize_global(mean, var, count, bn)
        return
    _OPS.bn_finalize(mean, var, bn.weight.detach(), bn.bias.detach(), bn.running_mean,
                     bn.running_var, bn.num_batches_tracked, momentum_arg(bn), float(bn.eps),
                     count)


def block_group(groups, block) -> Optional[str]:
    """The process group name block_train takes for a block whose BNs are synchronized
    over `groups` (resnet_fused/distributed.py): "" for none, the one group's name when
    every BN of the block is synchronized over the same group, None when it cannot take
    the block (a mix of groups, or of local and synchronized BNs)."""
    if groups is None:
        return ""
    bns = (block.bn1, block.bn2, getattr(block, "bn3", None))
    mine = [g for g, bn in zip(groups, bns) if bn is not None]
    if any(g is None for g in mine) or len({g.group_name for g in mine}) != 1:
        return None
    return mine[0].group_name


def train_block(block, x: torch.Tensor, group: str = "") -> torch.Tensor:
    """Training forward of the block (batch statistics), differentiable in x and every
    parameter; updates the running statistics of bn1, bn2 (and bn3) as nn.BatchNorm2d.
    x: NCHW or channels_last contiguous; the output has x's memory format.
    group: the name of the process group every BN of the block is synchronized over
    ("" for none; block_group)."""
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
    P, Q = conv_out_hw(H, W, 3, 3, s, 1)
    if N * P * Q <= 1:
        raise ValueError(f"triton train_block: batch statistics need more than one value per "
                         f"channel, got N*P*Q = {N * P * Q} (input {tuple(x.shape)})")

    dt = x.dtype
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
            g3, beta3 = bn3.weight, bn3.bias
    o = BlockTrainOut(*_OPS.block_train(*BlockTrainArgs(
        x=xc, w1=w1, b1=b1, g1=bn1.weight, beta1=bn1.bias, w2=w2, b2=b2, g2=bn2.weight,
        beta2=bn2.bias, w3=w3, b3=b3, g3=g3, beta3=beta3, stride=s, pad3=pad3,
        eps1=float(bn1.eps), eps2=float(bn2.eps),
        eps3=float(bn3.eps) if bn3 is not None else 1e-5, group=group)))
    count = o.stats[6, 0] if group else N * P * Q
    _update_running(bn1, o.stats[0], o.stats[1], count)
    _update_running(bn2, o.stats[2], o.stats[3], count)
    if bn3 is not None:
        _update_running(bn3, o.stats[4], o.stats[5], count)
    return like_format(o.out, x)


__all__ = ["block_group", "train_block"]
