"""The Triton implicit-GEMM convolution (resnet_fused/backends/triton/conv.py).

Every case compares against float64 PyTorch with the tolerance rule of
tests/tolerance.py, where "plain" is the same computation written with
F.conv2d and elementwise ops in the tested dtype. Without a GPU these run in
Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes are
tiny; with a GPU the same cases run compiled, plus bfloat16.
"""
import threading

import pytest
import torch
import torch.nn.functional as F
import triton
from triton.runtime import _allocation

from conftest import DEVICES
from tolerance import assert_within

from resnet_fused.backends.triton import conv  # noqa: E402
from resnet_fused.backends.triton.conv import (  # noqa: E402
    Epilogue, Prologue, ResidualAdd, SecondGemm, conv2d_nhwc)

CL = torch.channels_last

# Every buffer the launcher allocates starts as NaN (tests/poisoning.py), so an element a
# kernel leaves unwritten fails the comparison.
pytestmark = pytest.mark.usefixtures("poison")


# The interpreter computes bf16 on raw bits: bf16 only on the GPU.
DTYPE_DEVICE = [(dt, "cpu") for dt in (torch.float32, torch.float16)] + [
    pytest.param(dt, "cuda", marks=pytest.mark.cuda)
    for dt in (torch.float32, torch.float16, torch.bfloat16)
]


def _reference(dtype, x, w, bias, stride, padding, residual=None, relu=False,
               x2=None, w2=None, stride2=1, padding2=0,
               in_scale=None, in_shift=None, in_relu=False):
    """The plain PyTorch computation, with every tensor cast to `dtype`."""
    def c(t):
        return None if t is None else t.to(dtype)
    xin = c(x)
    if in_scale is not None:
        xin = xin * c(in_scale)[None, :, None, None] + c(in_shift)[None, :, None, None]
        if in_relu:
            xin = torch.relu(xin)
    y = F.conv2d(xin, c(w), c(bias), stride=stride, padding=padding)
    if x2 is not None:
        y = y + F.conv2d(c(x2), c(w2), None, stride=stride2, padding=padding2)
    if residual is not None:
        y = y + c(residual)
    if relu:
        y = torch.relu(y)
    return y


def _make(device, dtype, *shape):
    return torch.randn(*shape, device=device).to(dtype)


def _check(name, dtype, device, fused, args, kwargs):
    """fused vs plain-in-dtype vs float64 (all inputs already rounded to dtype)."""
    ref = _reference(torch.float64, *args, **kwargs)
    plain = _reference(dtype, *args, **kwargs)
    assert fused.dtype == dtype
    assert fused.is_contiguous(memory_format=CL), f"{name}: output is not channels_last"
    assert_within(name, fused, plain, ref)


# (N, C, H, W, K, R, stride, padding)
CASES = [
    pytest.param(2, 8, 7, 7, 8, 3, 1, 1, id="3x3s1-c8-7x7"),
    pytest.param(2, 24, 13, 13, 40, 3, 2, 1, id="3x3s2-c24-k40-13x13"),
    pytest.param(2, 40, 9, 11, 24, 3, 1, 1, id="3x3s1-c40-k24-9x11"),
    pytest.param(2, 40, 13, 13, 24, 1, 2, 0, id="1x1s2-c40-k24-13x13"),
    pytest.param(2, 24, 7, 7, 16, 1, 1, 0, id="1x1s1-c24-k16"),
    pytest.param(1, 3, 9, 9, 16, 3, 2, 1, id="batch1-c3-stem"),
]


