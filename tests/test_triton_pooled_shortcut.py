"""ResNet-D's pooled shortcut on the triton backend (README.md, Design, "Gates and pooled
shortcuts"): `AvgPool2d(k, stride s, ceil_mode, count_include_pad=False) -> 1x1 conv ->
BN` computed in our kernels, the window average taken as the projection GEMM loads x
(forward), rebuilt in the weight gradient's loader and spread back over the window in
the data gradient's loader (backward).

Through Triton's interpreter on CPU (tests/conftest.py), small shapes with odd sizes
(ceil_mode's edge windows of one tap); float64 reference by the tolerance rule
(tests/tolerance.py, tests/blockcheck.py).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fused.backends as backends_pkg
from blockcheck import check_block, randomize_bn
from resnet_fused import FusedResidual
from resnet_fused.testing.model_check import assert_model_matches
from tolerance import assert_within

triton_backend = pytest.importorskip("resnet_fused.backends.triton")
from resnet_fused.backends.triton.conv import AvgPool, SecondGemm, conv2d_nhwc  # noqa: E402
from resnet_fused.backends.triton.conv_bwd import (GradOperand, SecondDgrad,  # noqa: E402
                                                   conv_dgrad, conv_wgrad)
from resnet_fused.backends.triton.pool import shortcut_pool  # noqa: E402

tr = pytest.importorskip("timm.models.resnet")
CL = torch.channels_last
OPS = torch.ops.resnet_fused_triton

# (H, W, window, stride, ceil_mode): timm's 2x2/2 on odd and even sizes, and the general
# windows the kernels also cover (overlapping 3x3/2, a 2x2/1).
POOLS = [(7, 9, 2, 2, True), (8, 6, 2, 2, False), (9, 7, 3, 2, True), (5, 6, 2, 1, True)]


def _ref_pool(x, k, s, ceil):
    return F.avg_pool2d(x, k, s, 0, ceil, count_include_pad=False)


@pytest.fixture(autouse=True)
def _cpu_interpreter():
    reason = triton_backend.TritonBackend().unavailable_reason(torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)


# --------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("h,w,k,s,ceil,dtype", [p + (torch.float16 if i == 2 else torch.float32,)
                                                for i, p in enumerate(POOLS)])
def test_pooled_gemm_forward_and_gradients(h, w, k, s, ceil, dtype):
    """conv(avg_pool2d(x), w) as the forward's main and second GEMM, and its weight and
    data gradients (the latter also as the second GEMM of a 3x3 stride-s dgrad)."""
    torch.manual_seed(0)
    x64 = torch.randn(2, 24, h, w, dtype=torch.float64, requires_grad=True)
    w64 = (torch.randn(40, 24, 1, 1, dtype=torch.float64) / 5).requires_grad_()
    x, wt = x64.detach().to(dtype).contiguous(memory_format=CL), w64.detach().to(dtype)
    ref = F.conv2d(_ref_pool(x64, k, s, ceil), w64)
    plain = F.conv2d(_ref_pool(x.float(), k, s, ceil), wt.float()).to(dtype) \
        if dtype == torch.float16 else F.conv2d(_ref_pool(x, k, s, ceil), wt)
    out = conv2d_nhwc(x, wt, s, 0, pool=AvgPool(k, ceil)).out
    assert_within("pooled GEMM", out, plain, ref)
    y = torch.randn(2, 16, *ref.shape[2:], dtype=dtype).contiguous(memory_format=CL)
    w2 = (torch.randn(40, 16, 3, 3) / 10).to(dtype)
    out2 = conv2d_nhwc(y, w2, 1, 1, second=SecondGemm(x, wt, s, 0, AvgPool(k, ceil))).out
    ref2 = F.conv2d(y.double(), w2.double(), padding=1) + ref
    assert_within("pooled second GEMM", out2,
                  (F.conv2d(y.float(), w2.float(), padding=1) + plain.float()).to(dtype), ref2)

    g64 = torch.randn_like(ref)
    gx, gw = torch.autograd.grad(ref, (x64, w64), g64)
    G = GradOperand(g64.to(dtype).contiguous(memory_format=CL))
    xp, wp = x.float().requires_grad_(), wt.float().requires_grad_()
    gxp, gwp = torch.autograd.grad(F.conv2d(_ref_pool(xp, k, s, ceil), wp), (xp, wp),
                                   g64.to(dtype).float())
    dx = conv_dgrad(G, wt, (h, w), s, 0, pool=k).dx
    assert_within("pooled dgrad", dx, gxp.to(dtype), gx)
    dw = conv_wgrad(G, x, tuple(wt.shape), s, 0, pool=k).dw
    assert_within("pooled wgrad", dw, gwp, gw, dtype=dtype)
    if k == s:
        # The basic block's dX: the pooled shortcut's dgrad as a second GEMM of stage
        # 0's (3x3, stride s, padding 1) into the same accumulator.
        w0 = (torch.randn(40, 24, 3, 3, dtype=torch.float64) / 10)
        g0 = torch.randn(2, 40, *ref.shape[2:], dtype=torch.float64)
        ref0 = torch.nn.grad.conv2d_input(x64.shape, w0, g0, s, 1) + gx
        dx2 = conv_dgrad(GradOperand(g0.to(dtype).contiguous(memory_format=CL)), w0.to(dtype),
                         (h, w), s, 1, second=SecondDgrad(G, wt, 0, k)).dx
        plain0 = torch.nn.grad.conv2d_input(x64.shape, w0.to(dtype).float(),
                                            g0.to(dtype).float(), s, 1) + gxp
        assert_within("pooled second dgrad", dx2, plain0.to(dtype), ref0)


# --------------------------------------------------------------------------- blocks
def _avg_down(cin, cout, stride=2, **pool):
    """timm's avg_down shortcut (resnet*d): AvgPool2d(2, s, ceil_mode, no pad count)."""
    args = dict(ceil_mode=True, count_include_pad=False, **pool)
    return nn.Sequential(nn.AvgPool2d(2, stride, **args), nn.Conv2d(cin, cout, 1, bias=False),
                         nn.BatchNorm2d(cout))


