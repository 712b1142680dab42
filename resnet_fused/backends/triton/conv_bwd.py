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

from typing import Optional

import torch
import triton
import triton.language as tl

from .bn import _load_mask_bit
from .launcher import INTERPRET, launch
from .conv import _input_precision as _conv_input_precision

if INTERPRET:
    _DG = dict(BM=32, BN=16, BK=16, num_warps=4, num_stages=1)
    _WG = dict(BM=16, BN=16, BK=32, num_warps=4, num_stages=1)
    _WG_PROGRAMS = 1
else:
    # Untuned starting points (no GPU in the session that wrote this): 128x64x32 for
    # dgrad, 64x64 over 64 positions for wgrad. dgrad runs 8 warps: with 4, its
    # BN-backward prologue and dReLU/BN epilogue spilled 8-40 bytes per thread at 255
    # registers on sm_90 (aot.py, triton 3.6 and 3.8).
    _DG = dict(BM=128, BN=64, BK=32, num_warps=8, num_stages=3)
    _WG = dict(BM=64, BN=64, BK=64, num_warps=4, num_stages=3)
    _WG_PROGRAMS = 512
# fp32 without TF32 multiplies on the FMA units: smaller tiles, or ptxas spills (with
# triton 3.6: 64-5000 bytes per thread for the configs above, aot.py).
_DG_FMA = dict(_DG, BM=64, BN=64, BK=32, num_warps=8) if not INTERPRET else _DG
_WG_FMA = dict(_WG, BM=64, BN=64, BK=16, num_warps=8) if not INTERPRET else _WG


def _input_precision(dtype: torch.dtype) -> str:
    """TF32 for fp32 only where PyTorch's own convolution switch allows it: conv.py's
    rule, which reads torch.backends.cudnn.conv.fp32_precision first (the legacy
    allow_tf32 getter raises once the new API has set conv and RNN apart)."""
    return _conv_input_precision(dtype)


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
                rc, c_ok, C, P, Q, K,
                STRIDE: tl.constexpr, PAD: tl.constexpr, R: tl.constexpr, S: tl.constexpr,
                HAS_MASK: tl.constexpr, HAS_BN: tl.constexpr, PREC: tl.constexpr,
                BK: tl.constexpr):
    """acc += sum over the valid taps of this parity class and K of G * w^T."""
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
        b = tl.load(w_ptr + kidx.to(tl.int64)[:, None] * (R * S * C)
                    + ((r * S + s) * C + rc)[None, :],
                    mask=k_ok[:, None] & c_ok[None, :], other=0.0)
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
                      ph, pw, rc, c_ok, C, P, Q, K, STRIDE, PAD, R, S, HAS_MASK, HAS_BN,
                      PREC, BK)
    if HAS_G2:
        # The projection shortcut's data gradient: a second GEMM (same output pixels,
        # stride and K; its own taps, padding and operand prologue) into the same
        # accumulator, so it is never written out.
        acc = _dgrad_loop(acc, g2_ptr, g2mask_ptr, g2c_ptr, coef2_ptr, w2_ptr, n64, h, w,
                          row_ok, ph, pw, rc, c_ok, C, P, Q, K, STRIDE, PAD2, R2, S2,
                          HAS_MASK2, HAS_BN2, PREC, BK)

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
                  HAS_DB: tl.constexpr, PREC: tl.constexpr,
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
    rc = pid_n * BN + tl.arange(0, BN)
    c_ok = rc < C
    if X_BNRELU:
        xsc = tl.load(xss_ptr + rc, mask=c_ok, other=0.0)
        xsh = tl.load(xss_ptr + C + rc, mask=c_ok, other=0.0)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    dbacc = tl.zeros((BM,), dtype=tl.float32)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, MP)
    for p0 in range(start, end, BK):
        pos = p0 + tl.arange(0, BK)
        pos_ok = pos < end
        n = pos // (P * Q)
        rem = pos - n * (P * Q)
        p = rem // Q
        q = rem - p * Q
        ih = p * STRIDE - PAD + r
        iw = q * STRIDE - PAD + s
        x_ok = pos_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        # G^T tile [BM (k), BK (positions)].
        a = _load_grad(g_ptr, gmask_ptr, gc_ptr, coef_ptr,
                       pos.to(tl.int64)[None, :] * K + rk[:, None],
                       k_ok[:, None] & pos_ok[None, :], rk[:, None], K, HAS_MASK, HAS_BN)
        if HAS_DB:
            dbacc += tl.sum(a, axis=1)
        xm = x_ok[:, None] & c_ok[None, :]
        xt = tl.load(x_ptr + (((n.to(tl.int64) * H + ih) * W + iw) * C)[:, None] + rc[None, :],
                     mask=xm, other=0.0)
        if X_BNRELU:
            xf = xt.to(tl.float32) * xsc[None, :] + xsh[None, :]
            xf = tl.where(xf != xf, xf, tl.maximum(xf, 0.0))  # NaN stays NaN, as F.relu
            xt = tl.where(xm, xf, 0.0).to(x_ptr.dtype.element_ty)   # padding after the transform
        acc = tl.dot(a.to(x_ptr.dtype.element_ty), xt, acc, input_precision=PREC)
    tl.atomic_add(dw_ptr + rk.to(tl.int64)[:, None] * (R * S * C) + (tap * C + rc)[None, :], acc,
                  mask=k_ok[:, None] & c_ok[None, :])
    if HAS_DB:
        tl.atomic_add(db_ptr + rk, dbacc, mask=k_ok & (tap == 0) & (pid_n == 0))