@pytest.mark.parametrize("N,C,H,W,K,R,stride,padding", CASES)
@pytest.mark.parametrize("dtype,device", DTYPE_DEVICE)
def test_conv_bias_relu(N, C, H, W, K, R, stride, padding, dtype, device):
    x = _make(device, dtype, N, C, H, W).to(memory_format=CL)
    w = (_make(device, torch.float32, K, C, R, R) / (C * R * R) ** 0.5).to(dtype)
    b = _make(device, dtype, K)
    out = conv2d_nhwc(x, w, stride, padding, epilogue=Epilogue(b, relu=True)).out
    assert out.shape == (N, K, (H + 2 * padding - R) // stride + 1, (W + 2 * padding - R) // stride + 1)
    _check("conv_bias_relu", dtype, device, out, (x, w, b, stride, padding), dict(relu=True))


@pytest.mark.parametrize("dtype,device", DTYPE_DEVICE)
def test_no_bias_no_relu_nchw_input(dtype, device):
    """NCHW input is accepted (converted once); a raw conv keeps negative values."""
    x = _make(device, dtype, 2, 16, 8, 8)  # NCHW-contiguous
    w = (_make(device, torch.float32, 24, 16, 3, 3) / 12).to(dtype)
    out = conv2d_nhwc(x, w, 1, 1).out
    assert (out < 0).any()
    _check("conv", dtype, device, out, (x, w, None, 1, 1), {})


@pytest.mark.parametrize("dtype,device", DTYPE_DEVICE)
def test_channels_last_weight(dtype, device):
    """A channels_last weight ([K, R, S, C] in memory) gives the same result."""
    x = _make(device, dtype, 2, 24, 7, 7).to(memory_format=CL)
    w = (_make(device, torch.float32, 16, 24, 3, 3) / 15).to(dtype)
    a = conv2d_nhwc(x, w, 1, 1).out
    b = conv2d_nhwc(x, w.contiguous(memory_format=CL), 1, 1).out
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype,device", DTYPE_DEVICE)
def test_residual_relu(dtype, device):
    """K2 with the identity shortcut: relu(conv(y) + b + x)."""
    y = _make(device, dtype, 2, 24, 9, 9).to(memory_format=CL)
    x = _make(device, dtype, 2, 24, 9, 9).to(memory_format=CL)
    w = (_make(device, torch.float32, 24, 24, 3, 3) / 15).to(dtype)
    b = _make(device, dtype, 24)
    out = conv2d_nhwc(y, w, 1, 1, residual=ResidualAdd(x), epilogue=Epilogue(b, relu=True)).out
    _check("conv_residual_relu", dtype, device, out, (y, w, b, 1, 1), dict(residual=x, relu=True))


@pytest.mark.parametrize("R2,stride2,padding2", [(1, 2, 0), (3, 2, 1), (1, 1, 0)],
                         ids=["proj1x1s2", "proj3x3s2", "proj1x1s1"])
@pytest.mark.parametrize("dtype,device", DTYPE_DEVICE)
def test_projection_second_gemm(R2, stride2, padding2, dtype, device):
    """K2 with the projection: relu(conv(y, w2) + conv(x, w3) + b) in one accumulator."""
    N, C, H, K = 2, 24, 13 if stride2 == 2 else 7, 40
    P = (H + 2 * padding2 - R2) // stride2 + 1
    x = _make(device, dtype, N, C, H, H).to(memory_format=CL)
    y = _make(device, dtype, N, K, P, P).to(memory_format=CL)
    w = (_make(device, torch.float32, K, K, 3, 3) / 19).to(dtype)
    w3 = (_make(device, torch.float32, K, C, R2, R2) / (C * R2 * R2) ** 0.5).to(dtype)
    b = _make(device, dtype, K)
    out = conv2d_nhwc(y, w, 1, 1, second=SecondGemm(x, w3, stride2, padding2),
                      epilogue=Epilogue(b, relu=True)).out
    _check("conv_projection", dtype, device, out, (y, w, b, 1, 1),
           dict(x2=x, w2=w3, stride2=stride2, padding2=padding2, relu=True))


def _pack_mask(out):
    """schemas.py's packed ReLU mask of `out` over its physical (memory) order."""
    flat = out.permute(0, 2, 3, 1).reshape(-1) if out.is_contiguous(memory_format=CL) \
        else out.reshape(-1)
    bits = (flat > 0).to(torch.uint8)
    bits = torch.cat([bits, bits.new_zeros((-bits.numel()) % 8)]).view(-1, 8)
    return (bits << torch.arange(8, device=out.device, dtype=torch.uint8)).sum(1).to(torch.uint8)


@pytest.mark.parametrize("R,stride,padding,H", [(1, 2, 0, 13), (3, 2, 1, 9), (1, 1, 0, 7)],
                         ids=["1x1s2", "3x3s2", "1x1s1"])
@pytest.mark.parametrize("dtype,device", DTYPE_DEVICE)
def test_bn_residual_relu_mask_epilogue(R, stride, padding, H, dtype, device):
    """The training block's D2L-projection final pass as one GEMM epilogue:
    out = relu(conv(x, w3) + b3 + c2 * scale2 + shift2), and its packed ReLU mask.
    K = 40 spans a partial column tile (the interpreter's BN is 32)."""
    N, C, K = 2, 24, 40
    P = (H + 2 * padding - R) // stride + 1
    x = _make(device, dtype, N, C, H, H).to(memory_format=CL)
    w = (_make(device, torch.float32, K, C, R, R) / (C * R * R) ** 0.5).to(dtype)
    b = _make(device, dtype, K)
    c2 = (_make(device, torch.float32, N, K, P, P) * 2 + 1).to(dtype).to(memory_format=CL)
    scale = torch.rand(K, device=device) + 0.5
    shift = torch.randn(K, device=device) - 0.5
    out, mask, mean, var = conv2d_nhwc(x, w, stride, padding,
                                       residual=ResidualAdd(c2, scale, shift),
                                       epilogue=Epilogue(b, relu=True, mask=True))
    assert mean is None and var is None
    # The BN'd residual, in fp32 then rounded to dtype as a plain bn2 output would be.
    res = (c2.float() * scale[None, :, None, None] + shift[None, :, None, None]).to(dtype)
    res64 = c2.double() * scale.double()[None, :, None, None] + shift.double()[None, :, None, None]
    ref = torch.relu(F.conv2d(x.double(), w.double(), b.double(), stride=stride,
                              padding=padding) + res64)
    plain = torch.relu(F.conv2d(x, w, b, stride=stride, padding=padding) + res)
    assert out.dtype == dtype and out.is_contiguous(memory_format=CL)
    assert_within("conv_bn_residual_relu", out, plain, ref)
    assert ((out > 0).float().mean() - 0.5).abs() < 0.4   # both bit values occur
    assert mask.dtype == torch.uint8 and mask.shape == ((N * K * P * P + 7) // 8,)
    torch.testing.assert_close(mask, _pack_mask(out), rtol=0, atol=0)


@pytest.mark.parametrize("dtype,device", DTYPE_DEVICE)
def test_mask_with_stats_and_plain_residual(dtype, device):
    """The mask with a plain residual and stats: every field of ConvOut is filled."""
    N, C, H, K = 2, 16, 7, 16
    x = _make(device, dtype, N, C, H, H).to(memory_format=CL)
    w = (_make(device, torch.float32, K, C, 3, 3) / 12).to(dtype)
    r = _make(device, dtype, N, K, H, H).to(memory_format=CL)
    out, mask, mean, var = conv2d_nhwc(x, w, 1, 1, residual=ResidualAdd(r),
                                       epilogue=Epilogue(relu=True, mask=True), stats=True)
    _check("conv_residual_mask", dtype, device, out, (x, w, None, 1, 1),
           dict(residual=r, relu=True))
    torch.testing.assert_close(mask, _pack_mask(out), rtol=0, atol=0)
    o = out.double()
    torch.testing.assert_close(mean.double(), o.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), o.var((0, 2, 3), unbiased=False), rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype,device", DTYPE_DEVICE)
def test_prologue_padding_is_zero_after_transform(stride, dtype, device):
    """relu(x*scale+shift) on load; the padded border is zero in the TRANSFORMED space.

    shift > 0 on most channels makes relu(0*scale + shift) != 0, so padding applied in
    the raw space (the OOB zero fill before the transform) would be caught at the border.
    """
    N, C, H, K = 2, 24, 9, 16
    c1 = _make(device, dtype, N, C, H, H).to(memory_format=CL)
    scale = torch.rand(C, device=device) + 0.5
    shift = torch.rand(C, device=device) + 0.2
    shift[::5] = -1.0  # some channels clipped by the ReLU too
    w = (_make(device, torch.float32, K, C, 3, 3) / 15).to(dtype)
    b = _make(device, dtype, K)
    out = conv2d_nhwc(c1, w, stride, 1, prologue=Prologue(scale, shift, relu=True),
                      epilogue=Epilogue(b)).out
    # The plain path's transform is in fp32 then rounded to dtype, as the kernel's is.
    y1 = torch.relu(c1.float() * scale[None, :, None, None] + shift[None, :, None, None]).to(dtype)
    _check("conv_prologue", dtype, device, out, (y1, w, b, stride, 1), {})
    # Without the prologue's ReLU, negative transformed values pass through.
    out2 = conv2d_nhwc(c1, w, stride, 1, prologue=Prologue(scale, shift, relu=False)).out
    y1b = (c1.float() * scale[None, :, None, None] + shift[None, :, None, None]).to(dtype)
    _check("conv_prologue_norelu", dtype, device, out2, (y1b, w, None, stride, 1), {})


@pytest.mark.parametrize("dtype,device", DTYPE_DEVICE)
def test_stats_epilogue(dtype, device):
    """stats=True: fp32 per-channel mean and biased variance of the written output."""
    N, C, H, K = 2, 24, 13, 40
    x = _make(device, dtype, N, C, H, H).to(memory_format=CL)
    w = (_make(device, torch.float32, K, C, 3, 3) / 15).to(dtype)
    b = (_make(device, torch.float32, K) * 3).to(dtype)  # far-from-zero means
    out, mask, mean, var = conv2d_nhwc(x, w, 1, 1, epilogue=Epilogue(b), stats=True)
    assert mask is None
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (K,)
    _check("conv_stats_out", dtype, device, out, (x, w, b, 1, 1), {})
    # Exactly the statistics of what was written (up to fp32 summation order).
    o64 = out.double()
    torch.testing.assert_close(mean.double(), o64.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), o64.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-6)
    # And, through the tolerance rule, the statistics of the exact convolution.
    ref = _reference(torch.float64, x, w, b, 1, 1)
    plain = _reference(dtype, x, w, b, 1, 1).float()
    assert_within("stats_mean", mean, plain.mean((0, 2, 3)), ref.mean((0, 2, 3)), dtype=dtype)
    assert_within("stats_var", var, plain.var((0, 2, 3), unbiased=False),
                  ref.var((0, 2, 3), unbiased=False), dtype=dtype)


@pytest.mark.parametrize("dtype,device", DTYPE_DEVICE)
def test_stats_with_prologue_and_relu(dtype, device):
    """The training conv2 shape of use: prologue in, stats out, residual + ReLU ignored."""
    N, C, H, K = 1, 16, 11, 24
    c1 = _make(device, dtype, N, C, H, H).to(memory_format=CL)
    scale = torch.rand(C, device=device) + 0.5
    shift = torch.randn(C, device=device)
    w = (_make(device, torch.float32, K, C, 3, 3) / 12).to(dtype)
    out, _, mean, var = conv2d_nhwc(c1, w, 2, 1, prologue=Prologue(scale, shift, relu=True),
                                    stats=True)
    y1 = torch.relu(c1.float() * scale[None, :, None, None] + shift[None, :, None, None]).to(dtype)
    _check("conv_prologue_stats", dtype, device, out, (y1, w, None, 2, 1), {})
    o64 = out.double()
    torch.testing.assert_close(mean.double(), o64.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), o64.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bms", [(32, 64), (64, 32), (32, 128, 64)],
                         ids=lambda b: "-".join(map(str, b)))