def _bottleneck(**pool):
    return lambda: tr.Bottleneck(8, 4, stride=2, downsample=_avg_down(8, 16, **pool))


def _basic(**pool):
    return lambda: tr.BasicBlock(8, 16, stride=2, downsample=_avg_down(8, 16, **pool))


BLOCKS = {"bottleneck": _bottleneck(), "basic": _basic()}
SHAPE = (2, 8, 7, 7)   # 7x7 at stride 2: ceil_mode windows of 1 tap on the last row/column


@pytest.mark.parametrize("kind,channels_last,dtype", [
    ("bottleneck", False, torch.float32), ("bottleneck", True, torch.float16),
    ("basic", True, torch.float32), ("basic", False, torch.float16)])
def test_resnet_d_block_train_frozen_and_eval(kind, channels_last, dtype):
    """A ResNet-D downsampling block on triton against the float64 plain block: a
    training step (output, every gradient, running statistics), frozen-BN fine-tuning
    and eval; each kind in both layouts and both dtypes, not every product (the
    interpreter's time)."""
    be = FusedResidual.from_residual(BLOCKS[kind](), backend="triton")
    assert triton_backend.TritonBackend().unsupported_block_reason(be.parts(), True) is None
    kw = dict(backend="triton", dtype=dtype, channels_last=channels_last, shape=SHAPE)
    check_block(BLOCKS[kind], train=True, **kw)
    check_block(BLOCKS[kind], train=True, bn_eval=True, **kw)
    check_block(BLOCKS[kind], train=False, grads=False, **kw)


