"""The Triton backend's fused training path (resnet_fused/backends/triton/train.py):
output, every gradient and the running statistics of FusedResidual(backend="triton")
in training mode against the plain block in float64, by the tolerance rule.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1) at
interpreter-sized shapes; with a GPU the same cases run compiled, plus bfloat16.
"""
import copy

import pytest
import torch
from torch import nn

from conftest import DEVICES
from tolerance import FLOOR, assert_within

pytest.importorskip("triton")
from resnet_fused import FusedResidual  # noqa: E402
from resnet_fused.reference import Residual, plain_block_forward  # noqa: E402
from resnet_fused.backends.triton import bn as tbn  # noqa: E402
from resnet_fused.backends.triton.train import train_block  # noqa: E402
from resnet_fused.matching import spec_of  # noqa: E402
from resnet_fused.spec import resolve  # noqa: E402


def parts_of(block):
    return resolve(block, spec_of(block))

CL = torch.channels_last
ops = torch.ops.resnet_fused_triton


class _BasicBlock(nn.Module):
    """torchvision's BasicBlock layout (convs without bias, downsample = conv1x1 + BN),
    written out so the test needs no torchvision."""

    def __init__(self, cin, k, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, k, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(k)
        self.conv2 = nn.Conv2d(k, k, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(k)
        self.downsample = nn.Sequential(nn.Conv2d(cin, k, 1, stride, bias=False),
                                        nn.BatchNorm2d(k))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.downsample(x))


# name -> (input channels, output channels, stride, builder)
CONFIGS = {
    "identity": (8, 8, 1, lambda: Residual(8, 8)),
    "1x1/2": (4, 8, 2, lambda: Residual(4, 8, use_1x1conv=True, strides=2)),
    "1x1/1": (4, 8, 1, lambda: Residual(4, 8, use_1x1conv=True, strides=1)),
    # 12 channels: not a multiple of 8, so the D2L projection's final pass cannot be the
    # GEMM epilogue (a mask byte would span two tiles) and takes the elementwise pass.
    "1x1/2-k12": (4, 12, 2, lambda: Residual(4, 12, use_1x1conv=True, strides=2)),
    "3x3/2": (4, 8, 2, None),          # D2L copies whose conv3 is a 3x3, padding 1
    "bn/2": (4, 8, 2, lambda: _BasicBlock(4, 8, 2)),
}


def _make_block(name, momentum=0.1):
    cin, k, stride, build = CONFIGS[name]
    if build is None:
        block = Residual(cin, k, use_1x1conv=True, strides=stride)
        block.conv3 = nn.Conv2d(cin, k, 3, stride, 1)
    else:
        block = build()
    # Fresh, non-trivial BN parameters and running statistics.
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.5)
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return block.train()


# `poison` (NaN-filled torch.empty/empty_like) is tests/poisoning.py's fixture.


def _cases(device):
    dts = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
    return dts


def _params(block):
    return dict(block.named_parameters())


def _check_grads(fused_blk, plain_blk, ref_blk, dtype, xs):
    """Every parameter gradient by the rule (3x); biases that feed a training BN have a
    true gradient of zero: there the check is that the value is noise-sized."""
    pf, pp, pr = _params(fused_blk), _params(plain_blk), _params(ref_blk)
    assert pf.keys() == pr.keys()
    for name in pr:
        gf, gp, gr = pf[name].grad, pp[name].grad, pr[name].grad
        assert gf is not None, f"{name}: no gradient"
        assert gf.dtype == pf[name].dtype and gf.shape == pf[name].shape, name
        bn_follows = name in ("conv1.bias", "conv2.bias") or (
            name == "conv3.bias" and getattr(ref_blk, "bn3", None) is not None)
        if bn_follows:
            wname = name.replace("bias", "weight")
            scale = pr[wname].grad.abs().max().item()
            limit = max(3 * gp.abs().max().item(), 4 * FLOOR[dtype] * scale)
            assert torch.isfinite(gf).all() and gf.abs().max().item() <= limit, (
                f"{name}: |grad| {gf.abs().max().item():.3e} > {limit:.3e} (true value 0)")
        else:
            assert_within(f"grad {name}", gf, gp, gr, factor=3)


