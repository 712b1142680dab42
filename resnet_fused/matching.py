"""What a block computes, read off its traced dataflow (README.md, "What converts").

`spec_of(block)` traces the block's forward with torch.fx through any nesting of
modules (torchvision's Conv2dNormActivation and BottleneckTransform, transformers'
ResNetConvLayer and ResNetShortCut, timm's ConvNormAct, plain nn.Sequential): every
module is traced into except the leaves whose computation is known or irrelevant (the
convolutions, the BN types and composite BNs (leaves.py), activations, identity-like
modules, torch.nn's own modules, and any module holding no normalisation layer: an
SE gate or a drop path stays one node, named as the user wrote it). A module traced
into must not branch on its `training` flag either. The block is accepted only when
its graph is exactly one of the computations the fused block performs:

    out = relu(stage_k(... stage_1(x)) + shortcut(x))
    stage    = conv -> BN -> ReLU (every stage but the last: conv -> BN)
    shortcut = x | conv(x) | BN(conv(x))

with two stages (basic block) or three (bottleneck), a stage's output optionally
multiplied by gates (spec.Gate: a channel or sample gate module, or a Python number:
a constant scale). ReLU may be written as nn.ReLU
(in place or not, one module reused), F.relu, torch.relu, torch.relu_ or .relu_(), or
be a composite BN's own activation; the add as +, +=, torch.add or .add_ (alpha 1).
Modules that compute nothing fall away (nn.Identity, dropout with p=0, a drop path of
rate 0). Everything else, and every parameter or buffer of the block that the fused
block would not use, raises ConversionError naming the node that does not fit; so does
a forward that torch.fx cannot trace or that branches on `self.training` (one trace
must hold in both modes). The spec names each module by its path inside the block
("layer.0.convolution"), so state_dict keys stay.

`residual_add(module)` answers the question before it: does this module's own forward
add two tensors derived from its input with a convolution on one path (a residual
block, whether or not it converts)? conversion.py asks it of every module.
"""
from __future__ import annotations

import operator
from typing import NamedTuple

import torch
from torch import fx, nn
from torch.nn import functional as F

from . import spec as S
from . import blocks
from .blocks import ConversionError, is_bn
from .gates import NotAGate, ShallowTracer, channel_gate_fn, is_sample_gate
from .leaves import composite_bn

_ADDS = {operator.add, operator.iadd, torch.add}
_RELUS = {F.relu, torch.relu, torch.relu_, F.relu_}
_MULS = {operator.mul, operator.imul, torch.mul}
_INPLACE_FUNCS = {operator.iadd, torch.relu_, F.relu_}
# How the user wrote an operator: `y += x` is recorded as operator.iadd.
_OPERATORS = {operator.add: "+", operator.iadd: "+=", operator.mul: "*", operator.imul: "*=",
              operator.sub: "-", operator.truediv: "/", operator.neg: "-x"}
_KNOWN_SPECS = (S.D2L_IDENTITY, S.D2L_PROJECTION, S.TV_BASIC_PROJECTION,
                S.TV_BOTTLENECK_IDENTITY, S.TV_BOTTLENECK_PROJECTION)


# --------------------------------------------------------------------------- tracing
class _Proxy(fx.Proxy):
    # fx's Proxy has no __iadd__, so `y += x` would trace as `y = y + x` and a write
    # into the block's input would go unseen; record it as the in-place add it is.
    def __iadd__(self, other):
        return self.tracer.create_proxy("call_function", operator.iadd, (self, other), {})


def _is_norm(m: nn.Module) -> bool:
    """A normalisation layer of any kind (BN, GroupNorm, LayerNorm, a frozen BN...)."""
    return (isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
                           nn.LocalResponseNorm))
            or blocks.is_bn(m) or "Norm" in type(m).__name__)


def _traced_into(m: nn.Module) -> bool:
    """Whether tracing goes inside `m` (else `m` is one node of the graph): plain
    nn.Sequential always; otherwise a module that is not a known leaf nor one of
    torch.nn's own and that holds a normalisation layer, so may hold part of a stage."""
    if type(m) is nn.Sequential:
        return True
    if not m._modules or type(m).__module__.startswith("torch.nn.") or not any(
            _is_norm(c) for c in m.modules() if c is not m):
        return False
    return _module_op(m, (None,), {}) == "other"   # a gate holding a BN stays one node


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return not _traced_into(m)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)


class _TrainingBranch(Exception):
    pass


class _TrainingProbe:
    """Stands in for `training` of the block and of each module traced into: a forward
    that branches on it computes differently in training and eval, which one trace
    cannot show."""

    def __init__(self, path: str, module: nn.Module):
        self.where = f"`{path}` ({type(module).__name__})" if path else "its forward"

    def __bool__(self):
        raise _TrainingBranch(self.where)