def _aten_ops(fn):
    """The aten:: op names the CPU profiler records while fn runs, nested ones included."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("aten::")}


@pytest.mark.parametrize("mode", ["train", "frozen", "eval"])
def test_forward_runs_no_aten_convolution_or_pooling(mode):
    """The window average and every convolution of the forward are our kernels: the
    profiler records no ATen convolution or pooling op (the plain block's forward, for
    contrast, does)."""
    torch.manual_seed(0)
    plain = BLOCKS["bottleneck"]()
    randomize_bn(plain)
    fused = FusedResidual.from_residual(copy.deepcopy(plain), backend="triton")
    for m in (plain, fused):
        m.train(mode != "eval")
        if mode == "frozen":
            for bn in m.modules():
                if isinstance(bn, nn.BatchNorm2d):
                    bn.eval()
    x = torch.randn(SHAPE, requires_grad=mode != "eval")

    def run(m):
        def fn():
            with torch.set_grad_enabled(mode != "eval"):
                m(x)
        return fn

    banned = ("conv", "pool")
    seen = _aten_ops(run(plain))
    assert any(b in n for n in seen for b in banned), sorted(seen)   # the probe sees them
    seen = _aten_ops(run(fused))
    assert not [n for n in seen if any(b in n for b in banned)], sorted(seen)


def test_eval_op_opcheck():
    """conv_bias_pool_shortcut_relu's registration (fake, autograd) by torch's opcheck,
    and its gradients against the plain computation in float64."""
    torch.manual_seed(0)
    y = torch.randn(2, 16, 4, 5).contiguous(memory_format=CL)
    x = torch.randn(2, 8, 7, 9).contiguous(memory_format=CL)
    w, w3, b = torch.randn(16, 16, 3, 3) / 10, torch.randn(16, 8, 1, 1) / 3, torch.randn(16)
    args = (y, w, b, x, w3, 1, 2, 2, True)
    torch.library.opcheck(OPS.conv_bias_pool_shortcut_relu.default, args)
    leaves = [t.detach().double().requires_grad_() for t in (y, w, b, x, w3)]
    ref = torch.relu(F.conv2d(leaves[0], leaves[1], leaves[2], padding=1)
                     + F.conv2d(_ref_pool(leaves[3], 2, 2, True), leaves[4]))
    fl = [t.detach().requires_grad_() for t in (y, w, b, x, w3)]
    out = OPS.conv_bias_pool_shortcut_relu(*fl, 1, 2, 2, True)
    pl = [t.detach().requires_grad_() for t in (y, w, b, x, w3)]
    plain = torch.relu(F.conv2d(pl[0], pl[1], pl[2], padding=1)
                       + F.conv2d(_ref_pool(pl[3], 2, 2, True), pl[4]))
    assert_within("out", out, plain, ref)
    g = torch.randn_like(ref)
    for name, a, p, r in zip("y w b x w3".split(), torch.autograd.grad(out, fl, g.float()),
                             torch.autograd.grad(plain, pl, g.float()),
                             torch.autograd.grad(ref, leaves, g)):
        assert_within(f"grad {name}", a, p, r)


@pytest.mark.parametrize("pool,why", [
    (dict(padding=1), "without padding"),
    (dict(divisor_override=3), "divisor_override=3"),
])
def test_pools_the_kernels_lack_are_declined_and_auto_routes_on(pool, why, monkeypatch):
    """A pool the kernels do not compute exactly: the backend says why, an explicit
    backend='triton' raises with it, and auto takes the next backend."""
    block = FusedResidual.from_residual(_basic()(), backend="torch")
    pool_mod = block.downsample[0]
    for name, value in pool.items():
        setattr(pool_mod, name, value)
    reason = triton_backend.TritonBackend().unsupported_block_reason(block.parts(), True)
    assert reason and why in reason, reason
    block.backend = "triton"
    with pytest.raises(ValueError, match="backend='triton'"):
        block(torch.randn(SHAPE))
    monkeypatch.setattr(backends_pkg, "preferred_order", lambda *a: ("triton", "torch"))
    assert backends_pkg.choose(torch.device("cpu"), torch.float32, True, None,
                               block.parts()).name == "torch"


def test_timm_resnet_d_every_block_on_triton():
    """timm's own ResNet-D (resnet50d's layout: deep stem, avg_down shortcuts) at tiny
    widths, every block on triton (3 of 4 with the pooled shortcut: 7x7 -> 4x4 with
    ceil_mode's one-tap edge windows, down to a 1x1 output), eval and a training step
    against float64 by check_model's rule.
    resnet50d itself takes minutes per forward through the interpreter."""
    torch.manual_seed(0)
    model = tr.ResNet(tr.Bottleneck, (1, 1, 1, 1), num_classes=10, stem_width=8,
                      stem_type="deep", avg_down=True, channels=(4, 8, 8, 16))
    randomize_bn(model)
    pooled = [b for b in model.modules() if isinstance(b, tr.Bottleneck)
              and b.downsample is not None and isinstance(b.downsample[0], nn.AvgPool2d)]
    assert len(pooled) == 3
    report = assert_model_matches(model, torch.randn(2, 3, 28, 28), backends=["triton"],
                                  by_geometry=False, steps=1)
    assert "4 residual block(s) fused" in str(report)


def test_training_block_at_a_one_pixel_output():
    """A 1x1 output (a tiny input's last stage): grad_out arrives NCHW-strided there,
    which is also channels_last-contiguous, and the backward took its strides for a
    different layout (an assertion in conv_bwd failed before the fix; the timm test
    above hits it in layer4)."""
    check_block(lambda: tr.Bottleneck(8, 4, stride=2, downsample=nn.Sequential(
        nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))),
        backend="triton", train=True, shape=(2, 8, 2, 2))


class _PooledD2L(nn.Module):
    """A D2L-style block whose projection (conv bias, no BN) pools first: the training
    join is then the pooled GEMM's epilogue (bn2's output added, ReLU, mask)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16)
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
        self.conv3 = nn.Conv2d(8, 16, 1)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.conv3(self.pool(x)))