def _run_steps(name, dtype, fmt, device, steps=3):
    block = _make_block(name)
    ref = copy.deepcopy(block).double().to(device)
    plain = copy.deepcopy(block).to(device=device, dtype=dtype)
    fused = FusedResidual.from_residual(copy.deepcopy(block).to(device=device, dtype=dtype),
                                        backend="triton")
    cin, k, s, _ = CONFIGS[name]
    H, W = 6, 5
    for step in range(steps):
        # Gradients are checked on the first step; the later steps (forward only, to keep
        # interpreter time down) check the output and feed the running statistics.
        backward = step == 0
        x64 = (torch.randn(2, cin, H, W, dtype=torch.float64) * (1 + step) + 0.2 * step)
        x = x64.to(device=device, dtype=dtype).contiguous(memory_format=fmt)
        g = torch.randn(2, k, (H - 1) // s + 1, (W - 1) // s + 1, dtype=torch.float64,
                        device=device)
        outs = []
        for blk, inp in ((ref, x.double()), (plain, x), (fused, x)):
            blk.zero_grad(set_to_none=True)
            xi = inp.detach().clone().requires_grad_(backward)
            out = blk(xi) if blk is fused else plain_block_forward(blk, xi)
            if backward:
                out.backward(g.to(dtype=out.dtype).contiguous(memory_format=fmt))
            outs.append((out, xi.grad))
        (o_r, gx_r), (o_p, gx_p), (o_f, gx_f) = outs
        assert o_f.dtype == dtype and o_f.is_contiguous(memory_format=fmt)
        assert_within(f"step {step} out", o_f, o_p, o_r)
        if backward:
            assert gx_f.dtype == dtype and gx_f.is_contiguous(memory_format=fmt)
            assert_within(f"step {step} grad x", gx_f, gx_p, gx_r, factor=3)
            _check_grads(fused, plain, ref, dtype, x)
    return fused, plain, ref