def test_stats_independent_of_earlier_launches_on_the_same_buffers(bms, monkeypatch):
    """Autotuning runs every config on the same statistics buffers before the winner's
    launch: the result must not depend on what an earlier config (another BM) left
    there. The conv kernel is launched once per BM in `bms`, in that order, on the same
    arguments, its partial-statistics buffers first filled with positive garbage (as
    reused memory may hold); the statistics are those of the last launch's output."""
    launched = []

    def launch_each_config(kernel, grid, *args, **kwargs):
        if kernel is not conv._conv_kernel:
            return conv_launch(kernel, grid, *args, **kwargs)
        named = dict(zip(kernel.arg_names, args))
        named["pcnt_ptr"].fill_(1e4)
        named["pmean_ptr"].fill_(1e3)
        named["pm2_ptr"].fill_(1e3)
        for bm in bms:
            cfg = conv._cfg(bm, 32, 16, 4, 1)
            kernel.fn[grid](*args, **kwargs, **cfg.all_kwargs())
            launched.append(bm)

    conv_launch = conv.launch
    monkeypatch.setattr(conv, "launch", launch_each_config)
    N, C, H, K = 2, 8, 10, 40    # M = 200 rows: 7 slots of 32, partial last tiles
    x = _make("cpu", torch.float32, N, C, H, H).to(memory_format=CL)
    w = _make("cpu", torch.float32, K, C, 3, 3) / 8
    b = _make("cpu", torch.float32, K) * 3
    out, _, mean, var = conv2d_nhwc(x, w, 1, 1, epilogue=Epilogue(b), stats=True)
    assert launched == list(bms)
    _check("conv_stats_out", torch.float32, "cpu", out, (x, w, b, 1, 1), {})
    o64 = out.double()
    torch.testing.assert_close(mean.double(), o64.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), o64.var((0, 2, 3), unbiased=False), rtol=1e-4,
                               atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_stats_combine_skips_unwritten_rows_and_is_stable(device):
    """The tile combiner (two passes: T > tiles per split): rows with count 0 may hold
    NaN garbage; a large common offset (mean 1e3, std 1) must not cancel the variance."""
    assert 70 > conv._TPS or device == "cuda"
    T, K, BM = 70, 40, 32
    M = T * BM - 5
    vals = (torch.randn(M, K, dtype=torch.float64, device=device) + 1e3)
    pmean = torch.full((T + 9, K), float("nan"), device=device)
    pm2 = torch.full((T + 9, K), float("nan"), device=device)
    pcnt = torch.zeros(T + 9, device=device)
    for t in range(T):
        v = vals[t * BM:(t + 1) * BM]
        pmean[t] = v.mean(0).float()
        pm2[t] = ((v - v.mean(0)) ** 2).sum(0).float()
        pcnt[t] = v.shape[0]
    mean, var = conv._combine_stats(pmean, pm2, pcnt, K, device)
    torch.testing.assert_close(mean.double(), vals.mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), vals.var(0, unbiased=False), rtol=1e-4, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("allow", [False, True])
