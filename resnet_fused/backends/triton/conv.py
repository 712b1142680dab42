"""Implicit-GEMM convolution in Triton, NHWC, with fused prologue and epilogue.

One kernel serves every convolution of the block, eval and training forward:

    out[n, p, q, k] = epilogue( sum_{r, s, c} A(x)[n, p*st + r - pad, q*st + s - pad, c] * w[k, c, r, s]
                                [+ sum_{r, s, c} x2[n, p*st2 + r - pad2, q*st2 + s - pad2, c] * w2[k, c, r, s]] )
    A(x)     = relu?(x * in_scale[c] + in_shift[c])   (the prologue, e.g. bn1 + ReLU of conv1's raw output);
               taps outside the image are ZERO after the transform (padding in y1 space)
    epilogue = relu?(acc + bias[k] (+ R(residual)[n, p, q, k])), cast to x's dtype, optionally
               with per-channel (mean, biased var) of the written values and/or the
               packed 1-bit ReLU mask of them;
               R(r) = r, or r * residual_scale[k] + residual_shift[k] (a BN of the residual).

As a GEMM: rows are the output pixels (M = N*P*Q), columns the output channels (K),
and the reduction runs over R*S*C (taps x input channels). The reduction is ONE flat
loop over `R*S*C_pad` in steps of BK, C_pad = C rounded up to BK so that a step never
straddles two taps: Triton software-pipelines only the innermost loop, and the flat
loop ran at 75-87% of cuDNN's fused conv where nested tap/channel loops reached 50-75%
in an H200 experiment (README.md, Design, "Figures to beat"). The projection shortcut is a second such loop into the same fp32
accumulator (K-concatenation), so x is read once and the block stays two kernels.

Cost model, for the benchmark: FLOPs = 2 * N*P*Q * K * C*R*S (+ 2 * N*P*Q * K * C2*R2*S2
for the projection); the compute floor is FLOPs / peak (bf16 dense). The curated GPU
configs below target the ResNet-18 stages at batch 128 (M = 100k..400k rows, K = C =
64..512): 128x128x64 / 8 warps for the wide stages, 128x64 and 64x128 with 4 stages
for K=64, 64x64 for the small-M 7x7 stage, BK=32 variants for fp32 (shared memory).

Layouts: x, x2, residual and the output are channels_last (NHWC in memory); weights
are PyTorch-shaped [K, C, R, S] and read as channels_last ([K, R, S, C] in memory),
which costs no copy when the weight already is channels_last.

Hopper (TMA): `_conv_tma_kernel` reads x through a 4-D tensor descriptor over NHWC
whose out-of-bounds zero fill gives the padding; it covers stride-1 convolutions
without a prologue or stats, a projection GEMM included (that one through pointers;
see `_tma_eligible`). Automatic selection picks it only with
RESNET_FUSED_TRITON_TMA=1, until a GPU session has measured where it wins; its index
logic is tested in the interpreter (which emulates descriptors) via _path="tma".
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .bn import chan_merge
from .launcher import INTERPRET as _INTERPRET, launch, tracing

# ----------------------------------------------------------------------------------------
# Configurations. The interpreter runs exactly one, small enough to exercise the masked
# edges (C=24/40 span a partial channel chunk, K=40 a partial column tile).
# ----------------------------------------------------------------------------------------


def _cfg(bm, bn, bk, warps, stages, group=8):
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": group},
                         num_warps=warps, num_stages=stages)


if _INTERPRET:
    _CONFIGS = [_cfg(32, 32, 16, 4, 1)]
else:
    _CONFIGS = [
        _cfg(128, 128, 64, 8, 3),
        _cfg(128, 64, 64, 4, 4),
        _cfg(64, 128, 64, 4, 4),
        _cfg(128, 128, 32, 4, 4),
        _cfg(64, 64, 64, 4, 3),
        _cfg(128, 256, 64, 8, 3),
        _cfg(256, 128, 64, 8, 3),
        _cfg(64, 64, 32, 4, 4),      # fp32 and tiny channel counts
        _cfg(128, 64, 32, 4, 3),     # fp32
        _cfg(32, 32, 16, 2, 2),      # C=3 stems and odd tiny shapes
    ]

# The statistics partials are slots of _MIN_BM rows, the smallest BM any config can
# pick; a tile of BM rows owns BM // _MIN_BM consecutive slots (see _epilogue), so every
# BM must be a multiple of it, by a power of two (the epilogue's tl.arange over the slots).
_MIN_BM = min(c.kwargs["BM"] for c in _CONFIGS)
if any(c.kwargs["BM"] % _MIN_BM or (c.kwargs["BM"] // _MIN_BM) & (c.kwargs["BM"] // _MIN_BM - 1)
       for c in _CONFIGS):
    raise AssertionError(f"conv.py: every config's BM must be a power-of-two multiple of "
                         f"{_MIN_BM}, the rows of a statistics slot: "
                         f"{[c.kwargs['BM'] for c in _CONFIGS]}")


def _heavy(named_args, kwargs) -> bool:
    """A variant with a prologue, a second GEMM, or a residual read in the epilogue."""
    # Constexprs passed by keyword arrive in kwargs, the rest in named_args.
    return any(kwargs.get(f, named_args.get(f, False))
               for f in ("HAS_PRO", "HAS_X2", "HAS_RES", "RES_BN", "OUT_MASK"))


# Accumulator fp32 registers per thread (tile elements / threads) from which a heavy
# variant spills on sm_90: measured by the ahead-of-time compile (aot.py) with triton
# 3.6 and 3.8 (e.g. 128x128 over 4 warps or 256x128 over 8 warps with the prologue, a
# residual or the mask epilogue: 80-600 bytes of spills per thread); lighter variants fit.
_HEAVY_ACC_REGS = 128


def _acc_regs(tile_rows, bn, warps):
    return tile_rows * bn // (32 * warps)


def _prune(configs, named_args, **kwargs):
    """Drop configs that waste most of a tile on this shape, overflow shared memory, or
    spill registers (heavy variants with a 128-register accumulator)."""
    C = named_args["C"]
    K = named_args["K"]
    M = named_args["M"]
    x = named_args["x_ptr"]
    esize = x.element_size() if hasattr(x, "element_size") else 2
    has_x2 = kwargs.get("HAS_X2", named_args.get("HAS_X2", False))
    heavy = _heavy(named_args, kwargs)
    ieee = kwargs.get("INPUT_PRECISION", named_args.get("INPUT_PRECISION")) == "ieee"
    cmax = max(C, named_args["C2"] if has_x2 else 0)
    kept = []
    for c in configs:
        bm, bn, bk = c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"]
        if bn > max(16, triton.next_power_of_2(K)):
            continue
        if heavy and _acc_regs(bm, bn, c.num_warps) >= _HEAVY_ACC_REGS:
            continue
        # fp32 operands: more than 64 loaded elements per thread per stage (e.g. 128x64x64
        # or 64x128x64 over 4 warps) spilled 100-470 bytes per thread on sm_90 (aot.py).
        if esize == 4 and (bm * bk + bk * bn) // (32 * c.num_warps) > 64:
            continue
        # fp32 without TF32 multiplies on the FMA units: accumulators above 32 registers
        # per thread spilled 64-420 bytes per thread on sm_90 (aot.py).
        if esize == 4 and ieee and _acc_regs(bm, bn, c.num_warps) > 32:
            continue
        if bk > max(16, triton.next_power_of_2(cmax)):
            continue
        if bm > max(16, triton.next_power_of_2(M)):
            continue
        if (bm * bk + bk * bn) * esize * max(c.num_stages, 1) > 200 * 1024:
            continue
        kept.append(c)
    if not kept:  # every config is too big for this tiny shape: keep the smallest one
        kept = [min(configs, key=lambda c: c.kwargs["BM"] * c.kwargs["BN"] * c.kwargs["BK"])]
    return kept


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _gemm_loop(acc, x_ptr, w_ptr, scale_ptr, shift_ptr,
               n64, oh, ow, row_ok, rk, rn, n_ok,
               H, W, C,
               STRIDE: tl.constexpr, PAD: tl.constexpr, R: tl.constexpr, S: tl.constexpr,
               HAS_PRO: tl.constexpr, IN_RELU: tl.constexpr,
               INPUT_PRECISION: tl.constexpr, BK: tl.constexpr):
    """acc += implicit-im2col(x)[rows, :] @ w[:, cols] over all R*S taps x C channels."""
    ih0 = oh * STRIDE - PAD
    iw0 = ow * STRIDE - PAD
    c_pad = tl.cdiv(C, BK) * BK
    # Weight rows are k * (R*S*C) + (r*S + s) * C + c (channels_last weight); int64 so a
    # huge K*R*S*C cannot overflow.
    w_col = rn.to(tl.int64) * (R * S * C)
    for kk in range(0, R * S * c_pad, BK):
        tap = kk // c_pad
        c0 = kk - tap * c_pad
        r = tap // S
        s = tap - r * S
        ih = ih0 + r
        iw = iw0 + s
        pix_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        # Pixel offset in int64: N*H*W*C overflows int32 for large activations.
        pix = ((n64 * H + ih) * W + iw) * C
        cc = c0 + rk
        c_ok = cc < C
        a_mask = pix_ok[:, None] & c_ok[None, :]
        a = tl.load(x_ptr + pix[:, None] + cc[None, :], mask=a_mask, other=0.0)
        if HAS_PRO:
            sc = tl.load(scale_ptr + cc, mask=c_ok, other=0.0).to(tl.float32)
            sh = tl.load(shift_ptr + cc, mask=c_ok, other=0.0).to(tl.float32)
            af = a.to(tl.float32) * sc[None, :] + sh[None, :]
            if IN_RELU:
                af = tl.where(af != af, af, tl.maximum(af, 0.0))  # NaN stays NaN, as F.relu
            # Padding is zero in the transformed space: mask AFTER the transform.
            af = tl.where(a_mask, af, 0.0)
            a = af.to(x_ptr.dtype.element_ty)
        b_mask = c_ok[:, None] & n_ok[None, :]
        b = tl.load(w_ptr + w_col[None, :] + (tap * C + cc)[:, None], mask=b_mask, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _epilogue(acc, rm, rn, row_ok, n_ok, pid_m, n0, M, K,
              bias_ptr, res_ptr, rscale_ptr, rshift_ptr, out_ptr, omask_ptr,
              pmean_ptr, pm2_ptr, pcnt_ptr,
              HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RES_BN: tl.constexpr,
              RELU: tl.constexpr, OUT_MASK: tl.constexpr, STATS: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, SLOT_ROWS: tl.constexpr):
    """rm: the flat output pixel index (n*P + p)*Q + q of each row; pid_m: the row tile;
    n0: the first output channel of the tile (rn = n0 + arange(BN)); SLOT_ROWS: the
    rows of one statistics slot (BM is a multiple of it)."""
    off = rm.to(tl.int64)[:, None] * K + rn[None, :]
    mask = row_ok[:, None] & n_ok[None, :]
    if RES_BN:
        # A BatchNorm-transformed residual, res * scale[k] + shift[k] (the training
        # block's bn2(c2) added to the projection GEMM's output). The bias joins the
        # shift first: one per-channel vector fewer live next to the accumulator.
        rs = tl.load(rscale_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        col = tl.load(rshift_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            col += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        res = tl.load(res_ptr + off, mask=mask, other=0.0).to(tl.float32)
        acc = acc + (res * rs[None, :] + col[None, :])
    else:
        if HAS_BIAS:
            bias = tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
            acc = acc + bias[None, :]
        if HAS_RES:
            acc = acc + tl.load(res_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.where(acc != acc, acc, tl.maximum(acc, 0.0))  # NaN stays NaN, as F.relu
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + off, out, mask=mask)
    if OUT_MASK:
        # Packed ReLU mask of the values as stored (schemas.py: bit i % 8 of byte i // 8
        # for physical offset i = row * K + channel). The launcher guarantees K % 8 == 0,
        # and BN and n0 are multiples of 8, so each byte is 8 consecutive channels of one
        # pixel inside this tile: assembled in registers, written once, no atomics.
        keep = mask & (out.to(tl.float32) > 0.0)
        bits = tl.where(keep, 1 << (tl.arange(0, BN) % 8)[None, :], 0).to(tl.uint8)
        byte = tl.sum(tl.reshape(bits, (BM, BN // 8, 8)), axis=2, dtype=tl.uint8)
        bcol = n0 // 8 + tl.arange(0, BN // 8)
        boff = rm.to(tl.int64)[:, None] * (K // 8) + bcol[None, :]
        tl.store(omask_ptr + boff, byte, mask=row_ok[:, None] & (bcol < K // 8)[None, :])
    if STATS:
        # Per-tile mean and centred sum of squares of the values as written (rounded to
        # the output dtype), combined across tiles by _stats_combine_kernel (Chan et al.):
        # no atomics, so autotuning's repeated launches and the result are deterministic.
        # The partials have one slot per SLOT_ROWS rows; this tile owns slots
        # [pid_m * SUB, (pid_m + 1) * SUB) below cdiv(M, SLOT_ROWS): its statistics go to
        # the first, count 0 to the others. So every launch writes the count of every
        # slot, whatever its BM, and no slot keeps a count from an earlier launch on the
        # same buffers (autotuning benchmarks each config there before the final run).
        v = tl.where(mask, out.to(tl.float32), 0.0)
        cnt = tl.minimum(M - pid_m * BM, BM).to(tl.float32)
        t_mean = tl.sum(v, axis=0) / cnt
        d = tl.where(mask, v - t_mean[None, :], 0.0)
        t_m2 = tl.sum(d * d, axis=0)
        SUB: tl.constexpr = BM // SLOT_ROWS
        slot = pid_m * SUB
        tl.store(pmean_ptr + slot * K + rn, t_mean, mask=n_ok)
        tl.store(pm2_ptr + slot * K + rn, t_m2, mask=n_ok)
        own = slot + tl.arange(0, SUB)
        tl.store(pcnt_ptr + own, tl.where(own == slot, cnt, 0.0),
                 mask=own < tl.cdiv(M, SLOT_ROWS))


# The autotune keys name the sizes and EVERY constexpr but the tile sizes: the variants
# prune differently (_heavy's flags, INPUT_PRECISION) and run at different speeds, so
# one must never reuse a config tuned for another (eval K1 and K2 of an identity block
# differ only in HAS_RES; a TF32 winner can spill as IEEE fp32), and a 1x1 and a 3x3
# conv can share M, K, C, H, W. The tensors' dtypes join the key by themselves (the
# Autotuner appends every argument's dtype). tests/test_triton_launch.py checks that
# each key covers every constexpr and every argument the pruning reads.
_CONV_KEY = ["M", "K", "C", "C2", "H", "W", "H2", "W2", "P", "Q",
             "STRIDE", "PAD", "R", "S", "STRIDE2", "PAD2", "R2", "S2",
             "HAS_BIAS", "HAS_RES", "RELU", "HAS_X2", "HAS_PRO", "IN_RELU", "STATS", "RES_BN",
             "OUT_MASK", "INPUT_PRECISION", "SLOT_ROWS"]


@triton.autotune(configs=_CONFIGS, key=_CONV_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _conv_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
    scale_ptr, shift_ptr,
    x2_ptr, w2_ptr,
    pmean_ptr, pm2_ptr, pcnt_ptr,
    rscale_ptr, rshift_ptr, omask_ptr,
    M, K, H, W, C, P, Q,
    H2, W2, C2,
    STRIDE: tl.constexpr, PAD: tl.constexpr, R: tl.constexpr, S: tl.constexpr,
    STRIDE2: tl.constexpr, PAD2: tl.constexpr, R2: tl.constexpr, S2: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    HAS_X2: tl.constexpr, HAS_PRO: tl.constexpr, IN_RELU: tl.constexpr,
    STATS: tl.constexpr, RES_BN: tl.constexpr, OUT_MASK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, SLOT_ROWS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles share each weight column tile while it is
    # hot in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(K, BN)
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsize
    pid_n = (pid % width) // gsize

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    row_ok = rm < M
    n_ok = rn < K
    pq = P * Q
    n_img = rm // pq
    rem = rm - n_img * pq
    oh = rem // Q
    ow = rem - oh * Q
    n64 = n_img.to(tl.int64)

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = _gemm_loop(acc, x_ptr, w_ptr, scale_ptr, shift_ptr, n64, oh, ow, row_ok, rk, rn, n_ok,
                     H, W, C, STRIDE, PAD, R, S, HAS_PRO, IN_RELU, INPUT_PRECISION, BK)
    if HAS_X2:
        acc = _gemm_loop(acc, x2_ptr, w2_ptr, scale_ptr, shift_ptr, n64, oh, ow, row_ok, rk, rn,
                         n_ok, H2, W2, C2, STRIDE2, PAD2, R2, S2, False, False,
                         INPUT_PRECISION, BK)
    _epilogue(acc, rm, rn, row_ok, n_ok, pid_m, pid_n * BN, M, K, bias_ptr, res_ptr,
              rscale_ptr, rshift_ptr, out_ptr, omask_ptr, pmean_ptr, pm2_ptr, pcnt_ptr,
              HAS_BIAS, HAS_RES, RES_BN, RELU, OUT_MASK, STATS, BM, BN, SLOT_ROWS)


# ----------------------------------------------------------------------------------------
# Tensor-descriptor (TMA) variant: stride 1, no prologue, no stats.
# A program owns a BH x BW patch of output pixels of one image, so each tap's input
# patch is ONE 4-D box [1, BH, BW, BK] of the NHWC input, loaded at (possibly negative)
# coordinates (n, oh0 - PAD + r, ow0 - PAD + s, c0): the descriptor's out-of-bounds zero
# fill is the convolution's zero padding, and channels past C read as zero too, so a
# BK chunk may run past C into the next tap's weights harmlessly. The weights are a
# 2-D descriptor over [K, R*S*C]. The projection GEMM (strided) and the epilogue use the
# pointer code.
# ----------------------------------------------------------------------------------------


def _tcfg(bh, bw, bn, bk, warps, stages):
    return triton.Config({"BH": bh, "BW": bw, "BN": bn, "BK": bk}, num_warps=warps,
                         num_stages=stages)


if _INTERPRET:
    _TMA_CONFIGS = [_tcfg(4, 8, 32, 16, 4, 1)]
else:
    _TMA_CONFIGS = [
        _tcfg(8, 16, 128, 64, 8, 3),
        _tcfg(16, 8, 128, 64, 8, 3),
        _tcfg(8, 8, 128, 64, 4, 4),
        _tcfg(8, 8, 64, 64, 4, 4),
        _tcfg(8, 16, 64, 64, 4, 4),
        _tcfg(16, 16, 128, 64, 8, 3),
    ]


def _prune_tma(configs, named_args, **kwargs):
    C, K, P, Q = named_args["C"], named_args["K"], named_args["P"], named_args["Q"]
    x = named_args["x_ptr"]
    esize = x.element_size() if hasattr(x, "element_size") else 2
    heavy = _heavy(named_args, kwargs)
    kept = [c for c in configs
            if (c.kwargs["BH"] * c.kwargs["BW"] + c.kwargs["BN"]) * c.kwargs["BK"] * esize
            * max(c.num_stages, 1) <= 200 * 1024
            and not (heavy and _acc_regs(c.kwargs["BH"] * c.kwargs["BW"], c.kwargs["BN"],
                                         c.num_warps) >= _HEAVY_ACC_REGS)
            and c.kwargs["BN"] <= max(16, triton.next_power_of_2(K))
            and c.kwargs["BK"] <= max(16, triton.next_power_of_2(C))
            and c.kwargs["BH"] <= max(4, triton.next_power_of_2(P))
            and c.kwargs["BW"] <= max(8, triton.next_power_of_2(Q))]
    return kept or [min(configs, key=lambda c: c.kwargs["BH"] * c.kwargs["BW"] * c.kwargs["BN"])]


# As _CONV_KEY (see there).
_TMA_KEY = ["N", "K", "C", "C2", "H", "W", "H2", "W2", "P", "Q",
            "PAD", "R", "S", "STRIDE2", "PAD2", "R2", "S2",
            "HAS_BIAS", "HAS_RES", "RELU", "HAS_X2", "RES_BN", "OUT_MASK", "INPUT_PRECISION"]


@triton.autotune(configs=_TMA_CONFIGS, key=_TMA_KEY,
                 prune_configs_by={"early_config_prune": _prune_tma})
@triton.jit
def _conv_tma_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
    x2_ptr, w2_ptr,
    rscale_ptr, rshift_ptr, omask_ptr,
    N, K, H, W, C, P, Q,
    H2, W2, C2,
    PAD: tl.constexpr, R: tl.constexpr, S: tl.constexpr,
    STRIDE2: tl.constexpr, PAD2: tl.constexpr, R2: tl.constexpr, S2: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    HAS_X2: tl.constexpr, RES_BN: tl.constexpr, OUT_MASK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BH: tl.constexpr, BW: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(K, BN)
    tiles_w = tl.cdiv(Q, BW)
    tiles_h = tl.cdiv(P, BH)
    # Output-channel tiles fastest: consecutive programs reuse the same input patch in L2.
    pid_n = pid % num_n
    t = pid // num_n
    tw = t % tiles_w
    t = t // tiles_w
    th = t % tiles_h
    n = t // tiles_h
    oh0 = th * BH
    ow0 = tw * BW

    i = tl.arange(0, BH * BW)
    oh = oh0 + i // BW
    ow = ow0 + i % BW
    row_ok = (oh < P) & (ow < Q)
    rn = pid_n * BN + tl.arange(0, BN)
    n_ok = rn < K

    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[N, H, W, C], strides=[H * W * C, W * C, C, 1],
                                       block_shape=[1, BH, BW, BK])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K, R * S * C], strides=[R * S * C, 1],
                                       block_shape=[BN, BK])
    c_pad = tl.cdiv(C, BK) * BK
    acc = tl.zeros((BH * BW, BN), dtype=tl.float32)
    for kk in range(0, R * S * c_pad, BK):
        tap = kk // c_pad
        c0 = kk - tap * c_pad
        r = tap // S
        s = tap - r * S
        a = x_desc.load([n, oh0 - PAD + r, ow0 - PAD + s, c0])
        a = tl.reshape(a, (BH * BW, BK))
        b = w_desc.load([pid_n * BN, tap * C + c0])
        acc = tl.dot(a, tl.trans(b), acc, input_precision=INPUT_PRECISION)

    n64 = tl.zeros((BH * BW,), dtype=tl.int64) + n
    if HAS_X2:
        rk = tl.arange(0, BK)
        acc = _gemm_loop(acc, x2_ptr, w2_ptr, x2_ptr, x2_ptr, n64, oh, ow, row_ok, rk, rn,
                         n_ok, H2, W2, C2, STRIDE2, PAD2, R2, S2, False, False,
                         INPUT_PRECISION, BK)
    rows = (n64 * P + oh) * Q + ow
    _epilogue(acc, rows, rn, row_ok, n_ok, 0, pid_n * BN, 0, K, bias_ptr, res_ptr,
              rscale_ptr, rshift_ptr, out_ptr, omask_ptr, out_ptr, out_ptr, out_ptr,
              HAS_BIAS, HAS_RES, RES_BN, RELU, OUT_MASK, False, BH * BW, BN, BH * BW)


_ALLOCATOR_SET = False


def _ensure_tma_allocator():
    """Device-side descriptors need scratch memory from a global allocator."""
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET:
        def alloc(size: int, alignment: int, stream):
            return torch.empty(size, device="cuda", dtype=torch.int8)
        triton.set_allocator(alloc)
        _ALLOCATOR_SET = True


def _tma_eligible(x, w, stride, in_scale, stats) -> bool:
    """Where the descriptor path is legal: stride 1, no prologue or stats, 16-byte aligned
    rows (C * itemsize % 16 == 0) and bases, tensor descriptors in this Triton."""
    if stride != 1 or in_scale is not None or stats:
        return False
    if not hasattr(tl, "make_tensor_descriptor"):
        return False
    if (x.shape[1] * x.element_size()) % 16 or x.data_ptr() % 16 or w.data_ptr() % 16:
        return False
    return True


def _use_tma(x, w, stride, in_scale, stats, path: Optional[str]) -> bool:
    """The path: "pointer", "tma" (tests), or None = automatic.

    Automatic picks TMA only with RESNET_FUSED_TRITON_TMA=1, on compute capability >= 9,
    in eager (not while torch.compile traces: device-side descriptors need the global
    allocator), until benchmarks on an H100/H200 say for which shapes it wins.
    """
    if path == "pointer":
        return False
    if path == "tma":
        if not _tma_eligible(x, w, stride, in_scale, stats):
            raise ValueError("conv2d_nhwc: the TMA path needs stride 1, no prologue, no stats, "
                             "C * itemsize a multiple of 16 bytes and 16-byte aligned tensors")
        return True
    if path is not None:
        raise ValueError(f"conv2d_nhwc: _path must be None, 'pointer' or 'tma', not {path!r}")
    if _INTERPRET or os.environ.get("RESNET_FUSED_TRITON_TMA", "0") != "1":
        return False
    if x.device.type != "cuda" or tracing((x,)):
        return False
    if torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    if x.dtype == torch.float32 and _input_precision(x.dtype) == "ieee":
        # fp32 without TF32 on the descriptor path lowers to FMA code that spills
        # kilobytes per thread on sm_90 (aot.py): the pointer kernel serves it.
        return False
    return _tma_eligible(x, w, stride, in_scale, stats)


@triton.jit
def _stats_combine_kernel(pmean_ptr, pm2_ptr, pcnt_ptr, omean_ptr, om2_ptr, ocnt_ptr, T, K, TPS,
                          FINAL: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """Combine per-tile (count, mean, M2) rows into fewer rows, or the final statistics.

    Program (pid_c, pid_s) merges tiles [pid_s*TPS, (pid_s+1)*TPS) for BC channels and
    writes row pid_s of (omean, om2, ocnt); with FINAL (one split) it writes the mean
    and the biased variance M2/n instead. Two launches (many splits, then one) keep
    every program's serial loop short when there are thousands of tiles.

    Slots with count 0 (those a conv tile owns after its first, see _epilogue) hold
    no statistics: their mean and M2 are never read (unwritten memory, maybe NaN).
    Each chunk of BT tiles is merged exactly around its own mean, then folded into the
    running result with Chan's pairwise update: no catastrophic cancellation of
    E[x^2] - E[x]^2.
    """
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    rc = pid_c * BC + tl.arange(0, BC)
    c_ok = rc < K
    n_a = tl.zeros((BC,), dtype=tl.float32)
    mean_a = tl.zeros((BC,), dtype=tl.float32)
    m2_a = tl.zeros((BC,), dtype=tl.float32)
    t_begin = pid_s * TPS
    t_end = tl.minimum(t_begin + TPS, T)
    for t0 in range(t_begin, t_end, BT):
        rt = t0 + tl.arange(0, BT)
        t_ok = rt < t_end
        cnt = tl.load(pcnt_ptr + rt, mask=t_ok, other=0.0)
        # Unwritten rows hold garbage (maybe NaN): never read them, 0 * NaN is NaN.
        t_ok = t_ok & (cnt > 0)
        mask = t_ok[:, None] & c_ok[None, :]
        off = rt.to(tl.int64)[:, None] * K + rc[None, :]
        mi = tl.load(pmean_ptr + off, mask=mask, other=0.0)
        m2i = tl.load(pm2_ptr + off, mask=mask, other=0.0)
        cnt2 = tl.where(t_ok, cnt, 0.0)[:, None] + tl.zeros((BT, BC), dtype=tl.float32)
        n_b = tl.sum(cnt2, axis=0)
        mean_b = tl.sum(cnt2 * mi, axis=0) / tl.maximum(n_b, 1.0)
        dev = tl.where(cnt2 > 0, mi - mean_b[None, :], 0.0)
        m2_b = tl.sum(m2i, axis=0) + tl.sum(cnt2 * dev * dev, axis=0)
        n_a, mean_a, m2_a = chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b)
    if FINAL:
        tl.store(omean_ptr + rc, mean_a, mask=c_ok)
        tl.store(om2_ptr + rc, m2_a / tl.maximum(n_a, 1.0), mask=c_ok)
    else:
        tl.store(omean_ptr + pid_s * K + rc, mean_a, mask=c_ok)
        tl.store(om2_ptr + pid_s * K + rc, m2_a, mask=c_ok)
        # Same count for every channel block; written by each (benign, identical).
        tl.store(ocnt_ptr + pid_s, tl.max(n_a, axis=0))


# Tiles per split of the first combine pass (small in the interpreter so tests cover it).
_TPS = 8 if _INTERPRET else 256
_BT = 16 if _INTERPRET else 64
_BC = 32 if _INTERPRET else 64


def _combine_stats(pmean, pm2, pcnt, K, dev):
    """fp32 (mean, biased var) per channel from per-tile partials; no host sync."""
    T = pcnt.shape[0]
    mean = _new_empty((K,), device=dev, dtype=torch.float32)
    var = _new_empty((K,), device=dev, dtype=torch.float32)
    if T > _TPS:
        splits = triton.cdiv(T, _TPS)
        smean = _new_empty((splits, K), device=dev, dtype=torch.float32)
        sm2 = _new_empty((splits, K), device=dev, dtype=torch.float32)
        scnt = _new_empty((splits,), device=dev, dtype=torch.float32)
        launch(_stats_combine_kernel, (triton.cdiv(K, _BC), splits),
            pmean, pm2, pcnt, smean, sm2, scnt, T, K, _TPS, FINAL=False, BT=_BT, BC=_BC)
        pmean, pm2, pcnt, T = smean, sm2, scnt, splits
    launch(_stats_combine_kernel, (triton.cdiv(K, _BC), 1),
        pmean, pm2, pcnt, mean, var, pcnt, T, K, T, FINAL=True, BT=_BT, BC=_BC)
    return mean, var


# ----------------------------------------------------------------------------------------
# Python launcher
# ----------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _input_precision(dtype: torch.dtype) -> str:
    """TF32 for fp32 only where PyTorch's own convolution switch allows it."""
    if dtype != torch.float32:
        return "ieee"  # ignored for 16-bit inputs; they always use the tensor cores
    if _INTERPRET:
        return "ieee"
    return "tf32" if _conv_allows_tf32() else "ieee"