def _nhwc(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() != 4 or not t.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"conv_bwd: {name} must be a channels_last-contiguous 4-D tensor, "
                         f"got shape {tuple(t.shape)} strides {t.stride()}")
    return t


def _grad_operand(g, gmask, gc, coef, K):
    if gc is not None or coef is not None:
        if gc is None or coef is None:
            raise ValueError("conv_bwd: the BN-backward prologue needs both gc and coef")
        _nhwc(gc, "gc")
        if gc.shape != g.shape or coef.shape != (4, K):
            raise ValueError(f"conv_bwd: gc {tuple(gc.shape)} / coef {tuple(coef.shape)} do not "
                             f"match the gradient {tuple(g.shape)}")
    if gmask is not None and gmask.numel() != (g.numel() + 7) // 8:
        raise ValueError(f"conv_bwd: gmask has {gmask.numel()} bytes, the gradient needs "
                         f"{(g.numel() + 7) // 8}")
    return (gmask if gmask is not None else g, gc if gc is not None else g,
            coef if coef is not None else g)


def conv_dgrad(g: torch.Tensor, w: torch.Tensor, in_hw, stride: int, padding: int, *,
               gmask: Optional[torch.Tensor] = None, gc: Optional[torch.Tensor] = None,
               coef: Optional[torch.Tensor] = None,
               relu_c: Optional[torch.Tensor] = None, relu_ss: Optional[torch.Tensor] = None,
               relu_stat: Optional[torch.Tensor] = None,
               residual: Optional[torch.Tensor] = None, res_mask: Optional[torch.Tensor] = None,
               g2: Optional[torch.Tensor] = None, w2: Optional[torch.Tensor] = None,
               padding2: int = 0, gmask2: Optional[torch.Tensor] = None,
               gc2: Optional[torch.Tensor] = None, coef2: Optional[torch.Tensor] = None):
    """Data gradient of conv2d(X, w, stride, padding) for X of spatial size in_hw.

    g [N,K,P,Q] channels_last: grad of the conv output, or (with gc, coef) the BN
    backward apply of it (gmask: packed mask bits of g's elements, applied first).
    relu_c/relu_ss/relu_stat: the dReLU + BN-reduction epilogue; relu_c is the raw
    conv output before the BN+ReLU whose input X was ([N,C,H,W]), relu_ss = [scale;
    shift] and relu_stat = [mean; invstd] of that BN ([2, C] fp32 each).
    residual (X-shaped, channels_last) is added last, times res_mask bits if given.
    g2, w2, padding2 (+ gmask2, gc2, coef2 as for g): a second convolution of the same
    input X and stride (the projection shortcut) whose data gradient is accumulated
    into the same tile: dX = dgrad(g, w) + dgrad(g2, w2).
    Returns dX (channels_last, g's dtype), and with the epilogue also red [2, C] fp32 =
    (sum(dZ), sum(dZ*xhat)).
    """
    _nhwc(g, "g")
    N, K, P, Q = g.shape
    Kw, C, R, S = w.shape
    if Kw != K:
        raise ValueError(f"conv_dgrad: weight has {Kw} output channels, the gradient {K}")
    H, W = in_hw
    w_cl = w.contiguous(memory_format=torch.channels_last)   # [K, R, S, C] in memory
    gm, gcc, cf = _grad_operand(g, gmask, gc, coef, K)
    out = torch.empty((N, C, H, W), device=g.device, dtype=g.dtype,
                      memory_format=torch.channels_last)
    epi = relu_c is not None
    red = torch.zeros((2, C), device=g.device, dtype=torch.float32) if epi else None
    if epi:
        _nhwc(relu_c, "relu_c")
        if relu_c.shape != out.shape or relu_ss.shape != (2, C) or relu_stat.shape != (2, C):
            raise ValueError("conv_dgrad: relu_c / relu_ss / relu_stat do not match the input")
    if residual is not None:
        _nhwc(residual, "residual")
        if residual.shape != out.shape:
            raise ValueError(f"conv_dgrad: residual {tuple(residual.shape)} != input gradient "
                             f"{tuple(out.shape)}")
    R2 = S2 = 1
    if g2 is not None:
        _nhwc(g2, "g2")
        if g2.shape[0] != N or tuple(g2.shape[2:]) != (P, Q) or w2.shape[0] != g2.shape[1] \
                or w2.shape[1] != C:
            raise ValueError(f"conv_dgrad: second gradient {tuple(g2.shape)} / weight "
                             f"{tuple(w2.shape)} do not match {tuple(g.shape)} / {tuple(w.shape)}")
        R2, S2 = w2.shape[2], w2.shape[3]
        if (H + 2 * padding2 - R2) // stride + 1 != P or (W + 2 * padding2 - S2) // stride + 1 != Q:
            raise ValueError("conv_dgrad: the second convolution's output size differs")
        w2_cl = w2.contiguous(memory_format=torch.channels_last)
        gm2, gcc2, cf2 = _grad_operand(g2, gmask2, gc2, coef2, g2.shape[1])
    HC, WC = triton.cdiv(H, stride), triton.cdiv(W, stride)
    cfg = _DG_FMA if _input_precision(g.dtype) == "ieee" and g.dtype == torch.float32 else _DG
    grid = (triton.cdiv(N * HC * WC, cfg["BM"]), triton.cdiv(C, cfg["BN"]), stride * stride)
    launch(_dgrad_kernel, grid, g, gm, gcc, cf, w_cl, out,
           relu_c if epi else out, relu_ss if epi else out, relu_stat if epi else out,
           red if epi else out,
           residual if residual is not None else out,
           res_mask if res_mask is not None else out,
           *((g2, gm2, gcc2, cf2, w2_cl) if g2 is not None else (out,) * 5),
           N, H, W, C, P, Q, K, HC, WC,
           STRIDE=stride, PAD=padding, R=R, S=S,
           HAS_MASK=gmask is not None, HAS_BN=gc is not None, EPI_RELU_BN=epi,
           HAS_RES=residual is not None, RES_MASK=res_mask is not None,
           HAS_G2=g2 is not None, PAD2=padding2, R2=R2, S2=S2,
           HAS_MASK2=gmask2 is not None, HAS_BN2=gc2 is not None,
           PREC=_input_precision(g.dtype), **cfg)
    return (out, red) if epi else out


