"""A gated branch beside ResNet-D's pooled shortcut on the triton backend (README.md,
Design, "Gates and pooled shortcuts"): timm's SE + drop path + avg_down bottleneck
(seresnext*d's dense twin) and ECA + avg_down (ecaresnet*d) against the float64 plain
block by the tolerance rule (tests/blockcheck.py, BN randomised): eval through
gate_pool_shortcut_relu (the pooled projection GEMM with the gated epilogue), two
seeded training steps (SE / ECA: train_gated.py's gate_join_train with sc_pool; a drop
path alone: block_train's sc_pool and gate), frozen BN; and that the forward runs no
ATen op over a feature map. Through Triton's interpreter on CPU, tiny odd shapes
(7x7 at stride 2: ceil_mode's edge windows of one tap).
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from blockcheck import check_block, randomize_bn
from test_gated_blocks import BLOCKS, _block, _shape
from test_triton_gates import _FeatureMapOps
from tolerance import assert_within

from resnet_fused import FusedResidual

triton_backend = pytest.importorskip("resnet_fused.backends.triton")
layers = pytest.importorskip("timm.layers")

CL = torch.channels_last
OPS = torch.ops.resnet_fused_triton
GATED_POOLED = {
    "se_drop_avg": BLOCKS["se_drop_avg"],
    "eca_avg": _block(layers.EcaModule, avg=True),
    "drop_avg": _block(drop=0.3, avg=True),
}
SHAPE = _shape("se_drop_avg")   # (3, 8, 7, 7)


@pytest.fixture(autouse=True)
def _cpu_interpreter():
    reason = triton_backend.TritonBackend().unavailable_reason(torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)


def _ref_pool(x, k, s, ceil):
    return F.avg_pool2d(x, k, s, 0, ceil, count_include_pad=False)


# --------------------------------------------------------------------------- the op
@pytest.mark.parametrize("gshape,channels_last,dtype", [
    ((3, 16, 1, 1), False, torch.float32), ((3, 1, 1, 1), True, torch.float16),
    ((1, 1, 1, 1), True, torch.float32)], ids=["channel", "sample-fp16", "scalar"])
def test_gate_pool_shortcut_relu(gshape, channels_last, dtype):
    """relu(gate * y + conv(avg_pool2d(x), w3) + b3) in one launch, against float64."""
    torch.manual_seed(0)
    fmt = CL if channels_last else torch.contiguous_format
    y = torch.randn(3, 16, 4, 5).to(dtype).contiguous(memory_format=fmt)
    x = torch.randn(3, 8, 7, 9).to(dtype).contiguous(memory_format=fmt)
    w3 = (torch.randn(16, 8, 1, 1) / 3).to(dtype)
    b3 = torch.randn(16).to(dtype)
    gate = torch.rand(gshape) + 0.25
    out = OPS.gate_pool_shortcut_relu(y, gate, x, w3, b3, 2, 2, True)
    assert out.is_contiguous(memory_format=fmt) and out.dtype == dtype

    def ref(y, gate, x, w3, b3):
        return torch.relu(gate.to(y.dtype) * y + F.conv2d(_ref_pool(x, 2, 2, True), w3, b3))

    d = [t.double() for t in (y, gate, x, w3, b3)]
    plain = ref(*[t.float() for t in (y, gate, x, w3, b3)]).to(dtype)
    assert_within("gated pooled join", out, plain, ref(*d))


def test_gate_pool_shortcut_relu_opcheck_and_gradients():
    """Its registration (fake, autograd) by torch's opcheck, and its gradients against
    the plain computation in float64."""
    torch.manual_seed(0)
    y = torch.randn(2, 16, 4, 5).contiguous(memory_format=CL)
    x = torch.randn(2, 8, 7, 9).contiguous(memory_format=CL)
    gate, w3, b3 = torch.rand(2, 16, 1, 1) + 0.25, torch.randn(16, 8, 1, 1) / 3, torch.randn(16)
    torch.library.opcheck(OPS.gate_pool_shortcut_relu.default,
                          (y, gate, x, w3, b3, 2, 2, True))

    def ref(y, gate, x, w3, b3):
        return torch.relu(gate * y + F.conv2d(_ref_pool(x, 2, 2, True), w3, b3))

    runs = []
    for fn, dt in ((lambda *t: OPS.gate_pool_shortcut_relu(*t, 2, 2, True), torch.float32),
                   (ref, torch.float32), (ref, torch.float64)):
        leaves = [t.detach().to(dt).requires_grad_() for t in (y, gate, x, w3, b3)]
        out = fn(*leaves)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                        dtype=torch.float64).to(dt)
        runs.append((out, torch.autograd.grad(out, leaves, g)))
    (of, gf), (op, gp), (orf, gr) = runs
    assert_within("out", of, op, orf)
    for name, a, p, r in zip("y gate x w3 b3".split(), gf, gp, gr):
        assert_within(f"grad {name}", a, p, r)


def test_gate_pool_shortcut_relu_rejects_a_mismatched_shortcut():
    y, x = torch.randn(2, 16, 4, 4), torch.randn(2, 8, 7, 9)
    with pytest.raises(ValueError, match="gate_pool_shortcut_relu: the pooled shortcut"):
        OPS.gate_pool_shortcut_relu(y, torch.rand(2, 16, 1, 1), x, torch.randn(16, 8, 1, 1),
                                    None, 2, 2, True)


# --------------------------------------------------------------------------- blocks
@pytest.mark.parametrize("kind,channels_last,dtype", [
    ("se_drop_avg", False, torch.float32), ("se_drop_avg", True, torch.float16),
    ("eca_avg", True, torch.float32), ("drop_avg", False, torch.float32)])
def test_eval(kind, channels_last, dtype):
    check_block(GATED_POOLED[kind], backend="triton", dtype=dtype, train=False,
                channels_last=channels_last, shape=SHAPE, grads=False)


@pytest.mark.parametrize("kind,ours", [
    ("se_drop_avg", ["conv_bias_relu", "conv_bias_relu", "conv_bias_pool",
                     "gate_pool_shortcut_relu"]),
    ("drop_avg", ["conv_bias_relu", "conv_bias_relu", "conv_bias_pool_shortcut_relu"])])
def test_eval_forward_runs_no_aten_op_over_a_feature_map(kind, ours):
    """The window average, the gate multiply and the join are ours (only the gate
    module runs, on (N, C, 1, 1)); a drop path alone is the identity in eval."""
    torch.manual_seed(0)
    plain = GATED_POOLED[kind]().eval()
    randomize_bn(plain)
    fused = FusedResidual.from_residual(copy.deepcopy(plain), backend="triton").eval()
    x = torch.randn(SHAPE).contiguous(memory_format=CL)
    with torch.no_grad():
        fused(x)  # folds the weights (ATen ops on the weights) outside the recording
        with _FeatureMapOps() as rec:
            fused(x)
    assert rec.seen == []
    assert rec.ours == ours


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("kind,channels_last,dtype", [
    ("se_drop_avg", False, torch.float32), ("se_drop_avg", True, torch.float16),
    ("eca_avg", True, torch.float32), ("drop_avg", False, torch.float32),
    ("drop_avg", True, torch.float16)])
def test_train(kind, channels_last, dtype):
    """Seeded training steps against the plain block (the same RNG seed before each
    forward: a drop path draws the same mask): output, every gradient (the gate
    module's own parameters included) and the running statistics; the block is not
    declined (no fallback hides a wrong fused path)."""
    parts = FusedResidual.from_residual(GATED_POOLED[kind](), backend="torch").parts()
    assert triton_backend.TritonBackend().unsupported_block_reason(parts, True) is None
    check_block(GATED_POOLED[kind], backend="triton", dtype=dtype, train=True,
                channels_last=channels_last, shape=SHAPE,
                steps=2 if dtype == torch.float32 else 1, reseed=True)


@pytest.mark.parametrize("kind", ["se_drop_avg", "drop_avg"])
def test_train_frozen_bn(kind):
    check_block(GATED_POOLED[kind], backend="triton", train=True, bn_eval=True, shape=SHAPE,
                steps=1, reseed=True)


@pytest.mark.parametrize("kind,first_ops", [
    ("drop_avg", ["block_train"]), ("se_drop_avg", ["block_branch", "gate_join_train"]),
    ("eca_avg", ["block_branch", "gate_join_train"])])
def test_train_forward_runs_no_aten_op_over_a_feature_map(kind, first_ops):
    """The training forward's pool of the branch, gate multiply, window average and join
    are ours; then only the running statistics' finalize."""
    torch.manual_seed(0)
    plain = GATED_POOLED[kind]()
    randomize_bn(plain)
    fused = FusedResidual.from_residual(plain, backend="triton").train()
    x = torch.randn(SHAPE).contiguous(memory_format=CL)
    with _FeatureMapOps() as rec:
        fused(x)
    assert rec.seen == []
    assert rec.ours[:len(first_ops)] == first_ops, rec.ours
    assert set(rec.ours[len(first_ops):]) == {"bn_finalize"}, rec.ours


@pytest.mark.parametrize("k", [16, 12], ids=["gemm_epilogue", "elementwise"])
def test_gate_join_train_pooled_projection_without_bn(k):
    """gate_join_train's sc_pool on the D2L projection (a conv bias, no BN), which the
    blocks above (BN'd shortcuts) do not reach: K = 16 joins in the pooled GEMM's
    epilogue, K = 12 through the elementwise pass; output and every gradient against
    float64 (bn on c's batch statistics, differentiable through them)."""
    torch.manual_seed(0)
    c = torch.randn(3, k, 4, 5).contiguous(memory_format=CL)
    x = torch.randn(3, 8, 7, 9).contiguous(memory_format=CL)
    gamma, beta = torch.rand(k) + 0.5, torch.randn(k)
    gate = torch.rand(3, k, 1, 1) + 0.25
    w_sc, b_sc = torch.randn(k, 8, 1, 1) / 3, torch.randn(k)

    def fused(c, gamma, beta, gate, x, w_sc, b_sc):
        var, mean = torch.var_mean(c.detach(), dim=(0, 2, 3), correction=0)
        stats = torch.stack([mean, var, torch.full_like(mean, c[:, 0].numel())])
        return OPS.gate_join_train(c, stats, gamma, beta, 1e-5, gate, x, w_sc, b_sc, None,
                                   None, 1e-5, 2, 2)[0]

    def ref(c, gamma, beta, gate, x, w_sc, b_sc):
        y = F.batch_norm(c, None, None, gamma, beta, True, 0.0, 1e-5)
        return torch.relu(gate * y + F.conv2d(_ref_pool(x, 2, 2, True), w_sc, b_sc))

    runs = []
    for fn, dt in ((fused, torch.float32), (ref, torch.float32), (ref, torch.float64)):
        leaves = [t.detach().to(dt).requires_grad_()
                  for t in (c, gamma, beta, gate, x, w_sc, b_sc)]
        out = fn(*leaves)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                        dtype=torch.float64).to(dt)
        runs.append((out, torch.autograd.grad(out, leaves, g)))
    (of, gf), (op, gp), (orf, gr) = runs
    assert_within("out", of, op, orf)
    for name, a, p, r in zip("c gamma beta gate x w_sc b_sc".split(), gf, gp, gr):
        assert_within(f"grad {name}", a, p, r, factor=2)


