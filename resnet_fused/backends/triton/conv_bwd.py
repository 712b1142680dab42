"""Backward implicit-GEMM convolutions in Triton (NHWC): data gradient and weight gradient,
with the fused BN-backward prologue and the dReLU + BN-statistics epilogue of README.md, Design.

Forward convention (conv.py): out[n,p,q,k] = sum_{r,s,c} X[n, p*st-pad+r, q*st-pad+s, c] * w[k,c,r,s].

The gradient operand G (grad of the conv output, [N,P,Q,K] channels_last) is never
materialised when it is a BatchNorm backward: the loaders build it per tile from
    G = a[k] * g + b[k] * (c - mean[k]) + d[k],   g = grad_out (* ReLU mask bit)
with c the saved raw conv output and (a, b, d, mean) the per-channel coefficients of
bn.bn_backward_coef (the "BN-backward apply in the prologue"). Out-of-range taps are zero
AFTER that transform (d != 0).

Data gradient  dX[n,h,w,c] = sum_{r,s,k} G[n,(h+pad-r)/st,(w+pad-s)/st,k] * w[k,c,r,s]
  over the taps where the division is exact and in range. For stride 2 the output pixels
  are split into st*st parity classes (grid axis 2); within a class the valid taps are a
  fixed sub-lattice (r = r0 + st*j), so no MMA is spent on taps that do not exist (a
  3x3/2 conv has 1, 2 or 4 taps per class instead of 9 masked ones). The reduction is one
  flat loop over taps x K-chunks (Triton pipelines only the innermost loop).
  Epilogues: EPI_RELU_BN (conv2's dgrad): dZ = dY * [scale1*c1 + shift1 > 0] (dReLU of
  y1 = relu(bn1(c1)), recomputed from c1, no mask stored) and the BN1 backward
  reductions sum(dZ), sum(dZ * xhat1) by per-tile partial sums + fp32 atomics;
  HAS_RES: + a residual gradient (the shortcut's), optionally times a mask bit (the
  identity shortcut's gradient is grad_out * mask, read straight from grad_out).

Weight gradient dW[k,c,r,s] = sum_{n,p,q} G[n,p,q,k] * Xt[n, p*st-pad+r, q*st-pad+s, c]
  as a GEMM [K x positions] @ [positions x C] per tap, split over positions (grid axis
  2 = taps x splits, fp32 atomics into a [K,R,S,C] buffer) so small K*C still fills the
  GPU. Xt = X, or relu(scale1*X + shift1) (conv2's input y1 rebuilt from c1: zero
  padding after the transform). The bias gradient sum(G) rides along (HAS_DB).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ...ops import conv_out_hw, mask_numel
from .bn import _load_mask_bit, lanes
from .conv import _input_precision, interp_tile
from .launcher import INTERPRET, launch
from .pool import pool_out_hw

if INTERPRET:
    # The smallest tiles; each launch takes the largest that fits its shape (_cfg).
    _DG = dict(BM=32, BN=16, BK=16, num_warps=4, num_stages=1)
    _WG = dict(BM=16, BN=16, BK=32, num_warps=4, num_stages=1)
    _WG_PROGRAMS = 1
else:
    # Untuned starting points: 128x64x32 for dgrad, 64x64 over 64 positions for wgrad.
    # dgrad runs 8 warps: with 4, its BN-backward prologue and dReLU/BN epilogue spill
    # on sm_90 (bench/NOTES.md, "Triton conv: register spills behind the config pruning").
    _DG = dict(BM=128, BN=64, BK=32, num_warps=8, num_stages=3)
    _WG = dict(BM=64, BN=64, BK=64, num_warps=4, num_stages=3)
    _WG_PROGRAMS = 512
# fp32 without TF32 multiplies on the FMA units: smaller tiles, or ptxas spills. dgrad's
# K step is 16: at 32 its BN-backward prologue spilled 8 B/thread on triton 3.8 and
# 16 B/thread on 3.6 (csrc/tools/triton_aot.py --full); at 16 neither spills, and an
# FMA-bound loop loses nothing by a shorter step.
_DG_FMA = dict(_DG, BM=64, BN=64, BK=16, num_warps=8) if not INTERPRET else _DG
_WG_FMA = dict(_WG, BM=64, BN=64, BK=16, num_warps=8) if not INTERPRET else _WG
# The pooled shortcut's wgrad (AVGPOOL) sums the window's taps into an fp32 [BK, BN] tile
# beside the accumulator: with fp32 (TF32) operands a 64-position step spilled 24
# B/thread on sm_90 (csrc/tools/triton_aot.py --filter avgdown), 32 does not.
_WG_POOL32 = dict(_WG, BK=32) if not INTERPRET else _WG


@triton.jit
def _load_grad(g_ptr, gmask_ptr, gc_ptr, coef_ptr, idx, ok, ch, K,
               HAS_MASK: tl.constexpr, HAS_BN: tl.constexpr):
    """A tile of the gradient operand G at element offsets idx (channel index ch,
    broadcastable to idx): g (* mask bit), then the BN-backward apply when HAS_BN."""
    g = tl.load(g_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    if HAS_MASK:
        g = tl.where(_load_mask_bit(gmask_ptr, idx, ok), g, 0.0)
    if HAS_BN:
        cm = ch < K
        a = tl.load(coef_ptr + ch, mask=cm, other=0.0)
        b = tl.load(coef_ptr + K + ch, mask=cm, other=0.0)
        d = tl.load(coef_ptr + 2 * K + ch, mask=cm, other=0.0)
        mu = tl.load(coef_ptr + 3 * K + ch, mask=cm, other=0.0)
        c = tl.load(gc_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        g = tl.where(ok, a * g + b * (c - mu) + d, 0.0)
    return g


@triton.jit
def _dgrad_loop(acc, g_ptr, gmask_ptr, gc_ptr, coef_ptr, w_ptr, n64, h, w, row_ok, ph, pw,
                rc, c_ok, C, P, Q, K, H, W,
                STRIDE: tl.constexpr, PAD: tl.constexpr, R: tl.constexpr, S: tl.constexpr,
                HAS_MASK: tl.constexpr, HAS_BN: tl.constexpr, PREC: tl.constexpr,
                BK: tl.constexpr, AVGPOOL: tl.constexpr):
    """acc += sum over the valid taps of this parity class and K of G * w^T.

    AVGPOOL: the conv is ResNet-D's pooled shortcut, an R x S average pool at STRIDE (PAD
    0) before a 1x1 weight w: every tap of the window takes that one weight, and the
    loader divides G by the window's taps inside the image, so each window's gradient
    is spread back over its taps here, in the loader, rather than in an epilogue:
    overlapping windows (R > STRIDE) sum into a pixel as the taps of a convolution do,
    and the pooled gradient (G @ w) is never written."""
    # First valid tap of the class (ph, pw) and the number of valid taps per axis.
    r0 = (ph + PAD) % STRIDE
    s0 = (pw + PAD) % STRIDE
    NR = (R - r0 + STRIDE - 1) // STRIDE
    NSS = (S - s0 + STRIDE - 1) // STRIDE
    rk = tl.arange(0, BK)
    k_pad = tl.cdiv(K, BK) * BK
    for kk in range(0, NR * NSS * k_pad, BK):
        t = kk // k_pad
        k0 = kk - t * k_pad
        tr = t // NSS
        r = r0 + STRIDE * tr
        s = s0 + STRIDE * (t - tr * NSS)
        hp = h + PAD - r          # a multiple of STRIDE by construction of the class
        wp = w + PAD - s
        p = hp // STRIDE
        q = wp // STRIDE
        ok = row_ok & (hp >= 0) & (p < P) & (wp >= 0) & (q < Q)
        pix = ((n64 * P + p) * Q + q) * K
        kidx = k0 + rk
        k_ok = kidx < K
        a = _load_grad(g_ptr, gmask_ptr, gc_ptr, coef_ptr, pix[:, None] + kidx[None, :],
                       ok[:, None] & k_ok[None, :], kidx[None, :], K, HAS_MASK, HAS_BN)
        if AVGPOOL:
            taps = (tl.minimum(p * STRIDE + R, H) - p * STRIDE) * (
                tl.minimum(q * STRIDE + S, W) - q * STRIDE)
            a = a / tl.maximum(taps, 1).to(tl.float32)[:, None]
            w_off = kidx.to(tl.int64)[:, None] * C + rc[None, :]
        else:
            w_off = kidx.to(tl.int64)[:, None] * (R * S * C) + ((r * S + s) * C + rc)[None, :]
        b = tl.load(w_ptr + w_off, mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        acc = tl.dot(a.to(w_ptr.dtype.element_ty), b, acc, input_precision=PREC)
    return acc


@triton.jit
def _dgrad_kernel(g_ptr, gmask_ptr, gc_ptr, coef_ptr, w_ptr, out_ptr,
                  ec_ptr, ess_ptr, estat_ptr, red_ptr, res_ptr, rmask_ptr,
                  g2_ptr, g2mask_ptr, g2c_ptr, coef2_ptr, w2_ptr,
                  N, H, W, C, P, Q, K, HC, WC,
                  STRIDE: tl.constexpr, PAD: tl.constexpr, R: tl.constexpr, S: tl.constexpr,
                  HAS_MASK: tl.constexpr, HAS_BN: tl.constexpr, EPI_RELU_BN: tl.constexpr,
                  HAS_RES: tl.constexpr, RES_MASK: tl.constexpr,
                  HAS_G2: tl.constexpr, PAD2: tl.constexpr, R2: tl.constexpr, S2: tl.constexpr,
                  HAS_MASK2: tl.constexpr, HAS_BN2: tl.constexpr, PREC: tl.constexpr,
                  AVGPOOL: tl.constexpr, AVGPOOL2: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    cls = tl.program_id(2)
    ph = cls // STRIDE
    pw = cls - ph * STRIDE
    rows = pid_m * BM + tl.arange(0, BM)
    n = rows // (HC * WC)
    rem = rows - n * (HC * WC)
    h = ph + STRIDE * (rem // WC)
    w = pw + STRIDE * (rem % WC)
    row_ok = (n < N) & (h < H) & (w < W)
    n64 = n.to(tl.int64)
    rc = pid_n * BN + tl.arange(0, BN)
    c_ok = rc < C
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = _dgrad_loop(acc, g_ptr, gmask_ptr, gc_ptr, coef_ptr, w_ptr, n64, h, w, row_ok,
                      ph, pw, rc, c_ok, C, P, Q, K, H, W, STRIDE, PAD, R, S, HAS_MASK, HAS_BN,
                      PREC, BK, AVGPOOL)
    if HAS_G2:
        # The projection shortcut's data gradient: a second GEMM (same output pixels,
        # stride and K; its own taps, padding and operand prologue) into the same
        # accumulator, so it is never written out.
        acc = _dgrad_loop(acc, g2_ptr, g2mask_ptr, g2c_ptr, coef2_ptr, w2_ptr, n64, h, w,
                          row_ok, ph, pw, rc, c_ok, C, P, Q, K, H, W, STRIDE, PAD2, R2, S2,
                          HAS_MASK2, HAS_BN2, PREC, BK, AVGPOOL2)

    off = (((n64 * H + h) * W + w) * C)[:, None] + rc[None, :]
    m = row_ok[:, None] & c_ok[None, :]
    if EPI_RELU_BN:
        c1 = tl.load(ec_ptr + off, mask=m, other=0.0).to(tl.float32)
        scale = tl.load(ess_ptr + rc, mask=c_ok, other=0.0)
        shift = tl.load(ess_ptr + C + rc, mask=c_ok, other=0.0)
        z = c1 * scale[None, :] + shift[None, :]
        acc = tl.where(m & (z > 0.0), acc, 0.0)
        # Reductions of the values as stored, so that the apply (which reads them back)
        # and the statistics agree.
        dz = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        mean = tl.load(estat_ptr + rc, mask=c_ok, other=0.0)
        inv = tl.load(estat_ptr + C + rc, mask=c_ok, other=0.0)
        xhat = (c1 - mean[None, :]) * inv[None, :]
        tl.atomic_add(red_ptr + rc, tl.sum(dz, axis=0), mask=c_ok)
        tl.atomic_add(red_ptr + C + rc, tl.sum(tl.where(m, dz * xhat, 0.0), axis=0), mask=c_ok)
    if HAS_RES:
        res = tl.load(res_ptr + off, mask=m, other=0.0).to(tl.float32)
        if RES_MASK:
            res = tl.where(_load_mask_bit(rmask_ptr, off, m), res, 0.0)
        acc = acc + res
    tl.store(out_ptr + off, acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _wgrad_kernel(g_ptr, gmask_ptr, gc_ptr, coef_ptr, x_ptr, xss_ptr, dw_ptr, db_ptr,
                  N, H, W, C, P, Q, K, MP, CHUNK,
                  STRIDE: tl.constexpr, PAD: tl.constexpr, R: tl.constexpr, S: tl.constexpr,
                  HAS_MASK: tl.constexpr, HAS_BN: tl.constexpr, X_BNRELU: tl.constexpr,
                  HAS_DB: tl.constexpr, PREC: tl.constexpr, AVGPOOL: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(2)
    tap = pid_z % (R * S)
    split = pid_z // (R * S)
    r = tap // S
    s = tap - r * S
    rk = pid_m * BM + tl.arange(0, BM)
    k_ok = rk < K
    rc, c_ok = lanes(pid_n * BN, C, BN)
    if X_BNRELU:
        xsc = tl.load(xss_ptr + rc, mask=c_ok, other=0.0)
        xsh = tl.load(xss_ptr + C + rc, mask=c_ok, other=0.0)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    dbacc = tl.zeros((BM,), dtype=tl.float32)
    end = tl.minimum(split * CHUNK + CHUNK, MP)
    for p0 in range(split * CHUNK, end, BK):
        pos, pos_ok = lanes(p0, end, BK)
        n = pos // (P * Q)
        rem = pos - n * (P * Q)
        p = rem // Q
        q = rem - p * Q
        # G^T tile [BM (k), BK (positions)].
        a = _load_grad(g_ptr, gmask_ptr, gc_ptr, coef_ptr,
                       pos.to(tl.int64)[None, :] * K + rk[:, None],
                       k_ok[:, None] & pos_ok[None, :], rk[:, None], K, HAS_MASK, HAS_BN)
        if HAS_DB:
            dbacc += tl.sum(a, axis=1)
        if AVGPOOL:
            # ResNet-D's pooled shortcut (a 1x1 weight, PAD 0): its input, the AVGPOOL x AVGPOOL
            # window average at STRIDE, rebuilt in the loader as the forward's GEMM
            # computed it (conv._pool_gemm_loop), never materialised.
            ih0 = p * STRIDE
            iw0 = q * STRIDE
            xs = tl.zeros((BK, BN), dtype=tl.float32)
            for t in tl.static_range(AVGPOOL * AVGPOOL):
                ih = ih0 + t // AVGPOOL
                iw = iw0 + t % AVGPOOL
                x_ok = pos_ok & (ih < H) & (iw < W)
                xs += tl.load(x_ptr + (((n.to(tl.int64) * H + ih) * W + iw) * C)[:, None]
                              + rc[None, :], mask=x_ok[:, None] & c_ok[None, :],
                              other=0.0).to(tl.float32)
            taps = (tl.minimum(ih0 + AVGPOOL, H) - ih0) * (tl.minimum(iw0 + AVGPOOL, W) - iw0)
            xt = (xs / tl.maximum(taps, 1).to(tl.float32)[:, None]).to(x_ptr.dtype.element_ty)
        else:
            ih = p * STRIDE - PAD + r
            iw = q * STRIDE - PAD + s
            x_ok = pos_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xm = x_ok[:, None] & c_ok[None, :]
            xt = tl.load(x_ptr + (((n.to(tl.int64) * H + ih) * W + iw) * C)[:, None]
                         + rc[None, :], mask=xm, other=0.0)
            if X_BNRELU:
                xf = xt.to(tl.float32) * xsc[None, :] + xsh[None, :]
                xf = tl.where(xf != xf, xf, tl.maximum(xf, 0.0))  # NaN stays NaN, as F.relu
                # padding after the transform
                xt = tl.where(xm, xf, 0.0).to(x_ptr.dtype.element_ty)
        acc = tl.dot(a.to(x_ptr.dtype.element_ty), xt, acc, input_precision=PREC)
    tl.atomic_add(dw_ptr + rk.to(tl.int64)[:, None] * (R * S * C) + (tap * C + rc)[None, :], acc,
                  mask=k_ok[:, None] & c_ok[None, :])
    if HAS_DB:
        tl.atomic_add(db_ptr + rk, dbacc, mask=k_ok & (tap == 0) & (pid_n == 0))


# ----------------------------------------------------------------------------------------
# Python launchers. In-package callers only (train.py's block backward, whose inputs
# FusedResidual / train_block validated): inconsistencies are asserted, not reported.
# ----------------------------------------------------------------------------------------

_CL = torch.channels_last


class GradOperand(NamedTuple):
    """The gradient operand G of a backward GEMM, built per tile on load: g, times its
    packed mask bit with mask, then with c and coef the BN-backward apply
    a[k]*g + b[k]*(c - mean[k]) + d[k] (coef = [a; b; d; mean], [4, K] fp32, from
    bn.bn_backward_coef; c the saved raw conv output the BN normalised)."""
    g: torch.Tensor                        # [N, K, P, Q] channels_last
    mask: Optional[torch.Tensor] = None    # uint8 [ceil(g.numel() / 8)]
    c: Optional[torch.Tensor] = None       # g-shaped, channels_last
    coef: Optional[torch.Tensor] = None


class ReluBnEpilogue(NamedTuple):
    """conv_dgrad's dReLU + BN-reduction epilogue for an input X = relu(bn(c)): dZ = dX *
    [scale*c + shift > 0] (recomputed, no mask stored) and the BN backward reductions
    sum(dZ), sum(dZ * xhat) of it."""
    c: torch.Tensor        # X-shaped raw conv output, channels_last
    ss: torch.Tensor       # [scale; shift], [2, C] fp32
    stat: torch.Tensor     # [mean; invstd], [2, C] fp32


class GradResidual(NamedTuple):
    """An X-shaped gradient added last (the identity shortcut's), times its mask bit."""
    tensor: torch.Tensor
    mask: Optional[torch.Tensor] = None


class SecondDgrad(NamedTuple):
    """A second convolution of the same input X and stride (the projection shortcut) whose
    data gradient goes into the same accumulator: dX = dgrad(g, w) + dgrad(g2, w2)."""
    g: GradOperand
    w: torch.Tensor
    padding: int = 0
    pool: int = 0      # ResNet-D: w is 1x1 after a pool x pool average pool (padding 0)


class DgradOut(NamedTuple):
    dx: torch.Tensor                       # channels_last, g's dtype
    red: Optional[torch.Tensor] = None     # [2, C] fp32 (sum(dZ), sum(dZ*xhat)) with relu_bn


class WgradOut(NamedTuple):
    dw: torch.Tensor                       # fp32 [K, C, R, S], a view of a [K, R, S, C] buffer
    db: Optional[torch.Tensor] = None      # fp32 [K] with need_db


def _grad_args(op: GradOperand, K: int):
    """The four pointer arguments of _load_grad (absent ones: g, never read) and its
    two flags."""
    g = op.g
    assert g.dim() == 4 and g.is_contiguous(memory_format=_CL) and g.shape[1] == K, \
        f"conv_bwd: gradient {tuple(g.shape)} {g.stride()} for {K} channels"
    assert (op.c is None) == (op.coef is None), "conv_bwd: the BN-backward apply needs c and coef"
    # The same physical layout: both channels_last-contiguous (their strides may still
    # differ on size-1 axes, a 1x1 output's, which no offset reads).
    assert op.c is None or (op.c.shape == g.shape and op.c.is_contiguous(memory_format=_CL)
                            and tuple(op.coef.shape) == (4, K)), \
        f"conv_bwd: c {tuple(op.c.shape)} / coef {tuple(op.coef.shape)} for {tuple(g.shape)}"
    assert op.mask is None or op.mask.numel() == mask_numel(g), "conv_bwd: mask size"
    ptrs = tuple(g if t is None else t for t in (op.mask, op.c, op.coef))
    return (g,) + ptrs, op.mask is not None, op.c is not None


def _cfg(dtype, fast, fma, dims):
    """fp32 without TF32 multiplies on the FMA units: the smaller tiles. The interpreter
    takes per shape the largest tile no larger than the problem's (BM, BN, BK) dims
    (interp_tile; why: conv.py's configurations)."""
    if INTERPRET:
        m, n, k = dims
        return dict(fast, BM=interp_tile(m, fast["BM"]), BN=interp_tile(n, fast["BN"]),
                    BK=interp_tile(k, fast["BK"]))
    return fma if _input_precision(dtype) == "ieee" and dtype == torch.float32 else fast


def _dgrad_extras(out, relu_bn, residual, second, g_shape, stride):
    """The epilogue and second-GEMM pointer arguments of _dgrad_kernel and their
    constexprs; absent ones are `out` (never read)."""
    N, C, H, W = out.shape
    red = None
    if relu_bn is not None:
        assert relu_bn.c.shape == out.shape and relu_bn.c.is_contiguous(memory_format=_CL) \
            and relu_bn.ss.shape == relu_bn.stat.shape == (2, C), "conv_dgrad: relu_bn"
        red = torch.zeros((2, C), device=out.device, dtype=torch.float32)
    epi = relu_bn or ReluBnEpilogue(out, out, out)
    res = residual or GradResidual(out)
    assert res.tensor.shape == out.shape and res.tensor.is_contiguous(memory_format=_CL)
    ptrs = (epi.c, epi.ss, epi.stat, out if red is None else red, res.tensor,
            out if res.mask is None else res.mask)
    flags = dict(EPI_RELU_BN=relu_bn is not None, HAS_RES=residual is not None,
                 RES_MASK=res.mask is not None, HAS_G2=second is not None)
    if second is None:
        return red, ptrs + (out,) * 5, dict(flags, PAD2=0, R2=1, S2=1, HAS_MASK2=False,
                                            HAS_BN2=False, AVGPOOL2=False)
    w2 = second.w
    g2_ptrs, has_mask2, has_bn2 = _grad_args(second.g, w2.shape[0])
    r2, s2 = _taps(w2, second.padding, second.pool)
    assert w2.shape[1] == C and second.g.g.shape == g_shape and _fwd_hw(
        H, W, r2, s2, stride, second.padding, second.pool) == tuple(g_shape[2:]), \
        f"conv_dgrad: second GEMM {tuple(second.g.g.shape)} * {tuple(w2.shape)}"
    return red, ptrs + g2_ptrs + (w2.contiguous(memory_format=_CL),), dict(
        flags, PAD2=second.padding, R2=r2, S2=s2, HAS_MASK2=has_mask2,
        HAS_BN2=has_bn2, AVGPOOL2=second.pool > 0)


def _taps(w, padding, pool):
    """The taps (R, S) the dgrad walks: w's, or a pooled 1x1 weight's window (pool.py's
    shortcut: every tap of the window takes the one weight)."""
    if not pool:
        return w.shape[2], w.shape[3]
    assert tuple(w.shape[2:]) == (1, 1) and padding == 0, \
        f"conv_bwd: a pooled shortcut has a 1x1 weight and no padding, got {tuple(w.shape)}"
    return pool, pool


def _fwd_hw(H, W, R, S, stride, padding, pool):
    """The forward's output size; a pooled one as conv.py computes it (the training
    block checked that its pool's output is the block's, so ceil_mode's is)."""
    if pool:
        return pool_out_hw(H, W, pool, stride, True)
    return conv_out_hw(H, W, R, S, stride, padding)


def conv_dgrad(g: GradOperand, w: torch.Tensor, in_hw, stride: int, padding: int, *,
               relu_bn: Optional[ReluBnEpilogue] = None,
               residual: Optional[GradResidual] = None,
               second: Optional[SecondDgrad] = None, pool: int = 0) -> DgradOut:
    """Data gradient of conv2d(X, w, stride, padding) for X of spatial size in_hw, from
    the gradient operand g of its output; the optional parts are the specs above.
    pool: the conv is w (1x1) after a pool x pool average pool at stride (pool.py).
    Returns DgradOut(dx, red): red only with relu_bn."""
    N, K, P, Q = g.g.shape
    C = w.shape[1]
    R, S = _taps(w, padding, pool)
    H, W = in_hw
    g_ptrs, has_mask, has_bn = _grad_args(g, w.shape[0])
    out = torch.empty((N, C, H, W), device=g.g.device, dtype=g.g.dtype, memory_format=_CL)
    red, extras, flags = _dgrad_extras(out, relu_bn, residual, second, g.g.shape, stride)
    HC, WC = triton.cdiv(H, stride), triton.cdiv(W, stride)
    cfg = _cfg(g.g.dtype, _DG, _DG_FMA, (N * HC * WC, C, K))
    grid = (triton.cdiv(N * HC * WC, cfg["BM"]), triton.cdiv(C, cfg["BN"]), stride * stride)
    launch(_dgrad_kernel, grid, *g_ptrs, w.contiguous(memory_format=_CL), out, *extras,
           N, H, W, C, P, Q, K, HC, WC,
           STRIDE=stride, PAD=padding, R=R, S=S, HAS_MASK=has_mask, HAS_BN=has_bn,
           PREC=_input_precision(g.g.dtype), AVGPOOL=pool > 0, **flags, **cfg)
    return DgradOut(out, red)


def conv_wgrad(g: GradOperand, x: torch.Tensor, w_shape, stride: int, padding: int, *,
               x_bnrelu: Optional[torch.Tensor] = None, need_db: bool = False,
               pool: int = 0) -> WgradOut:
    """Weight (and with need_db bias) gradient of conv2d(Xt, w, stride, padding) from the
    gradient operand g of its output. x [N, C, H, W] channels_last; Xt = x, or
    relu(x * scale + shift) with x_bnrelu = [scale; shift] ([2, C] fp32: conv2's input
    y1 rebuilt from c1, zero padding after the transform). pool: Xt is x's pool x pool
    window average at stride before a 1x1 w, no padding (pool.py)."""
    N, K, P, Q = g.g.shape
    K2, C, R, S = w_shape
    assert not pool or ((R, S, padding) == (1, 1, 0) and x_bnrelu is None), \
        f"conv_wgrad: a pooled input takes a 1x1 weight, no padding or transform"
    assert x.is_contiguous(memory_format=_CL) and tuple(x.shape[:2]) == (N, C) and K2 == K, \
        f"conv_wgrad: weight {tuple(w_shape)}, input {tuple(x.shape)}, gradient {(N, K, P, Q)}"
    g_ptrs, has_mask, has_bn = _grad_args(g, K)
    dw = torch.zeros((K, R, S, C), device=x.device, dtype=torch.float32)
    db = torch.zeros((K,), device=x.device, dtype=torch.float32) if need_db else None
    MP = N * P * Q
    fast = _WG_POOL32 if pool and g.g.dtype == torch.float32 else _WG
    cfg = _cfg(g.g.dtype, fast, _WG_FMA, (K, C, MP))
    tiles = triton.cdiv(K, cfg["BM"]) * triton.cdiv(C, cfg["BN"]) * R * S
    split = max(1, min(triton.cdiv(MP, cfg["BK"]), _WG_PROGRAMS // tiles))
    chunk = triton.cdiv(triton.cdiv(MP, split), cfg["BK"]) * cfg["BK"]
    split = triton.cdiv(MP, chunk)
    grid = (triton.cdiv(K, cfg["BM"]), triton.cdiv(C, cfg["BN"]), R * S * split)
    launch(_wgrad_kernel, grid, *g_ptrs, x, x if x_bnrelu is None else x_bnrelu,
           dw, dw if db is None else db,
           N, x.shape[2], x.shape[3], C, P, Q, K, MP, chunk,
           STRIDE=stride, PAD=padding, R=R, S=S, HAS_MASK=has_mask, HAS_BN=has_bn,
           X_BNRELU=x_bnrelu is not None, HAS_DB=need_db, PREC=_input_precision(g.g.dtype),
           AVGPOOL=pool, **cfg)
    return WgradOut(dw.permute(0, 3, 1, 2), db)


__all__ = ["DgradOut", "GradOperand", "GradResidual", "ReluBnEpilogue", "SecondDgrad",
           "WgradOut", "conv_dgrad", "conv_wgrad"]
