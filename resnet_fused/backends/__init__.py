"""Backend registry: "torch", "native", "triton", "eager", and the "auto" choice among them.

Backends are imported lazily, on first use, so `import resnet_fused` never needs the
extension, Triton or a GPU, and never queries CUDA.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from .base import Backend
from .preference import preferred_order

NAMES = ("torch", "native", "triton", "eager")
CHOICES = ("auto",) + NAMES

# name -> (module, class) imported on first use.
_WHERE = {
    "torch": ("resnet_fused.backends.composite", "TorchBackend"),
    "native": ("resnet_fused.backends.native", "NativeBackend"),
    "triton": ("resnet_fused.backends.triton", "TritonBackend"),
    "eager": ("resnet_fused.backends.eager", "EagerBackend"),
}
_INSTANCES: dict[str, Backend] = {}
_IMPORT_ERRORS: dict[str, str] = {}


class BackendUnavailable(RuntimeError):
    """Raised when the backend asked for cannot run here; the message says why."""


def _load(name: str) -> Optional[Backend]:
    if name in _INSTANCES:
        return _INSTANCES[name]
    if name in _IMPORT_ERRORS:
        return None
    module, cls = _WHERE[name]
    try:
        backend = getattr(importlib.import_module(module), cls)()
    except Exception as e:  # an optional dependency is missing or broken
        _IMPORT_ERRORS[name] = f"{type(e).__name__}: {e}"
        return None
    _INSTANCES[name] = backend
    return backend


def check_name(name: str) -> str:
    """Validate a backend name and import what it may use.

    Called when a FusedResidual is built (always eager code), so that forward, which
    torch.compile traces, finds the backends already imported: Dynamo cannot trace an
    import."""
    if name not in CHOICES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(CHOICES)}")
    for n in (NAMES if name == "auto" else ("torch", name)):
        _load(n)
    return name


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """None when backend `name` can run on `device`, else why not."""
    backend = _load(name)
    if backend is None:
        return f"the {name} backend could not be imported ({_IMPORT_ERRORS[name]})"
    return backend.unavailable_reason(device)


def get(name: str, device: torch.device) -> Backend:
    """The backend `name` for `device`, or BackendUnavailable saying why not."""
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} is not available on {device}: {reason}")
    return _INSTANCES[name]


def available(device) -> list[str]:
    """Names of the backends that can run on `device` (a torch.device or string)."""
    device = torch.device(device)
    return [n for n in NAMES if unavailable_reason(n, device) is None]


def choose(device: torch.device, dtype: torch.dtype, training: bool,
           shape_key: Optional[str] = None, parts=None) -> Backend:
    """The "auto" choice for this device, dtype, mode and block shape.

    On CPU: the eager backend (PyTorch's own kernels in training, BN folded in eval:
    nothing fused is faster there; resnet_fused/backends/eager.py).
    On CUDA: the first available backend of the measured preference order
    (resnet_fused/backends/preference.py; measured.json from benchmark results) that
    takes the dtype and, given `parts` (a spec.Parts), the block.
    """
    for name in preferred_order(device, dtype, training, shape_key):
        backend = _load(name)
        if backend is None or backend.unavailable_reason(device) is not None:
            continue
        if backend.unsupported_dtype_reason(dtype, device) is not None:
            continue
        if parts is not None and backend.unsupported_block_reason(parts, training):
            continue
        return backend
    return get("torch", device)


__all__ = [
    "Backend", "BackendUnavailable", "NAMES", "CHOICES",
    "available", "check_name", "choose", "get", "unavailable_reason",
]