def conv_wgrad(g: torch.Tensor, x: torch.Tensor, w_shape, stride: int, padding: int, *,
               gmask: Optional[torch.Tensor] = None, gc: Optional[torch.Tensor] = None,
               coef: Optional[torch.Tensor] = None, x_ss: Optional[torch.Tensor] = None,
               need_db: bool = False):
    """Weight (and bias) gradient of conv2d(Xt, w, stride, padding).

    g and its prologue as conv_dgrad; x [N,C,H,W] channels_last; Xt = x, or
    relu(x*scale + shift) with x_ss = [scale; shift] ([2, C] fp32).
    Returns (dw fp32 [K,C,R,S] (a channels_last view of a [K,R,S,C] buffer),
    db fp32 [K] or None)."""
    _nhwc(g, "g")
    _nhwc(x, "x")
    N, K, P, Q = g.shape
    K2, C, R, S = w_shape
    if K2 != K or x.shape[1] != C or x.shape[0] != N:
        raise ValueError(f"conv_wgrad: weight {tuple(w_shape)}, input {tuple(x.shape)} and "
                         f"gradient {tuple(g.shape)} do not match")
    H, W = x.shape[2], x.shape[3]
    gm, gcc, cf = _grad_operand(g, gmask, gc, coef, K)
    dw = torch.zeros((K, R, S, C), device=g.device, dtype=torch.float32)
    db = torch.zeros((K,), device=g.device, dtype=torch.float32) if need_db else None
    MP = N * P * Q
    cfg = _WG_FMA if _input_precision(g.dtype) == "ieee" and g.dtype == torch.float32 else _WG
    tiles = triton.cdiv(K, cfg["BM"]) * triton.cdiv(C, cfg["BN"]) * R * S
    split = max(1, min(triton.cdiv(MP, cfg["BK"]), _WG_PROGRAMS // tiles))
    chunk = triton.cdiv(triton.cdiv(MP, split), cfg["BK"]) * cfg["BK"]
    split = triton.cdiv(MP, chunk)
    grid = (triton.cdiv(K, cfg["BM"]), triton.cdiv(C, cfg["BN"]), R * S * split)
    launch(_wgrad_kernel, grid, g, gm, gcc, cf, x, x_ss if x_ss is not None else x,
           dw, db if need_db else dw,
           N, H, W, C, P, Q, K, MP, chunk,
           STRIDE=stride, PAD=padding, R=R, S=S,
           HAS_MASK=gmask is not None, HAS_BN=gc is not None, X_BNRELU=x_ss is not None,
           HAS_DB=need_db, PREC=_input_precision(g.dtype), **cfg)
    return dw.permute(0, 3, 1, 2), db


__all__ = ["conv_dgrad", "conv_wgrad"]
