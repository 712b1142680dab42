"""BatchNorm (training statistics, and frozen) in Triton: the BN ops of resnet_fused/schemas.py
under the namespace `resnet_fused_triton`, and the per-channel helpers the fused block
(train.py, conv_bwd.py) calls inside its own ops.

Ops (schemas exactly as resnet_fused/schemas.py):
    channel_stats(x) -> (mean, var)                         per-tile partials, Chan combine
    bn_finalize(mean, var, w, b, running_*..., momentum, eps, count) -> (invstd, scale, shift)
    bn_act(c, mean, invstd, w, b, residual?) -> (out, mask)  one elementwise pass + packed mask
    bn_act_backward(grad_out, mask, c, mean, invstd, w, residual_grad)
        -> (grad_c, grad_w, grad_b, grad_res)                 reduce pass + apply pass
    bn_frozen_act / bn_frozen_act_backward                    the same kernels, the
        backward's statistics terms zero (frozen BN), its reduce pass only for w/b grads

Activations may be NCHW- or channels_last-contiguous: every kernel indexes a channel as
(n, c, hw) with the tensor's own strides, and the mask follows the *physical* offset.

How the ops are registered: with resnet_fused.ops.define_op, as triton_ops on a GPU
(torch.compile sees the kernels) and as custom_ops with the op layer's shared fakes
under TRITON_INTERPRET=1 (an interpreted kernel cannot be traced: wrap_triton passes
it through in torch 2.14 and rejects it in 2.11; launcher.py never hands it one).
bn_act's autograd is the op layer's (backward = resnet_fused_triton::bn_act_backward).
The op functions carry full annotations: torch 2.11 (the GPU image) ignores triton_op's
`schema=` and infers the schema from them.

Callers: the composite training path (CompositeBackend.forward_train, ATen
convolutions around these ops), which the triton backend takes for the blocks its
fused path cannot (backends/triton/__init__.py); the fused path (train.py) calls the
*_impl helpers below inside its own op.

Numerics: every reduction accumulates in fp32 around a mean or a shift (channel_stats:
two-pass per tile, Chan's pairwise combine of tiles and chunks), so neither a large
mean nor an outlier cancels the variance away; BN parameters and running buffers are
read and written in their own dtype, computed in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ...ops import mask_numel
from .launcher import DTYPES as _DTYPES, INTERPRET, NS, define_triton_op, launch

# Tile sizes. The interpreter pays per program and per op, not per element: big tiles.
_BR = 64 if INTERPRET else 32      # rows (pixels) per reduction step
_BC = 32 if INTERPRET else 64      # channels per reduction program
_EW_BYTES = 64 if INTERPRET else 128  # mask bytes per elementwise program (x8 elements)
_RED_PROGRAMS = 4 if INTERPRET else 1024  # target programs of a reduction over rows


# =========================================================================== kernels
@triton.jit
def _row_tile(r0, row_end, HW, sN, sHW, rc, sC, c_ok, BR: tl.constexpr):
    """Offsets and bounds mask of a (BR rows of N*H*W) x (channels rc) tile, for either
    layout (the strides say which): shared by the statistics and backward reductions."""
    rows = r0 + tl.arange(0, BR)
    n = rows // HW
    off = (n.to(tl.int64) * sN + (rows - n * HW) * sHW)[:, None] + (rc * sC)[None, :]
    return off, (rows < row_end)[:, None] & c_ok[None, :]


@triton.jit
def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s pairwise combine of two per-channel (count, mean, M2) sets; returns
    the merged triple. The mean moves by a fraction of the difference of means and M2
    gains the between-set term, so nothing is summed around a far-away shift. Empty
    sets (count 0 on both sides) stay empty: the division is guarded."""
    n = n_a + n_b
    delta = mean_b - mean_a
    frac = n_b / tl.maximum(n, 1.0)
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@triton.jit
def chan_empty(BC: tl.constexpr):
    """An empty per-channel (count, mean, M2) set of BC channels: chan_merge's start."""
    z = tl.zeros((BC,), dtype=tl.float32)
    return z, z, z


