"""The native backend's ops (resnet_fused._C) beyond the op contract
(tests/test_op_contract.py: schemas, opcheck, the float64 torch op): every op against a
float64 PyTorch computation over dtypes and shapes that take the kernels' vector and
scalar paths, and the error messages, with the CPU kernels always and the CUDA kernels
when a GPU is present (the `cuda` parametrisations).

Shapes cover both memory formats, C = 3 and 20 (not multiples of 8: scalar paths),
C = 16/24 (vector paths), numel not a multiple of 8 (mask tail), batch 1.
"""
import os

import pytest
import torch
from torch.nn import functional as F

from conftest import DEVICES
from poisoning import poison_allocator
from tolerance import assert_within

if os.environ.get("RESNET_FUSED_SKIP_EXT") == "1":
    pytest.skip("built without the extension (RESNET_FUSED_SKIP_EXT=1)", allow_module_level=True)

from resnet_fused.backends.native import load_extension  # noqa: E402

_C, _err = load_extension()
if _C is None:  # a missing build is a failure, not a skip: CI builds the extension
    raise ImportError(f"resnet_fused._C is not built: {_err}")

ops = torch.ops.resnet_fused
LOW = [torch.float32, torch.float16, torch.bfloat16]
ALL = LOW + [torch.float64]
IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
SHAPES = [(2, 3, 5, 7), (3, 20, 3, 5), (2, 16, 4, 4), (1, 24, 5, 3)]


def stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def act(shape, dtype, channels_last, device, scale=1.0, offset=0.0):
    x = (torch.randn(shape, dtype=torch.float64) * scale + offset).to(dtype).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def physical(t):
    """t's elements in memory order."""
    if t.dim() == 4 and not t.is_contiguous():
        return t.permute(0, 2, 3, 1).reshape(-1)
    return t.reshape(-1)


def unpack(mask, numel):
    bits = (mask.to(torch.int64).unsqueeze(1) >> torch.arange(8, device=mask.device)) & 1
    return bits.reshape(-1)[:numel].bool(), bits.reshape(-1)[numel:]


def stats64(c):
    c64 = c.double()
    var, mean = torch.var_mean(c64, dim=(0, 2, 3), unbiased=False)
    return mean, var


def bn_params(C, device, dtype=torch.float32):
    w = (torch.rand(C, dtype=torch.float64) + 0.5).to(dtype).to(device)
    b = torch.randn(C, dtype=torch.float64).to(dtype).to(device)
    return w, b


def test_module_reports_cuda_build():
    assert isinstance(_C.built_with_cuda, bool)


# ----------------------------------------------------------------------------- channel_stats
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL, ids=IDS.get)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES)
def test_channel_stats(device, dtype, channels_last, shape):
    x = act(shape, dtype, channels_last, device, scale=2.0, offset=0.5)
    poison_allocator(1 << 18, device)   # outputs likely reuse NaN-filled memory
    mean, var = ops.channel_stats(x)
    sd = stat_dtype(dtype)
    assert mean.dtype == var.dtype == sd and mean.shape == var.shape == (shape[1],)
    ref_m, ref_v = stats64(x)
    plain_v, plain_m = torch.var_mean(x.to(sd), dim=(0, 2, 3), unbiased=False)
    assert_within("mean", mean, plain_m, ref_m, dtype=sd)
    assert_within("var", var, plain_v, ref_v, dtype=sd)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_channel_stats_stable_when_mean_dominates(device, channels_last):
    """|mean| = 1000 x std: naive E[x^2] - E[x]^2 in fp32 loses every digit of var."""
    x = act((4, 16, 9, 9), torch.float32, channels_last, device, scale=0.5, offset=500.0)
    mean, var = ops.channel_stats(x)
    ref_m, ref_v = stats64(x)
    torch.testing.assert_close(mean.double(), ref_m, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), ref_v, rtol=1e-3, atol=0)


# ----------------------------------------------------------------------------- bn_finalize
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("buf_dtype", [torch.float32, torch.float16, torch.float64],
                         ids=["fp32", "fp16", "fp64"])