def _trace(block: nn.Module) -> fx.Graph:
    probed = {}
    for path, m in block.named_modules():
        if (m is block or _traced_into(m)) and id(m) not in probed:
            probed[id(m)] = (m, m.__dict__.get("training", True))
            m.__dict__["training"] = _TrainingProbe(path, m)
    try:
        return _Tracer().trace(block)
    except _TrainingBranch as e:
        where = e.args[0]
        where = where if where == "its forward" else f"the forward of {where}"
        raise ConversionError(f"{where} branches on self.training (it computes "
                              "differently in training and eval), which a fused block "
                              "does not") from None
    except Exception as e:  # noqa: BLE001: whatever stops the trace, the block stays
        raise ConversionError(f"its forward cannot be traced by torch.fx "
                              f"({_first_line(e)}), so what it computes is "
                              "unknown") from None
    finally:
        for m, training in probed.values():
            m.__dict__["training"] = training


def _first_line(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"


# --------------------------------------------------------------------------- nodes
class _Op(NamedTuple):
    kind: str                 # "input", "conv", "bn", "relu", "add", "identity", "pool",
    #                           "channel_gate", "sample_gate", "scale", "other"
    inputs: tuple             # the tensor operands (fx Nodes)
    inplace: bool = False     # writes into inputs[0]
    value: float = None       # a "scale"'s constant


def _is_identity(m: nn.Module) -> bool:
    if type(m) is nn.Identity:
        return True
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return m.p == 0
    # timm's DropPath (timm.layers.DropPath), named rather than imported: rate 0 (or
    # None) returns its input in both modes.
    return type(m).__name__ == "DropPath" and not getattr(m, "drop_prob", 1)


def _module_op(m: nn.Module, args: tuple, kwargs: dict) -> str:
    if kwargs or len(args) != 1:
        return "other"
    if isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward:
        return "conv"
    if is_bn(m):  # BatchNorm2d, SyncBatchNorm, a composite or a frozen BN (blocks.py)
        return "bn"
    if isinstance(m, nn.ReLU) and type(m).forward is nn.ReLU.forward:
        return "relu"
    if _is_identity(m):
        return "identity"
    if type(m) is nn.AvgPool2d:   # a shortcut's pool (ResNet-D); blocks.py checks it
        return "pool"
    if is_sample_gate(m):
        return "sample_gate"
    if type(m).__module__.startswith("torch.nn.") and type(m) is not nn.Sequential:
        return "other"            # torch.nn's own modules are no gates
    try:
        channel_gate_fn(m)        # x * f(mean_hw(x)) (gates.py; traced once per module)
    except NotAGate:
        return "other"
    return "channel_gate"


def _classify(block: nn.Module, n: fx.Node) -> _Op:
    args, kwargs = n.args, dict(n.kwargs)
    if n.op == "placeholder":
        return _Op("input", ())
    if n.op == "call_module":
        m = block.get_submodule(n.target)
        kind = _module_op(m, args, kwargs)
        inplace = kind == "relu" and m.inplace
        return _Op(kind, args if kind != "other" else _nodes(args, kwargs), inplace)
    relu_call = (n.op == "call_function" and n.target in _RELUS) or (
        n.op == "call_method" and n.target in ("relu", "relu_"))
    if relu_call:
        inplace = kwargs.pop("inplace", False)
        if len(args) == 2 and n.op == "call_function" and isinstance(args[1], bool):
            args, inplace = args[:1], args[1]
        if len(args) == 1 and not kwargs and isinstance(args[0], fx.Node):
            inplace = bool(inplace) or n.target in _INPLACE_FUNCS or n.target == "relu_"
            return _Op("relu", args, inplace)
    mul_call = (n.op == "call_function" and n.target in _MULS) or (
        n.op == "call_method" and n.target in ("mul", "mul_"))
    if mul_call and not kwargs and len(args) == 2:
        # A tensor times a Python number (a constant scale of the branch); a number
        # that is a bool, or a tensor (a learnt scale), is no constant gate.
        node, k = (args if isinstance(args[0], fx.Node) else args[::-1])
        if isinstance(node, fx.Node) and isinstance(k, (int, float)) \
                and not isinstance(k, bool):
            return _Op("scale", (node,), n.target in (operator.imul, "mul_"), float(k))
    add_call = (n.op == "call_function" and n.target in _ADDS) or (
        n.op == "call_method" and n.target in ("add", "add_"))
    if add_call and kwargs.pop("alpha", 1) == 1 and not kwargs and len(args) == 2 \
            and all(isinstance(a, fx.Node) for a in args):
        return _Op("add", args, n.target in (operator.iadd, "add_"))
    return _Op("other", _nodes(args, kwargs))


def _nodes(args, kwargs) -> tuple:
    out = []
    fx.node.map_arg((args, kwargs), out.append)
    return tuple(out)


def _describe(block: nn.Module, n: fx.Node) -> str:
    """The node as the user wrote it: "`se` (SEModule)", "`mul`", "`.flatten()`"; an
    operation inside a module traced into is named by that module."""
    if n.op == "call_module":
        return f"`{n.target}` ({type(block.get_submodule(n.target)).__name__})"
    stack = n.meta.get("nn_module_stack") or {}
    if stack and n.op in ("call_function", "call_method"):
        path, cls = list(stack.values())[-1]
        return f"`{path}` ({getattr(cls, '__name__', cls)})"
    if n.op == "call_function":
        return f"`{_OPERATORS.get(n.target) or getattr(n.target, '__name__', n.target)}`"
    if n.op == "call_method":
        return f"`.{n.target}()`"
    if n.op == "get_attr":
        return f"the attribute `{n.target}`"
    return f"`{n.name}`"


def _expand_composites(block: nn.Module, graph: fx.Graph) -> None:
    """Each call of a composite BN (leaves.py) becomes its BN node followed by calls of
    the children it applies after BatchNorm (`bn.drop`, `bn.act`), marked as its own
    (meta "in_bn": the BN's path), so they are classified and matched as written."""
    for n in list(graph.nodes):
        if n.op != "call_module":
            continue
        after = composite_bn(block.get_submodule(n.target))
        if after is None:
            continue
        users = list(n.users)
        prev = n
        for child in after:
            with graph.inserting_after(prev):
                prev = graph.call_module(f"{n.target}.{child}", (prev,))
            prev.meta.update(n.meta, in_bn=n.target)
        for u in users:
            u.replace_input_with(n, prev)


class _Graph:
    """The traced graph with its identity modules dropped, each node classified."""

    def __init__(self, block: nn.Module, graph: fx.Graph):
        self.block = block
        _expand_composites(block, graph)
        for n in list(graph.nodes):
            if n.op == "call_module" and _classify(block, n).kind == "identity":
                n.replace_all_uses_with(n.args[0])
                graph.erase_node(n)
        self.nodes = list(graph.nodes)
        self.ops = {n: _classify(block, n) for n in self.nodes if n.op != "output"}
        inputs = [n for n in self.nodes if n.op == "placeholder"]
        used = [n for n in inputs if n.users]
        if len(used) != 1 or used[0] is not inputs[0]:
            names = ", ".join(f"`{n.target}`" for n in used[1:] or inputs[1:])
            raise ConversionError(f"its forward uses {names} besides the input (a fused "
                                  "block takes one tensor)")
        self.input = inputs[0]
        self.output = next(n for n in self.nodes if n.op == "output")

    def kind(self, n) -> str:
        return self.ops[n].kind if n in self.ops else "other"

    def label(self, n) -> str:
        kind = self.kind(n)
        if n is self.input:
            return "the block's input"
        if kind in ("conv", "bn"):
            return str(n.target)
        if kind == "relu":
            return f"the ReLU after {self.label(self.ops[n].inputs[0])}"
        if kind == "add":
            return "the add"
        if n is self.output:
            return "the output"
        return _describe(self.block, n)

    def misfit(self, n, consumer) -> ConversionError:
        """`n`, found where the fused block has nothing or something else."""
        if n is self.input:
            return ConversionError(f"{self.label(consumer)} takes the block's input "
                                   "directly (each path of a fused block starts with a "
                                   "convolution)")
        ins = self.ops[n].inputs if n in self.ops else ()
        # "between bn2 and the add": name the tensor it changes, not a constant or
        # attribute it is combined with (those are named as the operand of an add).
        data = [i for i in ins if i.op != "get_attr"] or list(ins)
        where = (f"between {self.label(data[0])} and {self.label(consumer)}" if data
                 else f"before {self.label(consumer)}")
        what = _describe(self.block, n)
        if self.kind(n) == "add":
            other = next((i for i in ins if i is not data[0]), ins[-1])
            what = f"an add of {self.label(other)}"
        return ConversionError(f"{what} {where} is not part of a fused block")


# --------------------------------------------------------------------------- matching
class _Chain(NamedTuple):
    stages: tuple       # tuple[S.Stage, ...] from the input on
    nodes: tuple        # every node of the chain (gates, relu, bn, conv, pool), the input excluded
    gates: tuple = ()   # tuple[S.Gate, ...] in the order the forward applies them


_GATE_KINDS = {"channel_gate": S.CHANNEL, "sample_gate": S.SAMPLE, "scale": S.SCALE}


def _chain(g: _Graph, n, consumer) -> _Chain:
    """The conv -> BN? -> ReLU? -> gates? stages from the block's input to `n` (a pool
    may precede a conv: the shortcut's, checked by _split)."""
    stages, nodes, gates = [], [], []
    while n is not g.input:
        while g.kind(n) in _GATE_KINDS:   # gates of this stage, last applied first
            op = g.ops[n]
            path = "" if op.kind == "scale" else str(n.target)
            gates.append((path, _GATE_KINDS[op.kind], len(stages), op.value))
            nodes.append(n)
            consumer, n = n, g.ops[n].inputs[0]
        relu = g.kind(n) == "relu"
        if relu:
            nodes.append(n)
            consumer, n = n, g.ops[n].inputs[0]
        relu_node = consumer if relu else None
        bn = None
        if g.kind(n) == "bn":
            bn, consumer = n, n
            nodes.append(n)
            n = g.ops[n].inputs[0]
        if g.kind(n) != "conv":
            raise g.misfit(n, consumer)
        nodes.append(n)
        # A composite BN's own activation (leaves.py): calling the BN applies it.
        in_bn = (relu and bn is not None
                 and relu_node.meta.get("in_bn") == bn.target)
        conv = n
        consumer, n = n, g.ops[n].inputs[0]
        pool = None
        if g.kind(n) == "pool":
            pool = n
            nodes.append(n)
            consumer, n = n, g.ops[n].inputs[0]
        stages.append(S.Stage(conv.target, bn.target if bn is not None else None, relu,
                              in_bn, str(pool.target) if pool is not None else None))
    k = len(stages)
    return _Chain(tuple(reversed(stages)), tuple(nodes),
                  tuple(S.Gate(path, kind, k - 1 - i, v) for path, kind, i, v in reversed(gates)))


def _join(g: _Graph):
    """(final ReLU, add) at the output, or ConversionError."""
    out = g.output.args[0]
    if not isinstance(out, fx.Node):
        raise ConversionError(f"its forward returns {type(out).__name__}, not one tensor")
    if g.kind(out) == "add":
        raise ConversionError("no ReLU after the add (a fused block computes "
                              "relu(main path + shortcut))")
    if g.kind(out) != "relu":
        raise g.misfit(out, g.output)
    add = g.ops[out].inputs[0]
    if g.kind(add) != "add":
        raise g.misfit(add, out)
    return out, add


def _split(g: _Graph, add) -> tuple:
    """(main chain, shortcut chain) of the add's two operands."""
    chains, errors = [], []
    for operand in g.ops[add].inputs:
        try:
            chains.append(_chain(g, operand, add))
        except ConversionError as e:
            errors.append(e)
    if errors:
        raise errors[0]
    main, short = sorted(chains, key=lambda c: len(c.stages), reverse=True)
    if len(main.stages) not in (2, 3):
        raise ConversionError(f"its main path has {len(main.stages)} conv stage(s) (a "
                              "fused block has 2 or 3: basic or bottleneck)")
    if len(short.stages) > 1 or any(st.relu for st in short.stages) or short.gates:
        raise ConversionError(
            f"its shortcut ({' -> '.join(g.label(n) for n in reversed(short.nodes))}) is "
            "not the input, a convolution or a convolution and a BatchNorm (after an "
            "average pool, ResNet-D)")
    for st in main.stages:
        if st.pool is not None:
            raise ConversionError(f"`{st.pool}` (AvgPool2d) before {st.conv} on the main "
                                  "path is not part of a fused block (only a shortcut's "
                                  "pool is)")
    return main, short


def _check_all_matched(g: _Graph, matched: set) -> None:
    for n in g.nodes:
        if n.op not in ("placeholder", "output") and n not in matched:
            raise ConversionError(f"{_describe(g.block, n)} is computed in its forward but "
                                  "is not part of a fused block")


def _check_used_once(g: _Graph, chains) -> None:
    seen = {}
    for c in chains:
        for n in c.nodes:
            if g.kind(n) in ("conv", "bn"):
                m = g.block.get_submodule(n.target)
                seen.setdefault(id(m), []).append(str(n.target))
    for names in seen.values():
        if len(names) > 1:
            raise ConversionError(f"`{names[0]}` is applied {len(names)} times"
                                  + (f" (also as `{names[1]}`)" if names[1] != names[0] else "")
                                  + ": a fused block applies each convolution and "
                                  "BatchNorm once")


def _check_inplace(g: _Graph, matched: set) -> None:
    for n in matched:
        op = g.ops.get(n)
        if op is None or not op.inplace:
            continue
        target = op.inputs[0]
        if target is g.input:
            raise ConversionError(f"{_describe(g.block, n)} writes into the block's input, "
                                  "which a fused block leaves as it is")
        if len(target.users) != 1:
            raise ConversionError(f"{_describe(g.block, n)} overwrites {g.label(target)}, "
                                  "which its forward uses again")


def _check_state(block: nn.Module, spec: S.BlockSpec) -> None:
    """Every parameter and buffer belongs to a module the spec names (under the name it
    is reached by): anything else would be unused, or dropped from the state_dict."""
    owners = set(spec.module_paths())
    gates = tuple(gt.path + "." for gt in spec.gates if gt.path)  # a gate's submodules' too
    tensors = list(block.named_parameters(remove_duplicate=False)) + list(
        block.named_buffers(remove_duplicate=False))
    for name, _ in tensors:
        owner, _, leaf = name.rpartition(".")
        if owner not in owners and not owner.startswith(gates):
            what = (f"`{owner}` ({type(block.get_submodule(owner)).__name__})" if owner
                    else "the block itself")
            raise ConversionError(f"{what} holds `{leaf}`, which the fused block would "
                                  "not use (its checkpoint would lose it)")


def _check_hooks(block: nn.Module) -> None:
    # Every module of the block: the fused block calls none of them as a module (the
    # wrappers traced into, a composite BN's act, the dropped identities included).
    for path, m in block.named_modules():
        if (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None)):
            raise ConversionError(f"{f'`{path}`' if path else 'the block'} has a module hook, "
                                  "which a fused block would not call")