def _check_running(fused, plain, ref):
    bf, bp, br = (dict(b.named_buffers()) for b in (fused, plain, ref))
    assert bf.keys() == br.keys()
    for name in br:
        if name.endswith("num_batches_tracked"):
            assert int(bf[name]) == int(br[name]) == 3, name
        else:
            assert_within(name, bf[name], bp[name], br[name])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_train_block_vs_float64(device, name, poison):
    """channels_last, every dtype, every shortcut kind and stride."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    for dtype in _cases(device):
        fused, plain, ref = _run_steps(name, dtype, CL, device)
        _check_running(fused, plain, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["identity", "bn/2"])
def test_train_block_nchw(device, name, poison):
    """NCHW in, NCHW out (the unit works in NHWC; the conversions are autograd's)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    fused, plain, ref = _run_steps(name, torch.float32, torch.contiguous_format, device)
    _check_running(fused, plain, ref)


def test_momentum_none_cumulative_average():
    """momentum=None: running stats are the cumulative average (1/num_batches_tracked)."""
    block = _make_block("identity", momentum=None)
    ref = copy.deepcopy(block).double()
    fused = FusedResidual.from_residual(copy.deepcopy(block), backend="triton")
    for step in range(3):
        x = torch.randn(2, 8, 5, 6) * (1 + step)
        plain_block_forward(ref, x.double())
        fused(x.contiguous(memory_format=CL))
    for name, b in ref.named_buffers():
        got = dict(fused.named_buffers())[name]
        if name.endswith("num_batches_tracked"):
            assert int(got) == int(b) == 3
        else:
            torch.testing.assert_close(got.double(), b, rtol=2e-5, atol=1e-6)


def _functional(name, dtype=torch.float32):
    """The block's parameters as a flat tuple of leaf tensors, and f(x, *params) -> out
    through the differentiable unit block_train (no running-stat update)."""
    block = _make_block(name)
    p = dict(block.named_parameters())
    bn3 = "downsample.1.weight" in p
    c3w = p.get("conv3.weight", p.get("downsample.0.weight"))
    c3b = p.get("conv3.bias")
    names = ["x", "w1", "b1", "g1", "beta1", "w2", "b2", "g2", "beta2", "w3", "b3", "g3", "beta3"]
    vals = [None, p["conv1.weight"], p.get("conv1.bias"), p["bn1.weight"], p["bn1.bias"],
            p["conv2.weight"], p.get("conv2.bias"), p["bn2.weight"], p["bn2.bias"], c3w, c3b,
            p.get("downsample.1.weight") if bn3 else None,
            p.get("downsample.1.bias") if bn3 else None]
    stride = CONFIGS[name][2]

    def f(x, w1, b1, g1, beta1, w2, b2, g2, beta2, w3, b3, g3, beta3):
        # The op's per-stage lists: stage 0 (conv1, bn1), stage 1 (conv2, bn2).
        return ops.block_train(x, [w1, w2], [b1, b2], [g1, g2], [beta1, beta2], [stride, 1],
                               [1e-5, 1e-5], w3, b3, g3, beta3, 1e-5)[0]

    return names, [v.detach().to(dtype) if v is not None else None for v in vals], f


@pytest.mark.parametrize("name", ["identity", "bn/2", "3x3/2"])
def test_finite_difference_gradients(name):
    """Directional finite differences in float32 (central differences, one random
    direction per input tensor) against the fused backward. A small step (perturbation
    norm 2e-4): at these tiny shapes the batch statistics and ReLU kinks make the loss
    curve so much that float64 differences of the plain block along a w1 direction of
    norm 2e-2 are 15% off.
    The tolerance is 1% plus a bound on the rounding noise of the float32 quotient."""
    names, vals, f = _functional(name)
    cin = CONFIGS[name][0]
    vals[0] = torch.randn(2, cin, 5, 4).contiguous(memory_format=CL)
    leaves = [v.clone().requires_grad_() if v is not None else None for v in vals]
    out = f(*leaves)
    v = torch.randn_like(out)
    (out * v).sum().backward()
    mag = (out.detach().double() * v).abs().sum().item()   # size of the loss' terms
    for i, (nm, leaf) in enumerate(zip(names, leaves)):
        if leaf is None:
            continue
        u = torch.randn_like(leaf)
        u /= u.norm()     # a unit direction, perturbation norm eps
        eps = 2e-4

        def loss(t):
            args = list(vals)
            args[i] = t.contiguous(memory_format=CL) if i == 0 else t
            return (f(*args).double() * v).sum().item()

        fd = (loss(vals[i] + eps * u) - loss(vals[i] - eps * u)) / (2 * eps)
        an = (leaf.grad.double() * u).sum().item()
        noise = 4 * 2.0 ** -24 * mag / eps
        assert abs(fd - an) <= 1e-2 * max(abs(fd), abs(an)) + noise, (
            f"{nm}: finite difference {fd:.6f} vs autograd {an:.6f} (noise {noise:.1e})")


def _compile_step(backend, device):
    block = _make_block("1x1/2").to(device)
    eager = FusedResidual.from_residual(copy.deepcopy(block), backend="triton")
    comp_blk = FusedResidual.from_residual(copy.deepcopy(block), backend="triton")

    def step(m, x):
        out = m(x)
        return out, (out * out).mean()

    # The forward (with the running-stat updates) is one graph, no breaks; AOTAutograd
    # traces the backward of the same graph, run by loss.backward().
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    for i in range(2):
        x = torch.randn(2, 4, 6, 6, device=device).contiguous(memory_format=CL)
        o_e, l_e = step(eager, x)
        o_c, l_c = compiled(comp_blk, x)
        l_e.backward()
        l_c.backward()
        torch.testing.assert_close(o_c, o_e, rtol=1e-5, atol=1e-5)
    for (n, pe), (_, pc) in zip(eager.named_parameters(), comp_blk.named_parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5, msg=n)
    for (n, be), (_, bc) in zip(eager.named_buffers(), comp_blk.named_buffers()):
        torch.testing.assert_close(bc, be, rtol=1e-5, atol=1e-6, msg=n)
    assert int(comp_blk.bn1.num_batches_tracked) == 2


def test_compile_fullgraph_aot_eager():
    """torch.compile(fullgraph=True) of a training step (forward, loss, backward) with
    the autograd graph traced by AOTAutograd; in the interpreter the ops are opaque."""
    torch._dynamo.reset()
    _compile_step("aot_eager", "cpu")


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow),
                                    pytest.param("cuda", marks=pytest.mark.cuda)])
def test_compile_fullgraph_inductor(device):
    """Inductor. On CPU the interpreter's ops are opaque custom ops (about 15 s of
    compilation); on CUDA they are triton_ops whose kernels Inductor sees."""
    torch._dynamo.reset()
    _compile_step("inductor", device)


@pytest.mark.parametrize("name,fused_final", [("1x1/2", True), ("3x3/2", True),
                                              ("1x1/2-k12", False), ("bn/2", False),
                                              ("identity", False)])