def test_bn_finalize_matches_batchnorm_over_steps(device, momentum, buf_dtype):
    C = 5
    bn = torch.nn.BatchNorm2d(C, momentum=momentum, eps=1e-3).to(device).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    rm = bn.running_mean.clone().to(buf_dtype)
    rv = bn.running_var.clone().to(buf_dtype)
    nbt = bn.num_batches_tracked.clone()
    bn64 = bn.double()
    for step in range(3):
        c = act((4, C, 3, 3), torch.float64, False, device, scale=2.0, offset=1.0)
        sd = stat_dtype(buf_dtype)
        mean, var = (t.to(sd) for t in stats64(c))
        w, b = bn64.weight.detach().to(buf_dtype), bn64.bias.detach().to(buf_dtype)
        invstd, scale, shift = ops.bn_finalize(mean, var, w, b, rm, rv, nbt,
                                               -1.0 if momentum is None else momentum,
                                               bn64.eps, c.numel() // C)
        bn64(c)
        assert nbt.item() == step + 1
        tol = dict(rtol=2e-3, atol=2e-3) if buf_dtype == torch.float16 else dict(rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(rm.double(), bn64.running_mean, **tol)
        torch.testing.assert_close(rv.double(), bn64.running_var, **tol)
        inv64 = torch.rsqrt(var.double() + bn64.eps)
        torch.testing.assert_close(invstd.double(), inv64, rtol=1e-6, atol=0)
        torch.testing.assert_close(scale.double(), w.double() * inv64, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(shift.double(), b.double() - mean.double() * w.double() * inv64,
                                   rtol=1e-6, atol=1e-6)
        assert invstd.dtype == scale.dtype == shift.dtype == mean.dtype


# ----------------------------------------------------------------------------- bn_act
def _bn_inputs(shape, dtype, channels_last, device, residual):
    c = act(shape, dtype, channels_last, device, scale=1.5, offset=0.3)
    m64, v64 = stats64(c)
    sd = stat_dtype(dtype)
    mean, invstd = m64.to(sd), torch.rsqrt(v64 + 1e-5).to(sd)
    w, b = bn_params(shape[1], device)
    r = act(shape, dtype, channels_last, device) if residual else None
    return c, mean, invstd, w, b, r


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL, ids=IDS.get)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("shape", SHAPES)
def test_bn_act(device, dtype, channels_last, residual, shape):
    c, mean, invstd, w, b, r = _bn_inputs(shape, dtype, channels_last, device, residual)
    poison_allocator(1 << 18, device)   # outputs likely reuse NaN-filled memory
    out, mask = ops.bn_act(c, mean, invstd, w, b, r)
    assert out.dtype == dtype and out.shape == c.shape and out.stride() == c.stride()
    assert mask.dtype == torch.uint8 and mask.shape == ((c.numel() + 7) // 8,)
    sc64 = w.double() * invstd.double()
    sh64 = b.double() - mean.double() * sc64
    per_c = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    ref = c.double() * per_c(sc64) + per_c(sh64) + (r.double() if residual else 0)
    ref = ref.relu()
    plain = c * per_c(sc64.to(dtype)) + per_c(sh64.to(dtype))
    plain = (plain + r if residual else plain).relu()
    assert_within("out", out, plain, ref)
    bits, pad = unpack(mask, c.numel())
    assert torch.equal(bits, physical(out) > 0), "mask bits differ from out > 0"
    assert not pad.any(), "padding bits of the last mask byte must be 0"


@pytest.mark.parametrize("device", DEVICES)
def test_bn_act_misaligned_views_take_the_scalar_path(device):
    """A contiguous slice that starts off a 16-byte boundary (N offset of one 3x3x3
    image in fp16 = 54 bytes) must not be read with vector loads."""
    big = act((3, 3, 3, 3), torch.float16, False, device)
    c = big[1:]
    assert c.is_contiguous() and c.data_ptr() % 16 != 0
    _, mean, invstd, w, b, _ = _bn_inputs(c.shape, torch.float16, False, device, False)
    out, mask = ops.bn_act(c, mean, invstd, w, b, None)
    ref = (c.double() * (w.double() * invstd.double()).view(1, -1, 1, 1)
           + (b.double() - mean.double() * w.double() * invstd.double()).view(1, -1, 1, 1)).relu()
    torch.testing.assert_close(out.double(), ref, rtol=2e-3, atol=2e-3)
    assert torch.equal(unpack(mask, c.numel())[0], physical(out) > 0)


# ----------------------------------------------------------------------------- bn_act_backward
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL, ids=IDS.get)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("residual_grad", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("shape", SHAPES)
def test_bn_act_backward(device, dtype, channels_last, residual_grad, shape):
    c, mean, invstd, w, b, r = _bn_inputs(shape, dtype, channels_last, device, True)
    _, mask = ops.bn_act(c, mean, invstd, w, b, r)
    dy = act(shape, dtype, channels_last, device)
    poison_allocator(1 << 18, device)   # outputs likely reuse NaN-filled memory
    gc, gw, gb, gr = ops.bn_act_backward(dy, mask, c, mean, invstd, w, residual_grad)
    sd = stat_dtype(dtype)
    assert gc.dtype == dtype and gc.stride() == c.stride()
    assert gw.dtype == gb.dtype == sd and gw.shape == gb.shape == (shape[1],)
    # g = dy * mask (mask in logical NCHW order).
    keep = torch.empty_like(c, dtype=torch.bool)
    physical(keep).copy_(unpack(mask, c.numel())[0])
    if residual_grad:
        assert gr.dtype == dtype and gr.stride() == c.stride()
        assert torch.equal(gr, dy * keep), "grad_residual must be dy * mask exactly"
    else:
        assert gr.shape == (0,)

    def grads(cc, ww, bb, g):  # autograd through training BatchNorm
        cc = cc.detach().requires_grad_()
        ww = ww.detach().requires_grad_()
        bb = bb.detach().requires_grad_()
        y = F.batch_norm(cc, None, None, ww, bb, True, 0.0, 1e-5)
        return torch.autograd.grad(y, (cc, ww, bb), g)

    g64 = dy.double() * keep
    ref = grads(c.double(), w.double(), b.double(), g64)
    plain = grads(c, w.to(dtype), b.to(dtype), dy * keep)
    assert_within("grad_c", gc, plain[0], ref[0], factor=3)
    assert_within("grad_weight", gw, plain[1], ref[1], factor=3, dtype=sd)
    assert_within("grad_bias", gb, plain[2], ref[2], factor=3, dtype=sd)


def test_bn_act_autograd_gradcheck():
    """The registered autograd of bn_act (backward = bn_act_backward) is the exact
    derivative of training BatchNorm + residual + ReLU, stats path included."""
    c = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)

    def f(c, w, b, r):
        mean, var = ops.channel_stats(c.detach())
        return ops.bn_act(c, mean, torch.rsqrt(var + 1e-5), w, b, r)[0]

    torch.autograd.gradcheck(f, (c, w, b, r))


# ----------------------------------------------------------------------------- gate ops
REF = torch.ops.resnet_fused_torch


def _gate(shape, kind, device):
    n, c = shape[:2]
    gshape = {"channel": (n, c, 1, 1), "sample": (n, 1, 1, 1), "shared": (1, 1, 1, 1)}[kind]
    return (torch.rand(gshape, dtype=torch.float64) + 0.5).float().to(device)


def _plain_and_ref(name, args):
    """The torch namespace's op on args (the plain path, in their dtypes) and in float64."""
    def double(a):
        return a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
    return getattr(REF, name)(*args), getattr(REF, name)(*(double(a) for a in args))


def _check_outputs(name, got, plain, ref, factor):
    got, plain, ref = ((t,) if isinstance(t, torch.Tensor) else t for t in (got, plain, ref))
    for i, (g, p, r) in enumerate(zip(got, plain, ref)):
        if g.numel() == 0 or g.dtype == torch.uint8:
            continue
        assert g.dtype == p.dtype and g.shape == p.shape and g.stride() == p.stride(), f"{name}[{i}]"
        assert_within(f"{name}[{i}]", g, p, r.to(g.device), factor=factor)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL, ids=IDS.get)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("kind", ["channel", "sample", "shared"])
@pytest.mark.parametrize("shape", SHAPES)
def test_gate_ops(device, dtype, channels_last, kind, shape):
    """bn_gate_act (+ its mask), bn_gate_act_backward, bn_pool, bn_pool_backward and
    gate_shortcut_relu (identity and projection) against the torch namespace's ops in
    float64, with those ops in `dtype` as the plain path."""
    c, mean, invstd, w, b, r = _bn_inputs(shape, dtype, channels_last, device, True)
    gate = _gate(shape, kind, device)
    poison_allocator(1 << 18, device)
    out, mask = ops.bn_gate_act(c, mean, invstd, w, b, gate, r)
    _check_outputs("bn_gate_act", (out,), *(t[:1] for t in
                   _plain_and_ref("bn_gate_act", (c, mean, invstd, w, b, gate, r))), 2)
    bits, pad = unpack(mask, c.numel())
    assert torch.equal(bits, physical(out) > 0) and not pad.any()
    dy = act(shape, dtype, channels_last, device)
    args = (dy, mask, c, mean, invstd, w, b, gate, True)
    got = ops.bn_gate_act_backward(*args)
    _check_outputs("bn_gate_act_backward", got, *_plain_and_ref("bn_gate_act_backward", args), 3)
    assert got[3].shape == gate.shape
    keep = torch.empty_like(c, dtype=torch.bool)
    physical(keep).copy_(bits)
    assert torch.equal(got[4], dy * keep), "grad_residual must be dy * mask exactly"
    pool_args = (c, mean, invstd, w, b)
    _check_outputs("bn_pool", ops.bn_pool(*pool_args), *_plain_and_ref("bn_pool", pool_args), 2)
    gp = torch.randn(shape[:2], dtype=torch.float64).float().to(device)
    pb_args = (gp, c, mean, invstd, w)
    if shape[0] > 1:  # batch 1: mean_hw(xhat) = 0, the gradient is rounding noise on every path
        _check_outputs("bn_pool_backward", ops.bn_pool_backward(*pb_args),
                       *_plain_and_ref("bn_pool_backward", pb_args), 3)
    y = act(shape, dtype, channels_last, device)
    x = act((shape[0], 3, 2 * shape[2], 2 * shape[3]), dtype, channels_last, device)
    sw = (torch.randn(shape[1], 3, 1, 1, dtype=torch.float64) * 0.5).to(dtype).to(device)
    sb = torch.randn(shape[1], dtype=torch.float64).to(dtype).to(device)
    for gsr in ((y, gate, c, None, None, 1, 0), (y, gate, x, sw, sb, 2, 0)):
        _check_outputs("gate_shortcut_relu", ops.gate_shortcut_relu(*gsr),
                       *_plain_and_ref("gate_shortcut_relu", gsr), 2)


def test_gate_ops_autograd_gradcheck():
    """The registered autograd of the native bn_gate_act (backward = bn_gate_act_backward)
    and bn_pool (bn_pool_backward) is the exact derivative, batch statistics included."""
    c = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    g = (torch.rand(2, 3, 1, 1, dtype=torch.float64) + 0.5).requires_grad_()
    r = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)

    def stats(c):
        var, mean = torch.var_mean(c, dim=(0, 2, 3), correction=0)
        return mean, torch.rsqrt(var + 1e-5)

    def gated(c, w, b, g, r):
        return ops.bn_gate_act(c, *stats(c), w, b, g, r)[0]

    def pooled(c, w, b):
        return ops.bn_pool(c, *stats(c), w, b)

    torch.autograd.gradcheck(gated, (c, w, b, g, r))
    torch.autograd.gradcheck(pooled, (c, w, b))