def test_fp32_tf32_switch_cuda(allow):
    """fp32 honours torch.backends.cudnn.allow_tf32: off -> IEEE fp32 products."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = allow
    try:
        assert conv._input_precision(torch.float32) == ("tf32" if allow else "ieee")
        x = torch.randn(4, 64, 14, 14, device="cuda").to(memory_format=CL)
        w = torch.randn(64, 64, 3, 3, device="cuda") / 24
        out = conv2d_nhwc(x, w, 1, 1).out
        plain = F.conv2d(x, w, padding=1)
        ref = F.conv2d(x.double(), w.double(), padding=1)
        assert_within("fp32_tf32" if allow else "fp32_ieee", out, plain, ref)
        if not allow:  # truly fp32: far below TF32's ~1e-3 relative error
            assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5
    finally:
        torch.backends.cudnn.allow_tf32 = old


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_resnet_stage_shapes_cuda(dtype):
    """The benchmark's stage shapes at a small batch, through the autotuned GPU configs."""
    for C, K, H, s in [(64, 64, 56, 1), (64, 128, 56, 2), (128, 128, 28, 1), (256, 256, 14, 1),
                       (512, 512, 7, 1)]:
        x = torch.randn(4, C, H, H, device="cuda").to(dtype).to(memory_format=CL)
        w = (torch.randn(K, C, 3, 3, device="cuda") / (9 * C) ** 0.5).to(dtype)
        b = torch.randn(K, device="cuda").to(dtype)
        out = conv2d_nhwc(x, w, s, 1, epilogue=Epilogue(b, relu=True)).out
        _check(f"stage{C}-{K}-{H}", dtype, "cuda", out, (x, w, b, s, 1), dict(relu=True))


