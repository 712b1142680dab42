"""What FusedResidual decides once per input signature (README.md, Design).

A call's signature is what these decisions read: the shape, strides, dtype and device
of x, the backend name asked for, the BN modes, whether autocast cast x, and the
module's conv1 with the dtype and device of its weight. From it follow the checks of
x against the module (each failure a clear error, raised before anything is kept),
the memory format of the output, the mode (training, eval, or a mix of BN modes) and
the backend ("auto": the measured choice, resnet_fused/backends/preference.py). That
is a Plan. FusedResidual keeps the plans of the signatures it has seen, so a repeated
call costs a tuple and a dict lookup; under torch.compile or torch.export a plan is
made on every call, which the tracer runs once per graph (and `auto` answers as in
eager: preference._cuda_order is a constant result).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import backends
from .backends.base import Backend
from .backends.preference import block_shape_key
from .blocks import block_stride
from .ops import memory_format_of

# Signatures one block remembers; past that the table starts over (a model fed many
# batch sizes re-plans now and then instead of growing without bound).
PLAN_CACHE_SIZE = 16

TRAIN, EVAL, MIXED = "train", "eval", "mixed"
# An empty batch (N = 0; detection code feeds them): the plain computation, which
# returns the empty output and does to the BN modules what nn.BatchNorm2d does with
# one (in training: num_batches_tracked counts it, the running statistics stay).
EMPTY = "empty"


@dataclass(frozen=True)
class Plan:
    backend: Backend
    memory_format: torch.memory_format
    copy: bool   # x is not yet contiguous in memory_format: one .contiguous() per call
    mode: str    # TRAIN, EVAL, MIXED (some BNs train, some not) or EMPTY (N = 0):
                 # the last two take the plain path


def check_input(block, x, *, dtype: bool = True) -> None:
    """The errors of x against the block, each naming what is wrong (dtype=False: the
    dtype is not compared with the parameters', as under autocast)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"FusedResidual expects a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"FusedResidual expects a dense (strided) tensor, got layout "
                        f"{x.layout}")
    if x.dim() != 4:
        raise ValueError(f"FusedResidual expects a 4-D input (N, C, H, W), got a "
                         f"{x.dim()}-D tensor of shape {tuple(x.shape)}")
    if x.shape[1] != block.in_channels:
        raise ValueError(f"FusedResidual expects {block.in_channels} input channels, got "
                         f"input of shape {tuple(x.shape)} with {x.shape[1]} channels")
    if not x.is_floating_point():
        raise TypeError(f"FusedResidual expects a floating-point input, got {x.dtype}")
    w = block.parts().stages[0].conv.weight
    if x.device != w.device:
        raise RuntimeError(f"FusedResidual: input is on {x.device} but the module's "
                           f"parameters are on {w.device}; move one with .to()")
    if min(x.shape[1:]) == 0:  # an empty batch (N = 0) is served: Plan.mode EMPTY
        raise ValueError(f"FusedResidual: input of shape {tuple(x.shape)} is empty")
    if dtype and x.dtype != w.dtype:
        raise TypeError(f"FusedResidual: input dtype {x.dtype} does not match the "
                        f"module's parameter dtype {w.dtype}; convert the module "
                        f"(e.g. .to({x.dtype})) or run under torch.autocast")


def _backend_for(block, parts, x: torch.Tensor, training: bool) -> Backend:
    """The backend that computes this call: block.backend, or auto's choice (which
    skips a backend that declines this block: unsupported_block_reason)."""
    if block.backend == "auto":
        key = block_shape_key(x.shape, parts)
        return backends.choose(x.device, x.dtype, training, key, parts)
    backend = backends.get(block.backend, x.device)
    reason = backend.unsupported_dtype_reason(x.dtype, x.device)
    if reason is not None:
        raise TypeError(f"FusedResidual(backend={block.backend!r}): {reason}; use "
                        "backend='torch' for this dtype")
    reason = backend.unsupported_block_reason(parts, training)
    if reason is not None:
        raise ValueError(f"FusedResidual(backend={block.backend!r}): {reason}; use "
                         "backend='auto' (it takes a backend that computes this block) "
                         "or 'torch'")
    return backend


def make_plan(block, x: torch.Tensor, modes: tuple, autocast: bool = False,
              parts=None) -> Plan:
    """The Plan of a call (x not yet in its memory format), or the error that x has.
    autocast: x was cast to the autocast dtype, which the parameters need not have.
    parts: block.parts() when the caller has it."""
    check_input(block, x, dtype=not autocast)
    if parts is None:
        parts = block.parts()
    mode = TRAIN if all(modes) else MIXED if any(modes) else EVAL
    # Resolved (and the dtype checked) on every path, so a backend that cannot take
    # this input says so even where the plain path would serve it.
    backend = _backend_for(block, parts, x, mode == TRAIN)
    if x.shape[0] == 0:
        mode = EMPTY
    if mode == TRAIN:
        n, _, h, w = x.shape
        s = block_stride(parts)
        if n * ((h - 1) // s + 1) * ((w - 1) // s + 1) <= 1:
            raise ValueError("Expected more than 1 value per channel when training, got "
                             f"input size {tuple(x.shape)} (BatchNorm needs N*H*W > 1)")
    fmt = memory_format_of(x)
    return Plan(backend, fmt, not x.is_contiguous(memory_format=fmt), mode)