@triton.jit
def lanes(start, end, B: tl.constexpr):
    """Indices start + arange(B) and their bound mask (< end): a block of channels, of
    tiles or of positions (kernels here and in conv.py, conv_bwd.py)."""
    idx = start + tl.arange(0, B)
    return idx, idx < end


@triton.jit
def _stats_partial_kernel(x_ptr, pmean_ptr, pm2_ptr, M, C, HW, sN, sC, sHW, ROWS,
                          BR: tl.constexpr, BC: tl.constexpr):
    """Per (row chunk, channel block): mean and centred sum of squares of the chunk.

    Each BR-row tile is reduced two-pass (its mean, then sum((x - mean)^2)) and merged
    into the chunk's running (count, mean, M2) by Chan's combine: every term is centred
    on a mean of the data it covers, so no single element (an outlier as the shift of
    a sum of (x - shift)^2) can make the variance cancel."""
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    rc = pid_c * BC + tl.arange(0, BC)
    c_ok = rc < C
    row0 = pid_s * ROWS
    row_end = tl.minimum(row0 + ROWS, M)
    n_a = tl.zeros((BC,), dtype=tl.float32)
    mean_a = tl.zeros((BC,), dtype=tl.float32)
    m2_a = tl.zeros((BC,), dtype=tl.float32)
    for r0 in range(row0, row_end, BR):
        off, m = _row_tile(r0, row_end, HW, sN, sHW, rc, sC, c_ok, BR)
        v = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        n_b = tl.minimum(row_end - r0, BR).to(tl.float32)
        mean_b = tl.sum(v, axis=0) / n_b
        d = tl.where(m, v - mean_b[None, :], 0.0)
        m2_b = tl.sum(d * d, axis=0)
        n_a, mean_a, m2_a = chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b)
    tl.store(pmean_ptr + pid_s * C + rc, mean_a, mask=c_ok)
    tl.store(pm2_ptr + pid_s * C + rc, m2_a, mask=c_ok)


@triton.jit
def _chunk_stats_combine_kernel(pmean_ptr, pm2_ptr, mean_ptr, var_ptr, M, C, ROWS, SPLIT,
                                BC: tl.constexpr):
    """The mean and biased variance from _stats_partial_kernel's SPLIT row chunks of
    ROWS rows (the last one shorter): Chan's pairwise combination of their (count,
    mean, M2) triples."""
    rc, c_ok = lanes(tl.program_id(0) * BC, C, BC)
    n_a, mean_a, m2_a = chan_empty(BC)
    for s in range(0, SPLIT):
        n_b = tl.minimum(ROWS, M - s * ROWS).to(tl.float32)
        mean_b = tl.load(pmean_ptr + s * C + rc, mask=c_ok, other=0.0)
        m2_b = tl.load(pm2_ptr + s * C + rc, mask=c_ok, other=0.0)
        n_a, mean_a, m2_a = chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b)
    tl.store(mean_ptr + rc, mean_a, mask=c_ok)
    tl.store(var_ptr + rc, m2_a / n_a, mask=c_ok)