@pytest.mark.parametrize("device", DEVICES)
def test_gate_ops_bad_inputs_raise_clear_errors(device):
    c, mean, invstd, w, b = _good(device)
    gate = torch.rand(2, 4, 1, 1, device=device)
    with pytest.raises(RuntimeError, match=r"bn_gate_act: gate must have shape \(N, C, 1, 1\) = \[2, 4, 1, 1\].*got \[2, 3, 1, 1\]"):
        ops.bn_gate_act(c, mean, invstd, w, b, gate[:, :3].contiguous(), None)
    with pytest.raises(RuntimeError, match=r"bn_gate_act: gate must be a floating tensor"):
        ops.bn_gate_act(c, mean, invstd, w, b, gate.to(torch.int32), None)
    with pytest.raises(RuntimeError, match=r"bn_gate_act: residual must have the same dtype as c"):
        ops.bn_gate_act(c, mean, invstd, w, b, gate, c.double())
    _, mask = ops.bn_gate_act(c, mean, invstd, w, b, gate, None)
    with pytest.raises(RuntimeError, match=r"bn_gate_act_backward: mask must be a contiguous uint8 tensor"):
        ops.bn_gate_act_backward(c, mask[:3], c, mean, invstd, w, b, gate, False)
    with pytest.raises(RuntimeError, match=r"bn_gate_act_backward: bias must be a 1-D tensor with one value per channel \(4\)"):
        ops.bn_gate_act_backward(c, mask, c, mean, invstd, w, b[:2], gate, False)
    with pytest.raises(RuntimeError, match=r"bn_pool: invstd must be Float"):
        ops.bn_pool(c, mean, invstd.double(), w, b)
    with pytest.raises(RuntimeError, match=r"bn_pool_backward: grad_pooled must have shape \(N, C\) = \[2, 4\]"):
        ops.bn_pool_backward(torch.randn(4, device=device), c, mean, invstd, w)
    with pytest.raises(RuntimeError, match=r"gate_shortcut_relu: shortcut_bias is given without shortcut_weight"):
        ops.gate_shortcut_relu(c, gate, c, None, b, 1, 0)
    with pytest.raises(RuntimeError, match=r"gate_shortcut_relu: the projection shortcut .* has shape"):
        ops.gate_shortcut_relu(c, gate, c, torch.randn(4, 4, 1, 1, device=device), None, 2, 0)
    with pytest.raises(RuntimeError, match=r"gate_shortcut_relu: x must have the same shape as y"):
        ops.gate_shortcut_relu(c, gate, c[:1], None, None, 1, 0)


