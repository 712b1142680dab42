"""fuse_model: every residual block of a model replaced by a FusedResidual.

Which modules are residual blocks is decided by their own forward: a module whose
forward adds two tensors derived from its input, with a convolution on one path
(matching.residual_add), is one, whatever its norm, activation or wrapping. Whether
it converts is matching.py's answer from its full dataflow. Never silent: every
residual block left as it is gets a warning naming the node that does not fit; so
does a module whose forward torch.fx cannot trace and that holds two convolutions
and no block found below it (whether it adds is unknown); a model in which no residual
block is found at all gets one warning saying so.
"""
from __future__ import annotations

import copy
import warnings
from typing import Callable, NamedTuple, Optional, Union

from torch import nn

from . import backends
from .blocks import ConversionError
from .matching import Untraceable, residual_add
from .module import FusedResidual

_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


class Found(NamedTuple):
    """A residual block of a model: its path, the module, and either the FusedResidual
    it is (or converts to) or the reason it is left as it is."""
    path: str
    module: nn.Module
    fused: Optional[FusedResidual]
    reason: Optional[str]


def fuse_model(model: nn.Module, backend: str = "auto", inplace: bool = False) -> nn.Module:
    """Replace every residual block of `model` by a FusedResidual.

    A block converts when its traced forward is exactly a fused block's computation
    (README.md, "What converts"): D2L's Residual (either projection kind),
    torchvision's and timm's BasicBlock and Bottleneck, RegNet X blocks, transformers'
    ResNet layers, and any block written the same way, at any nesting of modules. A
    residual block that computes anything else is left as it is, with a warning naming
    it and the part that does not fit. Returns the converted model (a deep copy unless
    inplace=True); its state_dict has exactly the original keys.
    """
    backends.check_name(backend)
    if not inplace:
        model = copy.deepcopy(model)
    found = []

    def on_block(f: Found):
        found.append(f)
        if f.reason is not None:
            warnings.warn(f"fuse_model: left {f.path or '(the model itself)'} "
                          f"({type(f.module).__name__}) as it is: {f.reason}", stacklevel=4)

    replaced = walk(model, backend, on_block, replace=True)
    if not found:
        warnings.warn(f"fuse_model: found no residual block in {type(model).__name__} "
                      "(no module adds two tensors derived from its input with a "
                      "convolution on one path): nothing was converted", stacklevel=2)
    return replaced if replaced is not None else model


def walk(model: nn.Module, backend: str, on_block: Callable[[Found], None],
         replace: bool = False, skip=()) -> Optional[FusedResidual]:
    """Call on_block for every residual block of `model`, outermost first, converted or
    not. replace: put each FusedResidual in its parent (returns the model's own
    replacement when the model itself is a block). Modules of a type in `skip` are
    not entered."""
    new, _ = _visit(model, "", backend, on_block, replace, tuple(skip))
    return new


def _is_plain_container(m: nn.Module) -> bool:
    # Their forward (Sequential's: each child in turn; the others have none) adds
    # nothing of its own.
    return isinstance(m, _CONTAINERS) or type(m).forward is nn.Sequential.forward


def _convs(m: nn.Module) -> int:
    return sum(isinstance(c, nn.modules.conv._ConvNd) for c in m.modules())


def _visit(module, name, backend, on_block, replace, skip):
    """(module's replacement or None, whether module or a descendant is a block)."""
    if isinstance(module, FusedResidual):
        on_block(Found(name, module, module, None))
        return None, True
    if isinstance(module, skip) or not _convs(module):
        return None, False
    untraceable, is_block = None, False
    if not _is_plain_container(module):
        try:
            is_block = residual_add(module) is not None
        except Untraceable as e:
            is_block, untraceable = False, str(e)
        if is_block or untraceable is not None:
            try:
                fused = FusedResidual.from_residual(module, backend=backend)
            except ConversionError as e:
                reason = str(e)
            else:
                on_block(Found(name, module, fused, None))
                return (fused if replace else None), True
            if is_block:
                on_block(Found(name, module, None, reason))
    holds_blocks = False
    for child_name, child in list(module._modules.items()):
        if child is None:
            continue
        new, found = _visit(child, f"{name}.{child_name}" if name else child_name,
                            backend, on_block, replace, skip)
        holds_blocks |= found
        if new is not None:
            module._modules[child_name] = new
    if untraceable is not None and not holds_blocks and _convs(module) >= 2:
        # Whether it adds is unknown: a block in it may be left, so say so.
        on_block(Found(name, module, None, reason))
        return None, True
    return None, holds_blocks or is_block


def left_unconverted(model: nn.Module, skip=()) -> list:
    """Paths of the residual blocks of `model` that are not FusedResidual (what
    fuse_model would warn about, or convert if run again)."""
    out = []
    walk(model, "auto", lambda f: out.append(f.path or "(the model itself)")
         if f.fused is None or f.fused is not f.module else None, skip=skip)
    return out
