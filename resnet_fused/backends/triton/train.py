"""Training forward + backward of the whole residual block on the fused Triton path
(README.md, Design, "Data flow": training), for any chain of stages: the basic block
(3x3, 3x3) and the bottleneck (1x1, 3x3, 1x1; the stride on the 3x3 (v1.5) or on the
first 1x1 (v1)) are the same op.

The differentiable unit is ONE functional op, `resnet_fused_triton::block_train`, with
registered autograd whose backward is `resnet_fused_triton::block_train_backward`.
torch.library forbids register_autograd on ops that mutate their inputs, so the running
statistics are updated AFTER the unit, by the mutating `bn_finalize` op fed with the
batch statistics the unit returns (its invstd/scale/shift outputs are unused).

Both ops' schemas are in resnet_fused/schemas.py (per-stage arguments are lists), their
fakes and block_train's autograd in the op layer (resnet_fused/ops.py). On the Python
side their arguments and results are ops.py's named tuples (BlockTrainArgs,
BlockTrainOut, BlockTrainBackwardArgs, BlockTrainGrads), whose fields are the schema's
names.

Forward, S stages (conv.py, bn.py):
  c_0, (m_0, v_0) = conv(x, w_0) + b_0             stats in the conv epilogue
  finalize_0 -> scale_0, shift_0                   tiny, no running-stat update
  c_i, (m_i, v_i) = conv(relu(scale_{i-1}*c_{i-1} + shift_{i-1}), w_i) + b_i
                                                   BN_{i-1} + ReLU in the input prologue,
                                                   padding zero after the transform
  finalize_i                                       tiny
  the join, last = S-1:
  identity:   out, mask = relu(bn_last(c_last) + x)          one elementwise pass, 1-bit mask
  BN'd proj:  c_sc, (m, v) = conv(x, w_sc) + b_sc; finalize;
              out, mask = relu(bn_last(c_last) + bn_sc(c_sc)) one elementwise pass
  D2L proj:   out, mask = relu(conv(x, w_sc) + b_sc + scale_last*c_last + shift_last)
                                                   the final pass IS the projection GEMM's
                                                   epilogue: the shortcut is never written

Backward (block_train_backward; conv_bwd.py, bn.py):
  BN_last reductions  sum(g), sum(g*xhat), g = grad_out*mask   one read of grad_out, c_last
                      [+ the shortcut BN's sum(g*xhat) on c_sc in the same pass]
  for i = S-1 .. 1:
    dZ_{i-1} = dgrad(G_i, w_i) * [y_{i-1} > 0]    G_i = BN_i-backward-apply built in the
                                                   loader, never materialised; dReLU
                                                   recomputed from c_{i-1}; BN_{i-1}
                                                   reductions in the epilogue
    dW_i = wgrad(G_i, y_{i-1})                     both operands rebuilt in the loaders
  [dW_sc = wgrad(G_sc, x)]                         G_sc = g or the shortcut BN's apply
  dW_0 = wgrad(G_0, x)
  dX   = dgrad(G_0, w_0) + g | + dgrad(G_sc, w_sc)
      identity: g = grad_out*mask added in the epilogue; projection with stage 0 of the
      output's shape and stride (basic block): a second GEMM into the same accumulator;
      otherwise (bottleneck: stage 0 has the inner width) dgrad(G_sc, w_sc) is written
      once and added in dgrad(G_0, w_0)'s epilogue.

Kernels (GEMMs; each also has one or two tiny per-channel launches):
  basic block       forward 2 GEMMs + 1 elementwise pass (identity, BN'd projection
                    +1 GEMM) or 3 GEMMs (D2L projection); backward 1 reduction pass +
                    4 GEMMs (projection +1 wgrad; the dgrad is fused)
  bottleneck        forward 3 GEMMs + 1 elementwise pass (projection +1 GEMM); backward
                    1 reduction pass + 6 GEMMs (projection +2: its wgrad and dgrad)
Passes over activation-sized memory, per stage: forward one read of its input (BN+ReLU
applied on load) and one write of c_i, statistics from the epilogue; eager adds a
statistics read and a read+write for BN+ReLU per stage, and a read+write for the add.
Backward per stage: the dgrad and the wgrad each read G_i's operands (g or dZ, and c_i)
and c_{i-1}; the dgrad writes dZ_{i-1} once. Eager also writes and re-reads every BN's
input gradient and runs its two reduction/apply passes. The bottleneck projection's
extra dX write+read is the accumulation eager does anyway. No path makes more passes.

Sample gate (drop path; README.md, Design, "Gates and pooled shortcuts"): `gate`, the
(N, 1, 1, 1) factor drawn before the call, scales bn_last(c_last) in the join (every
join kind above: the elementwise pass, or the D2L projection GEMM's epilogue); the
backward writes gate * grad_out once and runs BN_last's reductions and the loaders'
BN-apply on it (a BN'd projection's reductions then take their own pass on the
ungated grad_out). No gradient flows to the gate (the module's mask is a constant).

Synchronized BN (nn.SyncBatchNorm children, resnet_fused/distributed.py; `group` names
the process group, "" for none): each conv's epilogue statistics are combined across
the group (one all-reduce per BN) before the finalize that the next kernel's prologue
or the final pass reads; in backward the BN_last (+ shortcut BN) reductions are
all-reduced (one collective) before their coefficients feed the last stage's dgrad,
and each stage's BN reductions from a dgrad epilogue (one more per stage) before the
next loaders read them. The op takes one group for the whole block: a block whose BNs
are synchronized over different groups (or only some of them) is not taken
(block_group returns None), and the backend runs it the composite way.

Saved for backward: x, every c_i (c_sc only with a shortcut BN), the 1-bit mask and the
per-BN [3, C] fp32 statistics. Nothing of y_i, bn(c_last), the shortcut or out is kept.
Backward temporaries: one dZ per stage (c-sized, freed as the chain goes down) plus fp32
weight-gradient buffers.

ResNet-D's pooled shortcut (sc_pool, pool.py): conv(x, w_sc) above is the 1x1 GEMM of
x's window average, taken as it loads x (conv._pool_gemm_loop); its wgrad rebuilds the
average in the loader and its dgrad spreads each window's gradient over its taps in
the loader (conv_bwd._dgrad_loop's AVGPOOL): no pass and no tensor more than the
unpooled projection's.

Covered: 1x1 and 3x3 kernels with 'same' padding, any stride, groups 1 and dilation 1
(train_unsupported_reason says what else is not, so the backend can decline).
No host synchronisation anywhere: every data-dependent value stays on the device.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from ... import distributed
from ...ops import (BlockTrainArgs, BlockTrainGrads, BlockTrainOut, like_format,
                    momentum_arg)
from ...blocks import bn_eps
from ...spec import Parts
from .bn import bn_act_impl, bn_backward_coef, bn_coef, finalize_impl
from .conv import AvgPool, Epilogue, Prologue, ResidualAdd, conv2d_nhwc
from .conv_bwd import (GradOperand, GradResidual, ReluBnEpilogue, SecondDgrad, conv_dgrad,
                       conv_wgrad)
from .gate import gate_nk, gate_scale
from .launcher import NS, define_triton_op
from .pool import pool_out_hw, pool_stride, pool_unsupported_reason, shortcut_pool

_CL = torch.channels_last
_OPS = getattr(torch.ops, NS)
_KERNELS = (1, 3)


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


class _Bn(NamedTuple):
    """One BN's batch statistics and the coefficients derived from them."""
    mean: torch.Tensor
    var: torch.Tensor
    invstd: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    count: Union[int, torch.Tensor]   # values per channel; the group's (device) when synced


