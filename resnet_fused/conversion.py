"""fuse_model: every residual block of a model replaced by a FusedResidual."""
from __future__ import annotations

import copy
import warnings
from typing import Optional

from torch import nn

from . import backends
from .blocks import ConversionError, looks_residual
from .module import FusedResidual


def fuse_model(model: nn.Module, backend: str = "auto", inplace: bool = False) -> nn.Module:
    """Replace every residual block of `model` by a FusedResidual.

    Converts D2L Residual blocks (either projection kind) and torchvision BasicBlocks,
    found by structure. A block that looks residual but cannot be converted is left as
    it is, with a warning naming it and the reason. Returns the converted model (a deep
    copy unless inplace=True).
    """
    backends.check_name(backend)
    if not inplace:
        model = copy.deepcopy(model)
    if unconverted(model):
        converted = _try_convert("(the model itself)", model, backend)
        return converted if converted is not None else model
    for name, module in list(model.named_modules()):
        for child_name, child in list(module._modules.items()):
            if child is None or not unconverted(child):
                continue
            full = f"{name}.{child_name}" if name else child_name
            converted = _try_convert(full, child, backend)
            if converted is not None:
                module._modules[child_name] = converted
    return model


def unconverted(m: nn.Module) -> bool:
    """m looks like a residual block and is not a FusedResidual."""
    return not isinstance(m, FusedResidual) and looks_residual(m)


def _try_convert(name: str, block: nn.Module, backend: str) -> Optional[FusedResidual]:
    try:
        return FusedResidual.from_residual(block, backend=backend)
    except ConversionError as e:
        warnings.warn(f"fuse_model: left {name} ({type(block).__name__}) as it is: {e}",
                      stacklevel=3)
        return None
