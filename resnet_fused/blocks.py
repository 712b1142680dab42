"""The checks of a resolved block (spec.Parts) against what every fused path computes:
convolution geometry, BatchNorm options, channels and strides that meet at the add.
matching.py decides which modules form the block (from its dataflow); this decides
whether the fused kernels compute them as given. Shared by FusedResidual (module.py) and
conversion; imports neither.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from . import spec as S
from .leaves import composite_bn


class ConversionError(ValueError):
    """A block that cannot be converted; the message says why."""


# nn.SyncBatchNorm (convert_sync_batchnorm, before or after fuse_model): the block
# normalises over its process group (resnet_fused/distributed.py).
BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)

# The eps of a frozen BN that keeps none as an attribute (transformers' *FrozenBatchNorm2d
# write 1e-5 into their forward); the probe below confirms it.
FROZEN_EPS = 1e-5
_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def bn_eps(bn) -> float:
    """The eps a BN (any of is_bn's kinds) normalises with."""
    eps = getattr(bn, "eps", None)
    return FROZEN_EPS if eps is None else float(eps)


def _frozen_probe(m: nn.Module) -> bool:
    """Whether m's forward, in training and in eval, is x * scale + shift with
    scale = weight * rsqrt(running_var + eps), shift = bias - running_mean * scale: run
    on a float64 copy (the module itself is not touched) with random inputs, which an
    affine map from batch statistics (or any other computation) would not match."""
    try:
        probe = copy.deepcopy(m).to(device="cpu", dtype=torch.float64)
        b = probe._buffers
        c = b["weight"].numel()
        scale = b["weight"] * torch.rsqrt(b["running_var"] + bn_eps(m))
        shift = b["bias"] - b["running_mean"] * scale
        if not bool(torch.isfinite(scale).all() and torch.isfinite(shift).all()):
            return False
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, c, 3, 2, generator=gen, dtype=torch.float64) * 3 + 1
        want = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        with torch.no_grad():
            for training in (True, False):
                probe.train(training)
                got = probe(x)
                if not (isinstance(got, torch.Tensor) and got.shape == x.shape
                        and torch.allclose(got, want, rtol=1e-9, atol=1e-9)):
                    return False
        return True
    except Exception:  # noqa: BLE001: whatever its forward does, it is not a frozen BN
        return False


def is_frozen_bn(m: nn.Module) -> bool:
    """A frozen BatchNorm: torchvision's FrozenBatchNorm2d, transformers' frozen BN
    classes, or any module alike, recognised by what it holds and computes, not by its
    name: no parameters and no children, the buffers weight, bias, running_mean and
    running_var (one value per channel; nothing else but num_batches_tracked), and a
    forward that is the affine map of the running statistics in training and in eval
    alike (_frozen_probe). Its weight and bias are buffers: they never train."""
    if type(m) in BN_TYPES or m._parameters or m._modules:
        return False
    bufs = {k: v for k, v in m._buffers.items() if v is not None}
    bufs.pop("num_batches_tracked", None)
    if set(bufs) != set(_FROZEN_BUFFERS):
        return False
    c = bufs["weight"].shape
    if len(c) != 1 or any(t.shape != c or not t.is_floating_point() for t in bufs.values()):
        return False
    return _frozen_probe(m)


def is_bn(m: nn.Module) -> bool:
    """A BatchNorm the fused block computes: nn.BatchNorm2d, nn.SyncBatchNorm, a
    composite BN (leaves.py: timm's BatchNormAct2d) or a frozen BN (is_frozen_bn)."""
    return type(m) in BN_TYPES or composite_bn(m) is not None or is_frozen_bn(m)


def bn_training(bn) -> bool:
    """Whether `bn`, a BN that passed the checks (check_parts), normalises with batch
    statistics now: its own mode, and never for a frozen BN (FrozenBatchNorm2d.training
    follows the model, its forward does not). A type test, cheap on every call and
    traceable by torch.compile: the frozen kinds were recognised (is_frozen_bn) when
    the block was checked, and none of them is a torch BatchNorm, while every kind
    that trains is one (BN_TYPES and the composite BNs, nn.BatchNorm2d subclasses)."""
    return bn.training and isinstance(bn, nn.modules.batchnorm._BatchNorm)


