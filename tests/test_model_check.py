"""resnet_fused.testing.check_model on small user-like models: passes where the fused
model computes what the plain one does, fails (with the table) where a conversion
went wrong."""
import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

from blockcheck import randomize_bn
from resnet_fused import FusedResidual, Residual, available_backends, fuse_model
from resnet_fused.testing import assert_model_matches, check_model

X = (4, 3, 8, 8)


def small_net(block=Residual):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        block(8, 8), block(8, 16, use_1x1conv=True, strides=2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    randomize_bn(net)
    return net


def example():
    return torch.randn(X, generator=torch.Generator().manual_seed(1))


def _cpu_backends():
    return [b for b in ("torch", "native", "eager") if b in available_backends("cpu")]


def test_passes_on_a_plain_model_converted_here():
    report = check_model(small_net(), example(), backends=_cpu_backends(), steps=2)
    assert report.ok, report.table()
    kinds = {(r.backend, r.mode) for r in report.rows}
    assert kinds == {(b, m) for b in _cpu_backends() for m in ("eval", "train")}
    names = {r.comparison.name.split(" (")[0] for r in report.rows}
    # every parameter gradient and buffer of the model is judged
    assert {f"grad {n}" for n, _ in small_net().named_parameters()} <= names
    assert {f"buffer {n}" for n, _ in small_net().named_buffers()} <= names
    assert "2 residual block(s) fused" in report.table()


def test_passes_on_an_already_converted_model_and_channels_last():
    fused = fuse_model(small_net())
    report = check_model(fused, example(), backends=["torch"], channels_last=True, steps=1)
    assert report.ok, report.table()
    assert "already converted" in report.table()


def test_triton_through_the_interpreter():
    if "triton" not in available_backends("cpu"):
        pytest.skip("triton backend unavailable here")
    report = check_model(small_net(), example(), backends=["triton"], steps=1)
    assert report.ok, report.table()


def three_block_net():
    """Two blocks of one geometry (8 -> 8) and a projection with stride 2, at an odd
    spatial size (11x11: the stride-2 block's output is 6x6)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        Residual(8, 8), Residual(8, 8), Residual(8, 16, use_1x1conv=True,
                                                                 strides=2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    randomize_bn(net)
    return net


def three_block_example():
    return torch.randn(3, 3, 11, 11, generator=torch.Generator().manual_seed(1))


def _slow_backends():
    return [b for b in ("native", "triton") if b in available_backends("cpu")]


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_slow_backends_are_checked_once_per_block_geometry(backend):
    """On a CPU the interpreter and the C++ twins check one block of each geometry at a
    reduced input (batch 2, 9x9 crop), and the whole model on the torch backend; the
    report names which block stood for which."""
    if backend not in available_backends("cpu"):
        pytest.skip(f"{backend} backend unavailable here")
    report = check_model(three_block_net(), three_block_example(), backends=[backend],
                         steps=1)
    assert report.ok, report.table()
    assert report.geometries == [
        "3 (checked at 2x8x9x9, in the model 3x8x11x11) stands for 4",
        "5 (checked at 2x8x9x9, in the model 3x8x11x11) stands for itself"], report.table()
    names = {(r.backend, r.mode, r.comparison.name.split(" (step")[0]) for r in report.rows}
    for mode in ("eval", "train"):
        assert {(backend, mode, "output of 3"), (backend, mode, "output of 5"),
                ("torch", mode, "output")} <= names
        assert not any(b == backend and "of 4" in n for b, m, n in names)
    # every parameter of the representatives is judged under its name in the model
    assert {(backend, "train", f"grad {n}") for n, _ in three_block_net().named_parameters()
            if n.startswith(("3.", "5."))} <= names
    assert "stands for 4" in report.table() and report.to_dict()["geometries"]
    # the whole model on the slow backend when asked
    whole = check_model(three_block_net(), three_block_example(), backends=[backend],
                        modes=("eval",), by_geometry=False)
    assert whole.ok and not whole.geometries and {r.backend for r in whole.rows} == {
        backend}, whole.table()


def test_geometry_key_separates_what_a_kernel_depends_on():
    """The key is the block's spec and its modules' classes, hyper-parameters, flags and
    tensor shapes: any of them differing separates two blocks, the weights' values do
    not."""
    from resnet_fused.testing.geometry import module_signature
    a, b = fuse_model(three_block_net())[3], fuse_model(three_block_net())[4]
    assert module_signature(a) == module_signature(b)
    changes = [lambda m: setattr(m.bn1, "eps", 1e-3),
               lambda m: setattr(m.bn2, "momentum", None),
               lambda m: m.bn1.eval(),                      # a frozen BN
               lambda m: setattr(m, "conv2", nn.Conv2d(8, 8, 3, padding=2, dilation=2)),
               # a field of the spec (as a gate or a pooled shortcut would be)
               lambda m: setattr(m, "_spec", dataclasses.replace(m._spec, kind="other"))]
    for change in changes:
        other = copy.deepcopy(b)
        change(other)
        assert module_signature(other) != module_signature(a)
    with torch.no_grad():
        b.conv1.weight.mul_(2)
    assert module_signature(b) == module_signature(a)


def test_torchvision_basic_blocks_with_downsample_bn():
    tv = pytest.importorskip("torchvision.models.resnet")
    torch.manual_seed(0)
    ds = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), tv.BasicBlock(8, 8),
                        tv.BasicBlock(8, 16, stride=2, downsample=ds), nn.Flatten())
    randomize_bn(net)
    assert_model_matches(net, example(), backends=["torch"], steps=2)


def _fail_rows(report):
    return [r.comparison.name for r in report.failures]


def test_fails_on_a_conversion_with_the_wrong_eps():
    net = small_net()
    bad = fuse_model(net)
    bad[3].bn1.eps = 1e-3
    report = check_model(net, example(), fused=bad, backends=["torch"], modes=("eval",))
    assert not report.ok
    assert _fail_rows(report) == ["output"]
    with pytest.raises(AssertionError) as err:
        assert_model_matches(net, example(), fused=bad, backends=["torch"], modes=("eval",))
    assert "FAIL" in str(err.value) and "output" in str(err.value)


def test_fails_on_a_conversion_with_the_wrong_momentum():
    net = small_net()
    bad = fuse_model(net)
    bad[4].bn2.momentum = 0.2
    report = check_model(net, example(), fused=bad, backends=["torch"], steps=2)
    failed = _fail_rows(report)
    assert failed == ["buffer 4.bn2.running_mean", "buffer 4.bn2.running_var"], report.table()


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times `factor`: a backward-only bug."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def test_fails_on_a_backward_off_by_a_part_in_a_thousand(monkeypatch):
    """A backward that is wrong by 1e-3 (a count of N-1 for N = 1000 is this big) with an
    exact forward: the perturbed-input probes of the plain error must not hide it."""
    from resnet_fused.backends.eager import EagerBackend
    exact = EagerBackend.forward_train

    def off(self, parts, x, groups=None):
        return _ScaleGrad.apply(exact(self, parts, x, groups), 1.001)

    monkeypatch.setattr(EagerBackend, "forward_train", off)
    report = check_model(small_net(), example(), backends=["eager"], steps=1,
                         modes=("train",))
    failed = {name.split(" (step")[0] for name in _fail_rows(report)}
    assert {"grad input", "grad 0.weight", "grad 4.conv1.weight"} <= failed, report.table()
    assert "output" not in failed, report.table()


def test_per_geometry_fails_on_one_conv_weight_off_by_a_part_in_a_thousand():
    """A conversion whose one convolution weight is 1.001x the plain one, in a block that
    is not its geometry's representative: the whole-model comparison on the torch
    backend fails it (the kernels' block checks pass: the representative is right). In
    training the BN after that convolution cancels a scaled weight in the output; its
    gradient and the running statistics show it."""
    backend = (_slow_backends() or pytest.skip("no slow backend here"))[0]
    net = three_block_net()
    bad = fuse_model(net)
    with torch.no_grad():
        bad[4].conv2.weight.mul_(1.001)
    report = check_model(net, three_block_example(), fused=bad, backends=[backend])
    failed = {(r.backend, r.comparison.name.split(" (step")[0]) for r in report.failures}
    assert {("torch", "output"), ("torch", "grad 4.conv2.weight"),
            ("torch", "buffer 4.bn2.running_mean")} <= failed, report.table()
    assert not any(b == backend for b, _ in failed), report.table()


@pytest.mark.parametrize("backend, where", [("native", "forward_train"),
                                            ("triton", "forward_train"),
                                            ("triton", "forward_eval")])
def test_per_geometry_fails_on_a_kernel_off_by_a_part_in_a_thousand(monkeypatch, backend,
                                                                    where):
    """A backend whose training backward, or whose eval forward, is wrong by 1e-3 with the
    rest exact: its per-geometry block rows fail (the torch backend's rows pass)."""
    if backend not in available_backends("cpu"):
        pytest.skip(f"{backend} backend unavailable here")
    from resnet_fused import backends as _b
    cls = type(_b.get(backend, torch.device("cpu")))
    exact = getattr(cls, where)
    if where == "forward_train":
        def off(self, parts, x, groups=None):
            return _ScaleGrad.apply(exact(self, parts, x, groups), 1.001)
    else:
        def off(self, parts, folded, x):
            return exact(self, parts, folded, x) * 1.001
    monkeypatch.setattr(cls, where, off)
    mode = "train" if where == "forward_train" else "eval"
    report = check_model(three_block_net(), three_block_example(), backends=[backend],
                         steps=1, modes=(mode,))
    failed = {(r.backend, r.comparison.name.split(" (step")[0]) for r in report.failures}
    if mode == "train":
        expect = {"grad input of 3", "grad input of 5", "grad 3.conv1.weight",
                  "grad 5.conv3.weight"}
        assert not any("output" in n for _, n in failed), report.table()
    else:
        expect = {"output of 3", "output of 5"}
    assert {(backend, n) for n in expect} <= failed, report.table()
    assert not any(b == "torch" for b, _ in failed), report.table()


@pytest.mark.parametrize("at_probes,rescued_at", [
    ([(0.3, 0.3), (0.01, 0.02), (0.3, 0.3), (0.3, 0.3)], 2),   # a rounding jump: not everywhere
    ([(0.3, 0.3)] * 4, None),                                  # a defect: at every input
    ([(0.01, 0.3)] * 4, None),                                 # within in L2 only
], ids=["jump", "defect", "l2-only"])
def test_over_the_bound_at_the_example_is_judged_again_at_the_probes(
        monkeypatch, at_probes, rescued_at):
    """A training quantity over its bound at the example passes if the fused error at
    one probe input is within the same bound (both L2 and max-abs), and fails if it is
    over at all four; the fused model runs at the probes only until one passes, and not
    at all when nothing failed (model_check._recheck_at_probes)."""
    from resnet_fused.testing import model_check as mc
    from resnet_fused.testing.tolerance import Comparison
    calls = []
    monkeypatch.setattr(mc, "_errors_at", lambda run, who, xin, g, seed: calls.append(
        (who, xin)) or {"grad w": at_probes[xin]})

    def over():
        return Comparison("grad w (step 0)", 0.3, 0.3, 0.01, 0.01, 0.05, 0.05, ok=False)

    fine = Comparison("output (step 0)", 0.01, 0.01, 0.01, 0.01, 0.05, 0.05, ok=True)
    rows = {"grad w": over(), "output": fine}
    mc._recheck_at_probes(None, rows, list(range(4)), None, 0)
    assert rows["output"] is fine
    if rescued_at is None:
        assert not rows["grad w"].ok and rows["grad w"].name == "grad w (step 0)"
        assert calls == [("fused", k) for k in range(4)]
    else:
        assert rows["grad w"].ok, rows["grad w"].message()
        assert rows["grad w"].name == (f"grad w (step 0) at probe {rescued_at} "
                                       "(example: 6.00 of the bound)")
        assert (rows["grad w"].bound_l2, rows["grad w"].plain_l2) == (0.05, 0.01)
        assert calls == [("fused", k) for k in range(rescued_at)]
    calls.clear()
    mc._recheck_at_probes(None, {"output": fine}, list(range(4)), None, 0)
    assert calls == []


def test_fails_on_a_dropped_projection():
    torch.manual_seed(0)
    net = nn.Sequential(Residual(8, 8, use_1x1conv=True), Residual(8, 8))
    randomize_bn(net)
    # A hand-made conversion that forgot the 1x1 projection of the first block.
    dropped = FusedResidual(8, 8)
    dropped.load_state_dict(net[0].state_dict(), strict=False)
    bad = nn.Sequential(dropped, FusedResidual.from_residual(copy.deepcopy(net[1])))
    x = torch.randn(2, 8, 6, 6)
    report = check_model(net, x, fused=bad, backends=["torch"], steps=1)
    failed = _fail_rows(report)
    assert "output" in failed and "output (step 0)" in failed, report.table()
    assert any("0.conv3.weight" in n for n in failed)
    assert "parameter missing in the fused model" in report.table()


def test_fails_on_a_block_whose_bn_was_swapped():
    net = small_net()
    swapped = fuse_model(net)
    swapped[3].bn2 = nn.BatchNorm2d(8)      # a fresh BN: the trained statistics are lost
    report = check_model(net, example(), fused=swapped, backends=["torch"], modes=("eval",))
    assert _fail_rows(report) == ["output"], report.table()
    other = fuse_model(net)
    other[3].bn1 = nn.GroupNorm(2, 8)       # not a BatchNorm at all
    report = check_model(net, example(), fused=other, backends=["torch"])
    assert not report.ok
    assert "raised" in report.table()


def test_fails_when_a_block_is_left_unconverted():
    class MyBN(nn.BatchNorm2d):
        pass

    net = small_net()
    net[3].bn1 = MyBN(8)
    randomize_bn(net)
    report = check_model(net, example(), backends=["torch"], modes=("eval",))
    assert not report.ok and not report.failures
    assert "left 3 (Residual) as it is" in report.table()
    allowed = check_model(net, example(), backends=["torch"], modes=("eval",),
                          require_all_converted=False)
    assert allowed.ok, allowed.table()


def test_report_as_dict_and_skips():
    report = check_model(small_net(), example(), backends=["torch", "native"],
                         dtypes=[torch.float32], modes=("eval",))
    d = json.loads(json.dumps(report.to_dict()))
    assert d["ok"] is report.ok
    assert {r["backend"] for r in d["results"]} | {s["backend"] for s in d["skipped"]} == {
        "torch", "native"}
    for r in d["results"]:
        assert {"name", "fused_l2", "plain_l2", "bound_l2", "ok", "ratio"} <= r.keys()
    report = check_model(small_net(), example(), backends=["torch", "nope"],
                         modes=("eval",))
    assert any("unknown backend" in s[3] for s in report.skipped)


@pytest.mark.parametrize("kwargs, match", [
    (dict(model=3), "model must be an nn.Module"),
    (dict(example_input=torch.ones(X, dtype=torch.int64)), "floating-point tensor"),
    (dict(modes=("inference",)), "modes must be"),
    (dict(steps=0), "steps must be"),
    (dict(dtypes=[torch.int8]), "dtypes must be"),
])
def test_bad_arguments_say_what_is_wrong(kwargs, match):
    args = dict(model=small_net(), example_input=example())
    args.update(kwargs)
    with pytest.raises((TypeError, ValueError), match=match):
        check_model(args.pop("model"), args.pop("example_input"), **args)


@pytest.mark.cuda
def test_on_cuda_every_backend_and_dtype():
    net = small_net().cuda()
    report = check_model(net, example().cuda(), steps=2)
    assert report.ok, report.table()
    assert {r.dtype for r in report.rows} == {"float32", "float16", "bfloat16"}


def _resnet50():
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    net = tvm.resnet50(num_classes=10)
    randomize_bn(net)
    return net


def test_resnet50_passes_on_every_cpu_backend():
    """torchvision's ResNet-50 (16 bottleneck blocks) on the CPU backends, eval and
    training: the issue's acceptance check, as a user would run it. Triton's interpreter
    takes over ten minutes for the whole network on two cores: its bottleneck kernels are
    checked block by block (test_bottleneck.py, test_triton_train_bottleneck.py)."""
    backends = _cpu_backends()
    # 64x64 at batch 4: 16 values per channel in layer4's BNs (at 32x32 and batch 2 the
    # plain model's own float32 training error is 30%: BN over two values)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    report = check_model(_resnet50(), x, backends=backends, steps=1,
                         require_all_converted=True)
    assert report.ok, report.table()
    assert {r.backend for r in report.rows} == set(backends)
    assert "16 residual block(s) fused" in report.table()