OPS = torch.ops.resnet_fused_triton


def test_eval_ops_bad_inputs_raise_clear_errors():
    """The public ops validate what a user passes (conv_checks.py), naming the problem."""
    x = torch.randn(1, 8, 5, 5).to(memory_format=CL)
    w, b = torch.randn(8, 8, 3, 3), torch.randn(8)
    k1 = [
        ((x[0], w, b, 1, 1), ValueError, "conv_bias_relu: x must be 4-D"),
        ((x, w[:, :4], b, 1, 1), ValueError, "weight expects 4 input channels, x has 8"),
        ((x.double(), w, b, 1, 1), TypeError, "x dtype must be float32, float16 or bfloat16"),
        ((x, w.long(), b, 1, 1), TypeError, "weight must be floating point"),
        ((x, w, b, 0, 1), ValueError, "stride must be an int >= 1"),
        ((x, w, b, 1, -1), ValueError, "padding must be an int >= 0"),
        ((x, w, torch.randn(7), 1, 1), ValueError, r"bias must have shape \(8,\)"),
        ((x[:0], w, b, 1, 1), ValueError, "x is empty"),
        ((torch.randn(1, 8, 1, 1), w, b, 1, 0), ValueError, "empty output"),
    ]
    for args, err, match in k1:
        with pytest.raises(err, match=match):
            OPS.conv_bias_relu(*args)
    x9, w1 = torch.randn(1, 8, 9, 9), torch.randn(8, 8, 1, 1)
    k2 = [
        ((x, w, b, x[:, :, :4], None, 1, 1, 0), ValueError,
         r"identity shortcut x must have the output shape \(1, 8, 5, 5\)"),
        ((x, w, b, x.half(), None, 1, 1, 0), TypeError, "x dtype torch.float16 differs"),
        ((x, w, b, x9, torch.randn(4, 8, 1, 1), 1, 2, 0), ValueError,
         r"projection shortcut conv\(x, shortcut_weight\) has shape \(1, 4, 5, 5\)"),
        ((x, w, b, x9, w1, 1, 1, 0), ValueError, r"has shape \(1, 8, 9, 9\), the main"),
        ((x, w, b, x9, w1, 1, 0, 0), ValueError, "shortcut_stride must be an int >= 1"),
        ((x, w, b, x9, torch.randn(8, 4, 1, 1), 1, 2, 0), ValueError,
         "shortcut_weight expects 4 input channels, x has 8"),
        ((x, w, b[:4], x, None, 1, 1, 0), ValueError, r"bias must have shape \(8,\)"),
    ]
    for args, err, match in k2:
        with pytest.raises(err, match=match):
            OPS.conv_bias_shortcut_relu(*args)