def match(block: nn.Module) -> S.BlockSpec:
    """The BlockSpec of what `block` computes, or ConversionError naming the first node
    (module, function or method) that does not fit."""
    g = _Graph(block, _trace(block))
    final_relu, add = _join(g)
    main, short = _split(g, add)
    matched = {final_relu, add, *main.nodes, *short.nodes}
    _check_all_matched(g, matched)
    _check_used_once(g, (main, short))
    _check_inplace(g, matched)
    kind = S.BASIC if len(main.stages) == 2 else S.BOTTLENECK
    spec = S.BlockSpec(kind, main.stages, short.stages[0] if short.stages else None,
                       main.gates)
    spec = next((k for k in _KNOWN_SPECS if k == spec), spec)
    _check_state(block, spec)
    _check_hooks(block)
    return spec


def spec_of(block: nn.Module) -> S.BlockSpec:
    """The spec of a block: a FusedResidual's own, else what its dataflow computes."""
    own = block.__dict__.get("_spec")
    return own if isinstance(own, S.BlockSpec) else match(block)



# --------------------------------------------------------------------------- detection
def _holds_conv(m: nn.Module) -> bool:
    return any(isinstance(c, nn.modules.conv._ConvNd) for c in m.modules())


class Untraceable(Exception):
    """A module's own forward cannot be traced: whether it adds is unknown."""