# ----------------------------------------------------------------------------- eval convs
def _conv_ref(x, w, b, stride, padding, z=None):
    out = F.conv2d(x, w, b, stride, padding)
    return (out + z if z is not None else out).relu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=IDS.get)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_bias_relu(device, dtype, channels_last, stride):
    x = act((2, 5, 7, 6), dtype, channels_last, device)
    w = (torch.randn(4, 5, 3, 3, dtype=torch.float64) * 0.3).to(dtype).to(device)
    if channels_last:
        w = w.contiguous(memory_format=torch.channels_last)
    b = torch.randn(4, dtype=torch.float64).to(dtype).to(device)
    out = ops.conv_bias_relu(x, w, b, stride, 1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)
    ref = _conv_ref(x.double(), w.double(), b.double(), stride, 1)
    assert_within("out", out, _conv_ref(x, w, b, stride, 1), ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=IDS.get)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shortcut", ["identity", "proj1x1_s2", "proj3x3_s2"])
def test_conv_bias_shortcut_relu(device, dtype, channels_last, shortcut):
    def t(*shape, s=1.0):
        return (torch.randn(shape, dtype=torch.float64) * s).to(dtype).to(device)

    if shortcut == "identity":
        cin, sstride, spad, w3 = 6, 1, 0, None
        x = act((2, 6, 5, 5), dtype, channels_last, device)
    else:
        k = 1 if shortcut == "proj1x1_s2" else 3
        cin, sstride, spad = 3, 2, (k - 1) // 2
        x = act((2, cin, 9, 9), dtype, channels_last, device)
        w3 = t(6, cin, k, k, s=0.3)
    y = act((2, 4, 5, 5), dtype, channels_last, device)
    w = t(6, 4, 3, 3, s=0.3)
    b = t(6)
    out = ops.conv_bias_shortcut_relu(y, w, b, x, w3, 1, sstride, spad)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)

    def ref(y, w, b, x, w3):
        z = x if w3 is None else F.conv2d(x, w3, None, sstride, spad)
        return _conv_ref(y, w, b, 1, 1, z)

    r64 = ref(y.double(), w.double(), b.double(), x.double(), None if w3 is None else w3.double())
    assert_within("out", out, ref(y, w, b, x, w3), r64)


