"""What a FusedResidual records for the tracers that are not torch.compile/torch.export
(README.md, "Export and tooling").

- ONNX export, either exporter (`torch.onnx.export`'s default, the dynamo exporter that
  runs torch.export, or `dynamo=False`, which traces with TorchScript): the block's
  plain computation (reference.plain_parts_forward: conv, BatchNorm, ReLU, add), which
  is the plain model's graph, so the exporter translates it with standard operators
  and folds each eval BatchNorm into its Conv as it does for the plain model. The
  switch is `torch.onnx.is_in_onnx_export()`, the flag both exporters set. The other
  mechanisms torch.onnx documents need the user to pass something (a custom
  translation table is an argument of torch.onnx.export), or reach into the
  exporter's private registry, or would have to teach ONNX each of our ops' schemas
  once per backend namespace; this one needs nothing from the user and no onnxscript.
- torch.fx (symbolic_trace, torchvision's create_feature_extractor, timm's FX feature
  nets): a FusedResidual is recorded as one call_module node, as a leaf module is, so
  the traced GraphModule calls the block itself (the fused computation) and the
  block's output is a node that feature extraction can return. No fx tracer treats
  a module outside torch.nn as a leaf by default, and the tracers of torchvision and
  timm take their leaf lists as arguments; the block makes itself one when its forward
  receives a Proxy.
- torch.jit.trace: the block's fused eval computation with its BN fold traced into the
  graph, whatever the grad mode. The trace check re-traces under torch.no_grad(); a
  decision that read the grad mode (eval while autograd records takes the unfolded
  path: module.py) or the fold cache (a cached fold would be traced as constants)
  would record another graph there. Folding inside the graph also keeps the trace
  right after a weight or running-statistics update.
- torch.jit.script: FusedResidual.__prepare_scriptable__ raises script_error(); its
  forward dispatches from Python, which TorchScript cannot compile.
"""
from __future__ import annotations

import warnings

import torch
from torch import fx

from .reference import plain_parts_forward

# One C call (torch.jit.is_tracing() is this behind a Python check for TorchScript
# compilation, which cannot be under way in an eager forward).
jit_tracing = getattr(torch._C, "_is_tracing", torch.jit.is_tracing)


def onnx_forward(block, x: torch.Tensor) -> torch.Tensor:
    """The block's plain computation, which ONNX exporters translate as they do the
    plain model's."""
    return plain_parts_forward(block.parts(), x)


def jit_forward(block, x: torch.Tensor) -> torch.Tensor:
    """The block's forward as torch.jit.trace records it: the per-call path of a traced
    call (module.py: plan made, fold traced, no grad-mode fallback). The plan's checks
    of x's shape compare sizes that the trace holds as tensors; each makes a
    TracerWarning, which says only that the trace is for this input's shape, as every
    trace is."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return block._call(x, True)


def fx_call(block, x: fx.Proxy) -> fx.Proxy:
    """The call_module node of `block` in the graph x's tracer records, as for a leaf
    module (the tracer's call_module has already entered the block's scope, so the
    node has the meta and the name that a leaf's would have)."""
    tracer = x.tracer
    path = None
    if isinstance(tracer, fx.Tracer) and getattr(tracer, "root", None) is not None:
        try:
            path = tracer.path_of_module(block)
        except NameError:  # not a submodule of the traced root
            path = None
    if not path:
        raise TypeError(
            "FusedResidual: torch.fx records a FusedResidual as one call of the block "
            "inside the model that holds it; this trace has no such call (the block is "
            "the traced root, or not a submodule of it). Trace the model or container "
            "that holds the block")
    return tracer.create_proxy("call_module", path, (x,), {})


def script_error() -> RuntimeError:
    return RuntimeError(
        "torch.jit.script cannot compile FusedResidual (resnet_fused): its forward "
        "chooses backends and kernels in Python. Use torch.compile, torch.export "
        "(resnet_fused.serving.export) or torch.jit.trace instead")
