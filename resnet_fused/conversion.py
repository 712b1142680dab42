"""fuse_model: every residual block of a model replaced by a FusedResidual.

Which modules are tried is decided by structure (a module holding at least two
convolutions and two BatchNorms, directly or through plain nn.Sequential children);
whether one converts, by what its forward computes (matching.py). A module that is
tried and left as it is gets a warning with the reason, unless it only holds blocks
(the model itself, a stage): then its blocks answer for themselves.
"""
from __future__ import annotations

import copy
import warnings
from torch import nn

from . import backends
from .blocks import ConversionError, is_frozen_bn
from .module import FusedResidual

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def fuse_model(model: nn.Module, backend: str = "auto", inplace: bool = False) -> nn.Module:
    """Replace every residual block of `model` by a FusedResidual.

    A block converts when its traced forward is exactly a fused block's computation
    (README.md, "What converts"): D2L's Residual (either projection kind),
    torchvision's and timm's BasicBlock and Bottleneck, and any block written the same
    way. A block that computes anything else is left as it is, with a warning naming it
    and the part that does not fit. Returns the converted model (a deep copy unless
    inplace=True); its state_dict has exactly the original keys.
    """
    backends.check_name(backend)
    if not inplace:
        model = copy.deepcopy(model)
    converted, _ = _fuse(model, "", backend)
    return converted if converted is not None else model


def _fuse(module: nn.Module, name: str, backend: str):
    """(module's replacement or None, whether module or a descendant is a block)."""
    reason = None
    if is_candidate(module):
        try:
            return FusedResidual.from_residual(module, backend=backend), True
        except ConversionError as e:
            reason = e
    holds_blocks = False
    for child_name, child in list(module._modules.items()):
        if child is None:
            continue
        if isinstance(child, FusedResidual):
            holds_blocks = True
            continue
        new, found = _fuse(child, f"{name}.{child_name}" if name else child_name, backend)
        holds_blocks |= found
        if new is not None:
            module._modules[child_name] = new
    if reason is not None and not holds_blocks:
        warnings.warn(f"fuse_model: left {name or '(the model itself)'} "
                      f"({type(module).__name__}) as it is: {reason}", stacklevel=3)
    return None, holds_blocks or reason is not None


def _layers(module: nn.Module):
    """module's children, those of plain containers flattened (a block's downsample)."""
    for child in module._modules.values():
        if isinstance(child, _CONTAINERS):
            yield from _layers(child)
        elif child is not None:
            yield child


def is_candidate(m: nn.Module) -> bool:
    """m might be a residual block: not a container or FusedResidual, and holding two
    convolutions and two BatchNorms, frozen ones included (whether it converts is
    matching.py's answer)."""
    if isinstance(m, _CONTAINERS + (FusedResidual,)):
        return False
    convs = bns = 0
    for child in _layers(m):
        convs += isinstance(child, nn.Conv2d)
        bns += isinstance(child, nn.modules.batchnorm._BatchNorm) or is_frozen_bn(child)
    return convs >= 2 and bns >= 2


def left_unconverted(model: nn.Module, skip=()) -> list:
    """Names of the blocks fuse_model would try and that are not FusedResidual: the
    candidates holding no other candidate nor FusedResidual (not the model, a stage)."""
    out = []

    def visit(m: nn.Module, name: str) -> bool:
        if isinstance(m, FusedResidual):
            return True
        if isinstance(m, skip):
            return False
        below = False
        for child_name, child in m._modules.items():
            if child is not None:
                below |= visit(child, f"{name}.{child_name}" if name else child_name)
        if is_candidate(m) and not below:
            out.append(name or "(the model itself)")
            return True
        return below

    visit(model, "")
    return out