def test_pooled_projection_without_bn():
    kw = dict(backend="triton", shape=SHAPE)
    check_block(_PooledD2L, train=True, **kw)
    check_block(_PooledD2L, train=False, grads=False, **kw)


def test_identity_pool_is_the_plain_projection():
    """AvgPool2d(1) before a stride-1 projection is the identity: the block runs as an
    unpooled projection (no window average) and matches the plain block."""
    def make():
        ds = nn.Sequential(nn.AvgPool2d(1), nn.Conv2d(8, 16, 1, bias=False),
                           nn.BatchNorm2d(16))
        return tr.Bottleneck(8, 4, stride=1, downsample=ds)
    assert shortcut_pool(FusedResidual.from_residual(make(), backend="triton").parts()) is None
    check_block(make, backend="triton", train=True, shape=(2, 8, 5, 5))
    check_block(make, backend="triton", train=False, grads=False, shape=(2, 8, 5, 5))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_fullgraph(train):
    """torch.compile(fullgraph=True, aot_eager) of the pooled block: a training step
    (block_train with sc_pool, its backward) and eval (conv_bias_pool_shortcut_relu)
    trace through the ops' fakes and autograd without a graph break and compute what
    the eager block computes."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    plain = BLOCKS["basic"]()
    randomize_bn(plain)
    eager = FusedResidual.from_residual(copy.deepcopy(plain), backend="triton").train(train)
    comp = FusedResidual.from_residual(copy.deepcopy(plain), backend="triton").train(train)

    def step(m, x):
        out = m(x)
        return out, (out * out).mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = torch.randn(SHAPE).contiguous(memory_format=CL)
    with torch.set_grad_enabled(train):
        o_e, l_e = step(eager, x)
        o_c, l_c = compiled(comp, x)
    torch.testing.assert_close(o_c, o_e, rtol=1e-5, atol=1e-5)
    if train:
        l_e.backward()
        l_c.backward()
        for (n, pe), (_, pc) in zip(eager.named_parameters(), comp.named_parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5, msg=n)