def _pad(w: torch.Tensor) -> int:
    return w.shape[-1] // 2          # 'same' padding of a 1x1 or 3x3 kernel


def _sc_stride(stride) -> int:
    """The shortcut's stride: the product of the stages' (it maps x to the output)."""
    s = 1
    for t in stride:
        s *= t
    return s


def _check_lists(w, b, g, beta, stride, eps) -> None:
    n = len(w)
    if n < 1 or any(len(t) != n for t in (b, g, beta, stride, eps)):
        raise ValueError(f"block_train: w, b, g, beta, stride and eps need one entry per "
                         f"stage, got lengths {[len(t) for t in (w, b, g, beta, stride, eps)]}")
    if len({t is None for t in b}) != 1:
        # Autograd tracks a list argument only when it holds tensors only.
        raise ValueError("block_train: b must be all tensors or all None (pass zeros for a "
                         "stage without a bias)")


# =========================================================================== forward
def _stage(prev, w, b, stride, prologue, gamma, beta, eps, group, running=None, pool=None):
    """c = conv(prev (prologue applied on load), w) + b with its BN's statistics from the
    epilogue (combined over the group) and the finalized coefficients; a frozen BN
    (running: its [2, C] running mean and variance) takes those instead, and the
    epilogue computes no statistics."""
    c, _, m, v = conv2d_nhwc(prev, w, stride, _pad(w), prologue=prologue,
                             epilogue=Epilogue(b), stats=running is None, pool=pool)
    n = c.shape[0] * c.shape[2] * c.shape[3]
    if running is not None:
        m, v = running[0], running[1]
    elif group:
        m, v, n = distributed.combine_stats(m, v, n, group)
    inv, sc, sh = finalize_impl(m, v, gamma, beta, eps)
    return c, _Bn(m, v, inv, sc, sh, n)


