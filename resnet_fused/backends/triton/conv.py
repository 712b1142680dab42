"""Implicit-GEMM convolution in Triton, NHWC, with fused prologue and epilogue.

One kernel serves every convolution of the block, eval and training forward:

    out[n, p, q, k] = epilogue( sum_{r, s, c} A(x)[n, p*st + r - pad, q*st + s - pad, c] * w[k, c, r, s]
                                [+ sum_{r, s, c} x2[n, p*st2 + r - pad2, q*st2 + s - pad2, c] * w2[k, c, r, s]] )
    x2, w2, st2, pad2 = the SecondGemm (the projection shortcut);
    A(x)     = relu?(x * scale[c] + shift[c])   (the Prologue, e.g. bn1 + ReLU of conv1's raw output);
               taps outside the image are ZERO after the transform (padding in y1 space)
    epilogue = relu?(acc + bias[k] (+ R(residual)[n, p, q, k])), cast to x's dtype, optionally
               with per-channel (mean, biased var) of the written values and/or the
               packed 1-bit ReLU mask of them;
               R(r) = r, or r * scale[k] + shift[k] (a BN of the residual: ResidualAdd),
               or r * gate[n, k] (a gated branch joined in the projection GEMM's epilogue);
               optionally also per-(n, k) sums of the written values over the pixels
               (pool_sums: the pool of a gated branch).

conv2d_nhwc takes the optional parts as small named specs (Prologue, SecondGemm,
ResidualAdd, Epilogue, stats=True, pool_sums=) and returns a ConvOut(out, mask, mean, var) whose
unrequested fields are None.

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
RESNET_FUSED_TRITON_TMA=1: where it beats the pointer kernel is not measured; its index
logic is tested in the interpreter (which emulates descriptors) via _path="tma".
"""
from __future__ import annotations

import contextvars
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ...ops import conv_out_hw, mask_numel
from .bn import _BC, chan_empty, chan_merge, lanes
from .launcher import DTYPES as _DTYPES, INTERPRET, launch, tracing
from .pool import AvgPool, pool_out_hw

# ----------------------------------------------------------------------------------------
# Configurations. The interpreter runs, per shape, the one tile interp_tile picks
# (the forward: the prune below keeps exactly it; dgrad/wgrad: conv_bwd._cfg): its
# cost is per tl operation (~35-50 us each, nearly independent of the tile's size;
# bench/NOTES.md, "check_model through the interpreter"), so the largest tile that does
# not exceed the problem cuts the operations executed 8-30x on wide layers, while tiles
# no larger than the problem keep the tests' small shapes on partial tiles (C=24/40: a
# partial channel chunk after BK=16/32; K=40: a partial column tile after BN=32).
# ----------------------------------------------------------------------------------------


def _cfg(bm, bn, bk, warps, stages, group=8):
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": group},
                         num_warps=warps, num_stages=stages)


def interp_tile(n: int, lo: int) -> int:
    """The interpreter's tile for a dimension of n: the largest power of two <= n,
    clamped to [lo, 128] (a larger tile than the problem only where n < lo)."""
    return max(lo, min(128, 1 << (max(int(n), 1).bit_length() - 1)))


_INTERP_TILES = (16, 32, 64, 128)

if INTERPRET:
    # Every tile interp_tile can pick; the prune keeps the one for the shape, which
    # launcher.launch runs on the un-tuned kernel (no benchmark: the interpreter has no
    # GPU driver to time on, and triton 3.6's Autotuner would benchmark even one config).
    _CONFIGS = [_cfg(bm, bn, bk, 4, 1) for bm in _INTERP_TILES[1:]
                for bn in _INTERP_TILES[1:] for bk in _INTERP_TILES]
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
               for f in ("HAS_PRO", "HAS_X2", "HAS_RES", "RES_BN", "OUT_MASK", "AVGPOOL",
                         "RES_GATE", "POOL"))