def test_launcher_asserts_what_its_callers_guarantee():
    """Below the ops, conv2d_nhwc asserts (with a message) instead of validating."""
    x = torch.randn(1, 8, 5, 5).to(memory_format=CL)
    w = torch.randn(8, 8, 3, 3)
    r = torch.randn(1, 8, 5, 5).to(memory_format=CL)
    with pytest.raises(AssertionError, match="conv2d_nhwc: x"):
        conv2d_nhwc(x, w.half())
    with pytest.raises(AssertionError, match="K % 8 == 0"):
        conv2d_nhwc(x, torch.randn(12, 8, 3, 3), epilogue=Epilogue(mask=True))
    with pytest.raises(AssertionError, match="scale and shift go together"):
        conv2d_nhwc(x, w, residual=ResidualAdd(r, torch.ones(8)))
    with pytest.raises(AssertionError, match="residual.scale"):
        conv2d_nhwc(x, w, residual=ResidualAdd(r, torch.ones(4), torch.zeros(4)))
    with pytest.raises(AssertionError, match="second GEMM"):
        conv2d_nhwc(x, w, second=SecondGemm(torch.randn(1, 8, 9, 9), torch.randn(8, 8, 1, 1)))


# ------------------------------------------------------------------ tensor-descriptor path
# The interpreter emulates tensor descriptors (OOB zero fill at negative coordinates
# included), so the TMA kernel's tiling and index logic is checked here; the hardware
# TMA unit itself only runs on a Hopper GPU (the cuda-marked case below).
TMA_CASES = [
    pytest.param(2, 24, 9, 11, 40, 3, id="3x3-c24-k40-9x11"),
    pytest.param(1, 40, 7, 7, 24, 3, id="3x3-b1-c40-7x7"),
    pytest.param(2, 16, 13, 5, 16, 1, id="1x1-c16-13x5"),
]