def _conv_allows_tf32() -> bool:
    """PyTorch's switch for TF32 in fp32 convolutions, new API first.

    torch >= 2.9 has torch.backends.cudnn.conv.fp32_precision ("tf32" / "ieee" / "none",
    the last meaning: inherit); the legacy torch.backends.cudnn.allow_tf32 raises when the
    two APIs were mixed, so it is read only when the new one does not decide.
    """
    conv = getattr(torch.backends.cudnn, "conv", None)
    prec = getattr(conv, "fp32_precision", None)
    if prec in ("tf32", "ieee"):
        return prec == "tf32"
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        return False


def _act(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() != 4:
        raise ValueError(f"conv2d_nhwc: {name} must be 4-D (N, C, H, W), got shape {tuple(t.shape)}")
    return t.contiguous(memory_format=torch.channels_last)


def _weight(w: torch.Tensor, name: str, c_in: int, dtype: torch.dtype) -> torch.Tensor:
    if w.dim() != 4:
        raise ValueError(f"conv2d_nhwc: {name} must be 4-D (K, C, R, S), got shape {tuple(w.shape)}")
    if w.shape[1] != c_in:
        raise ValueError(f"conv2d_nhwc: {name} expects {w.shape[1]} input channels, "
                         f"the activation has {c_in}")
    if w.dtype != dtype:
        raise TypeError(f"conv2d_nhwc: {name} dtype {w.dtype} differs from the activation dtype {dtype}")
    # [K, R, S, C] in memory; no copy when the weight is already channels_last.
    return w.contiguous(memory_format=torch.channels_last)


def _out_size(h: int, r: int, stride: int, pad: int) -> int:
    return (h + 2 * pad - r) // stride + 1


def _check_int(v, name: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"conv2d_nhwc: {name} must be an int >= {lo}, got {v!r}")
    return v


def _channel_vec(v: torch.Tensor, name: str, n: int, device) -> torch.Tensor:
    if v.dim() != 1 or v.shape[0] != n:
        raise ValueError(f"conv2d_nhwc: {name} must have shape ({n},), got {tuple(v.shape)}")
    if v.device != device:
        raise ValueError(f"conv2d_nhwc: {name} is on {v.device}, the activation on {device}")
    if not v.is_floating_point():
        raise TypeError(f"conv2d_nhwc: {name} must be floating point, got {v.dtype}")
    return v.contiguous()


def _new_empty(*args, **kwargs) -> torch.Tensor:
    """torch.empty; the tests replace it with a NaN-filling version to catch unwritten elements."""
    return torch.empty(*args, **kwargs)


def conv2d_nhwc(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                stride: int = 1, padding: int = 1,
                residual: Optional[torch.Tensor] = None, relu: bool = False,
                x2: Optional[torch.Tensor] = None, w2: Optional[torch.Tensor] = None,
                stride2: int = 1, padding2: int = 0,
                in_scale: Optional[torch.Tensor] = None, in_shift: Optional[torch.Tensor] = None,
                in_relu: bool = False,
                stats: bool = False,
                residual_scale: Optional[torch.Tensor] = None,
                residual_shift: Optional[torch.Tensor] = None,
                out_mask: bool = False,
                _path: Optional[str] = None):
    """Fused implicit-GEMM convolution; see the module docstring for the exact formula.

    x [N, C, H, W] (channels_last; other layouts are copied once), w [K, C, R, S],
    bias [K] (any float dtype, added in fp32). residual [N, K, P, Q] in x's dtype.
    x2/w2: a second convolution summed into the same accumulator (projection
    shortcut); its output size must equal the first's. in_scale/in_shift [C]: the
    input prologue relu?(x * in_scale + in_shift) (both or neither; in_relu applies
    only with them); padded taps are zero after it. stats=True also returns fp32
    per-channel mean and biased variance of the written output.
    residual_scale/residual_shift [K] (both or neither, with residual): the residual
    enters as residual * residual_scale[k] + residual_shift[k] (a BatchNorm applied to
    it, e.g. bn2(c2) added to the projection shortcut's GEMM in the training block).
    out_mask=True also returns the packed ReLU mask of the written output (uint8
    [ceil(N*K*P*Q / 8)], bit i % 8 of byte i // 8 = output element at physical
    offset i is > 0, resnet_fused/schemas.py's format); needs K % 8 == 0.

    Returns out [N, K, P, Q], channels_last, x's dtype, followed by the mask if
    out_mask and by (mean, var) if stats: out | (out, mask) | (out, mean, var) |
    (out, mask, mean, var).
    _path ("pointer" / "tma" / None = automatic) is for tests and benchmarks.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
        raise TypeError("conv2d_nhwc: x and w must be tensors")
    if x.dtype not in _DTYPES:
        raise TypeError(f"conv2d_nhwc: x dtype must be float32, float16 or bfloat16, got {x.dtype}")
    stride = _check_int(stride, "stride", 1)
    padding = _check_int(padding, "padding", 0)
    x = _act(x, "x")
    N, C, H, W = x.shape
    w = _weight(w, "w", C, x.dtype)
    if w.device != x.device:
        raise ValueError(f"conv2d_nhwc: w is on {w.device}, x on {x.device}")
    K, _, R, S = w.shape
    P, Q = _out_size(H, R, stride, padding), _out_size(W, S, stride, padding)
    if P <= 0 or Q <= 0:
        raise ValueError(f"conv2d_nhwc: empty output {P}x{Q} for input {H}x{W}, "
                         f"kernel {R}x{S}, stride {stride}, padding {padding}")
    M = N * P * Q
    dev = x.device

    if bias is not None:
        bias = _channel_vec(bias, "bias", K, dev)

    if (x2 is None) != (w2 is None):
        raise ValueError("conv2d_nhwc: x2 and w2 must be given together")
    H2 = W2 = C2 = 1
    R2 = S2 = 1
    if x2 is not None:
        stride2 = _check_int(stride2, "stride2", 1)
        padding2 = _check_int(padding2, "padding2", 0)
        if x2.dtype != x.dtype:
            raise TypeError(f"conv2d_nhwc: x2 dtype {x2.dtype} differs from x dtype {x.dtype}")
        x2 = _act(x2, "x2")
        if x2.device != dev:
            raise ValueError(f"conv2d_nhwc: x2 is on {x2.device}, x on {dev}")
        N2, C2, H2, W2 = x2.shape
        w2 = _weight(w2, "w2", C2, x.dtype)
        if w2.device != dev:
            raise ValueError(f"conv2d_nhwc: w2 is on {w2.device}, x on {dev}")
        if w2.shape[0] != K:
            raise ValueError(f"conv2d_nhwc: w2 has {w2.shape[0]} output channels, w has {K}")
        R2, S2 = w2.shape[2], w2.shape[3]
        P2, Q2 = _out_size(H2, R2, stride2, padding2), _out_size(W2, S2, stride2, padding2)
        if N2 != N or (P2, Q2) != (P, Q):
            raise ValueError(f"conv2d_nhwc: the second convolution's output {(N2, K, P2, Q2)} "
                             f"does not match the first's {(N, K, P, Q)}")

    if (in_scale is None) != (in_shift is None):
        raise ValueError("conv2d_nhwc: in_scale and in_shift must be given together")
    if in_relu and in_scale is None:
        raise ValueError("conv2d_nhwc: in_relu needs in_scale and in_shift")
    if in_scale is not None:
        in_scale = _channel_vec(in_scale, "in_scale", C, dev)
        in_shift = _channel_vec(in_shift, "in_shift", C, dev)

    if residual is not None:
        if tuple(residual.shape) != (N, K, P, Q):
            raise ValueError(f"conv2d_nhwc: residual shape {tuple(residual.shape)} != output "
                             f"shape {(N, K, P, Q)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"conv2d_nhwc: residual dtype {residual.dtype} differs from x dtype {x.dtype}")
        if residual.device != dev:
            raise ValueError(f"conv2d_nhwc: residual is on {residual.device}, x on {dev}")
        residual = residual.contiguous(memory_format=torch.channels_last)
    if (residual_scale is None) != (residual_shift is None):
        raise ValueError("conv2d_nhwc: residual_scale and residual_shift must be given together")
    if residual_scale is not None:
        if residual is None:
            raise ValueError("conv2d_nhwc: residual_scale/residual_shift need a residual")
        residual_scale = _channel_vec(residual_scale, "residual_scale", K, dev)
        residual_shift = _channel_vec(residual_shift, "residual_shift", K, dev)
    if out_mask and K % 8:
        raise ValueError(f"conv2d_nhwc: out_mask needs a multiple of 8 output channels (each "
                         f"mask byte is 8 channels of one pixel), got {K}")

    out = _new_empty((N, K, P, Q), device=dev, dtype=x.dtype, memory_format=torch.channels_last)
    omask = (_new_empty(((M * K + 7) // 8,), device=dev, dtype=torch.uint8) if out_mask
             else out)
    if stats:
        t_max = triton.cdiv(M, _MIN_BM)
        pmean = _new_empty((t_max, K), device=dev, dtype=torch.float32)
        pm2 = _new_empty((t_max, K), device=dev, dtype=torch.float32)
        # No zeroing: each launch writes every slot's count (_epilogue).
        pcnt = _new_empty((t_max,), device=dev, dtype=torch.float32)
    else:
        pmean = pm2 = pcnt = out  # never read (STATS=False)

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]) * triton.cdiv(K, meta["BN"]),)

    dummy = out
    rsc = residual_scale if residual_scale is not None else dummy
    rsh = residual_shift if residual_shift is not None else dummy
    if _use_tma(x, w, stride, in_scale, stats, _path):
        if not _INTERPRET:
            _ensure_tma_allocator()

        def tma_grid(meta):
            return (N * triton.cdiv(P, meta["BH"]) * triton.cdiv(Q, meta["BW"])
                    * triton.cdiv(K, meta["BN"]),)

        launch(_conv_tma_kernel, tma_grid,
            x, w, bias if bias is not None else dummy,
            residual if residual is not None else dummy, out,
            x2 if x2 is not None else dummy, w2 if w2 is not None else dummy,
            rsc, rsh, omask,
            N, K, H, W, C, P, Q, H2, W2, C2,
            PAD=padding, R=R, S=S,
            STRIDE2=stride2 if x2 is not None else 1, PAD2=padding2 if x2 is not None else 0,
            R2=R2, S2=S2,
            HAS_BIAS=bias is not None, HAS_RES=residual is not None, RELU=bool(relu),
            HAS_X2=x2 is not None, RES_BN=residual_scale is not None, OUT_MASK=bool(out_mask),
            INPUT_PRECISION=_input_precision(x.dtype),
        )
        return (out, omask) if out_mask else out
    launch(_conv_kernel, grid,
        x, w, bias if bias is not None else dummy, residual if residual is not None else dummy, out,
        in_scale if in_scale is not None else dummy, in_shift if in_shift is not None else dummy,
        x2 if x2 is not None else dummy, w2 if w2 is not None else dummy,
        pmean, pm2, pcnt,
        rsc, rsh, omask,
        M, K, H, W, C, P, Q, H2, W2, C2,
        STRIDE=stride, PAD=padding, R=R, S=S,
        STRIDE2=stride2 if x2 is not None else 1, PAD2=padding2 if x2 is not None else 0,
        R2=R2, S2=S2,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, RELU=bool(relu),
        HAS_X2=x2 is not None, HAS_PRO=in_scale is not None, IN_RELU=bool(in_relu),
        STATS=bool(stats), RES_BN=residual_scale is not None, OUT_MASK=bool(out_mask),
        INPUT_PRECISION=_input_precision(x.dtype), SLOT_ROWS=_MIN_BM,
    )
    head = (out, omask) if out_mask else (out,)
    if not stats:
        return head if out_mask else out
    mean, var = _combine_stats(pmean, pm2, pcnt, K, dev)
    return head + (mean, var)


def conv_flops(N: int, P: int, Q: int, K: int, C: int, R: int, S: int) -> int:
    """Multiply-adds x 2 of one convolution: 2 * N*P*Q * K * C*R*S."""
    return 2 * N * P * Q * K * C * R * S


__all__ = ["conv2d_nhwc", "conv_flops"]
