"""Which blocks the fused pipeline computes: a block's BlockSpec by its module names
(the stand-in until conversion's dataflow matcher serves every caller) and the checks
of a resolved block (spec.Parts) against what every fused path computes. Shared by
FusedResidual (module.py), the plain computation (reference.py) and conversion
(conversion.py); imports neither of them.

By name, without importing torchvision or timm: D2L's Residual (conv1, bn1, conv2,
bn2, conv3 or None), its 3x3-projection variant, torchvision's BasicBlock and
Bottleneck and timm's (conv1, bn1, conv2, bn2 [, conv3, bn3], downsample = None or
Sequential(Conv2d, BatchNorm2d)).
"""
from __future__ import annotations

from torch import nn

from . import spec as S


class ConversionError(ValueError):
    """A block that cannot be converted; the message says why."""


# nn.SyncBatchNorm (convert_sync_batchnorm, before or after fuse_model): the block
# normalises over its process group (resnet_fused/distributed.py).
BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)
_MAIN = ("conv1", "bn1", "conv2", "bn2")
# Children a timm or torchvision block may hold besides the spec's modules, which
# compute nothing (drop_block, aa) or the ReLUs the spec places: anything else there
# (an SE module, a drop path) changes the function, and the block is not converted.
_PASSIVE = (nn.ReLU, nn.Identity)


def _child(block: nn.Module, name: str):
    return block._modules.get(name, getattr(block, name, None))


def looks_residual(m: nn.Module) -> bool:
    """Has the four submodules every residual block has (whether they fit or not)."""
    return all(_child(m, n) is not None for n in _MAIN)


def _downsample_stage(block: nn.Module):
    """The Stage of a torchvision/timm downsample, or None for the identity."""
    ds = _child(block, "downsample")
    if ds is None:
        return None
    if (isinstance(ds, nn.Sequential) and len(ds) == 2
            and isinstance(ds[0], nn.Conv2d) and isinstance(ds[1], BN_TYPES)):
        names = list(ds._modules)
        return S.Stage(f"downsample.{names[0]}", f"downsample.{names[1]}")
    raise ConversionError(f"downsample is {type(ds).__name__}, expected "
                          "Sequential(Conv2d, BatchNorm2d)")


def _check_extra_children(block: nn.Module, spec: S.BlockSpec) -> None:
    used = {p.split(".")[0] for p in spec.module_paths()} | {"downsample"}
    for name, child in block._modules.items():
        if name not in used and child is not None and not isinstance(child, _PASSIVE):
            raise ConversionError(f"has a {name} submodule ({type(child).__name__}) that "
                                  "the fused block does not compute")


def spec_from_names(block: nn.Module) -> S.BlockSpec:
    """The BlockSpec of `block` read off its child names, or ConversionError naming
    what does not match. A FusedResidual answers with its own spec."""
    own = block.__dict__.get("_spec")
    if isinstance(own, S.BlockSpec):
        return own
    missing = [n for n in _MAIN if _child(block, n) is None]
    if missing:
        raise ConversionError(f"no {', '.join(missing)} submodule(s): not a residual block")
    has_ds = "downsample" in block._modules or hasattr(block, "downsample")
    if _child(block, "bn3") is not None:
        if _child(block, "conv3") is None:
            raise ConversionError("has bn3 but no conv3")
        sc = _downsample_stage(block)
        spec = S.BlockSpec(S.BOTTLENECK, S.BOTTLENECK_STAGES, sc)
    elif has_ds:
        if _child(block, "conv3") is not None:
            raise ConversionError("has conv3 and downsample but no bn3: neither a basic "
                                  "nor a bottleneck block")
        sc = _downsample_stage(block)
        spec = S.TV_BASIC_PROJECTION if sc == S.TV_BASIC_PROJECTION.shortcut else (
            S.TV_BASIC_IDENTITY if sc is None else S.BlockSpec(S.BASIC, S.D2L_IDENTITY.stages, sc))
    else:
        spec = S.D2L_PROJECTION if _child(block, "conv3") is not None else S.D2L_IDENTITY
    _check_extra_children(block, spec)
    return spec


def spec_of(block: nn.Module) -> S.BlockSpec:
    """The one place conversion asks for a block's spec (the name-based stand-in; the
    dataflow matcher replaces it)."""
    return spec_from_names(block)


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
    if conv.stride[0] != stride:
        errs.append(f"{name} stride {conv.stride[0]} differs from the main path's {stride}")
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
    if errs:
        raise ConversionError("; ".join(errs))