@triton.jit
def _finalize_kernel(mean_ptr, var_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, nbt_ptr,
                     invstd_ptr, scale_ptr, shift_ptr, C, momentum, eps, count,
                     UPDATE: tl.constexpr, BC: tl.constexpr):
    """invstd, scale, shift; with UPDATE the running statistics as nn.BatchNorm2d.

    One program (every channel): num_batches_tracked is read once by every thread,
    and written (incremented) only after a barrier, so no warp can read the new value:
    the cumulative-average factor 1/num_batches_tracked is the same for every channel
    and computed on the device (no host sync). The CUDA twin (csrc/cuda/bn_kernels.cu,
    finalize) does the same with __syncthreads. momentum < 0 stands for momentum=None."""
    if UPDATE:
        t = tl.load(nbt_ptr) + 1
        f = tl.where(momentum >= 0.0, momentum, 1.0 / t.to(tl.float32))
        # Bessel's correction for the running (unbiased) variance. Arithmetic, not
        # .to(): torch 2.11's kernel analysis (torch.compile) passes scalar arguments as
        # Python numbers, which have no .to, and would then assume every input written.
        bessel = count / (count - 1.0)
    for c0 in range(0, C, BC):
        rc = c0 + tl.arange(0, BC)
        ok = rc < C
        mean = tl.load(mean_ptr + rc, mask=ok, other=0.0).to(tl.float32)
        var = tl.load(var_ptr + rc, mask=ok, other=1.0).to(tl.float32)
        w = tl.load(w_ptr + rc, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + rc, mask=ok, other=0.0).to(tl.float32)
        invstd = 1.0 / tl.sqrt(var + eps)
        scale = w * invstd
        tl.store(invstd_ptr + rc, invstd, mask=ok)
        tl.store(scale_ptr + rc, scale, mask=ok)
        tl.store(shift_ptr + rc, b - mean * scale, mask=ok)
        if UPDATE:
            rm = tl.load(rm_ptr + rc, mask=ok, other=0.0).to(tl.float32)
            rv = tl.load(rv_ptr + rc, mask=ok, other=0.0).to(tl.float32)
            rm = (1.0 - f) * rm + f * mean
            rv = (1.0 - f) * rv + f * (var * bessel)
            tl.store(rm_ptr + rc, rm.to(rm_ptr.dtype.element_ty), mask=ok)
            tl.store(rv_ptr + rc, rv.to(rv_ptr.dtype.element_ty), mask=ok)
    if UPDATE:
        # Every thread of the program has loaded num_batches_tracked before it changes
        # (without the barrier a lagging warp could read n+1 and use 1/(n+2)).
        tl.debug_barrier()
        tl.store(nbt_ptr, t)


