"""Training a block whose last stage has a channel gate (SE, ECA) on the triton backend
(README.md, Design, "Gates and pooled shortcuts").

The gate g = f(pooled) depends on the pooled branch, and f is the user's module run by
autograd between the kernels, so the fused block is two differentiable ops around it
(block_train cannot be one op here: its join would need g before g exists):

  block_branch(x, ...)      the stages as block_train runs them (statistics in each
                            conv's epilogue, BN + ReLU in the next conv's prologue); the
                            last conv's epilogue also adds the per-(n, c) sums of c_last
                            (conv2d_nhwc(pool_sums=)), so after the finalize
                            pooled = scale_c * mean_nc(c_last) + shift_c (BN is affine per
                            channel): no pass over the branch for the pool.
                            -> c_last and pooled (differentiable), the inner c and every
                            stage's statistics (saved)
  g = f(pooled)             the gate module's own layers on (N, C, 1, 1), by autograd
  gate_join_train(c_last, stats_last, gamma, beta, g, x, shortcut...)
                            out = relu(g * bn_last(c_last) + shortcut), the joins of
                            train._join (elementwise pass, or the D2L projection GEMM's
                            epilogue); the shortcut BN's statistics in its conv epilogue;
                            ResNet-D's pooled shortcut (sc_pool) averaged in that
                            GEMM's loader, as block_train's.

Backward, in autograd's order:
  gate_join_train_backward  G = g * grad_out * mask written once; BN_last's reductions on
                            it, then grad_c_last = its BN-backward apply (one pass);
                            dg[n, c] = sum over H, W of grad_out * mask * y (ATen, in the
                            backward); the shortcut's gradients (identity: the masked
                            grad_out; projection: its wgrad and dgrad, BN'd or not).
  f's backward              autograd: d pooled (N, C)
  block_branch_backward     the pool's gradient joins grad_c_last as a per-(n, c) term
                            through BN_last's batch-statistics backward (ATen on the
                            branch, in the backward), plus its dgamma / dbeta; then the
                            chain of stages exactly as block_train_backward's.

What this costs beyond block_train: grad_c_last is materialised (block_train builds it in
the loaders) and the pool's term is an ATen pass in the backward. Not covered: frozen BN
(the composite path runs it) and synchronized BN (declined).
"""
from __future__ import annotations

from typing import Optional

import torch

from ...ops import like_format
from ...spec import Parts
from ..composite import branch_gate
from .bn import _bwd_apply, bn_backward_coef, finalize_impl
from .conv import Epilogue, Prologue, conv2d_nhwc
from .conv_bwd import GradOperand, conv_dgrad, conv_wgrad
from .gate import gate_nk, gate_scale
from .launcher import NS, define_triton_op
from .train import (_Bn, _check_lists, _check_parts, _empty, _join, _op_args, _pad,
                    _saved_bn, _sc_stride, _stage, _stage_grads, _stat_rows, _update_running)


