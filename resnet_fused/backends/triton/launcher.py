"""The one way this backend launches a Triton kernel (conv.py, conv_bwd.py, bn.py).

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
there (README.md, Design, "The op layer"), and a shape-only call (fake or meta
tensors, e.g. a fake implementation) launches nothing: the caller allocated the
outputs, which is all a fake needs. An autotuned kernel whose config pruning leaves
one config for the call runs that config on the un-tuned kernel (`_sole_config`):
benchmarking needs a GPU driver the interpreter lacks ("0 active drivers"), and
triton 3.6's Autotuner benchmarks whatever its prune leaves, even one config, as soon
as its list holds two (3.8 skips a sole survivor). That is how the conv forward takes
its per-shape interpreter tile (conv.py, Configurations).
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch._subclasses.fake_tensor import is_fake
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.library import wrap_triton
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from ...ops import define_op
from ...schemas import NAMESPACES

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _language_interpreted() -> bool:
    """Whether triton.language's own jit helpers (tl.cdiv, tl.sum, ...) are bound to the
    interpreter. Triton decides that once, when triton.language is first imported,
    reading TRITON_INTERPRET then; torch._dynamo imports it (so torch.compile and
    `import resnet_fused` do). Kernels defined under the interpreter that call helpers
    bound to the compiler fail with "Cannot call @triton.jit'd outside of the scope of a
    kernel"."""
    import triton.language.standard as std
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # a Triton without an interpreter binds nothing to one
        return False
    return isinstance(std.cdiv, InterpretedFunction)


# Kernels run under the interpreter only when both they and Triton's helpers were bound
# to it (TritonBackend.unavailable_reason names the case where they differ).
LANGUAGE_INTERPRETED = _language_interpreted()
NS = NAMESPACES["triton"]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the activations this backend takes


def define_triton_op(name: str, fn):
    """Define NS::name (schemas.py) from `fn` with ops.define_op: a triton_op, which
    torch.compile traces into, where the kernels are compiled for a GPU; a custom_op
    with the shared fake under TRITON_INTERPRET=1, whose kernels cannot be traced."""
    return define_op(NS, name, fn, traceable_triton=not INTERPRET)


def _tensors(args, kwargs):
    """The distinct tensors among a launch's arguments: the launchers pass one tensor
    again for each absent operand (a K1 conv launch has 15 tensor arguments, 4 tensors),
    and each is checked once on this per-launch path."""
    return {id(a): a for a in (*args, *(kwargs or {}).values())
            if isinstance(a, torch.Tensor)}.values()


def _shape_only(t: torch.Tensor) -> bool:
    return t.is_meta or is_fake(t)


def tracing(args, kwargs=None) -> bool:
    """Whether a launch with these arguments is being traced rather than run: dynamo is
    compiling, a dispatch mode is active (FunctionalTensorMode and the proxy/fake modes
    of AOTAutograd, make_fx and export), or an argument is fake, meta or functional."""
    if torch.compiler.is_compiling() or is_in_torch_dispatch_mode():
        return True
    return any(_shape_only(a) or isinstance(a, FunctionalTensor) or torch._is_functional_tensor(a)
               for a in _tensors(args, kwargs))


def device_guard(tensors):
    """torch.cuda.device(d) for the CUDA device d of the launch's tensors, a null context
    when none is on CUDA (the interpreter's CPU tensors). An eager Triton launch runs on
    torch.cuda.current_device(), not on its arguments' device, so without the guard a
    block on cuda:1 called while cuda:0 is current launches on the wrong GPU (reading
    another device's memory, or failing). Asks torch.cuda nothing for CPU tensors."""
    dev = None
    for t in tensors:
        if t.device.type == "cuda":
            assert dev is None or t.device == dev, (
                f"one Triton launch with tensors on {dev} and {t.device}")
            dev = t.device
    return torch.cuda.device(dev) if dev is not None else contextlib.nullcontext()


def _sole_config(kernel, args, kwargs):
    """(kernel, kwargs) to launch under the interpreter: for an Autotuner whose configs
    (after its early_config_prune, called as the Autotuner calls it) are one, its
    un-tuned kernel with that config's meta-parameters; anything else unchanged (an
    autotuner left with several configs benchmarks them: a test's stub benchmark)."""
    from triton.runtime.autotuner import Autotuner
    if not isinstance(kernel, Autotuner):
        return kernel, kwargs
    configs = kernel.configs
    if len(configs) > 1 and kernel.early_config_prune is not None:
        configs = kernel.early_config_prune(configs, dict(zip(kernel.arg_names, args)),
                                            **kwargs)
    if len(configs) != 1 or configs[0].pre_hook is not None:
        return kernel, kwargs
    return kernel.fn, {**kwargs, **configs[0].all_kwargs()}


def launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs), through wrap_triton only while tracing (see the
    module docstring), on its tensors' device (device_guard). Traced launches take no
    guard here: the compiled code (Inductor) guards each kernel with its device itself.
    kernel: a triton.jit function or a triton.autotune of one."""
    tensors = _tensors(args, kwargs)
    if INTERPRET:
        if any(_shape_only(a) for a in tensors):
            return None
        kernel, kwargs = _sole_config(kernel, args, kwargs)
    elif tracing(args, kwargs):
        return wrap_triton(kernel)[grid](*args, **kwargs)
    with device_guard(tensors):
        return kernel[grid](*args, **kwargs)


def declare_kernels(namespace: str, modules) -> int:
    """List every Triton kernel defined in `modules` as launched by every triton_op of
    `namespace`, in torch's registry of the kernels each triton_op runs. Returns how
    many (op, kernel) pairs were added.

    Why: torch fills that registry by reading a triton_op's source for
    `wrap_triton(<kernel name>)` calls, which launch() hides behind a parameter, and
    the AOTAutograd compile cache hashes the source of the listed kernels: without the
    list, an edited kernel could be served a stale cached compilation. Listing every
    kernel of the backend for every op errs on the safe side (an edit invalidates more
    than it must). The registry is torch-internal (torch._library.triton, present in
    2.11 and 2.14): a torch without it is left alone.
    """
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    try:  # the interpreter's kernels (the registry has no entries for its custom_ops)
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        InterpretedFunction = JITFunction

    try:
        import torch._library.triton as tlib
    except ImportError:
        return 0
    registry = getattr(tlib, "triton_ops_to_kernels", None)
    if not isinstance(registry, dict):
        return 0
    kernels = [obj for mod in modules for obj in vars(mod).values()
               if isinstance(obj, (JITFunction, Autotuner, InterpretedFunction))]
    added = 0
    for name, known in registry.items():
        if not name.startswith(namespace + "::"):
            continue
        for k in kernels:
            if all(k is not j for j in known):
                known.append(k)
                added += 1
    return added


__all__ = ["DTYPES", "INTERPRET", "LANGUAGE_INTERPRETED", "NS", "declare_kernels",
           "define_triton_op", "device_guard", "launch", "tracing"]