def test_conv_batch_one_and_1x1_spatial():
    x = torch.randn(1, 4, 1, 1)
    w = torch.randn(5, 4, 3, 3)
    b = torch.randn(5)
    out = ops.conv_bias_relu(x, w, b, 2, 1)
    torch.testing.assert_close(out, _conv_ref(x, w, b, 2, 1))


# ----------------------------------------------------------------------------- bad inputs
def _good(device="cpu"):
    c = act((2, 4, 3, 3), torch.float32, False, device)
    m64, v64 = stats64(c)
    w, b = bn_params(4, device)
    return c, m64.float(), torch.rsqrt(v64 + 1e-5).float(), w, b


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_clear_errors(device):
    c, mean, invstd, w, b = _good(device)
    with pytest.raises(RuntimeError, match=r"channel_stats: x must be a 4-D"):
        ops.channel_stats(c[0])
    with pytest.raises(RuntimeError, match=r"channel_stats: x must be float32, float16"):
        ops.channel_stats(c.to(torch.int32))
    with pytest.raises(RuntimeError, match=r"channel_stats: x must be contiguous in NCHW or channels_last"):
        ops.channel_stats(c.transpose(2, 3))
    with pytest.raises(RuntimeError, match=r"bn_act: residual must have the same shape as c, got \[2, 4, 3, 2\]"):
        ops.bn_act(c, mean, invstd, w, b, c[..., :2].contiguous())
    with pytest.raises(RuntimeError, match=r"bn_act: residual must have the same dtype as c"):
        ops.bn_act(c, mean, invstd, w, b, c.double())
    with pytest.raises(RuntimeError, match=r"bn_act: residual must be contiguous in the same memory format"):
        ops.bn_act(c, mean, invstd, w, b, c.contiguous(memory_format=torch.channels_last))
    with pytest.raises(RuntimeError, match=r"bn_act: mean must be a 1-D tensor with one value per channel \(4\)"):
        ops.bn_act(c, mean[:3], invstd, w, b, None)
    with pytest.raises(RuntimeError, match=r"bn_act: invstd must be Float"):
        ops.bn_act(c, mean, invstd.double(), w, b, None)
    _, mask = ops.bn_act(c, mean, invstd, w, b, None)
    with pytest.raises(RuntimeError, match=r"bn_act_backward: mask must be a contiguous uint8 tensor of ceil\(numel / 8\) = 9 bytes"):
        ops.bn_act_backward(c, mask[:5], c, mean, invstd, w, False)
    with pytest.raises(RuntimeError, match=r"bn_act_backward: mask must be uint8"):
        ops.bn_act_backward(c, mask.to(torch.int32), c, mean, invstd, w, False)
    with pytest.raises(RuntimeError, match=r"bn_act_backward: grad_out must have the same shape as c"):
        ops.bn_act_backward(c[:1], mask, c, mean, invstd, w, False)
    nbt = torch.tensor(0, device=device)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    with pytest.raises(RuntimeError, match=r"bn_finalize: count \(N\*H\*W\) must be > 1"):
        ops.bn_finalize(mean, invstd, w, b, rm, rv, nbt, 0.1, 1e-5, 1)
    with pytest.raises(RuntimeError, match=r"bn_finalize: running_var must be a 1-D tensor with one value per channel"):
        ops.bn_finalize(mean, invstd, w, b, rm, rv[:2], nbt, 0.1, 1e-5, 18)
    with pytest.raises(RuntimeError, match=r"bn_finalize: num_batches_tracked must be a one-element int64"):
        ops.bn_finalize(mean, invstd, w, b, rm, rv, nbt.float(), 0.1, 1e-5, 18)
    with pytest.raises(RuntimeError, match=r"conv_bias_relu: weight expects 5 input channels \(5 per group, 1 groups\).* but x has 4"):
        ops.conv_bias_relu(c, torch.randn(3, 5, 3, 3, device=device), torch.randn(3, device=device), 1, 1)
    with pytest.raises(RuntimeError, match=r"conv_bias_relu: bias must be a 1-D tensor of C_out = 3"):
        ops.conv_bias_relu(c, torch.randn(3, 4, 3, 3, device=device), torch.randn(2, device=device), 1, 1)
    with pytest.raises(RuntimeError, match=r"conv_bias_shortcut_relu: the identity shortcut x must have the main branch output shape"):
        ops.conv_bias_shortcut_relu(c, torch.randn(5, 4, 3, 3, device=device), torch.randn(5, device=device),
                                    c, None, 1, 1, 0)
    with pytest.raises(RuntimeError, match=r"conv_bias_shortcut_relu: the projection shortcut .* has shape"):
        ops.conv_bias_shortcut_relu(c, torch.randn(5, 4, 3, 3, device=device), torch.randn(5, device=device),
                                    c, torch.randn(5, 4, 1, 1, device=device), 1, 2, 0)