def _block_branch(x: torch.Tensor, w: list[torch.Tensor], b: list[Optional[torch.Tensor]],
                  g: list[torch.Tensor], beta: list[torch.Tensor], stride: list[int],
                  eps: list[float]
                  ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """block_branch (schemas.py): (c_last, pooled, c, stats)."""
    _check_lists(w, b, g, beta, stride, eps)
    cs, bns, prev, prologue = [], [], x, None
    for i in range(len(w) - 1):
        c, st = _stage(prev, w[i], b[i], stride[i], prologue, g[i], beta[i], eps[i], "")
        cs.append(c)
        bns.append(st)
        prev, prologue = c, Prologue(st.scale, st.shift, relu=True)
    sums = torch.zeros((x.shape[0], w[-1].shape[0]), device=x.device, dtype=torch.float32)
    c_last, _, m, v = conv2d_nhwc(prev, w[-1], stride[-1], _pad(w[-1]), prologue=prologue,
                                  epilogue=Epilogue(b[-1]), stats=True, pool_sums=sums)
    n = c_last.shape[0] * c_last.shape[2] * c_last.shape[3]
    inv, sc, sh = finalize_impl(m, v, g[-1], beta[-1], eps[-1])
    bns.append(_Bn(m, v, inv, sc, sh, n))
    # (N, C) floats: the mean of c_last per (n, c), through BN_last (affine per channel).
    pooled = sums / (c_last.shape[2] * c_last.shape[3]) * sc + sh
    return c_last, pooled, cs, [_stat_rows(st) for st in bns]


def _block_branch_backward(grad_c_last: torch.Tensor, grad_pooled: Optional[torch.Tensor],
                           x: torch.Tensor, c: list[torch.Tensor], c_last: torch.Tensor,
                           stats: list[torch.Tensor], w: list[torch.Tensor],
                           g: list[torch.Tensor], beta: list[torch.Tensor], has_b: list[bool],
                           stride: list[int], eps: list[float]
                           ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor],
                                      list[torch.Tensor], list[torch.Tensor]]:
    """block_branch_backward (schemas.py): (dx, dw, db, dg, dbeta)."""
    S = len(w)
    cs = list(c) + [c_last]
    bns = [_saved_bn(stats[i], cs[i], g[i], beta[i], eps[i], "") for i in range(S)]
    last = bns[-1]
    N, K, P, Q = c_last.shape
    dg_l = torch.zeros((K,), device=x.device, dtype=torch.float32)
    dbeta_l = torch.zeros_like(dg_l)
    G = grad_c_last.contiguous(memory_format=torch.channels_last)
    if grad_pooled is not None:
        # pooled = gamma * (mean_hw(c) - mu) * invstd + beta with mu, invstd c's batch
        # statistics: the per-(n, c) term dp / (P*Q) through BN's batch backward.
        dp = grad_pooled.to(torch.float32)
        mxhat = (c_last.to(torch.float32).mean((2, 3)) - last.mean) * last.invstd
        dbeta_l, dg_l = dp.sum(0), (dp * mxhat).sum(0)
        M = N * P * Q
        a = g[-1].to(torch.float32) * last.invstd
        xhat = (c_last.to(torch.float32) - last.mean.view(1, K, 1, 1)) \
            * last.invstd.view(1, K, 1, 1)
        term = a.view(1, K, 1, 1) * ((dp / (P * Q)).view(N, K, 1, 1)
                                     - (dbeta_l / M).view(1, K, 1, 1)
                                     - xhat * (dg_l / M).view(1, K, 1, 1))
        G = (G.to(torch.float32) + term).to(c_last.dtype).contiguous(
            memory_format=torch.channels_last)
    G = GradOperand(G)
    dw, db, dg, dbeta = [None] * S, [None] * S, [None] * S, [None] * S
    dg[-1], dbeta[-1] = dg_l, dbeta_l
    for i in range(S - 1, 0, -1):
        G, dw[i], db[i], dg[i - 1], dbeta[i - 1] = _stage_grads(
            G, w[i], stride[i], has_b[i], cs[i - 1], bns[i - 1], g[i - 1], "")
    dw[0], db[0] = conv_wgrad(G, x, w[0].shape, stride[0], _pad(w[0]), need_db=has_b[0])
    dx = conv_dgrad(G, w[0], tuple(x.shape[2:]), stride[0], _pad(w[0])).dx
    return (dx, [t.to(wi.dtype).contiguous() for t, wi in zip(dw, w)],
            [_empty(x) if t is None else t.to(wi.dtype) for t, wi in zip(db, w)],
            [t.to(gi.dtype) for t, gi in zip(dg, g)],
            [t.to(bi.dtype) for t, bi in zip(dbeta, beta)])