def _sc_avgpool(sc_pool: int) -> Optional[AvgPool]:
    """block_train's sc_pool as conv.py's pooled operand: its windows start at p * stride
    and end at the image, which ceil_mode's last window does; the caller checked that
    the user's pool has the block's output size (train_block: _check_parts)."""
    return AvgPool(sc_pool, True) if sc_pool else None


def _join(x, c, bn: _Bn, gamma, beta, w_sc, b_sc, g_sc, beta_sc, s_sc, eps_sc, group,
          running_sc=None, sc_pool=0, gate=None):
    """out, mask = relu([gate *] bn_last(c) + shortcut) in one pass; also c_sc and the
    shortcut BN's statistics (None without one). sc_pool: the shortcut GEMM averages x's
    windows as it loads them (ResNet-D; conv._pool_gemm_loop). gate: fp32 [N, C]
    (gate_nk) or None."""
    pool = _sc_avgpool(sc_pool)
    if w_sc is None:
        out, mask = bn_act_impl(c, bn.mean, bn.invstd, gamma, beta, residual=x, gate=gate)
        return out, mask, _empty(x), None
    if g_sc is None and c.shape[1] % 8 == 0:
        # D2L projection (no BN): the final pass is the projection GEMM's epilogue,
        # relu(conv(x, w_sc) + b_sc + scale*c + shift) with the mask, so the shortcut is
        # never written out and re-read.
        out, mask, _, _ = conv2d_nhwc(x, w_sc, s_sc, _pad(w_sc), pool=pool,
                                      residual=ResidualAdd(c, bn.scale, bn.shift, gate),
                                      epilogue=Epilogue(b_sc, relu=True, mask=True))
        return out, mask, _empty(x), None
    if g_sc is None:
        # Channel counts that are not a multiple of 8 would split a mask byte across
        # two tiles: the shortcut goes through memory and the elementwise pass.
        sc = conv2d_nhwc(x, w_sc, s_sc, _pad(w_sc), epilogue=Epilogue(b_sc), pool=pool).out
        out, mask = bn_act_impl(c, bn.mean, bn.invstd, gamma, beta, residual=sc, gate=gate)
        return out, mask, _empty(x), None
    c_sc, st = _stage(x, w_sc, b_sc, s_sc, None, g_sc, beta_sc, eps_sc, group, running_sc,
                      pool)
    out, mask = bn_act_impl(c, bn.mean, bn.invstd, gamma, beta, residual=c_sc,
                            res_bn=(st.mean, st.invstd, g_sc, beta_sc), gate=gate)
    return out, mask, c_sc, st


def _stat_rows(st: _Bn) -> torch.Tensor:
    """[mean; var; count] ([3, C] fp32), block_train's per-BN statistics."""
    n = (torch.full_like(st.mean, st.count) if not isinstance(st.count, torch.Tensor)
         else st.count.to(st.mean.dtype).expand_as(st.mean))
    return torch.stack([st.mean, st.var, n])


