"""The triton backend's gate kernels (README.md, Design, "Gates and pooled shortcuts"):
the elementwise join of a gated branch with an identity shortcut,
out = relu(gate[n, c] * y + x), and the gated branch's gradient gate * g. (The projection shortcut's join is the projection
GEMM's epilogue, conv.py's ResidualAdd(gate=); the pool of the branch is the branch
conv's epilogue, conv2d_nhwc(pool_sums=).)

Physical offsets, as bn.py's elementwise kernels: the channel of offset i is
(i // stride(1)) % C and its image i // stride(0), for NCHW and channels_last alike,
so no layout conversion.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launcher import INTERPRET, launch

_BLOCK = 4096 if INTERPRET else 1024   # elements per program (the interpreter pays per op)


def gate_nk(gate: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """A gate of shape (N or 1, K or 1, 1, 1) as the kernels read it: fp32 [N, K],
    contiguous (N * K floats, never a feature map)."""
    return gate.reshape(gate.shape[0], gate.shape[1]).to(torch.float32).expand(N, K) \
        .contiguous()


@triton.jit
def _gate_join_kernel(y_ptr, x_ptr, gate_ptr, out_ptr, total, C, sC, sN,
                      JOIN: tl.constexpr, BLOCK: tl.constexpr):
    """JOIN: out = relu(gate[n, c] * y + x), else out = gate[n, c] * y; in fp32, stored
    in out's dtype."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < total
    ch = (i // sC) % C
    n = i // sN
    g = tl.load(gate_ptr + n * C + ch, mask=ok, other=0.0)
    v = tl.load(y_ptr + i, mask=ok, other=0.0).to(tl.float32) * g
    if JOIN:
        v += tl.load(x_ptr + i, mask=ok, other=0.0).to(tl.float32)
        v = tl.where(v != v, v, tl.maximum(v, 0.0))  # ReLU that keeps NaN, as F.relu does
    tl.store(out_ptr + i, v.to(out_ptr.dtype.element_ty), mask=ok)


def gate_join_identity(y: torch.Tensor, gate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """relu(gate * y + x); y and x of one shape and memory format (contiguous in it),
    gate as gate_nk returns it. The result in y's layout."""
    N, C = y.shape[:2]
    out = torch.empty_like(y)
    total = y.numel()
    launch(_gate_join_kernel, (triton.cdiv(total, _BLOCK),), y, x, gate, out, total, C,
           y.stride(1), y.stride(0), JOIN=True, BLOCK=_BLOCK)
    return out


def gate_scale(t: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """gate * t (t contiguous in its memory format, gate as gate_nk returns it): the
    gradient a gated branch receives, in the training backward."""
    N, C = t.shape[:2]
    out = torch.empty_like(t)
    total = t.numel()
    launch(_gate_join_kernel, (triton.cdiv(total, _BLOCK),), t, t, gate, out, total, C,
           t.stride(1), t.stride(0), JOIN=False, BLOCK=_BLOCK)
    return out


__all__ = ["gate_join_identity", "gate_nk", "gate_scale"]