@pytest.mark.parametrize("N,C,H,W,K,R", TMA_CASES)
@pytest.mark.parametrize("dtype,device", DTYPE_DEVICE)
def test_tma_path(N, C, H, W, K, R, dtype, device):
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors (TMA) need compute capability >= 9.0")
    pad = (R - 1) // 2
    x = _make(device, dtype, N, C, H, W).to(memory_format=CL)
    w = (_make(device, torch.float32, K, C, R, R) / (C * R * R) ** 0.5).to(dtype)
    b = _make(device, dtype, K)
    res = _make(device, dtype, N, K, H, W).to(memory_format=CL)
    out = conv2d_nhwc(x, w, 1, pad, residual=ResidualAdd(res), epilogue=Epilogue(b, relu=True),
                      _path="tma").out
    _check("tma_residual", dtype, device, out, (x, w, b, 1, pad), dict(residual=res, relu=True))


@pytest.mark.parametrize("dtype,device", DTYPE_DEVICE)
def test_tma_path_bn_residual_mask(dtype, device):
    """The fused final-pass epilogue (BN'd residual, ReLU, mask) on the descriptor path."""
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors (TMA) need compute capability >= 9.0")
    x = _make(device, dtype, 2, 16, 7, 6).to(memory_format=CL)
    w = (_make(device, torch.float32, 40, 16, 1, 1) / 4).to(dtype)
    c2 = _make(device, dtype, 2, 40, 7, 6).to(memory_format=CL)
    scale, shift = torch.rand(40, device=device) + 0.5, torch.randn(40, device=device)
    out, mask, _, _ = conv2d_nhwc(x, w, 1, 0, residual=ResidualAdd(c2, scale, shift),
                                  epilogue=Epilogue(relu=True, mask=True), _path="tma")
    ref = torch.relu(F.conv2d(x.double(), w.double())
                     + c2.double() * scale.double()[None, :, None, None]
                     + shift.double()[None, :, None, None])
    res = (c2.float() * scale[None, :, None, None] + shift[None, :, None, None]).to(dtype)
    assert_within("tma_bn_residual", out, torch.relu(F.conv2d(x, w) + res), ref)
    torch.testing.assert_close(mask, _pack_mask(out), rtol=0, atol=0)


