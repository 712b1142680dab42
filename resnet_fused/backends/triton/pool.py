"""ResNet-D's pooled shortcut on the triton backend: which nn.AvgPool2d its kernels
compute, read off the user's module (README.md, Design, "Gates and pooled shortcuts").

The shortcut `AvgPool2d(k, stride s) -> 1x1 conv (stride 1) -> BN?` is computed in the
convolution kernels, never as a pooled tensor: the forward GEMM averages each window
as it loads its operand (conv.py, _pool_gemm_loop), the weight gradient rebuilds the
pooled input in its loader and the data gradient spreads each window's gradient back
over its taps (conv_bwd.py). Each window is divided by its taps inside the image, which
is what AvgPool2d computes without padding whatever its count_include_pad (padding is
the only thing that flag counts): with ceil_mode, the last window of an odd size runs
past the image and has 1 tap per axis instead of k.

Covered: a square window k and stride s (any), padding 0, no divisor_override, before a
1x1 stride-1 convolution without padding. The rest is declined (pool_unsupported_reason)
so `auto` routes the block to a backend that runs the user's module.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from torch import nn


class AvgPool(NamedTuple):
    """x averaged over kernel x kernel windows at the convolution's stride, no padding,
    each window divided by its taps inside the image, before a 1x1 stride-1 conv."""
    kernel: int
    ceil_mode: bool = True


def _two(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def pool_out_hw(h: int, w: int, kernel: int, stride: int, ceil_mode: bool) -> tuple:
    """The output size of AvgPool2d(kernel, stride, padding 0, ceil_mode), as PyTorch
    computes it (pooling_output_shape): with ceil_mode one more window where the last
    would start inside the image."""
    def one(n):
        o = (n - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
        if ceil_mode and (o - 1) * stride >= n:
            o -= 1
        return o
    return one(h), one(w)


def pool_unsupported_reason(pool, conv: nn.Conv2d) -> Optional[str]:
    """Why the triton kernels do not compute `pool` (the shortcut's, before `conv`), or
    None."""
    if type(pool) is not nn.AvgPool2d:
        return f"the triton backend pools only with nn.AvgPool2d, not {type(pool).__name__}"
    k, s, p = _two(pool.kernel_size), _two(pool.stride), _two(pool.padding)
    if k[0] != k[1] or s[0] != s[1]:
        return (f"the triton backend pools square windows with one stride, not AvgPool2d("
                f"kernel {pool.kernel_size}, stride {pool.stride})")
    if p != (0, 0):
        return (f"the triton backend pools without padding, and this shortcut's AvgPool2d "
                f"has padding {pool.padding}")
    if pool.divisor_override is not None:
        return (f"the triton backend divides each window by its taps, and this shortcut's "
                f"AvgPool2d has divisor_override={pool.divisor_override}")
    if tuple(conv.kernel_size) != (1, 1) or tuple(conv.stride) != (1, 1) \
            or tuple(conv.padding) != (0, 0):
        return (f"the triton backend pools before a 1x1 stride-1 convolution, and this "
                f"shortcut's is {tuple(conv.kernel_size)} stride {tuple(conv.stride)} "
                f"padding {tuple(conv.padding)}")
    return None


def shortcut_pool(parts) -> Optional[AvgPool]:
    """The AvgPool the kernels apply to the shortcut of `parts` (a spec.Parts), or None
    without a pool or with the identity pool (AvgPool2d(1), stride 1); the pool's stride
    is pool_stride(parts). Call after pool_unsupported_reason said None."""
    sc = parts.shortcut
    if sc is None or sc.pool is None:
        return None
    k, s = _two(sc.pool.kernel_size)[0], _two(sc.pool.stride)[0]
    if k == 1 and s == 1:
        return None
    return AvgPool(k, bool(sc.pool.ceil_mode))


def pool_stride(parts) -> int:
    """The stride of the shortcut's pool (1 without one)."""
    sc = parts.shortcut
    return 1 if sc is None or sc.pool is None else _two(sc.pool.stride)[0]
