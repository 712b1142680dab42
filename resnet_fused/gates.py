"""Branch gates: what a gate module computes, read off its traced graph (README.md,
Design, "Gates and pooled shortcuts").

A channel gate (timm's SEModule and EcaModule, torchvision's SqueezeExcitation,
transformers' RegNetSELayer, or any module written the same way) computes
`x * f(mean_hw(x))`: its only uses of x are the product, one pooling (a mean over H and
W, an adaptive average pool to 1x1) and x's batch and channel sizes. `channel_gate_fn`
checks that on the module's fx graph and returns `f` as a GraphModule: the same nodes
from the pooled tensor on, calling the module's own submodules (so its parameters are
the user's, under the user's keys). Fed the pooled (N, C, 1, 1) tensor `p`, the
pooling node computes p itself (the mean of one element is exact) and the sizes are
x's, so `f(p)` is the gate the module multiplies by, and the fused paths pool and
multiply in their own kernels.

A sample gate (timm's DropPath, torchvision's StochasticDepth at a non-zero rate)
multiplies each sample by mask / keep_prob in training and is the identity in eval.
`sample_gate` calls the module on ones of shape (N, 1, 1, 1): the module then makes
exactly the RNG calls it makes on the block's tensor (the same shape, dtype, device
and order), so a seeded converted model draws the same mask as the plain one, and
returns the mask itself (1 * mask is exact).

A constant scale (`y * 0.2` in the block's own forward, no module) is a gate of shape
(1, 1, 1, 1) holding the constant in float32 (float64 for float64 activations): the
plain `y * 0.2` multiplies in that precision too (a Python number is no tensor of y's
dtype), so the fused join rounds once, where the plain product does.
"""
from __future__ import annotations

import operator
import weakref
from typing import Optional

import torch
from torch import fx, nn
from torch.nn import functional as F

from .blocks import ConversionError

_MULS = {operator.mul, torch.mul}
_MEANS = {torch.mean}
_HW = ({2, 3}, {-2, -1}, {2, -1}, {-2, 3})


class NotAGate(ConversionError):
    """The module does not compute x * f(mean_hw(x)); the message says where."""


def sample_gate_error(m: nn.Module) -> Optional[str]:
    """None when m is a sample gate this package draws as the module does (timm's
    DropPath, torchvision's StochasticDepth; a rate of 0 is the identity and is dropped
    by matching before this), else why not."""
    name = type(m).__name__
    if name == "DropPath" and type(m).__module__.startswith("timm."):
        if not isinstance(getattr(m, "drop_prob", None), (int, float)):
            return "its drop_prob is not a number"
        return None
    if name == "StochasticDepth" and type(m).__module__.startswith("torchvision."):
        if getattr(m, "mode", None) not in ("row", "batch"):
            return f"its mode is {getattr(m, 'mode', None)!r}"
        return None
    return f"{name} is not a known sample gate"


def is_sample_gate(m: nn.Module) -> bool:
    return sample_gate_error(m) is None