def _block_train(x: torch.Tensor, w: list[torch.Tensor], b: list[Optional[torch.Tensor]],
                 g: list[torch.Tensor], beta: list[torch.Tensor], stride: list[int],
                 eps: list[float], w_sc: Optional[torch.Tensor], b_sc: Optional[torch.Tensor],
                 g_sc: Optional[torch.Tensor], beta_sc: Optional[torch.Tensor],
                 eps_sc: float, group: str = "", running: Optional[list[torch.Tensor]] = None,
                 sc_pool: int = 0, gate: Optional[torch.Tensor] = None
                 ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor,
                            list[torch.Tensor]]:
    """block_train (schemas.py): BlockTrainOut(out, c, c_sc, mask, stats) as a tuple."""
    _check_lists(w, b, g, beta, stride, eps)
    nbn = len(w) + (w_sc is not None and g_sc is not None)
    if running is not None and (len(running) != nbn or group):
        raise ValueError(f"block_train: running needs one [2, C] tensor per BN ({nbn}), got "
                         f"{len(running)}, and no group (got {group!r})")
    run = list(running) if running is not None else [None] * nbn
    cs, bns, prev, prologue = [], [], x, None
    for i in range(len(w)):
        c, st = _stage(prev, w[i], b[i], stride[i], prologue, g[i], beta[i], eps[i], group,
                       run[i])
        cs.append(c)
        bns.append(st)
        prev, prologue = c, Prologue(st.scale, st.shift, relu=True)
    gnk = None if gate is None else gate_nk(gate, x.shape[0], cs[-1].shape[1])
    out, mask, c_sc, st_sc = _join(x, cs[-1], bns[-1], g[-1], beta[-1], w_sc, b_sc, g_sc,
                                   beta_sc, _sc_stride(stride), eps_sc, group,
                                   run[-1] if nbn > len(w) else None, sc_pool, gnk)
    stats = [_stat_rows(st) for st in bns + ([st_sc] if st_sc is not None else [])]
    return tuple(BlockTrainOut(out=out, c=cs, c_sc=c_sc, mask=mask, stats=stats))


# =========================================================================== backward
def _global_coef(a, mean, invstd, sum_g, sum_gx, count):
    """The apply coefficients [a, b, d, mean] (see bn._bn_bwd_coef_kernel), a = weight *
    invstd, with the group's reductions and count: b = -a*invstd*sum(g*xhat)/N,
    d = -a*sum(g)/N."""
    return torch.stack([a, -a * invstd * sum_gx / count, -a * sum_g / count, mean])


def _saved_bn(stats: torch.Tensor, c: torch.Tensor, gamma, beta, eps, group) -> _Bn:
    """A BN's _Bn from block_train's [mean; var; count] rows of its input c."""
    m, v, n = stats.unbind(0)
    inv, sc, sh = finalize_impl(m, v, gamma, beta, eps)
    count = n[0] if group else c.shape[0] * c.shape[2] * c.shape[3]
    return _Bn(m, v, inv, sc, sh, count)


def _last_bn_grads(grad_out, mask, c, bn: _Bn, gamma, c_sc, bn_sc, g_sc, group,
                   grad_last=None):
    """(coef, dg, dbeta) of the last BN and of the shortcut BN (Nones without one): their
    reductions in one pass over grad_out and the mask, one all-reduce when synced.
    grad_last: the last BN's own gradient where it differs from the shortcut's (a gated
    branch: gate * grad_out); then one pass each."""
    if grad_last is not None:
        last = bn_backward_coef(grad_last, mask, c, bn.mean, bn.invstd, gamma)
        sc = (bn_backward_coef(grad_out, mask, c_sc, bn_sc.mean, bn_sc.invstd, g_sc)
              if g_sc is not None else None)
    elif g_sc is not None:
        last, sc = bn_backward_coef(grad_out, mask, c, bn.mean, bn.invstd, gamma,
                                    second=(c_sc, bn_sc.mean, bn_sc.invstd, g_sc))
    else:
        last, sc = bn_backward_coef(grad_out, mask, c, bn.mean, bn.invstd, gamma), None
    if group:
        # One all-reduce for both BNs' sums; dg/dbeta stay local (DDP reduces them).
        local = [last[2], last[1]] + ([sc[2], sc[1]] if sc is not None else [])
        total = distributed.all_reduce_sum(torch.stack(local), group)
        last = (_global_coef(last[0][0], bn.mean, bn.invstd, total[0], total[1], bn.count),
                ) + tuple(last[1:])
        if sc is not None:
            sc = (_global_coef(sc[0][0], bn_sc.mean, bn_sc.invstd, total[2], total[3],
                               bn_sc.count),) + tuple(sc[1:])
    return last, (sc if sc is not None else (None, None, None))