def residual_add(module: nn.Module):
    """The node of `module`'s own forward (its children as opaque calls) that adds two
    tensors both derived from its input, with a convolution on at least one of the two
    paths: a residual add. None when there is none; Untraceable (with torch.fx's
    reason) when the forward cannot be traced."""
    try:
        graph = ShallowTracer().trace(module)
    except Exception as e:  # noqa: BLE001: any failure: unknown
        raise Untraceable(_first_line(e)) from None
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if not inputs:
        return None
    x = inputs[0]
    # For each node: (derived from x, a convolution on the way from x).
    seen = {}
    for n in graph.nodes:
        args = _nodes(n.args, n.kwargs)
        from_x = n is x or any(seen.get(a, (False, False))[0] for a in args)
        conv = any(seen.get(a, (False, False))[1] for a in args)
        if n.op == "call_module" and _holds_conv(module.get_submodule(n.target)):
            conv = True
        if n.op == "call_function" and n.target in (F.conv2d, torch.conv2d, F.conv1d,
                                                    F.conv3d):
            conv = True
        seen[n] = (from_x, conv and from_x)
        add = (n.op == "call_function" and n.target in _ADDS) or (
            n.op == "call_method" and n.target in ("add", "add_"))
        ops = [a for a in n.args[:2] if isinstance(a, fx.Node)]
        if add and len(ops) == 2 and all(seen[a][0] for a in ops) and any(
                seen[a][1] for a in ops):
            return n
    return None