def _gate_join_train(c: torch.Tensor, stats: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor, eps: float, gate: torch.Tensor, x: torch.Tensor,
                     w_sc: Optional[torch.Tensor], b_sc: Optional[torch.Tensor],
                     g_sc: Optional[torch.Tensor], beta_sc: Optional[torch.Tensor],
                     eps_sc: float, stride_sc: int, sc_pool: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate_join_train (schemas.py): (out, mask, c_sc, stats_sc)."""
    bn = _saved_bn(stats, c, weight, bias, eps, "")
    out, mask, c_sc, st_sc = _join(x, c, bn, weight, bias, w_sc, b_sc, g_sc, beta_sc,
                                   stride_sc, eps_sc, "", None, sc_pool,
                                   gate=gate_nk(gate, c.shape[0], c.shape[1]))
    return out, mask, c_sc, (_stat_rows(st_sc) if st_sc is not None else _empty(x))


def _gate_join_train_backward(grad_out: torch.Tensor, mask: torch.Tensor, c: torch.Tensor,
                              stats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                              eps: float, gate: torch.Tensor, x: torch.Tensor,
                              w_sc: Optional[torch.Tensor], g_sc: Optional[torch.Tensor],
                              c_sc: torch.Tensor, stats_sc: torch.Tensor, has_b_sc: bool,
                              stride_sc: int, eps_sc: float, sc_pool: int = 0
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                         torch.Tensor, torch.Tensor, torch.Tensor,
                                         torch.Tensor, torch.Tensor]:
    """gate_join_train_backward (schemas.py): (grad_c, grad_weight, grad_bias, grad_gate,
    grad_x, grad_w_sc, grad_b_sc, grad_g_sc, grad_beta_sc)."""
    from ..torch_ops import unpack_mask
    bn = _saved_bn(stats, c, weight, bias, eps, "")
    grad_last = gate_scale(grad_out, gate_nk(gate, c.shape[0], c.shape[1]))
    coef, dw_l, db_l = bn_backward_coef(grad_last, mask, c, bn.mean, bn.invstd, weight)
    grad_c, _ = _bwd_apply(grad_last, mask, c, coef, False)
    gm = grad_out.to(torch.float32) * unpack_mask(mask, grad_out)
    y = c.to(torch.float32) * bn.scale.view(1, -1, 1, 1) + bn.shift.view(1, -1, 1, 1)
    # (sum_to_size, not sum(dims): with a 1x1 output there is nothing to reduce, and
    # sum over no dims would reduce them all.)
    grad_gate = (gm * y).sum_to_size(gate.shape).to(gate.dtype)
    # (Outputs may not alias: a new empty tensor for each absent gradient.)
    dw_sc, db_sc, dg_sc, dbeta_sc = (_empty(x) for _ in range(4))
    if w_sc is None:
        grad_x = gm.to(x.dtype).contiguous(memory_format=torch.channels_last)
    else:
        G = GradOperand(grad_out, mask)
        if g_sc is not None:
            bn_sc = _saved_bn(stats_sc, c_sc, g_sc, g_sc, eps_sc, "")
            coef_sc, dg_sc, dbeta_sc = bn_backward_coef(grad_out, mask, c_sc, bn_sc.mean,
                                                        bn_sc.invstd, g_sc)
            G = GradOperand(grad_out, mask, c_sc, coef_sc)
            dg_sc, dbeta_sc = dg_sc.to(g_sc.dtype), dbeta_sc.to(g_sc.dtype)
        # (A pooled shortcut: the wgrad rebuilds the pooled x in its loader, the dgrad
        # spreads each window's gradient over its taps, as block_train_backward's.)
        dw, db = conv_wgrad(G, x, w_sc.shape, stride_sc, _pad(w_sc), need_db=has_b_sc,
                            pool=sc_pool)
        dw_sc = dw.to(w_sc.dtype).contiguous()
        db_sc = db.to(w_sc.dtype) if has_b_sc else db_sc
        grad_x = conv_dgrad(G, w_sc, tuple(x.shape[2:]), stride_sc, _pad(w_sc),
                            pool=sc_pool).dx
    return (grad_c, dw_l.to(weight.dtype), db_l.to(bias.dtype), grad_gate, grad_x, dw_sc,
            db_sc, dg_sc, dbeta_sc)


define_triton_op("block_branch", _block_branch)
define_triton_op("block_branch_backward", _block_branch_backward)
define_triton_op("gate_join_train", _gate_join_train)
define_triton_op("gate_join_train_backward", _gate_join_train_backward)


# =========================================================================== entry
def train_gated_block(parts: Parts, x: torch.Tensor) -> torch.Tensor:
    """Training forward of a block whose last stage has channel gates (and maybe sample
    gates), local BNs: block_branch, the gates (composite.branch_gate: each channel
    gate's f on the pooled branch, each sample gate drawn as its module draws),
    gate_join_train; then every BN's running statistics, as train.train_block."""
    ops = getattr(torch.ops, NS)
    _check_parts(parts, x)
    a = _op_args(parts, x, "")
    c_last, pooled, cs, stats = ops.block_branch(a.x, a.w, a.b, a.g, a.beta, a.stride, a.eps)
    gate = branch_gate(parts, c_last, lambda: pooled)
    out, _, c_sc, stats_sc = ops.gate_join_train(
        c_last, stats[-1], a.g[-1], a.beta[-1], a.eps[-1], gate, a.x, a.w_sc, a.b_sc, a.g_sc,
        a.beta_sc, a.eps_sc, _sc_stride(a.stride), a.sc_pool)
    bn_sc = a.w_sc is not None and a.g_sc is not None
    rows = list(stats) + ([stats_sc] if bn_sc else [])
    convs = list(cs) + [c_last] + ([c_sc] if bn_sc else [])
    for bn, st, c in zip(parts.bns(), rows, convs):
        _update_running(bn, st, c.shape[0] * c.shape[2] * c.shape[3])
    return like_format(out, x)