def _frozen_coef(coef: torch.Tensor) -> torch.Tensor:
    """A frozen BN's apply coefficients: a*g alone (no statistics terms b, d)."""
    return torch.stack([coef[0], torch.zeros_like(coef[0]), torch.zeros_like(coef[0]),
                        coef[3]])


def _stage_grads(G, w, stride, has_b, c_prev, bn: _Bn, gamma, group, frozen=False):
    """Down one stage: from G (the gradient operand of conv(y_prev, w)'s output), dw, db,
    and the previous BN's dg, dbeta and gradient operand (y_prev = relu(bn(c_prev)))."""
    ss = torch.stack([bn.scale, bn.shift])
    dz, red = conv_dgrad(G, w, tuple(c_prev.shape[2:]), stride, _pad(w),
                         relu_bn=ReluBnEpilogue(c_prev, ss, torch.stack([bn.mean, bn.invstd])))
    dw, db = conv_wgrad(G, c_prev, w.shape, stride, _pad(w), x_bnrelu=ss, need_db=has_b)
    if group:
        total = distributed.all_reduce_sum(red, group)
        coef = _global_coef(gamma.to(torch.float32) * bn.invstd, bn.mean, bn.invstd,
                            total[0], total[1], bn.count)
        dg, dbeta = red[1].clone(), red[0].clone()  # outputs may not alias
    else:
        coef, dg, dbeta = bn_coef(red, bn.mean, bn.invstd, gamma, bn.count)
    if frozen:
        coef = _frozen_coef(coef)
    return GradOperand(dz, c=c_prev, coef=coef), dw, db, dg, dbeta


def _shortcut_grads(G0, grad_out, mask, x, w_sc, c_sc, coef_sc, s_sc, has_b_sc, sc_pool=0):
    """dw_sc, db_sc and how dx gets the shortcut's gradient: (residual, second). A
    pooled shortcut (sc_pool): the wgrad rebuilds the pooled x in its loader, the dgrad
    spreads each window's gradient over its taps in its loader (conv_bwd._dgrad_loop)."""
    if w_sc is None:
        return None, None, GradResidual(grad_out, mask), None  # identity: g = grad_out*mask
    G = GradOperand(grad_out, mask) if coef_sc is None else GradOperand(grad_out, mask, c_sc,
                                                                        coef_sc)
    dw, db = conv_wgrad(G, x, w_sc.shape, s_sc, _pad(w_sc), need_db=has_b_sc, pool=sc_pool)
    if G.g.shape == G0.g.shape:
        # Same output as stage 0 (basic block): a second GEMM into conv 0's accumulator.
        return dw, db, None, SecondDgrad(G, w_sc, _pad(w_sc), sc_pool)
    dx_sc = conv_dgrad(G, w_sc, tuple(x.shape[2:]), s_sc, _pad(w_sc), pool=sc_pool).dx
    return dw, db, GradResidual(dx_sc), None


