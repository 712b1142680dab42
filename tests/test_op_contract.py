"""The op contract, over backend namespace x op (resnet_fused/schemas.py): every op of
every backend available here has its schema from schemas.py, passes
torch.library.opcheck (schema, fake, autograd registration, AOT dispatch), and agrees
with the float64 reference by the tolerance rule: the torch namespace's op in float64
for the ops every backend implements, the plain block in float64 for the triton
backend's training block. Also: the C++ schema strings (csrc/schemas.h) are
schemas.py's, character for character.

Backends: torch always; native when the extension is built (a missing build fails,
as in test_native_ops.py); triton through its interpreter on CPU. Shapes are tiny
(the interpreter pays per program and per op). Behaviour specific to one backend
(dtype sweeps, vector paths, error messages) is tested in that backend's own file.
"""
import os
import re

import pytest
import torch
from torch.nn import functional as F

from conftest import DEVICES
from resnet_fused import ops as op_layer
from resnet_fused.backends import torch_ops
from resnet_fused.schemas import BACKEND_OPS, COMMON_OPS, NAMESPACES, SCHEMAS
from tolerance import assert_within

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CL = torch.channels_last
REF = torch.ops.resnet_fused_torch


def _load(backend):
    """Import what defines the backend's ops; a reason to skip when it cannot run here."""
    if backend == "native":
        if os.environ.get("RESNET_FUSED_SKIP_EXT") == "1":
            return "built without the extension (RESNET_FUSED_SKIP_EXT=1)"
        from resnet_fused.backends.native import load_extension
        ext, err = load_extension()
        if ext is None:  # a missing build is a failure: CI builds the extension
            raise ImportError(f"resnet_fused._C is not built: {err}")
    elif backend == "triton":
        try:
            import resnet_fused.backends.triton  # noqa: F401
        except ImportError as e:
            return f"triton is not importable: {e}"
    return None


def _ops(backend, device=None):
    """The backend's op namespace, loaded; skips when it cannot run on `device`."""
    reason = _load(backend)
    if reason is not None:
        pytest.skip(reason)
    if device == "cpu" and backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the triton backend on CPU needs TRITON_INTERPRET=1")
    return getattr(torch.ops, NAMESPACES[backend])


PAIRS = [(b, n) for b in NAMESPACES for n in BACKEND_OPS[b]]
COMMON_PAIRS = [(b, n) for b, n in PAIRS if n in COMMON_OPS]
# The torch namespace's ops are the reference below: compared with themselves they could
# not fail (tests/test_ops_torch.py and the torch-backend block tests check them
# against plain PyTorch).
VS_TORCH_PAIRS = [(b, n) for b, n in COMMON_PAIRS if b != "torch"]


# --------------------------------------------------------------------------- schemas
def _cpp_schemas():
    """The schema strings of csrc/schemas.h's m.def(...) calls (adjacent literals joined)."""
    with open(os.path.join(ROOT, "csrc", "schemas.h")) as f:
        text = f.read()
    calls = re.findall(r'm\.def\(((?:\s*"(?:[^"\\]|\\.)*")+)\s*\)', text)
    return ["".join(re.findall(r'"((?:[^"\\]|\\.)*)"', c)).replace('\\"', '"') for c in calls]


def test_cpp_schema_strings_are_schemas_py():
    assert _cpp_schemas() == [SCHEMAS[n] for n in BACKEND_OPS["native"]]


@pytest.mark.parametrize("backend,name", PAIRS)
def test_registered_schema(backend, name):
    got = str(getattr(_ops(backend), name).default._schema)
    want = f"{NAMESPACES[backend]}::{SCHEMAS[name]}"
    if backend == "triton":
        from resnet_fused.backends.triton import launcher
        if not launcher.INTERPRET:
            # triton_ops: torch < 2.14 ignores schema= and infers the schema from the
            # function's annotations and mutates_args.
            got, want = _as_inferred(got), _as_inferred(want)
    assert got == want


