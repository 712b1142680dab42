"""The Triton backend's BatchNorm training ops (resnet_fused/backends/triton/bn.py) and
backward convolution kernels (conv_bwd.py) against float64 PyTorch, beyond the op
contract (tests/test_op_contract.py: schemas, opcheck, the float64 torch op): float16,
unwritten outputs (poisoned allocations), statistics with a large mean, and errors.

On CPU they run through Triton's interpreter (conftest sets TRITON_INTERPRET=1), at
interpreter-sized shapes. Outputs are allocated through a NaN-poisoning torch.empty, so
an element a kernel fails to write shows up as a non-finite value.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES
from tolerance import assert_within

triton = pytest.importorskip("triton")
from resnet_fused.backends.triton import bn as tbn  # noqa: E402
from resnet_fused.backends.triton.conv_bwd import GradOperand, conv_dgrad, conv_wgrad  # noqa: E402

ops = torch.ops.resnet_fused_triton
CL = torch.channels_last
LAYOUTS = [torch.contiguous_format, CL]
DTYPES = [torch.float32, torch.float16]


def _dtypes(device):
    # The interpreter computes bf16 arithmetic on the raw bits (wrong): bf16 only on CUDA.
    return DTYPES + ([torch.bfloat16] if device == "cuda" else [])


# `poison` (NaN-filled torch.empty/empty_like) is tests/poisoning.py's fixture.


def _skip_cuda(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def _act(shape, dtype, fmt, device, mean=0.0, std=1.0):
    x = torch.randn(shape, dtype=torch.float64) * std + mean
    return x.to(device=device, dtype=dtype).contiguous(memory_format=fmt)


def _bc(v):
    return v.view(1, -1, 1, 1)


def _packed_mask(out: torch.Tensor) -> torch.Tensor:
    """Pack (out > 0) by physical offset (NHWC order for channels_last)."""
    phys = out.permute(0, 2, 3, 1) if (not out.is_contiguous()
                                        and out.is_contiguous(memory_format=CL)) else out
    bits = (phys.reshape(-1) > 0).to(torch.int32)
    bits = F.pad(bits, (0, (-bits.numel()) % 8)).view(-1, 8)
    return (bits << torch.arange(8, device=out.device)).sum(1).to(torch.uint8)


# ------------------------------------------------------------------ channel_stats
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", LAYOUTS)
def test_channel_stats(device, fmt, poison):
    _skip_cuda(device)
    for dtype in _dtypes(device):
        # A large mean against a small spread: naive E[x^2]-E[x]^2 in fp32 would lose it.
        x = _act((2, 6, 7, 5), dtype, fmt, device, mean=30.0, std=0.5)
        mean, var = ops.channel_stats(x)
        assert mean.dtype == torch.float32 and var.dtype == torch.float32
        x64 = x.double()
        ref_m, ref_v = x64.mean((0, 2, 3)), x64.var((0, 2, 3), unbiased=False)
        xf = x.float()  # plain: PyTorch's own fp32 reduction of the same values
        assert_within("mean", mean, xf.mean((0, 2, 3)), ref_m, dtype=torch.float32)
        assert_within("var", var, xf.var((0, 2, 3), unbiased=False), ref_v, dtype=torch.float32)


# ------------------------------------------------------------------ bn_finalize
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("C", [5, 1100])
def test_bn_finalize_running_stats(device, momentum, C, poison):
    """Three training steps of nn.BatchNorm2d vs channel_stats + bn_finalize, with
    fp32 and half running buffers (a .half() module). C=1100: the finalize program
    walks its channels in two chunks (1024 + 76), and with momentum=None each chunk
    must use the same 1/num_batches_tracked, read before the one increment (on a GPU
    the barrier before that store keeps a lagging warp from reading n+1)."""
    _skip_cuda(device)
    for pdt in (torch.float32, torch.float16):
        ref = torch.nn.BatchNorm2d(C, momentum=momentum).double().to(device)
        plain = torch.nn.BatchNorm2d(C, momentum=momentum).to(device=device, dtype=pdt)
        w = torch.rand(C, device=device, dtype=pdt) + 0.5
        b = torch.randn(C, device=device, dtype=pdt)
        rm = torch.zeros(C, device=device, dtype=pdt)
        rv = torch.ones(C, device=device, dtype=pdt)
        nbt = torch.zeros((), device=device, dtype=torch.long)
        for step in range(3):
            x = _act((2, C, 4, 3), torch.float32, CL, device, mean=step, std=1 + step)
            ref(x.double())
            plain(x.to(pdt))
            mean, var = ops.channel_stats(x)
            invstd, scale, shift = ops.bn_finalize(mean, var, w, b, rm, rv, nbt, 
                                                   -1.0 if momentum is None else momentum,
                                                   1e-5, 2 * 4 * 3)
            v64 = x.double().var((0, 2, 3), unbiased=False)
            m64 = x.double().mean((0, 2, 3))
            inv64 = (v64 + 1e-5).rsqrt()
            assert_within("invstd", invstd, (var.double() + 1e-5).rsqrt().float(), inv64,
                          dtype=torch.float32)
            assert_within("scale", scale, (w.float() * invstd), w.double() * inv64,
                          dtype=torch.float32)
            assert_within("shift", shift, b.float() - mean * w.float() * invstd,
                          b.double() - m64 * w.double() * inv64, dtype=torch.float32)
        assert int(nbt) == 3 == int(ref.num_batches_tracked)
        assert rm.dtype == pdt and rv.dtype == pdt
        assert_within("running_mean", rm, plain.running_mean, ref.running_mean)
        assert_within("running_var", rv, plain.running_var, ref.running_var)


# ------------------------------------------------------------------ bn_act
def _bn_act_ref(c, mean, invstd, w, b, residual):
    y = (c - _bc(mean)) * _bc(invstd) * _bc(w) + _bc(b)
    if residual is not None:
        y = y + residual
    return torch.relu(y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_bn_act(device, fmt, with_residual, poison):
    _skip_cuda(device)
    for dtype in _dtypes(device):
        shape = (2, 6, 5, 7)   # 420 elements: the last mask byte is partial
        c = _act(shape, dtype, fmt, device, mean=0.3, std=2.0)
        r = _act(shape, dtype, fmt, device) if with_residual else None
        mean = c.float().mean((0, 2, 3))
        invstd = (c.float().var((0, 2, 3), unbiased=False) + 1e-5).rsqrt()
        w = torch.rand(6, device=device, dtype=dtype) + 0.5
        b = torch.randn(6, device=device, dtype=dtype)
        out, mask = ops.bn_act(c, mean, invstd, w, b, r)
        assert out.dtype == dtype and out.stride() == c.stride()
        assert mask.dtype == torch.uint8 and mask.shape == ((c.numel() + 7) // 8,)
        ref = _bn_act_ref(c.double(), mean.double(), invstd.double(), w.double(), b.double(),
                          r.double() if r is not None else None)
        # The plain path: PyTorch ops in the activation dtype (BN in fp32, as ATen does).
        plain = torch.relu(((c.float() - _bc(mean)) * _bc(invstd * w.float()) + _bc(b.float())
                            ).to(dtype) + (r if r is not None else 0))
        assert_within("out", out, plain, ref)
        # Mask bits exact: the packed (out > 0) of the op's own output...
        assert torch.equal(mask, _packed_mask(out))
        # ...and of the float64 reference (no value of these inputs sits on the kink).
        assert torch.equal(mask, _packed_mask(ref))


# ------------------------------------------------------------------ bn_act_backward
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("residual_grad", [False, True])
def test_bn_act_backward(device, fmt, residual_grad, poison):
    _skip_cuda(device)
    for dtype in _dtypes(device):
        shape = (2, 5, 6, 5)
        c = _act(shape, dtype, fmt, device, mean=-0.2, std=1.5)
        r = _act(shape, dtype, fmt, device)
        w = torch.rand(5, device=device, dtype=torch.float32) + 0.5
        b = torch.randn(5, device=device, dtype=torch.float32)
        mean, var = ops.channel_stats(c)
        invstd = (var + 1e-5).rsqrt()
        out, mask = ops.bn_act(c, mean, invstd, w, b, r)
        g = _act(shape, dtype, fmt, device)
        grad_c, gw, gb, gr = ops.bn_act_backward(g, mask, c, mean, invstd, w, residual_grad)

        def grads(dt):
            cc = c.to(dt).requires_grad_()
            ww = w.to(dt).requires_grad_()
            bb = b.to(dt).requires_grad_()
            rr = r.to(dt).requires_grad_()
            y = F.batch_norm(cc, None, None, ww, bb, training=True, eps=1e-5)
            y = torch.relu(y + rr)
            y.backward(g.to(dt))
            return cc.grad, ww.grad, bb.grad, rr.grad

        ref = grads(torch.float64)
        plain = grads(dtype) if dtype != torch.float16 or device == "cuda" else \
            [t.to(dtype) if t.dim() == 4 else t for t in grads(torch.float32)]
        assert grad_c.stride() == c.stride() and grad_c.dtype == dtype
        assert gw.dtype == torch.float32 and gb.dtype == torch.float32
        assert_within("grad_c", grad_c, plain[0], ref[0], factor=3)
        assert_within("grad_weight", gw, plain[1], ref[1], factor=3, dtype=dtype)
        assert_within("grad_bias", gb, plain[2], ref[2], factor=3, dtype=dtype)
        if residual_grad:
            assert gr.stride() == c.stride()
            assert_within("grad_residual", gr, plain[3], ref[3], factor=3)
        else:
            assert gr.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_bn_act_autograd(device):
    """bn_act's registered autograd: gradients of c (through the batch statistics),
    weight, bias and residual."""
    _skip_cuda(device)
    c = _act((2, 4, 5, 5), torch.float32, CL, device, std=2.0)
    r = _act((2, 4, 5, 5), torch.float32, CL, device)
    w = torch.rand(4, device=device) + 0.5
    b = torch.randn(4, device=device)
    g = _act((2, 4, 5, 5), torch.float32, CL, device)

    def run(dt, fused):
        cc, ww, bb, rr = (t.detach().to(dt).clone().requires_grad_() for t in (c, w, b, r))
        if fused:
            mean, var = ops.channel_stats(cc.detach())
            out, _ = ops.bn_act(cc, mean, (var + 1e-5).rsqrt(), ww, bb, rr)
        else:
            out = torch.relu(F.batch_norm(cc, None, None, ww, bb, training=True, eps=1e-5) + rr)
        out.backward(g.to(dt))
        return out, cc.grad, ww.grad, bb.grad, rr.grad

    fused, plain, ref = run(torch.float32, True), run(torch.float32, False), \
        run(torch.float64, False)
    for name, f, p, r64 in zip(("out", "c", "weight", "bias", "residual"), fused, plain, ref):
        assert_within(name, f, p, r64, factor=2 if name == "out" else 3)


# ------------------------------------------------------------------ errors
def test_bad_inputs_raise_clear_errors():
    c = _act((2, 4, 5, 3), torch.float32, CL, "cpu")
    mean = torch.zeros(4)
    with pytest.raises(ValueError, match="4-D"):
        ops.channel_stats(torch.randn(4, 5))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ops.channel_stats(c.double())
    with pytest.raises(ValueError, match=r"mean must have shape \(4,\)"):
        ops.bn_act(c, torch.zeros(3), mean, mean, mean, None)
    with pytest.raises(ValueError, match="residual strides"):
        ops.bn_act(c, mean, mean + 1, mean, mean, c.contiguous())
    with pytest.raises(ValueError, match="count must be > 1"):
        ops.bn_finalize(mean, mean + 1, mean, mean, mean.clone(), mean.clone(),
                        torch.zeros((), dtype=torch.long), 0.1, 1e-5, 1)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        ops.bn_finalize(mean, mean + 1, mean, mean, mean.clone(), mean.clone(),
                        torch.zeros(1), 0.1, 1e-5, 10)
    with pytest.raises(ValueError, match="mask must be uint8"):
        ops.bn_act_backward(c, torch.zeros(3, dtype=torch.uint8), c, mean, mean, mean, False)


# ------------------------------------------------------------------ backward convs
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel,stride,pad", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (1, 2, 0)])
def test_conv_dgrad_wgrad(device, kernel, stride, pad, poison):
    """Plain data/weight/bias gradients of a convolution vs ATen's, float64 reference;
    odd spatial sizes so stride 2 leaves a ragged parity class."""
    _skip_cuda(device)
    N, C, H, W, K = 2, 5, 7, 6, 6
    for dtype in _dtypes(device):
        x = _act((N, C, H, W), dtype, CL, device)
        w = (torch.randn(K, C, kernel, kernel, dtype=torch.float64) * 0.3).to(device, dtype)
        P = (H + 2 * pad - kernel) // stride + 1
        Q = (W + 2 * pad - kernel) // stride + 1
        g = _act((N, K, P, Q), dtype, CL, device)

        def grads(dt):
            xx = x.to(dt).requires_grad_()
            ww = w.to(dt).requires_grad_()
            F.conv2d(xx, ww, stride=stride, padding=pad).backward(g.to(dt))
            return xx.grad, ww.grad, g.to(dt).sum((0, 2, 3))

        ref = grads(torch.float64)
        plain = grads(dtype if dtype == torch.float32 or device == "cuda" else torch.float32)
        dx, red = conv_dgrad(GradOperand(g), w, (H, W), stride, pad)
        dw, db = conv_wgrad(GradOperand(g), x, w.shape, stride, pad, need_db=True)
        assert red is None
        assert dx.dtype == dtype and dx.is_contiguous(memory_format=CL)
        assert_within("dx", dx, plain[0].to(dtype), ref[0], factor=3)
        assert_within("dw", dw, plain[1], ref[1], factor=3, dtype=dtype)
        assert_within("db", db, plain[2], ref[2], factor=3, dtype=dtype)


def test_backward_launchers_assert_what_their_caller_guarantees():
    """conv_dgrad / conv_wgrad are fed by train.py only: an inconsistent operand spec is
    an AssertionError naming the part, not a silent misread."""
    g = _act((2, 6, 5, 5), torch.float32, CL, "cpu")
    w = torch.randn(6, 4, 3, 3)
    x = _act((2, 4, 5, 5), torch.float32, CL, "cpu")
    coef = torch.zeros(4, 6)
    with pytest.raises(AssertionError, match="needs c and coef"):
        conv_dgrad(GradOperand(g, coef=coef), w, (5, 5), 1, 1)
    with pytest.raises(AssertionError, match="mask size"):
        conv_wgrad(GradOperand(g, mask=torch.zeros(3, dtype=torch.uint8)), x, w.shape, 1, 1)
    with pytest.raises(AssertionError, match="gradient"):
        conv_dgrad(GradOperand(g.contiguous()), w, (5, 5), 1, 1)
    with pytest.raises(AssertionError, match="conv_wgrad: weight"):
        conv_wgrad(GradOperand(g), x, (6, 5, 3, 3), 1, 1)