def _block_train_backward(grad_out: torch.Tensor, x: torch.Tensor, c: list[torch.Tensor],
                          c_sc: torch.Tensor, mask: torch.Tensor, stats: list[torch.Tensor],
                          w: list[torch.Tensor], g: list[torch.Tensor],
                          beta: list[torch.Tensor], w_sc: Optional[torch.Tensor],
                          g_sc: Optional[torch.Tensor], has_b: list[bool], has_b_sc: bool,
                          stride: list[int], eps: list[float], eps_sc: float, group: str = "",
                          frozen: bool = False, sc_pool: int = 0,
                          gate: Optional[torch.Tensor] = None
                          ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor],
                                     list[torch.Tensor], list[torch.Tensor], torch.Tensor,
                                     torch.Tensor, torch.Tensor, torch.Tensor]:
    """block_train_backward (schemas.py): BlockTrainGrads as a tuple; the gradients of
    absent parameters are empty [0] tensors."""
    S = len(w)
    bns = [_saved_bn(stats[i], c[i], g[i], beta[i], eps[i], group) for i in range(S)]
    has_bn_sc = w_sc is not None and g_sc is not None
    bn_sc = _saved_bn(stats[S], c_sc, g_sc, g_sc, eps_sc, group) if has_bn_sc else None
    # A gated branch: the last BN's gradient is gate * grad_out (masked), written once;
    # the shortcut's is grad_out (masked).
    grad_last = (None if gate is None else
                 gate_scale(grad_out, gate_nk(gate, grad_out.shape[0], grad_out.shape[1])))
    (coef, dg_l, dbeta_l), (coef_sc, dg_sc, dbeta_sc) = _last_bn_grads(
        grad_out, mask, c[-1], bns[-1], g[-1], c_sc, bn_sc, g_sc if has_bn_sc else None, group,
        grad_last)
    if frozen:  # constants: the gradient has no path through the statistics
        coef = _frozen_coef(coef)
        coef_sc = _frozen_coef(coef_sc) if coef_sc is not None else None
    G = GradOperand(grad_out if grad_last is None else grad_last, mask=mask, c=c[-1],
                    coef=coef)
    dw, db, dg, dbeta = [None] * S, [None] * S, [None] * S, [None] * S
    dg[-1], dbeta[-1] = dg_l, dbeta_l
    for i in range(S - 1, 0, -1):
        G, dw[i], db[i], dg[i - 1], dbeta[i - 1] = _stage_grads(
            G, w[i], stride[i], has_b[i], c[i - 1], bns[i - 1], g[i - 1], group, frozen)
    dw_sc, db_sc, res, sec = _shortcut_grads(G, grad_out, mask, x, w_sc, c_sc, coef_sc,
                                             _sc_stride(stride), has_b_sc, sc_pool)
    dw[0], db[0] = conv_wgrad(G, x, w[0].shape, stride[0], _pad(w[0]), need_db=has_b[0])
    dx = conv_dgrad(G, w[0], tuple(x.shape[2:]), stride[0], _pad(w[0]), residual=res,
                    second=sec).dx

    def wt(t, like):       # weight-shaped gradient in the parameter's dtype and layout
        return _empty(x) if t is None else t.to(like.dtype).contiguous()

    def vec(t, like):
        return _empty(x) if t is None or like is None else t.to(like.dtype)

    return tuple(BlockTrainGrads(
        dx=dx, dw=[wt(t, wi) for t, wi in zip(dw, w)], db=[vec(t, wi) for t, wi in zip(db, w)],
        dg=[vec(t, gi) for t, gi in zip(dg, g)], dbeta=[vec(t, bi) for t, bi in zip(dbeta, beta)],
        dw_sc=wt(dw_sc, w_sc), db_sc=vec(db_sc, w_sc), dg_sc=vec(dg_sc, g_sc),
        dbeta_sc=vec(dbeta_sc, g_sc)))


# The op layer (resnet_fused/ops.py) holds their fakes and block_train's autograd
# (backward = block_train_backward).
define_triton_op("block_train", _block_train)
define_triton_op("block_train_backward", _block_train_backward)


# =========================================================================== entry
def _named_convs(parts: Parts):
    """(name for messages, StageParts) of every conv of the block, main path first."""
    out = [(f"stage {i} conv", st) for i, st in enumerate(parts.stages)]
    return out + ([("shortcut conv", parts.shortcut)] if parts.shortcut is not None else [])


