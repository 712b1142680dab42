"""Export a fused model for serving, and load an AOTInductor package of it.

    from resnet_fused import serving
    ep = serving.export(fused.eval(), (x,))             # torch.export, dynamic batch
    path = torch._inductor.aoti_compile_and_package(ep, package_path="model.pt2")
    # in the serving process:
    runner = serving.load_package("model.pt2")          # registers our ops, then loads
    y = runner(x)

Plain `torch.export.export(fused.eval(), (x,))` works too: a FusedResidual in eval
exports its folded ops (conv_bias_relu, conv_bias_shortcut_relu of the block's
backend). `export` adds the dynamic batch dimension and checks that no block fell
back to plain ops. A package refers to our ops by name, so the process that loads
it must have them registered: `load_package` does that (the C++ extension for the
native backend, the Python ops for torch).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from . import backends
from .module import FusedResidual
from .schemas import NAMESPACES as _BACKEND_NAMESPACES

# The op namespaces of every backend (resnet_fused/schemas.py).
NAMESPACES = tuple(_BACKEND_NAMESPACES.values())

# The folded eval ops: one per stage, the last one the join (a gated block's join is
# gate_shortcut_relu, schemas.GATE_OPS; its branch conv_bias_pool is not counted).
_EVAL_OPS = ("conv_bias_relu", "conv_bias_shortcut_relu", "gate_shortcut_relu")


def eval_ops_of(block: FusedResidual) -> int:
    """Fused ops a block exports: conv_bias_relu per stage but the last, and
    conv_bias_shortcut_relu (two for a basic block, three for a bottleneck)."""
    return len(block._spec.stages)


def fused_ops(program) -> list[str]:
    """The names of this package's ops called in an ExportedProgram or GraphModule's
    graph, in order (e.g. 'resnet_fused.conv_bias_relu.default')."""
    graph = program.graph if hasattr(program, "graph") else program.graph_module.graph
    names = []
    for node in graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            if node.target.namespace in NAMESPACES:
                names.append(str(node.target))
    return names


def export(model: nn.Module, args: tuple, *, dynamic_batch: bool = True,
           max_batch: Optional[int] = None, strict: bool = False):
    """torch.export.export of a model in eval mode, with the batch dimension of the
    first argument dynamic (when `dynamic_batch`), checked to keep every FusedResidual
    on its fused ops (RuntimeError naming the count otherwise)."""
    if not isinstance(args, tuple) or not args or not isinstance(args[0], torch.Tensor):
        raise TypeError("serving.export: args must be a tuple whose first element is the "
                        f"input tensor, got {type(args).__name__}")
    blocks = [m for m in model.modules() if isinstance(m, FusedResidual)]
    training = [n or "(the model)" for n, m in model.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if training:
        shown = ", ".join(training[:4]) + (", ..." if len(training) > 4 else "")
        raise ValueError(f"serving.export: call model.eval() first; {shown} would export "
                         "training-mode BatchNorm (batch statistics)")
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=max_batch)
        dynamic_shapes = ({0: batch},) + (None,) * (len(args) - 1)
    program = torch.export.export(model, args, dynamic_shapes=dynamic_shapes, strict=strict)
    # The folded eval ops only: a block on its unfolded paths (plain ops, or the
    # frozen-BN path's bn_frozen_act) would be served unfolded.
    found = sum(n.split(".")[1] in _EVAL_OPS for n in fused_ops(program))
    expected = sum(map(eval_ops_of, blocks))
    if found < expected:
        raise RuntimeError(
            f"serving.export: the exported graph calls {found} fused eval op(s) for "
            f"{len(blocks)} FusedResidual block(s) (expected {expected}, one per "
            "stage): some blocks were exported as plain ops or unfolded")
    return program


def register_ops() -> list[str]:
    """Import every backend that imports here, so its ops are registered; returns the
    names of those that could not be imported, with why."""
    missing = []
    for name in backends.NAMES:
        # Importing a backend registers its ops; a backend unavailable only for lack
        # of a GPU (triton on CPU) still registers them.
        reason = backends.unavailable_reason(name, torch.device("cpu"))
        if reason is not None and ("could not be imported" in reason
                                   or "is not built" in reason):
            missing.append(f"{name}: {reason}")
    return missing


def load_package(path: str, device_index: int = -1):
    """torch._inductor.aoti_load_package after registering this package's ops, so an
    AOTInductor package of a fused model runs in a fresh process."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"serving.load_package: no such package {path!r}")
    missing = register_ops()
    try:
        return torch._inductor.aoti_load_package(path, device_index=device_index)
    except RuntimeError as e:
        if "Could not find schema" in str(e) and missing:
            raise RuntimeError(f"{e}: the package calls ops of a backend that is not "
                               f"available here ({'; '.join(missing)})") from e
        raise