# Accumulator fp32 registers per thread (tile elements / threads) from which a heavy
# variant (prologue, residual read or mask epilogue) spills on sm_90; lighter variants
# fit. The measurements behind this and the fp32 limits below: bench/NOTES.md, "Triton
# conv: register spills behind the config pruning".
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
    gated = kwargs.get("RES_GATE", named_args.get("RES_GATE", False))
    bn_join = any(kwargs.get(f, named_args.get(f, False)) for f in ("RES_BN", "OUT_MASK"))
    pool_stats = all(kwargs.get(f, named_args.get(f, False)) for f in ("POOL", "STATS"))
    cmax = max(C, named_args["C2"] if has_x2 else 0)
    # A pooled operand (AVGPOOL, AVGPOOL2: ResNet-D's shortcut) loads k*k tiles of x per
    # step, and the pipeliner buffers each of them: k*k A tiles in shared memory a stage.
    pool = max(kwargs.get(f, named_args.get(f, 0)) or 0 for f in ("AVGPOOL", "AVGPOOL2"))
    a_tiles = max(1, pool * pool)
    if INTERPRET:
        # Exactly interp_tile's config. A config list without it (a test's own, to make
        # the autotuner tune) takes the rules below.
        tile = (interp_tile(M, 32), interp_tile(K, 32), interp_tile(cmax, 16))
        picked = [c for c in configs
                  if (c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"]) == tile]
        if picked:
            return picked[:1]
    kept = []
    for c in configs:
        bm, bn, bk = c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"]
        if bn > max(16, triton.next_power_of_2(K)):
            continue
        if heavy and _acc_regs(bm, bn, c.num_warps) >= _HEAVY_ACC_REGS:
            continue
        # fp32 operands: more than 64 loaded elements per thread per stage spill on sm_90.
        if esize == 4 and (bm * bk + bk * bn) // (32 * c.num_warps) > 64:
            continue
        # A pooled fp32 operand (AVGPOOL*): the window's k*k A tiles are loaded beside
        # the B tile. Two candidates spilled 8 B on sm_90 with triton 3.8: 32x32x16 with
        # 2 warps in TF32 (the frozen block's projection) and 64x64x32 with 4 warps in
        # IEEE (80 loaded elements per thread per stage, counting the k*k A tiles).
        if esize == 4 and pool and (
                (ieee and (bm * bk * a_tiles + bk * bn) // (32 * c.num_warps) > 64)
                or (not ieee and c.num_warps == 2)):
            continue
        # fp32 without TF32 multiplies on the FMA units: accumulators above 32 registers
        # per thread spill on sm_90.
        if esize == 4 and ieee and _acc_regs(bm, bn, c.num_warps) > 32:
            continue
        # A gated join (RES_GATE): the [BM, BN] fp32 gate tile beside the accumulator
        # spilled on sm_90 at 64 accumulator registers per thread in fp32 (16 B) and,
        # with the BN'd residual and the mask (the training join), in bf16 (8 B; fp16 at
        # 254 registers).
        if gated and (esize == 4 or bn_join) and _acc_regs(bm, bn, c.num_warps) >= 64:
            continue
        # The pool sums beside the statistics (a channel-gated block's last conv in
        # training) spilled at 64 accumulator registers per thread: 24-64 B with 4 warps
        # (triton 3.8), 16 B in fp32 with 8 warps (triton 3.6).
        if pool_stats and (c.num_warps == 4 or esize == 4) \
                and _acc_regs(bm, bn, c.num_warps) >= 64:
            continue
        if bk > max(16, triton.next_power_of_2(cmax)):
            continue
        if bm > max(16, triton.next_power_of_2(M)):
            continue
        if (bm * bk * a_tiles + bk * bn) * esize * max(c.num_stages, 1) > 200 * 1024:
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
def _pool_gemm_loop(acc, x_ptr, w_ptr, n64, oh, ow, row_ok, rk, rn, n_ok, H, W, C,
                    STRIDE: tl.constexpr, KP: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                    BM: tl.constexpr, BK: tl.constexpr):
    """acc += avgpool(x)[rows, :] @ w[:, cols]: the pooled shortcut (ResNet-D, pool.py)
    as a 1x1 GEMM whose operand is averaged as it is loaded, never written: each row's
    KP x KP window at STRIDE (no padding) summed in fp32 from the taps inside the image
    and divided by their count (AvgPool2d without padding; ceil_mode's edge windows have
    fewer taps), rounded to x's dtype as AvgPool2d's output is, then the dot."""
    ih0 = oh * STRIDE
    iw0 = ow * STRIDE
    taps = (tl.minimum(ih0 + KP, H) - ih0) * (tl.minimum(iw0 + KP, W) - iw0)
    cnt = tl.maximum(taps, 1).to(tl.float32)   # rows past M: any nonzero count
    w_col = rn.to(tl.int64) * C                # the 1x1 weight, channels_last: k * C + c
    for c0 in range(0, C, BK):
        cc = c0 + rk
        c_ok = cc < C
        s = tl.zeros((BM, BK), dtype=tl.float32)
        for t in tl.static_range(KP * KP):
            ih = ih0 + t // KP
            iw = iw0 + t % KP
            ok = row_ok & (ih < H) & (iw < W)
            pix = ((n64 * H + ih) * W + iw) * C
            s += tl.load(x_ptr + pix[:, None] + cc[None, :], mask=ok[:, None] & c_ok[None, :],
                         other=0.0).to(tl.float32)
        a = (s / cnt[:, None]).to(x_ptr.dtype.element_ty)
        b = tl.load(w_ptr + w_col[None, :] + cc[:, None], mask=c_ok[:, None] & n_ok[None, :],
                    other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _epilogue(acc, rm, rn, row_ok, n_ok, pid_m, n0, M, K,
              bias_ptr, res_ptr, rscale_ptr, rshift_ptr, out_ptr, omask_ptr,
              pmean_ptr, pm2_ptr, pcnt_ptr, rgate_ptr, PQ,
              HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RES_BN: tl.constexpr,
              RELU: tl.constexpr, OUT_MASK: tl.constexpr, STATS: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, SLOT_ROWS: tl.constexpr,
              RES_GATE: tl.constexpr):
    """rm: the flat output pixel index (n*P + p)*Q + q of each row; pid_m: the row tile;
    n0: the first output channel of the tile (rn = n0 + arange(BN)); SLOT_ROWS: the
    rows of one statistics slot (BM is a multiple of it); PQ: the pixels per image
    (rm // PQ is the row's image, for RES_GATE's gate[n, k]). Returns the values as
    written."""
    off = rm.to(tl.int64)[:, None] * K + rn[None, :]
    mask = row_ok[:, None] & n_ok[None, :]
    if RES_GATE:
        # A gated residual, R(res) * gate[n, k]: the join relu(g * branch + x @ w_sc +
        # b_sc) of a gated block with a projection, the branch being the residual here
        # (eval: the folded branch; training: bn_last(c_last) with RES_BN).
        gofs = (rm // PQ).to(tl.int64)[:, None] * K + rn[None, :]
        gt = tl.load(rgate_ptr + gofs, mask=mask, other=0.0)
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        res = tl.load(res_ptr + off, mask=mask, other=0.0).to(tl.float32)
        if RES_BN:
            rs = tl.load(rscale_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
            rsh = tl.load(rshift_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
            res = res * rs[None, :] + rsh[None, :]
        acc = acc + res * gt
    elif RES_BN:
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
        # the output dtype), combined across tiles by _tile_stats_combine_kernel (Chan et al.):
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
    return out


@triton.jit
def _pool_sums(out, rm, rn, row_ok, n_ok, pid_m, M, K, PQ, psum_ptr, BM: tl.constexpr):
    """psum[n, k] += the sum of this tile's written values of image n, channel k (the
    pool of a gated branch, per (n, k) over the pixels). A row tile spans the images
    from its first row's to its last row's (several where P*Q < BM): one masked column
    sum and one atomic add of BN floats per image. Atomics, not per-tile partials as
    the statistics: the tiles of one image are P*Q / BM (at most a few hundred), so the
    contention is low, the buffer is only N x K floats, and the order of the fp32 adds
    only changes the rounding of a mean that the gate's `f` consumes (far below the
    tolerance of the block's output). The caller zeroes the buffer; the autotuner
    re-zeroes it (reset_to_zero) after benchmarking on it."""
    v = tl.where(row_ok[:, None] & n_ok[None, :], out.to(tl.float32), 0.0)
    img = rm // PQ
    r0 = pid_m * BM
    last = (tl.minimum(r0 + BM, M) - 1) // PQ
    for n in range(r0 // PQ, last + 1):
        s = tl.sum(tl.where((img == n)[:, None], v, 0.0), axis=0)
        tl.atomic_add(psum_ptr + n * K + rn, s, mask=n_ok)   # N * K floats: int32 holds it


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
             "OUT_MASK", "INPUT_PRECISION", "SLOT_ROWS", "AVGPOOL", "AVGPOOL2", "RES_GATE",
             "POOL"]


@triton.autotune(configs=_CONFIGS, key=_CONV_KEY, prune_configs_by={"early_config_prune": _prune},
                 reset_to_zero=["psum_ptr"])
@triton.jit
def _conv_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
    scale_ptr, shift_ptr,
    x2_ptr, w2_ptr,
    pmean_ptr, pm2_ptr, pcnt_ptr,
    rscale_ptr, rshift_ptr, omask_ptr,
    rgate_ptr, psum_ptr,
    M, K, H, W, C, P, Q,
    H2, W2, C2,
    STRIDE: tl.constexpr, PAD: tl.constexpr, R: tl.constexpr, S: tl.constexpr,
    STRIDE2: tl.constexpr, PAD2: tl.constexpr, R2: tl.constexpr, S2: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    HAS_X2: tl.constexpr, HAS_PRO: tl.constexpr, IN_RELU: tl.constexpr,
    STATS: tl.constexpr, RES_BN: tl.constexpr, OUT_MASK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, SLOT_ROWS: tl.constexpr,
    # The pooled shortcut (pool.py): 0, or the window k of an average pool (at STRIDE /
    # STRIDE2, no padding) applied to x / x2 as it is loaded, before a 1x1 GEMM.
    AVGPOOL: tl.constexpr, AVGPOOL2: tl.constexpr,
    RES_GATE: tl.constexpr, POOL: tl.constexpr,
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
    if AVGPOOL:
        acc = _pool_gemm_loop(acc, x_ptr, w_ptr, n64, oh, ow, row_ok, rk, rn, n_ok, H, W, C,
                              STRIDE, AVGPOOL, INPUT_PRECISION, BM, BK)
    else:
        acc = _gemm_loop(acc, x_ptr, w_ptr, scale_ptr, shift_ptr, n64, oh, ow, row_ok, rk, rn,
                         n_ok, H, W, C, STRIDE, PAD, R, S, HAS_PRO, IN_RELU, INPUT_PRECISION, BK)
    if HAS_X2:
        if AVGPOOL2:
            acc = _pool_gemm_loop(acc, x2_ptr, w2_ptr, n64, oh, ow, row_ok, rk, rn, n_ok,
                                  H2, W2, C2, STRIDE2, AVGPOOL2, INPUT_PRECISION, BM, BK)
        else:
            acc = _gemm_loop(acc, x2_ptr, w2_ptr, scale_ptr, shift_ptr, n64, oh, ow, row_ok, rk,
                             rn, n_ok, H2, W2, C2, STRIDE2, PAD2, R2, S2, False, False,
                             INPUT_PRECISION, BK)
    out = _epilogue(acc, rm, rn, row_ok, n_ok, pid_m, pid_n * BN, M, K, bias_ptr, res_ptr,
                    rscale_ptr, rshift_ptr, out_ptr, omask_ptr, pmean_ptr, pm2_ptr, pcnt_ptr,
                    rgate_ptr, pq, HAS_BIAS, HAS_RES, RES_BN, RELU, OUT_MASK, STATS, BM, BN,
                    SLOT_ROWS, RES_GATE)
    if POOL:
        _pool_sums(out, rm, rn, row_ok, n_ok, pid_m, M, K, pq, psum_ptr, BM)


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


if INTERPRET:
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
              out_ptr, P * Q, HAS_BIAS, HAS_RES, RES_BN, RELU, OUT_MASK, False, BH * BW, BN,
              BH * BW, False)


def _tma_scratch(size: int, alignment: int, stream):
    # On the current device, which launch() has set to the tensors' (launcher.device_guard).
    return torch.empty(size, device="cuda", dtype=torch.int8)


# triton.set_allocator stores the allocator in a ContextVar: each thread (a new thread
# starts from an empty context) needs its own call. This flag is a ContextVar too, so it
# is set in exactly the contexts where the allocator is.
_ALLOCATOR_SET = contextvars.ContextVar("resnet_fused_tma_allocator_set", default=False)


def _ensure_tma_allocator():
    """Device-side descriptors need scratch memory from Triton's allocator, set once per
    context (thread); a repeated call costs one ContextVar lookup."""
    if not _ALLOCATOR_SET.get():
        triton.set_allocator(_tma_scratch)
        _ALLOCATOR_SET.set(True)


def _tma_eligible(x, w, stride, prologue, stats) -> bool:
    """Where the descriptor path is legal: stride 1, no prologue or stats, 16-byte aligned
    rows (C * itemsize % 16 == 0) and bases, tensor descriptors in this Triton."""
    if stride != 1 or prologue is not None or stats:
        return False
    if not hasattr(tl, "make_tensor_descriptor"):
        return False
    if (x.shape[1] * x.element_size()) % 16 or x.data_ptr() % 16 or w.data_ptr() % 16:
        return False
    return True


def _use_tma(x, w, stride, prologue, stats, path: Optional[str]) -> bool:
    """The path: "pointer", "tma" (tests), or None = automatic.

    Automatic picks TMA only with RESNET_FUSED_TRITON_TMA=1, on compute capability >= 9,
    in eager (not while torch.compile traces: device-side descriptors need the global
    allocator), until benchmarks on an H100/H200 say for which shapes it wins.
    """
    if path == "pointer":
        return False
    if path == "tma":
        if not _tma_eligible(x, w, stride, prologue, stats):
            raise ValueError("conv2d_nhwc: the TMA path needs stride 1, no prologue, no stats, "
                             "C * itemsize a multiple of 16 bytes and 16-byte aligned tensors")
        return True
    if path is not None:
        raise ValueError(f"conv2d_nhwc: _path must be None, 'pointer' or 'tma', not {path!r}")
    if INTERPRET or os.environ.get("RESNET_FUSED_TRITON_TMA", "0") != "1":
        return False
    if x.device.type != "cuda" or tracing((x,)):
        return False
    if torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    if x.dtype == torch.float32 and _input_precision(x.dtype) == "ieee":
        # fp32 without TF32 on the descriptor path lowers to FMA code that spills
        # kilobytes per thread on sm_90: the pointer kernel serves it.
        return False
    return _tma_eligible(x, w, stride, prologue, stats)


@triton.jit
def _tile_stats_combine_kernel(pmean_ptr, pm2_ptr, pcnt_ptr, omean_ptr, om2_ptr, ocnt_ptr, T, K,
                               TPS, FINAL: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
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
    pid_s = tl.program_id(1)
    rc, c_ok = lanes(tl.program_id(0) * BC, K, BC)
    n_a, mean_a, m2_a = chan_empty(BC)
    t_end = tl.minimum(pid_s * TPS + TPS, T)
    for t0 in range(pid_s * TPS, t_end, BT):
        rt, t_ok = lanes(t0, t_end, BT)
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


# Tiles per split of the first combine pass (small in the interpreter so tests cover it),
# tiles per step; channels per program are bn.py's _BC.
_TPS = 8 if INTERPRET else 256
_BT = 16 if INTERPRET else 64


def _combine_stats(pmean, pm2, pcnt, K, dev):
    """fp32 (mean, biased var) per channel from per-tile partials; no host sync."""
    T = pcnt.shape[0]
    mean = torch.empty((K,), device=dev, dtype=torch.float32)
    var = torch.empty((K,), device=dev, dtype=torch.float32)
    if T > _TPS:
        splits = triton.cdiv(T, _TPS)
        smean = torch.empty((splits, K), device=dev, dtype=torch.float32)
        sm2 = torch.empty((splits, K), device=dev, dtype=torch.float32)
        scnt = torch.empty((splits,), device=dev, dtype=torch.float32)
        launch(_tile_stats_combine_kernel, (triton.cdiv(K, _BC), splits),
            pmean, pm2, pcnt, smean, sm2, scnt, T, K, _TPS, FINAL=False, BT=_BT, BC=_BC)
        pmean, pm2, pcnt, T = smean, sm2, scnt, splits
    launch(_tile_stats_combine_kernel, (triton.cdiv(K, _BC), 1),
        pmean, pm2, pcnt, mean, var, pcnt, T, K, T, FINAL=True, BT=_BT, BC=_BC)
    return mean, var


# ----------------------------------------------------------------------------------------
# Python launcher: the optional parts of a call as small named specs, one return type.
# In-package callers only: user input was validated where it entered (the eval ops
# through conv_checks.py, FusedResidual / train_block for training), so what is not
# consistent here is a bug of the caller, and an assert says which.
# ----------------------------------------------------------------------------------------

_CL = torch.channels_last


class Prologue(NamedTuple):
    """x enters the GEMM as relu?(x * scale[c] + shift[c]) (bn1 + ReLU of conv1's raw
    output in the training block); padded taps are zero AFTER the transform."""
    scale: torch.Tensor        # [C], any float dtype, applied in fp32
    shift: torch.Tensor        # [C]
    relu: bool = True


class SecondGemm(NamedTuple):
    """conv(x, w, stride, padding) summed into the same fp32 accumulator (the projection
    shortcut): same batch, output channels and output size as the main convolution."""
    x: torch.Tensor            # [N, C2, H2, W2], x's dtype
    w: torch.Tensor            # [K, C2, R2, S2]
    stride: int = 1
    padding: int = 0
    # ResNet-D: x averaged (pool.py) at `stride` before the 1x1 w (padding 0).
    pool: Optional[AvgPool] = None


class ResidualAdd(NamedTuple):
    """tensor added in the epilogue, or tensor * scale[k] + shift[k] with both given (a
    BatchNorm of it: bn2(c2) added to the projection GEMM in the training block), or
    that times gate[n, k] with gate given (a gated branch joined in the projection GEMM)."""
    tensor: torch.Tensor       # [N, K, P, Q], x's dtype
    scale: Optional[torch.Tensor] = None   # [K] fp32
    shift: Optional[torch.Tensor] = None
    gate: Optional[torch.Tensor] = None    # [N, K] fp32, contiguous


class Epilogue(NamedTuple):
    """out = relu?(acc + bias[k] (+ residual)); mask: also return the packed ReLU mask of
    the written output (needs K % 8 == 0: a mask byte is 8 channels of one pixel)."""
    bias: Optional[torch.Tensor] = None    # [K], any float dtype, added in fp32
    relu: bool = False
    mask: bool = False


class ConvOut(NamedTuple):
    """out [N, K, P, Q] channels_last in x's dtype. mask (with Epilogue.mask): uint8
    [ceil(N*K*P*Q / 8)], bit i % 8 of byte i // 8 = the output element at physical offset
    i is > 0 (resnet_fused/schemas.py's format). mean, var (with stats): fp32 [K], the
    per-channel mean and biased variance of the values as written."""
    out: torch.Tensor
    mask: Optional[torch.Tensor] = None
    mean: Optional[torch.Tensor] = None
    var: Optional[torch.Tensor] = None


class _Geometry(NamedTuple):
    N: int
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    P: int
    Q: int
    C2: int = 1     # the second GEMM's input channels, size and taps (1 without one)
    H2: int = 1
    W2: int = 1
    R2: int = 1
    S2: int = 1


def _input_precision(dtype: torch.dtype) -> str:
    """TF32 for fp32 only where PyTorch's own convolution switch allows it."""
    if dtype != torch.float32:
        return "ieee"  # ignored for 16-bit inputs; they always use the tensor cores
    if INTERPRET:
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


def _out_hw(H, W, R, S, stride, padding, pool: Optional[AvgPool]):
    """The output size of conv(x) or, with pool, of the 1x1 conv of x's pool."""
    if pool is None:
        return conv_out_hw(H, W, R, S, stride, padding)
    assert (R, S, padding) == (1, 1, 0) and pool.kernel >= 1, \
        f"conv2d_nhwc: a pooled operand takes a 1x1 weight, no padding ({R}x{S}, {padding})"
    return pool_out_hw(H, W, pool.kernel, stride, pool.ceil_mode)


def _geometry(x, w, stride: int, padding: int, second: Optional[SecondGemm],
              pool: Optional[AvgPool] = None) -> _Geometry:
    N, C, H, W = x.shape
    K, _, R, S = w.shape
    assert x.dtype in _DTYPES and w.dtype == x.dtype and w.shape[1] == C, \
        f"conv2d_nhwc: x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)} {w.dtype}"
    P, Q = _out_hw(H, W, R, S, stride, padding, pool)
    assert P > 0 and Q > 0 and stride >= 1 and padding >= 0, \
        f"conv2d_nhwc: output {P}x{Q} (stride {stride}, padding {padding})"
    if second is None:
        return _Geometry(N, C, H, W, K, R, S, P, Q)
    (N2, C2, H2, W2), (K2, C2w, R2, S2) = second.x.shape, second.w.shape
    assert (N2, K2, C2w) == (N, K, C2) and second.x.dtype == second.w.dtype == x.dtype \
        and _out_hw(H2, W2, R2, S2, second.stride, second.padding, second.pool) == (P, Q), \
        f"conv2d_nhwc: second GEMM {tuple(second.x.shape)} * {tuple(second.w.shape)} " \
        f"(stride {second.stride}, padding {second.padding}) for output {(N, K, P, Q)}"
    return _Geometry(N, C, H, W, K, R, S, P, Q, C2, H2, W2, R2, S2)


def _assert_specs(g: _Geometry, x, prologue, residual, epilogue) -> None:
    vecs = [("bias", epilogue.bias, g.K)]
    if prologue is not None:
        vecs += [("prologue.scale", prologue.scale, g.C), ("prologue.shift", prologue.shift, g.C)]
    if residual is not None:
        r = residual.tensor
        assert tuple(r.shape) == (g.N, g.K, g.P, g.Q) and r.dtype == x.dtype, \
            f"conv2d_nhwc: residual {tuple(r.shape)} {r.dtype}, output {(g.N, g.K, g.P, g.Q)}"
        assert (residual.scale is None) == (residual.shift is None), \
            "conv2d_nhwc: residual scale and shift go together"
        assert residual.gate is None or (
            residual.gate.dtype == torch.float32
            and tuple(residual.gate.shape) == (g.N, g.K) and residual.gate.is_contiguous()), \
            "conv2d_nhwc: residual.gate is a contiguous fp32 [N, K] tensor"
        vecs += [("residual.scale", residual.scale, g.K), ("residual.shift", residual.shift, g.K)]
    for name, v, n in vecs:
        assert v is None or (tuple(v.shape) == (n,) and v.is_floating_point()
                             and v.device == x.device), \
            f"conv2d_nhwc: {name} {tuple(v.shape)} {v.dtype} on {v.device}, expected ({n},)"
    assert not epilogue.mask or g.K % 8 == 0, \
        f"conv2d_nhwc: the packed mask needs K % 8 == 0, got K = {g.K}"


def _operands(x, w, g: _Geometry, padding, second, residual, epilogue, out, mask):
    """The pointer and size arguments both kernels take, by parameter name, and the
    constexprs they share. An absent operand is `out` (never read: its flag is off)."""
    def vec(t):
        return out if t is None else t.contiguous()
    res = residual or ResidualAdd(out)
    ptrs = dict(x_ptr=x, w_ptr=w, bias_ptr=vec(epilogue.bias),
                res_ptr=res.tensor.contiguous(memory_format=_CL), out_ptr=out,
                x2_ptr=out if second is None else second.x.contiguous(memory_format=_CL),
                w2_ptr=out if second is None else second.w.contiguous(memory_format=_CL),
                rscale_ptr=vec(res.scale), rshift_ptr=vec(res.shift),
                omask_ptr=out if mask is None else mask,
                K=g.K, H=g.H, W=g.W, C=g.C, P=g.P, Q=g.Q, H2=g.H2, W2=g.W2, C2=g.C2)
    flags = dict(PAD=padding, R=g.R, S=g.S, STRIDE2=1 if second is None else second.stride,
                 PAD2=0 if second is None else second.padding, R2=g.R2, S2=g.S2,
                 HAS_BIAS=epilogue.bias is not None, HAS_RES=residual is not None,
                 RELU=bool(epilogue.relu), HAS_X2=second is not None,
                 RES_BN=residual is not None and residual.scale is not None,
                 OUT_MASK=mask is not None, INPUT_PRECISION=_input_precision(x.dtype))
    return ptrs, flags


def _launch_named(kernel, grid, operands: dict, constexprs: dict) -> None:
    """launch() with the kernel's leading parameters taken from `operands` by name."""
    names = kernel.arg_names[:len(operands)]
    assert set(names) == operands.keys(), f"{names} vs {sorted(operands)}"
    launch(kernel, grid, *(operands[n] for n in names), **constexprs)


def _launch_tma(g: _Geometry, ptrs, flags) -> None:
    if not INTERPRET:
        _ensure_tma_allocator()

    def grid(meta):
        return (g.N * triton.cdiv(g.P, meta["BH"]) * triton.cdiv(g.Q, meta["BW"])
                * triton.cdiv(g.K, meta["BN"]),)

    _launch_named(_conv_tma_kernel, grid, dict(ptrs, N=g.N), flags)


def _launch_pointer(g: _Geometry, stride, prologue, ptrs, flags, partials,
                    pool: Optional[AvgPool] = None, pool2: Optional[AvgPool] = None,
                    gate=None, pool_sums=None) -> None:
    M = g.N * g.P * g.Q
    out = ptrs["out_ptr"]
    pmean, pm2, pcnt = partials or (out, out, out)   # never read without STATS
    pro = prologue or Prologue(out, out, False)
    # Absent: `out`, never read; the autotuner's reset_to_zero of psum_ptr zeroes it
    # only around benchmarking, before the kernel overwrites all of it.
    gate_t = out if gate is None else gate
    psum = out if pool_sums is None else pool_sums

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]) * triton.cdiv(g.K, meta["BN"]),)

    _launch_named(_conv_kernel, grid,
                  dict(ptrs, M=M, scale_ptr=pro.scale.contiguous(),
                       shift_ptr=pro.shift.contiguous(), pmean_ptr=pmean, pm2_ptr=pm2,
                       pcnt_ptr=pcnt, rgate_ptr=gate_t, psum_ptr=psum),
                  dict(flags, STRIDE=stride, HAS_PRO=prologue is not None,
                       IN_RELU=bool(pro.relu), STATS=partials is not None,
                       SLOT_ROWS=_MIN_BM, AVGPOOL=pool.kernel if pool is not None else 0,
                       AVGPOOL2=pool2.kernel if pool2 is not None else 0,
                       RES_GATE=gate is not None, POOL=pool_sums is not None))


def _stat_partials(M: int, K: int, dev):
    """Per-slot (mean, M2, count) buffers of the statistics epilogue. No zeroing: each
    launch writes every slot's count (_epilogue)."""
    t_max = triton.cdiv(M, _MIN_BM)
    return (torch.empty((t_max, K), device=dev, dtype=torch.float32),
            torch.empty((t_max, K), device=dev, dtype=torch.float32),
            torch.empty((t_max,), device=dev, dtype=torch.float32))


def conv2d_nhwc(x: torch.Tensor, w: torch.Tensor, stride: int = 1, padding: int = 1, *,
                prologue: Optional[Prologue] = None, second: Optional[SecondGemm] = None,
                residual: Optional[ResidualAdd] = None, epilogue: Epilogue = Epilogue(),
                stats: bool = False, pool: Optional[AvgPool] = None,
                pool_sums: Optional[torch.Tensor] = None,
                _path: Optional[str] = None) -> ConvOut:
    """Fused implicit-GEMM convolution; the module docstring has the formula.
    pool (and second.pool): the operand is x averaged over pool.kernel windows at
    `stride` before the 1x1 w (ResNet-D's shortcut, pool.py; padding 0, no prologue).

    x [N, C, H, W] (channels_last; other layouts are copied once), w [K, C, R, S] in x's
    dtype; the optional parts are the specs above, stats=True also returns the
    statistics of the output. pool_sums: a zeroed fp32 [N, K] tensor into which the
    per-(n, k) sums of the written output over its P*Q pixels are added. Returns a
    ConvOut whose unrequested fields are None.
    _path ("pointer" / "tma" / None = automatic) is for tests and benchmarks.
    """
    x = x.contiguous(memory_format=_CL)
    w = w.contiguous(memory_format=_CL)   # [K, R, S, C] in memory; no copy when it is
    g = _geometry(x, w, stride, padding, second, pool)
    _assert_specs(g, x, prologue, residual, epilogue)
    assert pool is None or prologue is None, "conv2d_nhwc: a pooled operand has no prologue"
    out = torch.empty((g.N, g.K, g.P, g.Q), device=x.device, dtype=x.dtype,
                      memory_format=_CL)
    mask = (torch.empty((mask_numel(out),), device=x.device, dtype=torch.uint8)
            if epilogue.mask else None)
    gate = None if residual is None else residual.gate
    assert pool_sums is None or (pool_sums.dtype == torch.float32 and pool_sums.is_contiguous()
                                 and tuple(pool_sums.shape) == (g.N, g.K)), \
        f"conv2d_nhwc: pool_sums is a contiguous fp32 {(g.N, g.K)} tensor"
    ptrs, flags = _operands(x, w, g, padding, second, residual, epilogue, out, mask)
    pools = (pool, second.pool if second is not None else None)
    # The descriptor kernel has no pooled loader and no gate or pool-sum epilogue: such a
    # call takes the pointer kernel.
    if pools == (None, None) and gate is None and pool_sums is None \
            and _use_tma(x, w, stride, prologue, stats, _path):
        _launch_tma(g, ptrs, flags)
        return ConvOut(out, mask)
    partials = _stat_partials(g.N * g.P * g.Q, g.K, x.device) if stats else None
    _launch_pointer(g, stride, prologue, ptrs, flags, partials, *pools, gate, pool_sums)
    if partials is None:
        return ConvOut(out, mask)
    return ConvOut(out, mask, *_combine_stats(*partials, g.K, x.device))


def conv_flops(N: int, P: int, Q: int, K: int, C: int, R: int, S: int) -> int:
    """Multiply-adds x 2 of one convolution: 2 * N*P*Q * K * C*R*S."""
    return 2 * N * P * Q * K * C * R * S


__all__ = ["AvgPool", "ConvOut", "Epilogue", "Prologue", "ResidualAdd", "SecondGemm",
           "conv2d_nhwc", "conv_flops"]