def train_unsupported_reason(parts: Parts) -> Optional[str]:
    """Why block_train cannot compute the block (None when it can): its kernels are
    dense 1x1 / 3x3 convolutions with 'same' padding; the backend declines the rest
    (grouped or dilated convolutions: ResNeXt, dilated backbones) so auto routes on."""
    sc = parts.shortcut
    if sc is not None and sc.pool is not None:
        reason = pool_unsupported_reason(sc.pool, sc.conv)
        if reason is not None:
            return reason
    for name, st in _named_convs(parts):
        conv = st.conv
        k = tuple(conv.kernel_size)
        if conv.groups != 1:
            return f"the triton training kernels have no grouped convolution ({name}: groups={conv.groups})"
        if tuple(conv.dilation) != (1, 1):
            return (f"the triton training kernels have no dilated convolution ({name}: "
                    f"dilation={tuple(conv.dilation)})")
        if k[0] != k[1] or k[0] not in _KERNELS:
            return f"the triton training kernels are 1x1 or 3x3 ({name}: kernel {k})"
        if tuple(conv.padding) != (k[0] // 2, k[0] // 2) or conv.padding_mode != "zeros":
            return (f"the triton training kernels take 'same' zero padding ({name}: padding "
                    f"{tuple(conv.padding)}, {conv.padding_mode!r})")
        if conv.stride[0] != conv.stride[1]:
            return f"the triton training kernels take one stride for both axes ({name}: {tuple(conv.stride)})"
    return None


def _check_chain(parts: Parts, cin: int) -> None:
    """The main path is a chain conv -> BN -> ReLU (no ReLU after the last) whose
    channels line up; every BN has its conv's channels."""
    last = len(parts.stages) - 1
    for i, st in enumerate(parts.stages):
        if st.conv.in_channels != cin:
            raise ValueError(f"triton train_block: stage {i} conv takes {st.conv.in_channels} "
                             f"channels, its input has {cin}")
        cin = st.conv.out_channels
        if st.bn is None or st.relu != (i < last):
            raise ValueError(f"triton train_block: stage {i} must be conv -> BN"
                             f"{' -> ReLU' if i < last else ' (no ReLU: the join adds it)'}")
    for name, st in _named_convs(parts):
        n = st.bn.running_mean.numel() if st.bn is not None else None  # frozen BNs too
        if n is not None and n != st.conv.out_channels:
            raise ValueError(f"triton train_block: the BN after {name} has {n}"
                             f" features, the conv {st.conv.out_channels} channels")


def _check_parts(parts: Parts, x: torch.Tensor, frozen: bool = False) -> None:
    """ValueError naming what block_train cannot compute for this block and input."""
    reason = train_unsupported_reason(parts)
    if reason is not None:
        raise ValueError(f"triton train_block: {reason}")
    N, cin, H, W = x.shape
    _check_chain(parts, cin)
    s = _sc_stride([st.conv.stride[0] for st in parts.stages])
    kout = parts.stages[-1].conv.out_channels
    sc = parts.shortcut
    if sc is None and (s != 1 or cin != kout):
        raise ValueError(f"triton train_block: an identity shortcut needs stride 1 and equal "
                         f"channels, got stride {s} and {cin}->{kout} channels")
    if sc is not None and (sc.conv.stride[0] * pool_stride(parts) != s
                           or sc.conv.in_channels != cin
                           or sc.conv.out_channels != kout or sc.relu):
        raise ValueError(f"triton train_block: the shortcut (pool and) conv must map "
                         f"{cin}->{kout} channels with stride {s} (the stages' product) and "
                         f"no ReLU; got {sc.conv.in_channels}->{sc.conv.out_channels}, "
                         f"stride {tuple(sc.conv.stride)}, pool stride {pool_stride(parts)}")
    pool = shortcut_pool(parts)
    if pool is not None:
        out_hw = (H, W)
        for st in parts.stages:
            out_hw = tuple((n - 1) // st.conv.stride[0] + 1 for n in out_hw)
        pooled = pool_out_hw(H, W, pool.kernel, s, pool.ceil_mode)
        if pooled != out_hw:
            raise ValueError(f"triton train_block: the shortcut's AvgPool2d makes "
                             f"{pooled[0]}x{pooled[1]} of the {H}x{W} input, the main path "
                             f"{out_hw[0]}x{out_hw[1]}: the shapes would not add")
    h, w_ = H, W
    for i, st in enumerate(parts.stages if not frozen else ()):
        h, w_ = (h - 1) // st.conv.stride[0] + 1, (w_ - 1) // st.conv.stride[0] + 1
        if N * h * w_ <= 1:
            raise ValueError(f"triton train_block: batch statistics need more than one value "
                             f"per channel, got N*P*Q = {N * h * w_} at stage {i} (input "
                             f"{tuple(x.shape)})")


def _update_running(bn, stats: torch.Tensor, count) -> None:
    """bn's running statistics from the batch statistics block_train returned."""
    if isinstance(count, torch.Tensor):  # the group's count, a device tensor
        distributed.finalize_global(stats[0], stats[1], count, bn)
        return
    _OPS.bn_finalize(stats[0], stats[1], bn.weight.detach(), bn.bias.detach(),
                     bn.running_mean, bn.running_var, bn.num_batches_tracked,
                     momentum_arg(bn), float(bn.eps), count)


def block_group(groups, parts: Parts) -> Optional[str]:
    """The process group name block_train takes for a block whose BNs are synchronized
    over `groups` (resnet_fused/distributed.py; one per BN of parts.bns(), in order): ""
    for none, the one group's name when every BN of the block is synchronized over the
    same group, None when it cannot take the block (a mix of groups, or of local and
    synchronized BNs)."""
    if groups is None:
        return ""
    mine = list(groups)[:len(parts.bns())]
    if any(g is None for g in mine) or len({g.group_name for g in mine}) != 1:
        return None
    return mine[0].group_name


def _running(bn) -> torch.Tensor:
    """A frozen BN's [2, C] float32 running mean and variance (block_train's `running`)."""
    return torch.stack([bn.running_mean.detach().to(torch.float32),
                        bn.running_var.detach().to(torch.float32)])


def _op_args(parts: Parts, x: torch.Tensor, group: str, frozen: bool = False,
             gate: Optional[torch.Tensor] = None) -> BlockTrainArgs:
    dt = x.dtype

    def cast(t):     # conv weights/bias in the activation dtype (a no-op when they are)
        return None if t is None else t.to(dt)

    convs = [st.conv for st in parts.stages]
    b = [cast(cv.bias) for cv in convs]
    if len({t is None for t in b}) != 1:    # the op takes all biases or none
        b = [t if t is not None else cv.weight.new_zeros(cv.out_channels, dtype=dt)
             for t, cv in zip(b, convs)]
    sc = parts.shortcut
    sc_bn = sc.bn if sc is not None else None
    return BlockTrainArgs(
        x=x.contiguous(memory_format=_CL), w=[cast(cv.weight) for cv in convs], b=b,
        g=[st.bn.weight for st in parts.stages], beta=[st.bn.bias for st in parts.stages],
        stride=[cv.stride[0] for cv in convs], eps=[bn_eps(st.bn) for st in parts.stages],
        w_sc=cast(sc.conv.weight) if sc is not None else None,
        b_sc=cast(sc.conv.bias) if sc is not None else None,
        g_sc=sc_bn.weight if sc_bn is not None else None,
        beta_sc=sc_bn.bias if sc_bn is not None else None,
        eps_sc=bn_eps(sc_bn) if sc_bn is not None else 1e-5, group=group,
        running=[_running(bn) for bn in parts.bns()] if frozen else None,
        sc_pool=pool.kernel if (pool := shortcut_pool(parts)) is not None else 0, gate=gate)


def train_block(parts: Parts, x: torch.Tensor, group: str = "",
                frozen: bool = False, gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Training forward of the block `parts` (spec.Parts) with batch statistics,
    differentiable in x and every parameter; updates the running statistics of every
    BN as nn.BatchNorm2d. x: NCHW or channels_last contiguous; the output has x's memory
    format. group: the name of the process group every BN of the block is synchronized
    over ("" for none; block_group). frozen: every BN normalises with its running
    statistics instead (no statistics, no update; backend.forward_frozen). gate: the
    last stage's sample gates, drawn (block_train's `gate`), or None."""
    _check_parts(parts, x, frozen)
    o = BlockTrainOut(*_OPS.block_train(*_op_args(parts, x, group, frozen, gate)))
    if frozen:
        return like_format(o.out, x)
    cs = list(o.c) + ([o.c_sc] if len(o.stats) > len(o.c) else [])
    for bn, st, c in zip(parts.bns(), o.stats, cs):
        _update_running(bn, st, st[2, 0] if group else c.shape[0] * c.shape[2] * c.shape[3])
    return like_format(o.out, x)


__all__ = ["block_group", "train_block", "train_unsupported_reason"]
