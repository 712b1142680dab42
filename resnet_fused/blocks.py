"""A residual block's parts, matched by structure, and whether the fused block computes
them: shared by the plain computation (reference.py), FusedResidual (module.py) and
conversion (conversion.py). Imports neither of them.

Matched without importing torchvision: D2L's Residual (conv1, bn1, conv2, bn2, conv3
or None), its 3x3-projection variant, and torchvision's BasicBlock (conv1, bn1, conv2,
bn2, downsample = None or Sequential(Conv2d, BatchNorm2d)).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn


class ConversionError(ValueError):
    """A block that cannot be converted; the message says why."""


@dataclass
class BlockParts:
    conv1: nn.Conv2d
    bn1: nn.BatchNorm2d
    conv2: nn.Conv2d
    bn2: nn.BatchNorm2d
    conv3: Optional[nn.Conv2d]
    bn3: Optional[nn.BatchNorm2d]
    layout: str  # "d2l" (conv3 attribute) or "torchvision" (downsample attribute)


# nn.SyncBatchNorm (convert_sync_batchnorm, before or after fuse_model): the block
# normalises over its process group (resnet_fused/distributed.py).
BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)
_MAIN = ("conv1", "bn1", "conv2", "bn2")


def _child(block: nn.Module, name: str):
    return block._modules.get(name, getattr(block, name, None))


def looks_residual(m: nn.Module) -> bool:
    """Has the four submodules of a basic residual block (whether they fit or not)."""
    return all(_child(m, n) is not None for n in _MAIN)


def block_parts(block: nn.Module) -> BlockParts:
    """The pieces of a residual block, or ConversionError naming what does not match.

    A block that knows its own parts says so with a `_block_parts()` method
    (FusedResidual: its conv3/bn3 properties would otherwise read as a bottleneck's)."""
    own = getattr(type(block), "_block_parts", None)
    if own is not None:
        return own(block)
    missing = [n for n in _MAIN if _child(block, n) is None]
    if missing:
        raise ConversionError(f"no {', '.join(missing)} submodule(s): not a residual block")
    conv1, bn1, conv2, bn2 = (_child(block, n) for n in _MAIN)
    if "downsample" in block._modules or hasattr(block, "downsample"):
        layout = "torchvision"
        conv3, bn3 = _downsample_parts(block)
    else:
        layout = "d2l"
        conv3, bn3 = _child(block, "conv3"), None
        if _child(block, "bn3") is not None:
            raise ConversionError("has a bn3 submodule: a bottleneck block, not a basic "
                                  "residual block")
    parts = BlockParts(conv1, bn1, conv2, bn2, conv3, bn3, layout)
    check_parts(parts)
    return parts


def _downsample_parts(block: nn.Module):
    """(conv3, bn3) of a torchvision-style block: its downsample, or (None, None)."""
    ds = _child(block, "downsample")
    if _child(block, "conv3") is not None or _child(block, "bn3") is not None:
        raise ConversionError("has conv3/bn3 and downsample: a bottleneck block, "
                              "not a basic residual block")
    if ds is None:
        return None, None
    if (isinstance(ds, nn.Sequential) and len(ds) == 2
            and isinstance(ds[0], nn.Conv2d) and isinstance(ds[1], BN_TYPES)):
        return ds[0], ds[1]
    raise ConversionError(f"downsample is {type(ds).__name__}, expected "
                          "Sequential(Conv2d, BatchNorm2d)")


def _conv_geometry_error(name, conv, kernel, stride, in_ch=None):
    if not isinstance(conv, nn.Conv2d) or type(conv).forward is not nn.Conv2d.forward:
        return f"{name} is {type(conv).__name__}, expected nn.Conv2d"
    k = kernel
    pad = k // 2
    want = dict(kernel_size=(k, k), dilation=(1, 1), groups=1, padding_mode="zeros",
                stride=(stride, stride), padding=(pad, pad))
    for attr, value in want.items():
        if getattr(conv, attr) != value:
            return f"{name}.{attr} is {getattr(conv, attr)}, expected {value}"
    if in_ch is not None and conv.in_channels != in_ch:
        return f"{name} has {conv.in_channels} input channels, expected {in_ch}"
    return None


def _bn_error(name, bn, channels):
    # affine=False and track_running_stats=False are refused here, once: no fused path
    # (and no fold) has a branch for a BN without weight/bias or running statistics.
    if type(bn) not in BN_TYPES:
        return f"{name} is {type(bn).__name__}, expected nn.BatchNorm2d or nn.SyncBatchNorm"
    if bn.num_features != channels:
        return f"{name} has {bn.num_features} features, expected {channels}"
    if not bn.affine:
        return f"{name} has affine=False (no weight/bias), which is not supported"
    if not bn.track_running_stats:
        return f"{name} has track_running_stats=False, which is not supported"
    return None


def _shortcut_errors(p: BlockParts, stride: int, cin: int, cout: int) -> list:
    if p.conv3 is None:
        if stride != 1 or cin != cout:
            return [f"identity shortcut but conv1 maps {cin}->{cout} channels with "
                    f"stride {stride}: shapes would not add"]
        return []
    errs = []
    k3 = p.conv3.kernel_size[0] if isinstance(p.conv3, nn.Conv2d) else 0
    if k3 not in (1, 3):
        errs.append(f"conv3 kernel {getattr(p.conv3, 'kernel_size', '?')} is not "
                    "supported (1x1 or 3x3)")
    else:
        errs.append(_conv_geometry_error("conv3", p.conv3, k3, stride, in_ch=cin))
        if p.conv3.out_channels != cout:
            errs.append(f"conv3 has {p.conv3.out_channels} output channels, "
                        f"expected {cout}")
    if p.bn3 is not None:
        errs.append(_bn_error("downsample BN", p.bn3, cout))
    return errs


def check_parts(p: BlockParts) -> None:
    """ConversionError naming every part the fused block cannot compute as given."""
    if not isinstance(p.conv1, nn.Conv2d):
        raise ConversionError(f"conv1 is {type(p.conv1).__name__}, expected nn.Conv2d")
    stride = p.conv1.stride[0]
    cin, cout = p.conv1.in_channels, p.conv1.out_channels
    errs = [
        _conv_geometry_error("conv1", p.conv1, 3, stride),
        None if stride in (1, 2) else f"conv1 stride {stride} is not supported (1 or 2)",
        _conv_geometry_error("conv2", p.conv2, 3, 1, in_ch=cout),
        _bn_error("bn1", p.bn1, cout),
        _bn_error("bn2", p.bn2, cout),
    ]
    if getattr(p.conv2, "out_channels", cout) != cout:
        errs.append(f"conv2 has {p.conv2.out_channels} output channels, expected {cout}")
    errs += _shortcut_errors(p, stride, cin, cout)
    errs = [e for e in errs if e]
    if errs:
        raise ConversionError("; ".join(errs))