# --------------------------------------------------------------------------- checks
def _conv_error(name: str, conv, *, dense: bool = False):
    """What no fused path computes about this convolution: not a plain nn.Conv2d,
    a non-square or non-"same" geometry (the ops take one int per stride, padding and
    dilation, and the shortcut must meet the main path), kernel other than 1 or 3."""
    if not isinstance(conv, nn.Conv2d) or type(conv).forward is not nn.Conv2d.forward:
        return f"{name} is {type(conv).__name__}, expected nn.Conv2d"
    k, s, p, d = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    if conv.padding_mode != "zeros":
        return f"{name}.padding_mode is {conv.padding_mode!r}, expected 'zeros'"
    if isinstance(p, str) or len({k[0], k[1]}) != 1 or s[0] != s[1] or p[0] != p[1] \
            or d[0] != d[1]:
        return f"{name} is not square (kernel {k}, stride {s}, padding {p}, dilation {d})"
    if k[0] not in (1, 3):
        return f"{name} kernel {k} is not supported (1x1 or 3x3)"
    if s[0] not in (1, 2):
        return f"{name} stride {s[0]} is not supported (1 or 2)"
    if p[0] != d[0] * (k[0] // 2):
        return (f"{name}.padding is {p}, expected {(d[0] * (k[0] // 2),) * 2} for a "
                f"{k[0]}x{k[0]} kernel with dilation {d[0]}")
    if dense and (conv.groups != 1 or d[0] != 1):
        return f"{name} has groups={conv.groups}, dilation={d}: expected 1 for a shortcut"
    return None


def _pool_error(name: str, pool, conv):
    """What no fused path computes about a shortcut's pool: ResNet-D's
    AvgPool2d(k, stride k) (k 1 or 2; ceil_mode and count_include_pad as given, no
    padding, no divisor override) before a 1x1 stride-1 convolution."""
    if type(pool) is not nn.AvgPool2d:
        return f"{name} is {type(pool).__name__}, expected nn.AvgPool2d"
    two = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    k, s, p = two(pool.kernel_size), two(pool.stride), two(pool.padding)
    if len(set(k)) != 1 or k != s or k[0] not in (1, 2) or p != (0, 0) \
            or pool.divisor_override is not None:
        return (f"{name} is AvgPool2d(kernel {pool.kernel_size}, stride {pool.stride}, "
                f"padding {pool.padding}, divisor_override {pool.divisor_override}); "
                "expected a 1x1 or 2x2 window with its own stride and no padding")
    if conv.kernel_size[0] != 1 or conv.stride[0] != 1:
        return (f"the convolution after {name} is {conv.kernel_size[0]}x"
                f"{conv.kernel_size[0]} stride {conv.stride[0]}, expected 1x1 stride 1")
    return None


def _gate_errors(spec: S.BlockSpec, parts: S.Parts) -> list:
    from .gates import sample_gate_error
    errs = []
    for g, gp in zip(spec.gates, parts.gates):
        if not 0 <= g.stage < len(parts.stages):
            errs.append(f"the gate {g.path} is on stage {g.stage}, which the block lacks")
        elif g.kind == S.SAMPLE and sample_gate_error(gp.module):
            errs.append(f"{g.path}: {sample_gate_error(gp.module)}")
        elif g.kind == S.SCALE and not (isinstance(g.value, float)
                                        and math.isfinite(g.value)):
            errs.append(f"the branch is scaled by {g.value!r}, not a finite number")
        elif g.kind not in (S.SAMPLE, S.CHANNEL, S.SCALE):
            errs.append(f"the gate {g.path} is of unknown kind {g.kind!r}")
    return errs


def _bn_error(name, bn, channels):
    # affine=False and track_running_stats=False are refused here, once: no fused path
    # (and no fold) has a branch for a BN without weight/bias or running statistics.
    if type(bn) not in BN_TYPES and composite_bn(bn) is None:
        if not is_frozen_bn(bn):
            return (f"{name} is {type(bn).__name__}, expected nn.BatchNorm2d, "
                    "nn.SyncBatchNorm, timm's BatchNormAct2d or a frozen BatchNorm (torchvision's FrozenBatchNorm2d)")
        n = bn._buffers["weight"].numel()
        return None if n == channels else f"{name} has {n} features, expected {channels}"
    if bn.num_features != channels:
        return f"{name} has {bn.num_features} features, expected {channels}"
    if not bn.affine:
        return f"{name} has affine=False (no weight/bias), which is not supported"
    if not bn.track_running_stats:
        return f"{name} has track_running_stats=False, which is not supported"
    return None


def _stage_errors(spec: S.BlockSpec, parts: S.Parts) -> list:
    errs, ch, last = [], parts.stages[0].conv, len(parts.stages) - 1
    ch = getattr(ch, "in_channels", None)
    for i, (st, sp) in enumerate(zip(spec.stages, parts.stages)):
        e = _conv_error(st.conv, sp.conv)
        if e:
            errs.append(e)
            continue
        if sp.conv.in_channels != ch:
            errs.append(f"{st.conv} has {sp.conv.in_channels} input channels, expected {ch}")
        ch = sp.conv.out_channels
        if sp.bn is None:
            errs.append(f"{st.conv} has no BatchNorm after it (every main-path stage needs one)")
        else:
            errs.append(_bn_error(st.bn, sp.bn, ch))
        if sp.relu != (i != last):
            errs.append(f"{st.conv}: a ReLU after every stage but the last is expected")
    if not errs and parts.stages[-1].conv.stride[0] != 1:
        errs.append(f"{spec.stages[-1].conv} stride {parts.stages[-1].conv.stride[0]} is "
                    "not supported (the last stage has stride 1)")
    return errs


def _shortcut_errors(spec: S.BlockSpec, parts: S.Parts, stride: int, cin, cout) -> list:
    if parts.shortcut is None:
        if stride != 1 or cin != cout:
            return [f"identity shortcut but the block maps {cin}->{cout} channels with "
                    f"stride {stride}: shapes would not add"]
        return []
    name, conv, bn = spec.shortcut.conv, parts.shortcut.conv, parts.shortcut.bn
    e = _conv_error(name, conv, dense=True)
    if e:
        return [e]
    errs = []
    pool_stride = 1
    if parts.shortcut.pool is not None:
        e = _pool_error(spec.shortcut.pool, parts.shortcut.pool, conv)
        if e:
            return [e]
        pool_stride = parts.shortcut.pool.stride
        pool_stride = pool_stride[0] if isinstance(pool_stride, tuple) else pool_stride
    if conv.stride[0] * pool_stride != stride:
        errs.append(f"{name} stride {conv.stride[0] * pool_stride} differs from the main "
                    f"path's {stride}")
    if conv.in_channels != cin or conv.out_channels != cout:
        errs.append(f"{name} maps {conv.in_channels}->{conv.out_channels} channels, "
                    f"expected {cin}->{cout}")
    if bn is not None:
        errs.append(_bn_error("downsample BN" if spec.kind == S.BASIC else spec.shortcut.bn,
                              bn, cout))
    return errs


def block_stride(parts: S.Parts) -> int:
    """The block's stride: the product of its stages' strides."""
    s = 1
    for st in parts.stages:
        s *= st.conv.stride[0]
    return s


def check_parts(spec: S.BlockSpec, parts: S.Parts) -> None:
    """ConversionError naming every part the fused block cannot compute as given."""
    errs = [e for e in _stage_errors(spec, parts) if e]
    if not errs:
        stride = block_stride(parts)
        if stride not in (1, 2):
            errs.append(f"the block's stride {stride} is not supported (1 or 2)")
        cin, cout = parts.stages[0].conv.in_channels, parts.stages[-1].conv.out_channels
        errs += [e for e in _shortcut_errors(spec, parts, stride, cin, cout) if e]
        errs += _gate_errors(spec, parts)
    if errs:
        raise ConversionError("; ".join(errs))