def test_d2l_projection_final_pass_is_the_gemm_epilogue(name, fused_final, monkeypatch):
    """For the D2L projection (no bn3) with K % 8 == 0, relu(bn2(c2) + conv3(x)) and its
    mask come out of the projection GEMM's epilogue: no elementwise pass runs, and no
    convolution without the fused epilogue writes the shortcut."""
    from resnet_fused.backends.triton import train as ttrain

    calls = {"bn_act": 0, "conv_plain_out": 0}
    real_bn_act, real_conv = ttrain.bn_act_impl, ttrain.conv2d_nhwc

    def bn_act(*a, **k):
        calls["bn_act"] += 1
        return real_bn_act(*a, **k)

    def conv(*a, **k):
        if not k.get("stats") and not k.get("epilogue", ttrain.Epilogue()).mask:
            calls["conv_plain_out"] += 1      # a conv whose output is only a temporary
        return real_conv(*a, **k)

    monkeypatch.setattr(ttrain, "bn_act_impl", bn_act)
    monkeypatch.setattr(ttrain, "conv2d_nhwc", conv)
    names, vals, f = _functional(name)
    vals[0] = torch.randn(2, CONFIGS[name][0], 5, 4).contiguous(memory_format=CL)
    f(*vals)
    if fused_final:
        assert calls == {"bn_act": 0, "conv_plain_out": 0}, calls
    else:
        assert calls["bn_act"] == 1, calls


@pytest.mark.parametrize("name", ["bn/2", "identity"])
def test_bn_backward_reductions_read_grad_out_once(name, monkeypatch):
    """The BN'd projection's bn3 reductions ride in bn2's pass over grad_out and the
    mask: one reduction launch per block backward, whatever the shortcut."""
    launches = []
    real = tbn.launch

    def counting(kernel, grid, *a, **k):
        launches.append(getattr(kernel, "__name__", getattr(getattr(kernel, "fn", None),
                                                             "__name__", "")))
        return real(kernel, grid, *a, **k)

    monkeypatch.setattr(tbn, "launch", counting)
    names, vals, f = _functional(name)
    vals[0] = torch.randn(2, CONFIGS[name][0], 5, 4).contiguous(memory_format=CL)
    leaves = [v.clone().requires_grad_() if v is not None else None for v in vals]
    out = f(*leaves)
    launches.clear()
    out.backward(torch.randn_like(out))
    assert launches.count("_bn_bwd_reduce_kernel") == 1, launches


def test_paired_bn_backward_reduction_matches_two_single_ones():
    """bn_backward_coef(..., second=...) == two separate calls (same g, two BNs)."""
    N, C, H, W = 2, 40, 5, 3
    c2 = torch.randn(N, C, H, W).contiguous(memory_format=CL) * 2 + 1
    c3 = torch.randn(N, C, H, W).contiguous(memory_format=CL) - 0.5
    g = torch.randn(N, C, H, W).contiguous(memory_format=CL)
    mask = torch.randint(0, 256, ((g.numel() + 7) // 8,), dtype=torch.uint8)
    m2, m3 = c2.mean((0, 2, 3)), c3.mean((0, 2, 3))
    i2 = c2.var((0, 2, 3), unbiased=False).add(1e-5).rsqrt()
    i3 = c3.var((0, 2, 3), unbiased=False).add(1e-5).rsqrt()
    w2, w3 = torch.rand(C) + 0.5, torch.rand(C) + 0.5
    one2 = tbn.bn_backward_coef(g, mask, c2, m2, i2, w2)
    one3 = tbn.bn_backward_coef(g, mask, c3, m3, i3, w3)
    pair2, pair3 = tbn.bn_backward_coef(g, mask, c2, m2, i2, w2, second=(c3, m3, i3, w3))
    for a, b in zip(one2 + one3, pair2 + pair3):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="second BN's input"):
        tbn.bn_backward_coef(g, mask, c2, m2, i2, w2, second=(c3[:1], m3, i3, w3))


def test_bad_blocks_raise_clear_errors():
    block = _make_block("1x1/2")
    block.conv3 = None
    with pytest.raises(ValueError, match="identity shortcut needs stride 1"):
        train_block(parts_of(block), torch.randn(2, 4, 6, 6))
    block = _make_block("identity")
    block.conv2 = nn.Conv2d(8, 8, 5, 1, 2)
    with pytest.raises(ValueError, match=r"1x1 or 3x3 \(stage 1 conv: kernel \(5, 5\)\)"):
        train_block(parts_of(block), torch.randn(2, 8, 6, 6))
    with pytest.raises(ValueError, match="more than one value per channel"):
        train_block(parts_of(_make_block("identity")), torch.randn(1, 8, 1, 1))
    block = _make_block("identity")
    block.bn2 = nn.BatchNorm2d(4)
    with pytest.raises(ValueError, match="BN after stage 1 conv has 4 features"):
        train_block(parts_of(block), torch.randn(2, 8, 6, 6))
    with pytest.raises(ValueError, match="one entry per stage"):
        ops.block_train(torch.randn(2, 8, 6, 6), [block.conv1.weight], [None, None],
                        [block.bn1.weight], [block.bn1.bias], [1], [1e-5], None, None, None,
                        None, 1e-5)
