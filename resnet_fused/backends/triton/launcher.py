"""The one way this backend launches a Triton kernel (conv.py, conv_bwd.py, bn.py, train.py).

Eager calls launch the kernel object itself; `torch.library.wrap_triton` is used only
while something traces (torch.compile, make_fx / export, fake tensors). Why not
wrap_triton always: outside a `triton_op` body (direct calls of conv2d_nhwc,
conv_dgrad, ... from tests, benchmarks or train.py's helpers) wrap_triton's eager path
prunes an autotuned kernel's configs and builds a NEW autotuner with `key=[]` on every
call, so every call benchmarks all its configs again. The plain Autotuner object keeps
its cache across calls (one autotuning per key). Inside a triton_op body called
eagerly, torch turns wrap_triton off anyway, so both routes are the same there.

Under TRITON_INTERPRET=1 wrap_triton is never called: torch 2.14 hands an interpreted
kernel back unwrapped, but torch 2.11 rejects it ("wrap_triton only works on functions
annotated with triton.jit or triton.autotune" for an InterpretedFunction, an
AttributeError on `.fn` for an autotuner around one). The ops are plain custom_ops
there (README.md, "Where the code departs"), and a shape-only call (fake or meta
tensors, e.g. a fake implementation) launches nothing: the caller allocated the
outputs, which is all a fake needs.
"""
from __future__ import annotations

import os

import torch
from torch._subclasses.fake_tensor import is_fake
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.library import wrap_triton
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _shape_only(t) -> bool:
    return isinstance(t, torch.Tensor) and (t.device.type == "meta" or is_fake(t))


def tracing(args, kwargs=None) -> bool:
    """Whether a launch with these arguments is being traced rather than run: dynamo is
    compiling, a dispatch mode is active (FunctionalTensorMode and the proxy/fake modes
    of AOTAutograd, make_fx and export), or an argument is fake, meta or functional."""
    if torch.compiler.is_compiling() or is_in_torch_dispatch_mode():
        return True
    vals = list(args) + list((kwargs or {}).values())
    return any(_shape_only(a) or isinstance(a, FunctionalTensor) or torch._is_functional_tensor(a)
               for a in vals if isinstance(a, torch.Tensor))


def launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs), through wrap_triton only while tracing (see the
    module docstring). kernel: a triton.jit function or a triton.autotune of one."""
    if INTERPRET:
        if any(_shape_only(a) for a in args) or any(_shape_only(v) for v in kwargs.values()):
            return None
        return kernel[grid](*args, **kwargs)
    if tracing(args, kwargs):
        return wrap_triton(kernel)[grid](*args, **kwargs)
    return kernel[grid](*args, **kwargs)


__all__ = ["INTERPRET", "launch", "tracing"]