def test_tma_allocator_is_set_in_every_thread(monkeypatch):
    """triton.set_allocator writes a ContextVar, so each thread that takes the descriptor
    path needs its own call: once per thread, not once per process."""
    calls = []
    real = triton.set_allocator

    def spy(alloc):
        calls.append(threading.current_thread().name)
        real(alloc)
    monkeypatch.setattr(conv.triton, "set_allocator", spy)
    seen = {}

    def in_thread(name):
        before = _allocation._allocator.get()
        conv._ensure_tma_allocator()
        conv._ensure_tma_allocator()  # the second call in a thread sets nothing
        seen[name] = (before, _allocation._allocator.get())
    for name in ("a", "b"):
        t = threading.Thread(target=in_thread, args=(name,), name=name)
        t.start()
        t.join()
    assert calls == ["a", "b"], calls
    for name in ("a", "b"):
        before, after = seen[name]
        assert isinstance(before, _allocation.NullAllocator)  # a new thread has none
        assert after is conv._tma_scratch


@pytest.mark.parametrize("dtype,device", DTYPE_DEVICE)
def test_tma_path_with_projection(dtype, device):
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors (TMA) need compute capability >= 9.0")
    y = _make(device, dtype, 2, 40, 7, 7).to(memory_format=CL)
    x = _make(device, dtype, 2, 24, 13, 13).to(memory_format=CL)
    w = (_make(device, torch.float32, 40, 40, 3, 3) / 19).to(dtype)
    w3 = (_make(device, torch.float32, 40, 24, 1, 1) / 5).to(dtype)
    b = _make(device, dtype, 40)
    out = conv2d_nhwc(y, w, 1, 1, second=SecondGemm(x, w3, 2, 0), epilogue=Epilogue(b, relu=True),
                      _path="tma").out
    _check("tma_projection", dtype, device, out, (y, w, b, 1, 1),
           dict(x2=x, w2=w3, stride2=2, padding2=0, relu=True))


def test_tma_path_refuses_what_it_cannot_do():
    x = torch.randn(1, 8, 5, 5).to(memory_format=CL)
    w = torch.randn(8, 8, 3, 3)
    with pytest.raises(ValueError, match="TMA path needs stride 1"):
        conv2d_nhwc(x, w, stride=2, _path="tma")
    with pytest.raises(ValueError, match="TMA path needs"):
        conv2d_nhwc(x, w, stats=True, _path="tma")
    with pytest.raises(ValueError, match="TMA path needs"):  # 6 fp32 channels = 24 bytes
        conv2d_nhwc(torch.randn(1, 6, 5, 5), torch.randn(8, 6, 3, 3), _path="tma")
    with pytest.raises(ValueError, match="_path must be"):
        conv2d_nhwc(x, w, _path="fast")


def test_tf32_switch_is_read_from_pytorch():
    """Which fp32 precision the launcher would ask for (the kernel itself needs a GPU)."""
    cudnn = torch.backends.cudnn
    old = cudnn.allow_tf32
    try:
        cudnn.allow_tf32 = False
        assert conv._conv_allows_tf32() is False
        cudnn.allow_tf32 = True
        assert conv._conv_allows_tf32() is True
        if hasattr(cudnn, "conv") and hasattr(cudnn.conv, "fp32_precision"):
            old_p = cudnn.conv.fp32_precision
            try:
                cudnn.conv.fp32_precision = "ieee"
                assert conv._conv_allows_tf32() is False
                cudnn.conv.fp32_precision = "tf32"
                assert conv._conv_allows_tf32() is True
            finally:
                cudnn.conv.fp32_precision = old_p
    finally:
        cudnn.allow_tf32 = old
    assert cudnn.allow_tf32 == old  # state restored, and readable through the legacy API