def test_timm_ecaresnet_d_every_block_on_triton():
    """timm's own ecaresnet*d layout (deep stem, avg_down shortcuts, the EcaModule timm
    builds from its name, drop path) at tiny widths: every block on triton, 3 of 4
    gated beside a pooled shortcut, the last at a 1x1 output, eval and a seeded training
    step against float64 by check_model's rule (the whole network takes minutes per
    forward through the interpreter)."""
    from resnet_fused.testing.model_check import assert_model_matches
    timm_resnet = pytest.importorskip("timm.models.resnet")
    torch.manual_seed(0)
    model = timm_resnet.ResNet(timm_resnet.Bottleneck, (1, 1, 1, 1), num_classes=10,
                               stem_width=8, stem_type="deep", avg_down=True,
                               channels=(4, 8, 8, 16), block_args=dict(attn_layer="eca"),
                               drop_path_rate=0.1)
    randomize_bn(model)
    report = assert_model_matches(model, torch.randn(2, 3, 28, 28), backends=["triton"],
                                  by_geometry=False, steps=1)
    assert "4 residual block(s) fused" in str(report)


def test_gate_gradient_at_a_one_pixel_output():
    """At a 1x1 output the gate's gradient has nothing to sum over H, W: it keeps the
    gate's (N, C, 1, 1) shape (a sum over no dims would reduce them all), in
    gate_join_train's backward and in the eval join's."""
    torch.manual_seed(0)
    c = torch.randn(2, 16, 1, 1).contiguous(memory_format=CL)
    x = torch.randn(2, 8, 2, 2).contiguous(memory_format=CL)
    gamma, beta = torch.rand(16) + 0.5, torch.randn(16)
    gate = (torch.rand(2, 16, 1, 1) + 0.25).requires_grad_()
    w_sc = torch.randn(16, 8, 1, 1) / 3
    var, mean = torch.var_mean(c, dim=(0, 2, 3), correction=0)
    stats = torch.stack([mean, var, torch.full_like(mean, 2)])
    out = OPS.gate_join_train(c, stats, gamma, beta, 1e-5, gate, x, w_sc, None,
                              torch.ones(16), torch.zeros(16), 1e-5, 2, 2)[0]
    y = F.batch_norm(c, None, None, gamma, beta, True, 0.0, 1e-5)
    sc = F.batch_norm(F.conv2d(_ref_pool(x, 2, 2, True), w_sc), None, None, torch.ones(16),
                      torch.zeros(16), True, 0.0, 1e-5)
    (grad,) = torch.autograd.grad(out.sum(), gate)
    torch.testing.assert_close(grad, (y * ((gate * y + sc) > 0)).detach())
    out = OPS.gate_pool_shortcut_relu(y, gate, x, w_sc, None, 2, 2, True)
    (grad,) = torch.autograd.grad(out.sum(), gate)
    sc = F.conv2d(_ref_pool(x, 2, 2, True), w_sc)
    torch.testing.assert_close(grad, (y * ((gate * y + sc) > 0)).detach())