@pytest.mark.cuda
def test_device_mismatch_is_reported():
    c, mean, invstd, w, b = _good("cuda")
    with pytest.raises(RuntimeError, match=r"bn_act: mean must be on the same device as the activation"):
        ops.bn_act(c, mean.cpu(), invstd, w, b, None)
    with pytest.raises(RuntimeError, match=r"bn_act: residual must be on the same device as c"):
        ops.bn_act(c, mean, invstd, w, b, c.cpu())


# ----------------------------------------------------------------------------- CUDA only
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=IDS.get)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_kernels_match_cpu_kernels_on_larger_shapes(dtype, channels_last):
    """Many blocks, grid-stride loops and partial reductions: (16, 64, 28, 28) and an
    odd (5, 40, 13, 11)."""
    for shape in [(16, 64, 28, 28), (5, 40, 13, 11)]:
        c_cpu, mean, invstd, w, b, r_cpu = _bn_inputs(shape, dtype, channels_last, "cpu", True)
        c, r = c_cpu.cuda(), r_cpu.cuda()
        m_g, v_g = ops.channel_stats(c)
        m_c, v_c = ops.channel_stats(c_cpu)
        torch.testing.assert_close(m_g.cpu(), m_c, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v_g.cpu(), v_c, rtol=1e-4, atol=1e-5)
        args = (mean, invstd, w, b)
        out_g, mask_g = ops.bn_act(c, *(t.cuda() for t in args), r)
        out_c, mask_c = ops.bn_act(c_cpu, *args, r_cpu)
        torch.testing.assert_close(out_g.cpu(), out_c, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-2 if dtype == torch.bfloat16 else 1e-5)
        bits_g = unpack(mask_g.cpu(), c.numel())[0]
        assert torch.equal(bits_g, physical(out_g.cpu()) > 0)
        dy_cpu = act(shape, dtype, channels_last, "cpu")
        res_g = ops.bn_act_backward(dy_cpu.cuda(), mask_g, c, *(t.cuda() for t in args[:2]), w.cuda(), True)
        res_c = ops.bn_act_backward(dy_cpu, mask_g.cpu(), c_cpu, *args[:2], w, True)
        for name, g, e in zip(("grad_c", "grad_w", "grad_b", "grad_res"), res_g, res_c):
            torch.testing.assert_close(g.cpu().double(), e.double(), rtol=2e-2, atol=2e-2 * e.double().abs().max().item() / 10,
                                       msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------- availability
def test_unavailable_reasons_say_what_to_do(monkeypatch):
    from types import SimpleNamespace

    from resnet_fused.backends.native import NativeBackend

    b = NativeBackend()
    assert b.unavailable_reason(torch.device("cpu")) is None
    assert isinstance(_C.cuda_archs, tuple) and all(isinstance(a, int) for a in _C.cuda_archs)
    assert bool(_C.cuda_archs) == _C.built_with_cuda
    b._ext, b._import_error = None, "ModuleNotFoundError: no module named resnet_fused._C"
    reason = b.unavailable_reason(torch.device("cpu"))
    assert "resnet_fused._C is not built" in reason and "pip install --no-build-isolation" in reason
    b._ext = SimpleNamespace(built_with_cuda=False, cuda_archs=())
    assert "built without CUDA kernels" in b.unavailable_reason(torch.device("cuda"))
    b._ext = SimpleNamespace(built_with_cuda=True, cuda_archs=(90,))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert b.unavailable_reason(torch.device("cuda")) == "CUDA is not available"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    assert "compiled for sm_90 but this GPU is sm_80" in b.unavailable_reason(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert b.unavailable_reason(torch.device("cuda")) is None