@triton.jit
def _bn_act_kernel(c_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr,
                   r_ptr, rmean_ptr, rinvstd_ptr, rw_ptr, rb_ptr,
                   out_ptr, mask_ptr, total, C, sC,
                   HAS_RES: tl.constexpr, RES_BN: tl.constexpr, BYTES: tl.constexpr,
                   gate_ptr, sN, HAS_GATE: tl.constexpr):
    """out = relu([gate[n, c] *] bn(c) [+ r | + bn_r(r)]) and its packed mask, over
    physical offsets (gate: fp32 [N, C], n = offset // sN: a gated branch's join).

    A program owns BYTES whole mask bytes (8*BYTES elements), viewed [BYTES, 8], so
    each byte is assembled in registers and written once (no read-modify-write)."""
    pid = tl.program_id(0)
    byte = pid.to(tl.int64) * BYTES + tl.arange(0, BYTES)
    bit = tl.arange(0, 8)
    i = byte[:, None] * 8 + bit[None, :]
    ok = i < total
    ch = ((i // sC) % C).to(tl.int32)
    x = tl.load(c_ptr + i, mask=ok, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + ch, mask=ok, other=0.0).to(tl.float32)
    inv = tl.load(invstd_ptr + ch, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + ch, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + ch, mask=ok, other=0.0).to(tl.float32)
    y = (x - mean) * (inv * w) + b
    if HAS_GATE:
        y = y * tl.load(gate_ptr + (i // sN) * C + ch, mask=ok, other=0.0)
    if HAS_RES:
        r = tl.load(r_ptr + i, mask=ok, other=0.0).to(tl.float32)
        if RES_BN:
            rmean = tl.load(rmean_ptr + ch, mask=ok, other=0.0).to(tl.float32)
            rinv = tl.load(rinvstd_ptr + ch, mask=ok, other=0.0).to(tl.float32)
            rw = tl.load(rw_ptr + ch, mask=ok, other=0.0).to(tl.float32)
            rb = tl.load(rb_ptr + ch, mask=ok, other=0.0).to(tl.float32)
            r = (r - rmean) * (rinv * rw) + rb
        y = y + r
    # ReLU that keeps NaN, as F.relu does (max.f32 alone returns 0 for a NaN).
    out = tl.where(y != y, y, tl.maximum(y, 0.0)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + i, out, mask=ok)
    # The bit is of the value as stored (rounded), as the schema says.
    bits = tl.where(ok & (out.to(tl.float32) > 0.0), 1 << bit[None, :], 0)
    tl.store(mask_ptr + byte, tl.sum(bits, axis=1).to(tl.uint8), mask=byte * 8 < total)


@triton.jit
def _load_mask_bit(mask_ptr, i, ok):
    """The bit of physical element offset i in a packed mask (1 = output was > 0)."""
    byte = tl.load(mask_ptr + i // 8, mask=ok, other=0).to(tl.int32)
    return ((byte >> (i % 8).to(tl.int32)) & 1) != 0


@triton.jit
def _bn_bwd_reduce_kernel(g_ptr, mask_ptr, c_ptr, mean_ptr, invstd_ptr, red_ptr,
                          cb_ptr, meanb_ptr, invb_ptr, redb_ptr,
                          M, C, HW, sN, sC, sHW, ROWS,
                          HAS_MASK: tl.constexpr, TWO: tl.constexpr,
                          BR: tl.constexpr, BC: tl.constexpr):
    """red[0, c] += sum(g), red[1, c] += sum(g * xhat), g = grad_out (* mask bit).

    TWO: the same for a second BatchNorm fed by the same g (the BN'd projection
    shortcut's bn3, whose output is added to bn2's): redb gets sum(g) and
    sum(g * xhat_b) of cb, so grad_out and the mask are read once for both."""
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    rc = pid_c * BC + tl.arange(0, BC)
    c_ok = rc < C
    mean = tl.load(mean_ptr + rc, mask=c_ok, other=0.0).to(tl.float32)
    inv = tl.load(invstd_ptr + rc, mask=c_ok, other=0.0).to(tl.float32)
    if TWO:
        meanb = tl.load(meanb_ptr + rc, mask=c_ok, other=0.0).to(tl.float32)
        invb = tl.load(invb_ptr + rc, mask=c_ok, other=0.0).to(tl.float32)
    row0 = pid_s * ROWS
    row_end = tl.minimum(row0 + ROWS, M)
    sg = tl.zeros((BR, BC), dtype=tl.float32)
    sgx = tl.zeros((BR, BC), dtype=tl.float32)
    sgxb = tl.zeros((BR, BC), dtype=tl.float32)
    for r0 in range(row0, row_end, BR):
        off, m = _row_tile(r0, row_end, HW, sN, sHW, rc, sC, c_ok, BR)
        g = tl.load(g_ptr + off, mask=m, other=0.0).to(tl.float32)
        if HAS_MASK:
            g = tl.where(_load_mask_bit(mask_ptr, off, m), g, 0.0)
        c = tl.load(c_ptr + off, mask=m, other=0.0).to(tl.float32)
        xhat = (c - mean[None, :]) * inv[None, :]
        sg += g
        sgx += tl.where(m, g * xhat, 0.0)
        if TWO:
            cb = tl.load(cb_ptr + off, mask=m, other=0.0).to(tl.float32)
            sgxb += tl.where(m, g * ((cb - meanb[None, :]) * invb[None, :]), 0.0)
    tsg = tl.sum(sg, axis=0)
    tl.atomic_add(red_ptr + rc, tsg, mask=c_ok)
    tl.atomic_add(red_ptr + C + rc, tl.sum(sgx, axis=0), mask=c_ok)
    if TWO:
        tl.atomic_add(redb_ptr + rc, tsg, mask=c_ok)
        tl.atomic_add(redb_ptr + C + rc, tl.sum(sgxb, axis=0), mask=c_ok)


@triton.jit
def _bn_bwd_coef_kernel(red_ptr, mean_ptr, invstd_ptr, w_ptr, coef_ptr, gw_ptr, gb_ptr,
                        C, M, BC: tl.constexpr):
    """Per-channel coefficients of the BN backward apply, grad_c = a*g + b*(c - mean) + d:
        a = w*invstd,  b = -a*invstd*sum(g*xhat)/M,  d = -a*sum(g)/M
    coef rows: a, b, d, mean (the consumers read all four; see conv_bwd.py).
    Also grad_weight = sum(g*xhat), grad_bias = sum(g) (fp32)."""
    pid = tl.program_id(0)
    rc = pid * BC + tl.arange(0, BC)
    ok = rc < C
    sg = tl.load(red_ptr + rc, mask=ok, other=0.0)
    sgx = tl.load(red_ptr + C + rc, mask=ok, other=0.0)
    mean = tl.load(mean_ptr + rc, mask=ok, other=0.0).to(tl.float32)
    inv = tl.load(invstd_ptr + rc, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + rc, mask=ok, other=0.0).to(tl.float32)
    a = w * inv
    mf = M * 1.0  # not M.to(): see _finalize_kernel
    tl.store(coef_ptr + rc, a, mask=ok)
    tl.store(coef_ptr + C + rc, -a * inv * sgx / mf, mask=ok)
    tl.store(coef_ptr + 2 * C + rc, -a * sg / mf, mask=ok)
    tl.store(coef_ptr + 3 * C + rc, mean, mask=ok)
    tl.store(gw_ptr + rc, sgx, mask=ok)
    tl.store(gb_ptr + rc, sg, mask=ok)


@triton.jit
def _bn_bwd_apply_kernel(g_ptr, mask_ptr, c_ptr, coef_ptr, gc_ptr, gr_ptr, total, C, sC,
                         RES_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < total
    ch = ((i // sC) % C).to(tl.int32)
    g = tl.load(g_ptr + i, mask=ok, other=0.0).to(tl.float32)
    g = tl.where(_load_mask_bit(mask_ptr, i, ok), g, 0.0)
    c = tl.load(c_ptr + i, mask=ok, other=0.0).to(tl.float32)
    a = tl.load(coef_ptr + ch, mask=ok, other=0.0)
    b = tl.load(coef_ptr + C + ch, mask=ok, other=0.0)
    d = tl.load(coef_ptr + 2 * C + ch, mask=ok, other=0.0)
    mean = tl.load(coef_ptr + 3 * C + ch, mask=ok, other=0.0)
    gc = a * g + b * (c - mean) + d
    tl.store(gc_ptr + i, gc.to(gc_ptr.dtype.element_ty), mask=ok)
    if RES_GRAD:
        tl.store(gr_ptr + i, g.to(gr_ptr.dtype.element_ty), mask=ok)


# =========================================================================== checks
def _check_act(t: torch.Tensor, op: str, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{NS}::{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{NS}::{op}: {name} must be 4-D (N, C, H, W), got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{NS}::{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"{NS}::{op}: {name} must be NCHW- or channels_last-contiguous")
    if t.numel() == 0:
        raise ValueError(f"{NS}::{op}: {name} is empty (shape {tuple(t.shape)})")
    return t


def _check_like(t: torch.Tensor, ref: torch.Tensor, op: str, name: str, ref_name: str):
    if t.shape != ref.shape:
        raise ValueError(f"{NS}::{op}: {name} shape {tuple(t.shape)} != {ref_name} shape "
                         f"{tuple(ref.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{NS}::{op}: {name} dtype {t.dtype} != {ref_name} dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{NS}::{op}: {name} is on {t.device}, {ref_name} on {ref.device}")
    if t.stride() != ref.stride():
        raise ValueError(f"{NS}::{op}: {name} strides {t.stride()} != {ref_name} strides "
                         f"{ref.stride()} (make it contiguous in {ref_name}'s memory format)")


def _check_vec(t, C: int, op: str, name: str, device, fp32: bool = False):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{NS}::{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.shape != (C,):
        raise ValueError(f"{NS}::{op}: {name} must have shape ({C},), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{NS}::{op}: {name} must be floating point, got {t.dtype}")
    if fp32 and t.dtype != torch.float32:
        raise TypeError(f"{NS}::{op}: {name} must be float32 statistics, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{NS}::{op}: {name} is on {t.device}, the activation on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{NS}::{op}: {name} must be contiguous")


def _geometry(x: torch.Tensor):
    """(N, C, HW, sN, sC, sHW): element (n, c, hw) is at n*sN + c*sC + hw*sHW for both
    NCHW and channels_last contiguous tensors (hw strides are W-stride * hw)."""
    N, C, H, W = x.shape
    return N, C, H * W, x.stride(0), x.stride(1), x.stride(3)


def _row_split(M: int):
    """Rows per reduction program (a multiple of _BR) and the number of programs."""
    rows = max(_BR, triton.cdiv(triton.cdiv(M, _RED_PROGRAMS), _BR) * _BR)
    return rows, triton.cdiv(M, rows)


# =========================================================================== helpers
# Plain Python functions that allocate and launch; the ops below and the fused block
# (train.py) call them inside their own op bodies.
def channel_stats_impl(x: torch.Tensor):
    N, C, HW, sN, sC, sHW = _geometry(x)
    M = N * HW
    rows, split = _row_split(M)
    pmean = torch.empty((split, C), device=x.device, dtype=torch.float32)
    pm2 = torch.empty((split, C), device=x.device, dtype=torch.float32)
    launch(_stats_partial_kernel, (triton.cdiv(C, _BC), split), x, pmean, pm2,
           M, C, HW, sN, sC, sHW, rows, BR=_BR, BC=_BC)
    mean = torch.empty((C,), device=x.device, dtype=torch.float32)
    var = torch.empty((C,), device=x.device, dtype=torch.float32)
    launch(_chunk_stats_combine_kernel, (triton.cdiv(C, _BC),), pmean, pm2, mean, var,
           M, C, rows, split, BC=_BC)
    return mean, var


def finalize_impl(mean, var, weight, bias, eps: float, running=None, momentum: float = -1.0,
                  count: int = 2):
    """(invstd, scale, shift) fp32; running = (running_mean, running_var, nbt) to update."""
    C = mean.shape[0]
    invstd = torch.empty_like(mean, dtype=torch.float32)
    scale = torch.empty_like(invstd)
    shift = torch.empty_like(invstd)
    rm, rv, nbt = running if running is not None else (mean, mean, mean)
    launch(_finalize_kernel, (1,), mean, var, weight, bias, rm, rv, nbt, invstd, scale, shift,
           C, float(momentum), float(eps), int(count),
           UPDATE=running is not None, BC=min(1024, triton.next_power_of_2(max(C, 16))))
    return invstd, scale, shift


def bn_act_impl(c, mean, invstd, weight, bias, residual=None, res_bn=None, gate=None):
    """relu(bn(c) + residual), res_bn = (mean, invstd, weight, bias) to normalise the
    residual first (the BN'd projection shortcut); gate: fp32 [N, C] (gate.gate_nk)
    multiplying bn(c) (a gated branch). Returns (out, mask)."""
    out = torch.empty_like(c)
    total = c.numel()
    nbytes = mask_numel(c)
    mask = torch.empty((nbytes,), device=c.device, dtype=torch.uint8)
    rb = res_bn if res_bn is not None else (mean, invstd, weight, bias)
    launch(_bn_act_kernel, (triton.cdiv(nbytes, _EW_BYTES),), c, mean, invstd, weight, bias,
           residual if residual is not None else c, rb[0], rb[1], rb[2], rb[3],
           out, mask, total, c.shape[1], c.stride(1),
           HAS_RES=residual is not None, RES_BN=res_bn is not None, BYTES=_EW_BYTES,
           gate_ptr=c if gate is None else gate, sN=c.stride(0), HAS_GATE=gate is not None)
    return out, mask


def bn_coef(red, mean, invstd, weight, M: int):
    """The BN backward's apply coefficients [4, C] (a, b, d, mean; see
    _bn_bwd_coef_kernel), grad_weight and grad_bias from red = [sum g, sum g*xhat]
    over M values per channel."""
    C = mean.shape[0]
    coef = torch.empty((4, C), device=red.device, dtype=torch.float32)
    gw = torch.empty((C,), device=red.device, dtype=torch.float32)
    gb = torch.empty((C,), device=red.device, dtype=torch.float32)
    launch(_bn_bwd_coef_kernel, (triton.cdiv(C, _BC),), red, mean, invstd, weight,
           coef, gw, gb, C, M, BC=_BC)
    return coef, gw, gb


def bn_backward_coef(grad_out, mask, c, mean, invstd, weight, second=None):
    """Reduce sum(g), sum(g*xhat) (g = grad_out * mask bit when mask is given) and turn
    them into the apply coefficients [4, C] (a, b, d, mean), grad_weight and grad_bias.

    second = (c_b, mean_b, invstd_b, weight_b): a second BatchNorm whose output gradient
    is the same g (bn3 of the BN'd projection, added to bn2's output), reduced in the
    same pass over grad_out and the mask; then returns ((coef, gw, gb), (coef_b, gw_b,
    gb_b)). c_b must have c's shape and strides."""
    N, C, HW, sN, sC, sHW = _geometry(c)
    M = N * HW
    rows, split = _row_split(M)
    red = torch.zeros((2, C), device=c.device, dtype=torch.float32)
    if second is not None:
        cb, meanb, invb, weightb = second
        if cb.shape != c.shape or cb.stride() != c.stride():
            raise ValueError(f"bn_backward_coef: the second BN's input {tuple(cb.shape)} "
                             f"{cb.stride()} does not match {tuple(c.shape)} {c.stride()}")
        redb = torch.zeros((2, C), device=c.device, dtype=torch.float32)
    else:
        cb, meanb, invb, redb = c, mean, invstd, red
    launch(_bn_bwd_reduce_kernel, (triton.cdiv(C, _BC), split), grad_out,
           mask if mask is not None else grad_out, c, mean, invstd, red,
           cb, meanb, invb, redb,
           M, C, HW, sN, sC, sHW, rows, HAS_MASK=mask is not None, TWO=second is not None,
           BR=_BR, BC=_BC)
    if second is None:
        return bn_coef(red, mean, invstd, weight, M)
    return bn_coef(red, mean, invstd, weight, M), bn_coef(redb, meanb, invb, weightb, M)


# =========================================================================== ops
def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_act(x, "channel_stats", "x")
    return channel_stats_impl(x)


def _bn_finalize(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 running_mean: torch.Tensor, running_var: torch.Tensor,
                 num_batches_tracked: torch.Tensor, momentum: float, eps: float,
                 count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    op = "bn_finalize"
    if not isinstance(mean, torch.Tensor) or mean.dim() != 1:
        raise ValueError(f"{NS}::{op}: mean must be a 1-D tensor")
    C, dev = mean.shape[0], mean.device
    _check_vec(mean, C, op, "mean", dev, fp32=True)
    _check_vec(var, C, op, "var", dev, fp32=True)
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        _check_vec(t, C, op, name, dev)
    if (num_batches_tracked.dim() != 0 or num_batches_tracked.dtype != torch.int64
            or num_batches_tracked.device != dev):
        raise ValueError(f"{NS}::{op}: num_batches_tracked must be an int64 scalar tensor on "
                         f"{dev}, got {num_batches_tracked.dtype} shape "
                         f"{tuple(num_batches_tracked.shape)} on {num_batches_tracked.device}")
    if count <= 1:
        raise ValueError(f"{NS}::{op}: count must be > 1 (values per channel), got {count}")
    if eps <= 0:
        raise ValueError(f"{NS}::{op}: eps must be > 0, got {eps}")
    return finalize_impl(mean, var, weight, bias, eps,
                         (running_mean, running_var, num_batches_tracked), momentum, count)


def _bn_act(c: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor, residual: Optional[torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    op = "bn_act"
    _check_act(c, op, "c")
    C = c.shape[1]
    _check_vec(mean, C, op, "mean", c.device, fp32=True)
    _check_vec(invstd, C, op, "invstd", c.device, fp32=True)
    _check_vec(weight, C, op, "weight", c.device)
    _check_vec(bias, C, op, "bias", c.device)
    if residual is not None:
        _check_like(residual, c, op, "residual", "c")
    return bn_act_impl(c, mean, invstd, weight, bias, residual)


def _check_backward_args(op: str, grad_out, mask, c, mean, invstd, weight) -> None:
    """The argument checks bn_act_backward and bn_frozen_act_backward share."""
    _check_act(c, op, "c")
    _check_like(grad_out, c, op, "grad_out", "c")
    C = c.shape[1]
    nbytes = mask_numel(c)
    if mask.dtype != torch.uint8 or mask.shape != (nbytes,) or mask.device != c.device:
        raise ValueError(f"{NS}::{op}: mask must be uint8 of shape ({nbytes},) on {c.device}, "
                         f"got {mask.dtype} {tuple(mask.shape)} on {mask.device}")
    _check_vec(mean, C, op, "mean", c.device, fp32=True)
    _check_vec(invstd, C, op, "invstd", c.device, fp32=True)
    _check_vec(weight, C, op, "weight", c.device)


def _bwd_apply(grad_out, mask, c, coef, residual_grad: bool):
    """(grad_c, grad_residual) of the BN-backward apply pass with coefficients coef."""
    grad_c = torch.empty_like(c)
    grad_res = torch.empty_like(c) if residual_grad else c.new_empty((0,))
    total = c.numel()
    block = 8 * _EW_BYTES
    launch(_bn_bwd_apply_kernel, (triton.cdiv(total, block),), grad_out, mask, c, coef,
           grad_c, grad_res if residual_grad else grad_c, total, c.shape[1], c.stride(1),
           RES_GRAD=bool(residual_grad), BLOCK=block)
    return grad_c, grad_res


def _bn_act_backward(grad_out: torch.Tensor, mask: torch.Tensor, c: torch.Tensor,
                     mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor,
                     residual_grad: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_backward_args("bn_act_backward", grad_out, mask, c, mean, invstd, weight)
    coef, gw, gb = bn_backward_coef(grad_out, mask, c, mean, invstd, weight)
    grad_c, grad_res = _bwd_apply(grad_out, mask, c, coef, residual_grad)
    return grad_c, gw, gb, grad_res


def _bn_frozen_act(c: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                   weight: torch.Tensor, bias: torch.Tensor, residual: Optional[torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    # bn_act's kernel: the frozen BN differs in its backward only.
    return _bn_act(c, mean, invstd, weight, bias, residual)


def _bn_frozen_act_backward(grad_out: torch.Tensor, mask: torch.Tensor, c: torch.Tensor,
                            mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor,
                            residual_grad: bool, param_grads: bool
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The apply kernel of bn_act_backward with the statistics terms of its coefficients
    zero (grad_c = w*invstd*g); the reduce pass only for the BN's weight/bias gradients."""
    _check_backward_args("bn_frozen_act_backward", grad_out, mask, c, mean, invstd, weight)
    if param_grads:
        coef, gw, gb = bn_backward_coef(grad_out, mask, c, mean, invstd, weight)
        coef[1:3].zero_()
    else:
        zero = torch.zeros_like(mean)
        coef = torch.stack([weight.to(torch.float32) * invstd, zero, zero, mean])
        gw, gb = mean.new_empty((0,)), mean.new_empty((0,))
    grad_c, grad_res = _bwd_apply(grad_out, mask, c, coef, residual_grad)
    return grad_c, gw, gb, grad_res


for _name, _fn in (("channel_stats", _channel_stats), ("bn_finalize", _bn_finalize),
                   ("bn_act", _bn_act), ("bn_act_backward", _bn_act_backward),
                   ("bn_frozen_act", _bn_frozen_act),
                   ("bn_frozen_act_backward", _bn_frozen_act_backward)):
    define_triton_op(_name, _fn)

__all__ = ["chan_merge", "channel_stats_impl", "finalize_impl", "bn_act_impl", "bn_coef",
           "bn_backward_coef"]