def sample_gate(m: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The factor the sample gate `m` multiplies `y` by in this call: (N, 1, 1, 1)
    (mode "batch": (1, 1, 1, 1)), drawn with the module's own RNG calls."""
    return m(torch.ones((y.shape[0],) + (1,) * (y.dim() - 1), dtype=y.dtype,
                        device=y.device))


def _is_pool(n: fx.Node, root: nn.Module) -> bool:
    """n averages its first argument over H and W (to (N, C) or (N, C, 1, 1))."""
    args, kwargs = list(n.args), dict(n.kwargs)
    if n.op == "call_module":
        m = root.get_submodule(n.target)
        return (type(m) is nn.AdaptiveAvgPool2d and m.output_size in (1, (1, 1))
                and len(args) == 1 and not kwargs)
    if n.op == "call_function" and n.target is F.adaptive_avg_pool2d:
        size = args[1] if len(args) > 1 else kwargs.get("output_size")
        return size in (1, (1, 1), [1, 1])
    if (n.op == "call_method" and n.target == "mean") or (
            n.op == "call_function" and n.target in _MEANS):
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        extra = set(kwargs) - {"dim", "keepdim"}
        return (isinstance(dims, (tuple, list)) and set(dims) in _HW and not extra
                and len(args) <= 3)
    return False


def _shape_use(n: fx.Node) -> bool:
    """n reads x's batch or channel size only (x.shape[0], x.size(1), ...)."""
    if n.op == "call_method" and n.target == "size":
        return len(n.args) == 2 and n.args[1] in (0, 1) and not n.kwargs
    if n.op == "call_function" and n.target is getattr and n.args[1] == "shape":
        return all(u.op == "call_function" and u.target is operator.getitem
                   and u.args[1] in (0, 1) for u in n.users)
    return False


class ShallowTracer(fx.Tracer):
    """Every child a leaf: the graph of the module's own forward. Tracing runs a
    forward's Python on the module's real buffers, so a child traced into could change
    them (timm's BatchNormAct2d counts num_batches_tracked while it is traced in
    training); as leaves, the children are recorded, not run."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _trace_channel_gate(m: nn.Module) -> fx.GraphModule:
    try:
        traced = fx.GraphModule(m, ShallowTracer().trace(m))
    except Exception as e:  # noqa: BLE001: whatever stops the trace, it is no gate
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise NotAGate(f"its forward cannot be traced by torch.fx ({type(e).__name__}: "
                       f"{first})") from None
    graph = traced.graph
    xs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(xs) != 1:
        raise NotAGate("its forward takes more than one tensor")
    x = xs[0]
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    is_mul = isinstance(out, fx.Node) and (
        (out.op == "call_function" and out.target in _MULS)
        or (out.op == "call_method" and out.target == "mul")) and not out.kwargs
    if not is_mul or len(out.args) != 2 or x not in out.args or out.args[0] is out.args[1]:
        raise NotAGate("it does not return its input times a gate")
    h = out.args[1] if out.args[0] is x else out.args[0]
    while isinstance(h, fx.Node) and h.op == "call_method" and h.target == "expand_as" \
            and len(h.args) == 2 and h.args[1] is x:
        h = h.args[0]   # broadcasting the gate over x: the product broadcasts anyway
    if not isinstance(h, fx.Node):
        raise NotAGate("its gate is not computed from its input")
    keep, stack, pools = set(), [h], 0
    while stack:
        n = stack.pop()
        if n in keep:
            continue
        keep.add(n)
        for i in n.all_input_nodes:
            if i is x:
                if _is_pool(n, traced):
                    pools += 1
                elif not _shape_use(n):
                    raise NotAGate(f"its gate reads its input through `{n.name}`, not "
                                   "through a mean over H and W")
                continue
            stack.append(i)
    if x in keep or pools != 1:
        raise NotAGate("its gate does not depend on its input through exactly one mean "
                       "over H and W")
    f = fx.Graph()
    env = {x: f.placeholder("pooled")}
    for n in graph.nodes:
        if n in keep:
            env[n] = f.node_copy(n, env.__getitem__)
    f.output(env[h])
    return fx.GraphModule(m, f, class_name="ChannelGateFn")


# f is kept on the gate module itself, in its __dict__ under this name (not a submodule:
# state_dict, parameters() and .to() do not see it; deepcopy and pickle carry it with
# the submodules it calls), with the submodules it calls by target: traced once per
# module, again when one of those was replaced. A plain attribute, not a table keyed by
# module: torch.compile traces this lookup on every graph, and a weak-keyed table's
# guards broke when other entries were collected between tracing and guard building.
_ATTR = "_resnet_fused_gate_fn"


_NOT_GATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _called(m: nn.Module, fn: fx.GraphModule) -> tuple:
    return tuple((n.target, m.get_submodule(n.target)) for n in fn.graph.nodes
                 if n.op == "call_module")


def channel_gate_fn(m: nn.Module) -> fx.GraphModule:
    """`f` of the channel gate `m` (x * f(mean_hw(x))), to run on the pooled
    (N, C, 1, 1) tensor; NotAGate when m does not compute that."""
    hit = m.__dict__.get(_ATTR)
    if hit is not None:
        fn, called = hit
        try:
            if all(m.get_submodule(t) is s for t, s in called):
                return fn
        except AttributeError:
            pass
    if m in _NOT_GATES:
        raise NotAGate(_NOT_GATES[m])
    try:
        fn = _trace_channel_gate(m)
    except NotAGate as e:
        # matching asks of every module of a block that is not a known leaf: once
        _NOT_GATES[m] = str(e)
        raise
    m.__dict__[_ATTR] = (fn, _called(m, fn))
    return fn


def call_gate(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """m(t) in t's dtype. Under autocast FusedResidual runs the block in the autocast
    dtype with autocast off (module.py); the plain block's gate would have run its
    convolutions autocast, so a gate whose parameters are in another dtype than t runs
    with autocast back on, in t's dtype."""
    p = next(m.parameters(), None)
    if p is None or p.dtype == t.dtype or not t.is_floating_point():
        return m(t)
    with torch.autocast(t.device.type, dtype=t.dtype):
        out = m(t)
    return out.to(t.dtype)


def apply_gate(gp, y: torch.Tensor) -> torch.Tensor:
    """y times the gate gp (a spec.GateParts), as the plain block computes it: the
    module called on y, or y times the constant."""
    if gp.module is None:
        return y * gp.value
    return call_gate(gp.module, y)


def scale_gate(value: float, like: torch.Tensor) -> torch.Tensor:
    """The constant `value` as a (1, 1, 1, 1) gate for `like`'s branch (float32, or
    float64 for float64 `like`: the precision y * value computes in)."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return torch.full((1, 1, 1, 1), value, dtype=dtype, device=like.device)


def identity_in_eval(gp) -> bool:
    """The gate gp multiplies by 1 here: a sample gate in eval."""
    return gp.module is not None and gp.fn is None and not gp.module.training


def channel_gate(fn: nn.Module, pooled: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """f(pooled) as (N, C, 1, 1) in like's dtype; `pooled` is the (N, C) or
    (N, C, 1, 1) mean over H and W of the gated tensor."""
    n, c = like.shape[:2]
    g = call_gate(fn, pooled.reshape(n, c, 1, 1).to(like.dtype))
    if g.dim() != 4 or g.shape[2:] != (1, 1) or g.shape[0] not in (1, n) \
            or g.shape[1] not in (1, c):
        # x * g would broadcast g over H and W some other way than per (n, c): not the
        # gate the fused ops multiply by, so say so rather than compute something else
        raise RuntimeError(f"FusedResidual: the channel gate returned a gate of shape "
                           f"{tuple(g.shape)} for a branch of shape {tuple(like.shape)}; "
                           f"a channel gate must give (N, C, 1, 1) (or 1 in N or C)")
    return g