def _as_inferred(schema):
    """schema as torch 2.11 infers it: SymInt for int, alias sets numbered, returns
    without names (compared: everything else)."""
    args, returns = schema.replace("SymInt", "int").split(" -> ")
    return re.sub(r"\(\w+!\)", "(!)", args) + " -> " + re.sub(r"(Tensor(?:\[\])?) \w+", r"\1",
                                                                returns)


def test_define_op_rejects_a_function_that_is_not_the_schema():
    def channel_stats(inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return inp, inp

    with pytest.raises(TypeError, match=r"define_op\('channel_stats'\): the function's "
                                        r"parameters \('inp',\) are not the schema's "
                                        r"arguments \('x',\)"):
        op_layer.define_op("resnet_fused_contract_test", "channel_stats", channel_stats)


# --------------------------------------------------------------------------- cases
def _t(*shape, device, lo=None, scale=1.0, fmt=None):
    t = torch.randn(shape, dtype=torch.float64) * scale if lo is None else \
        torch.rand(shape, dtype=torch.float64) + lo
    t = t.float().to(device)
    return t.contiguous(memory_format=fmt) if fmt is not None else t


def _cases(name, device):
    """Named argument tuples (float32, both memory formats) of op `name`; the mask and
    statistics inputs come from the torch namespace's ops, so they are consistent."""
    A = op_layer.args_tuple(name)
    out = []
    for fmt in (torch.contiguous_format, CL):
        def act(*shape):
            return _t(*shape, device=device, fmt=fmt)

        c = act(2, 5, 3, 3)  # 90 elements: the last mask byte is partial
        mean, var = REF.channel_stats(c)
        invstd = torch.rsqrt(var + 1e-5)
        w, b = _t(5, device=device, lo=0.5), _t(5, device=device)
        if name == "channel_stats":
            out.append(A(x=act(2, 5, 3, 3) * 2 + 3))
        elif name == "bn_finalize":
            out.append(A(mean=mean, var=var, weight=w, bias=b,
                         running_mean=_t(5, device=device),
                         running_var=_t(5, device=device, lo=0.5),
                         num_batches_tracked=torch.tensor(3, device=device),
                         momentum=0.1, eps=1e-5, count=18))
        elif name == "bn_act":
            out.append(A(c=c, mean=mean, invstd=invstd, weight=w, bias=b, residual=act(2, 5, 3, 3)))
            out.append(A(c=c, mean=mean, invstd=invstd, weight=w, bias=b, residual=None))
        elif name == "bn_act_backward":
            mask = REF.bn_act(c, mean, invstd, w, b, None)[1]
            out.append(A(grad_out=act(2, 5, 3, 3), mask=mask, c=c, mean=mean, invstd=invstd,
                         weight=w, residual_grad=fmt == CL))
        elif name == "bn_frozen_act":  # running statistics: any mean, invstd
            rm, ri = _t(5, device=device), _t(5, device=device, lo=0.5)
            out.append(A(c=c, mean=rm, invstd=ri, weight=w, bias=b, residual=act(2, 5, 3, 3)))
            out.append(A(c=c, mean=rm, invstd=ri, weight=w, bias=b, residual=None))
        elif name == "bn_frozen_act_backward":
            rm, ri = _t(5, device=device), _t(5, device=device, lo=0.5)
            mask = REF.bn_frozen_act(c, rm, ri, w, b, None)[1]
            for param_grads in (True, False):
                out.append(A(grad_out=act(2, 5, 3, 3), mask=mask, c=c, mean=rm, invstd=ri,
                             weight=w, residual_grad=fmt == CL, param_grads=param_grads))
        elif name == "conv_bias_relu":
            out.append(A(x=act(2, 5, 6, 5), weight=_t(4, 5, 3, 3, device=device, scale=0.3),
                         bias=_t(4, device=device), stride=2, padding=1))
        elif name == "conv_bias_shortcut_relu":
            out.append(A(y=act(2, 4, 3, 3), weight=_t(6, 4, 3, 3, device=device, scale=0.3),
                         bias=_t(6, device=device), x=act(2, 3, 6, 6),
                         shortcut_weight=_t(6, 3, 1, 1, device=device, scale=0.3),
                         padding=1, shortcut_stride=2, shortcut_padding=0))
            out.append(A(y=act(2, 4, 3, 3), weight=_t(4, 4, 3, 3, device=device, scale=0.3),
                         bias=_t(4, device=device), x=act(2, 4, 3, 3), shortcut_weight=None,
                         padding=1, shortcut_stride=1, shortcut_padding=0))
    return out


# Inputs an op is differentiable in (opcheck's autograd checks get them requiring grad).
_DIFFERENTIABLE = {
    "bn_act": ("c", "weight", "bias", "residual"),
    "bn_frozen_act": ("c", "weight", "bias", "residual"),
    "conv_bias_relu": ("x", "weight", "bias"),
    "conv_bias_shortcut_relu": ("y", "weight", "bias", "x", "shortcut_weight"),
}


def _requiring_grad(name, args):
    return args._replace(**{n: getattr(args, n).clone().requires_grad_()
                            for n in _DIFFERENTIABLE.get(name, ())
                            if getattr(args, n) is not None})


def _assert_outputs_match(name, got, plain, ref):
    """Every output of op `name` (a tensor or the schema's tuple) against the plain op's
    by the tolerance rule (ref: float64): absent outputs empty on both, the mask exactly
    the bits of the op's own first output > 0, dtype, shape and layout as plain's."""
    got, plain, ref = ((t,) if isinstance(t, torch.Tensor) else t for t in (got, plain, ref))
    for field, g, p, r in zip(op_layer.returns_tuple(name)._fields, got, plain, ref):
        if g.numel() == 0:  # an absent output (bn_act_backward without residual_grad)
            assert g.shape == p.shape == (0,), f"{name}: {field}"
            continue
        if g.dtype == torch.uint8:
            assert torch.equal(g, torch_ops.pack_mask(got[0] > 0)), f"{name}: {field}"
            continue
        assert g.dtype == p.dtype and g.shape == p.shape, f"{name}: {field}"
        if g.dim() == 4:
            assert g.stride() == p.stride(), f"{name}: {field} layout"
        assert_within(f"{name} {field}", g, p, r)


def _cloned(args):
    """Fresh copies of the tensor arguments (mutated ones must not leak between runs)."""
    return type(args)(*(a.clone() if isinstance(a, torch.Tensor) else a for a in args))


def _double(args):
    return type(args)(*(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point()
                        else a for a in args))


# --------------------------------------------------------------------------- common ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend,name", COMMON_PAIRS)
def test_opcheck(device, backend, name):
    op = getattr(_ops(backend, device), name).default
    for args in _cases(name, device):
        torch.library.opcheck(op, tuple(_cloned(args)))
        if name in _DIFFERENTIABLE:
            torch.library.opcheck(op, tuple(_requiring_grad(name, _cloned(args))))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend,name", VS_TORCH_PAIRS)
def test_against_float64_torch_op(device, backend, name):
    """Every output (and every argument the op writes) against the torch namespace's op
    in float64, by the tolerance rule with the torch op in float32 as the plain path;
    a packed mask must be exactly the bits of the op's own output > 0."""
    op = getattr(_ops(backend, device), name)
    written = op_layer.mutated_args(name)
    for args in _cases(name, device):
        got_args, plain_args, ref_args = _cloned(args), _cloned(args), _double(_cloned(args))
        got = op(*got_args)
        plain = getattr(REF, name)(*plain_args)
        ref = getattr(REF, name)(*ref_args)
        _assert_outputs_match(name, got, plain, ref)
        for n in written:
            g, p, r = (getattr(a, n) for a in (got_args, plain_args, ref_args))
            if g.is_floating_point():
                assert_within(f"{name} {n}", g, p, r)
            else:
                assert torch.equal(g, p) and torch.equal(g.cpu(), r.cpu()), f"{name}: {n}"


# --------------------------------------------------------------------------- training block
# name -> (input channels, [(kernel, stride, output channels)] per stage, projection
# kernel or 0, BN'd projection)
BLOCKS = {
    "identity": (8, [(3, 1, 8), (3, 1, 8)], 0, False),
    "1x1/2": (4, [(3, 2, 8), (3, 1, 8)], 1, False),  # D2L: the final pass is its GEMM epilogue
    "bn/2": (4, [(3, 2, 8), (3, 1, 8)], 1, True),    # torchvision's downsample: conv1x1 + BN
    "bottleneck/2": (4, [(1, 1, 4), (3, 2, 4), (1, 1, 8)], 1, True),   # ResNet v1.5
}


def _block_args(kind, device):
    cin, stages, k3, bn3 = BLOCKS[kind]
    k = stages[-1][2]
    A = op_layer.BlockTrainArgs

    def t(*shape, lo=None, scale=1.0):
        return _t(*shape, device=device, lo=lo, scale=scale)

    chans = [cin] + [kout for _, _, kout in stages]
    return A(x=_t(2, cin, 5, 4, device=device, fmt=CL),
             w=[t(kout, c, r, r, scale=0.3) for (r, _, kout), c in zip(stages, chans)],
             b=[None] * len(stages), g=[t(kout, lo=0.5) for _, _, kout in stages],
             beta=[t(kout) for _, _, kout in stages], stride=[s for _, s, _ in stages],
             eps=[1e-5, 1e-4, 3e-5][:len(stages)],
             w_sc=t(k, cin, k3, k3, scale=0.3) if k3 else None,
             b_sc=t(k) if k3 and not bn3 else None,
             g_sc=t(k, lo=0.5) if bn3 else None, beta_sc=t(k) if bn3 else None, eps_sc=1e-3)


def _plain_block(a):
    """The plain block (conv, training BN, ReLU, shortcut) on block_train's arguments;
    out and every stage's conv output."""
    def bn(c, g, beta, eps):
        return F.batch_norm(c, None, None, g, beta, True, 0.0, eps)

    y, cs = a.x, []
    for i, w in enumerate(a.w):
        cs.append(F.conv2d(y, w, a.b[i], a.stride[i], w.shape[-1] // 2))
        y = bn(cs[-1], a.g[i], a.beta[i], a.eps[i])
        if i < len(a.w) - 1:
            y = F.relu(y)
    s = 1
    for st in a.stride:
        s *= st
    sc = a.x if a.w_sc is None else F.conv2d(a.x, a.w_sc, a.b_sc, s, a.w_sc.shape[-1] // 2)
    if a.g_sc is not None:
        sc = bn(sc, a.g_sc, a.beta_sc, a.eps_sc)
    return F.relu(y + sc), cs


def _leaves(args):
    """args with every tensor (also inside the lists) a fresh leaf requiring grad."""
    def leaf(v):
        return v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v

    return args._replace(**{n: ([leaf(t) for t in v] if isinstance(v, list) else leaf(v))
                            for n, v in args._asdict().items()})


def _double_block(args):
    return args._replace(**{n: ([t.double() if isinstance(t, torch.Tensor) else t for t in v]
                                if isinstance(v, list) else
                                (v.double() if isinstance(v, torch.Tensor) else v))
                            for n, v in args._asdict().items()})


def _leaf_grads(args):
    """(name, gradient) of every tensor of args, list entries as name[i]."""
    out = []
    for n, v in args._asdict().items():
        for i, t in (enumerate(v) if isinstance(v, list) else [(None, v)]):
            if isinstance(t, torch.Tensor):
                out.append((n if i is None else f"{n}[{i}]", t.grad))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_block_ops_opcheck(device, kind):
    """block_train with inputs that require grad (autograd registration, AOT dispatch
    through block_train_backward) on the identity block, the cheaper checks elsewhere
    (interpreter time); block_train_backward's schema and fake."""
    ops = _ops("triton", device)
    a = _block_args(kind, device)
    utils = (("test_schema", "test_autograd_registration", "test_faketensor",
              "test_aot_dispatch_dynamic") if kind == "identity"
             else ("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.block_train.default, tuple(_leaves(a)), test_utils=utils)
    o = op_layer.BlockTrainOut(*ops.block_train(*a))
    b = op_layer.BlockTrainBackwardArgs(
        grad_out=torch.randn_like(o.out), **{n: v for n, v in {**a._asdict(), **o._asdict()}.items()
                                             if n in op_layer.BlockTrainBackwardArgs._fields},
        has_b=[t is not None for t in a.b], has_b_sc=a.b_sc is not None)
    torch.library.opcheck(ops.block_train_backward.default, tuple(b),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_block_ops_against_float64_plain_block(device, kind):
    """block_train's output, conv outputs and batch statistics, and the gradient of every
    tensor input through its registered autograd (block_train_backward), against the
    plain block in float64 by the tolerance rule (the plain block in float32 as the
    plain path)."""
    ops = _ops("triton", device)
    a = _block_args(kind, device)
    runs = {}
    for label, args in (("got", a), ("plain", a), ("ref", _double_block(a))):
        leaves = _leaves(args)
        if label == "got":
            o = op_layer.BlockTrainOut(*ops.block_train(*leaves))
            out, cs = o.out, list(o.c)
        else:
            out, cs = _plain_block(leaves)
        g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        out.backward(g.to(device=device, dtype=out.dtype))
        runs[label] = (out, cs, leaves, o if label == "got" else None)
    got, plain, ref = runs["got"], runs["plain"], runs["ref"]
    assert got[0].stride() == plain[0].contiguous(memory_format=CL).stride()
    assert_within(f"{kind} out", got[0], plain[0], ref[0])
    stats = got[3].stats
    assert len(stats) == len(a.w) + (a.g_sc is not None)
    for i, (cg, cp, cr) in enumerate(zip(got[1], plain[1], ref[1])):
        assert_within(f"{kind} c[{i}]", cg, cp, cr)
        cp, cr = cp.detach(), cr.detach()
        assert_within(f"{kind} mean of c[{i}]", stats[i][0], cp.mean((0, 2, 3)),
                      cr.mean((0, 2, 3)), dtype=torch.float32)
        assert_within(f"{kind} var of c[{i}]", stats[i][1], cp.var((0, 2, 3), unbiased=False),
                      cr.var((0, 2, 3), unbiased=False), dtype=torch.float32)
        assert torch.equal(stats[i][2], torch.full_like(stats[i][2], cg[:, 0].numel()))
    assert torch.equal(got[3].mask, torch_ops.pack_mask(got[0] > 0))
    for (n, gg), (_, gp), (_, gr) in zip(*(_leaf_grads(r[2]) for r in (got, plain, ref))):
        assert_within(f"{kind} grad {n}", gg, gp, gr, factor=3)


def _running_of(a, device):
    """block_train's `running` for a frozen block: per BN (stages, then the shortcut's),
    [running mean; running variance] in float32."""
    ks = [w.shape[0] for w in a.w] + ([a.w_sc.shape[0]] if a.g_sc is not None else [])
    gen = torch.Generator().manual_seed(2)
    return [torch.stack([torch.randn(k, generator=gen, dtype=torch.float64),
                         torch.rand(k, generator=gen, dtype=torch.float64) + 0.5]
                        ).float().to(device) for k in ks]


def _plain_frozen_block(a, running):
    """The plain block with every BN on its running statistics (F.batch_norm in
    inference mode)."""
    bns = iter(running)

    def bn(c, g, beta, eps):
        r = next(bns).to(c.dtype)
        return F.batch_norm(c, r[0], r[1], g, beta, False, 0.0, eps)

    y = a.x
    for i, w in enumerate(a.w):
        y = bn(F.conv2d(y, w, a.b[i], a.stride[i], w.shape[-1] // 2), a.g[i], a.beta[i],
               a.eps[i])
        if i < len(a.w) - 1:
            y = F.relu(y)
    s = 1
    for st in a.stride:
        s *= st
    sc = a.x if a.w_sc is None else F.conv2d(a.x, a.w_sc, a.b_sc, s, a.w_sc.shape[-1] // 2)
    if a.g_sc is not None:
        sc = bn(sc, a.g_sc, a.beta_sc, a.eps_sc)
    return F.relu(y + sc)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(BLOCKS))
def test_block_ops_frozen_against_float64_plain_block(device, kind):
    """block_train with `running` (every BN frozen): its output, its stats (the running
    statistics themselves) and the gradient of every tensor input through
    block_train_backward(frozen=True), against the plain frozen block in float64."""
    ops = _ops("triton", device)
    a = _block_args(kind, device)
    running = _running_of(a, device)
    if kind == "identity":  # schema, fake and autograd registration with `running`
        torch.library.opcheck(ops.block_train.default,
                              tuple(_leaves(a)._replace(running=running)),
                              test_utils=("test_schema", "test_faketensor",
                                          "test_autograd_registration"))
    runs = {}
    for label, args in (("got", a), ("plain", a), ("ref", _double_block(a))):
        leaves = _leaves(args)
        if label == "got":
            o = op_layer.BlockTrainOut(*ops.block_train(*leaves._replace(running=running)))
            out = o.out
            assert all(torch.equal(s[:2], r) for s, r in zip(o.stats, running))
        else:
            out = _plain_frozen_block(leaves, running)
        g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        out.backward(g.to(device=device, dtype=out.dtype))
        runs[label] = (out, leaves)
    got, plain, ref = runs["got"], runs["plain"], runs["ref"]
    assert_within(f"{kind} frozen out", got[0], plain[0], ref[0])
    for (n, gg), (_, gp), (_, gr) in zip(*(_leaf_grads(r[1]) for r in (got, plain, ref))):
        assert_within(f"{kind} frozen grad {n}", gg, gp, gr, factor=3)


# --------------------------------------------------------------------------- gate ops
def _gate_cases(name):
    """Float64 argument tuples of a gate op (schemas.GATE_OPS: the torch and native
    namespaces'), both memory formats, channel and sample gates."""
    A = op_layer.args_tuple(name)
    out = []
    for fmt, gshape in ((torch.contiguous_format, (2, 5, 1, 1)), (CL, (2, 1, 1, 1))):
        def act(*shape):
            return torch.randn(shape, dtype=torch.float64).contiguous(memory_format=fmt)

        c = act(2, 5, 3, 3) * 2 + 1
        mean, var = REF.channel_stats(c)
        invstd = torch.rsqrt(var + 1e-5)
        w, b = torch.rand(5, dtype=torch.float64) + 0.5, torch.randn(5, dtype=torch.float64)
        gate = torch.rand(gshape, dtype=torch.float64) + 0.5
        if name == "bn_pool":
            out.append(A(c=c, mean=mean, invstd=invstd, weight=w, bias=b))
        elif name == "bn_pool_backward":
            out.append(A(grad_pooled=torch.randn(2, 5, dtype=torch.float64), c=c, mean=mean,
                         invstd=invstd, weight=w))
        elif name == "bn_gate_act":
            out.append(A(c=c, mean=mean, invstd=invstd, weight=w, bias=b, gate=gate,
                         residual=act(2, 5, 3, 3)))
            out.append(A(c=c, mean=mean, invstd=invstd, weight=w, bias=b, gate=gate,
                         residual=None))
        elif name == "bn_gate_act_backward":
            mask = REF.bn_gate_act(c, mean, invstd, w, b, gate, None)[1]
            out.append(A(grad_out=act(2, 5, 3, 3), mask=mask, c=c, mean=mean, invstd=invstd,
                         weight=w, bias=b, gate=gate, residual_grad=fmt == CL))
        elif name == "conv_bias_pool":
            out.append(A(x=act(2, 4, 5, 5), weight=torch.randn(6, 4, 3, 3, dtype=torch.float64),
                         bias=torch.randn(6, dtype=torch.float64), stride=2, padding=1))
        elif name == "gate_shortcut_relu":
            gate6 = torch.rand(gshape[:1] + (6 if gshape[1] != 1 else 1, 1, 1),
                               dtype=torch.float64) + 0.5
            out.append(A(y=act(2, 6, 3, 3), gate=gate6, x=act(2, 4, 6, 6),
                         shortcut_weight=torch.randn(6, 4, 1, 1, dtype=torch.float64),
                         shortcut_bias=torch.randn(6, dtype=torch.float64),
                         shortcut_stride=2, shortcut_padding=0))
            out.append(A(y=act(2, 5, 3, 3), gate=gate, x=act(2, 5, 3, 3),
                         shortcut_weight=None, shortcut_bias=None, shortcut_stride=1,
                         shortcut_padding=0))
    return out


_GATE_DIFFERENTIABLE = {
    "bn_pool": ("c", "weight", "bias"),
    "bn_gate_act": ("c", "weight", "bias", "gate", "residual"),
    "gate_shortcut_relu": ("y", "gate", "x", "shortcut_weight", "shortcut_bias"),
    "conv_bias_pool": ("x", "weight", "bias"),
}
GATE_OPS = [n for n in BACKEND_OPS["torch"] if n not in COMMON_OPS]
# The backends with gate ops (schemas.BACKEND_OPS).
GATE_PAIRS = [(b, n) for b, n in PAIRS if n in GATE_OPS]


@pytest.mark.parametrize("backend,name", GATE_PAIRS)
def test_gate_ops_opcheck(backend, name):
    op = getattr(_ops(backend, "cpu"), name).default
    cases = _gate_cases(name)
    if backend == "triton":   # its kernels compute float32, float16 and bfloat16
        cases = [_float(args) for args in cases]
    for args in cases:
        torch.library.opcheck(op, tuple(_cloned(args)))
        if name in _GATE_DIFFERENTIABLE:
            grad = args._replace(**{n: getattr(args, n).clone().requires_grad_()
                                    for n in _GATE_DIFFERENTIABLE[name]
                                    if getattr(args, n) is not None})
            torch.library.opcheck(op, tuple(grad))


def _float(args):
    return type(args)(*(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point()
                        else a for a in args))


@pytest.mark.parametrize("backend,name", [(b, n) for b, n in GATE_PAIRS if b != "torch"])
def test_gate_ops_against_float64_torch_op(backend, name):
    """A backend's gate op in float32 against the torch namespace's op in float64, by the
    tolerance rule (the torch op in float32 as the plain path); the mask exactly the bits
    of the op's own output > 0."""
    op = getattr(_ops(backend, "cpu"), name)
    for args in _gate_cases(name):
        args32 = _float(args)
        got, plain, ref = op(*args32), getattr(REF, name)(*args32), getattr(REF, name)(*args)
        _assert_outputs_match(name, got, plain, ref)


@pytest.mark.parametrize("name", list(_GATE_DIFFERENTIABLE))
def test_gate_ops_gradcheck(name):
    """The registered backward (bn_pool_backward, bn_gate_act_backward, the eval ops')
    against finite differences in float64. bn_pool and bn_gate_act hold the BN's batch
    statistics as part of the function (their contract): mean and invstd are computed
    from c inside the checked function."""
    for args in _gate_cases(name):
        diff = [n for n in _GATE_DIFFERENTIABLE[name] if getattr(args, n) is not None]

        def fn(*ts, args=args, diff=diff):
            a = args._replace(**dict(zip(diff, ts)))
            if "mean" in a._fields:
                var, mean = torch.var_mean(a.c, dim=(0, 2, 3), correction=0)
                a = a._replace(mean=mean, invstd=torch.rsqrt(var + 1e-5))
            out = getattr(REF, name)(*a)
            # Every floating output (a packed mask is not differentiable).
            return tuple(o for o in out if o.is_floating_point()) \
                if isinstance(out, (tuple, list)) else out

        inputs = tuple(getattr(args, n).detach().clone().requires_grad_() for n in diff)
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)
