"""A converted model where users take their models (README.md, "Export and tooling"):
ONNX with torch.onnx.export's defaults and with dynamo=False, run in onnxruntime;
torch.fx (symbolic_trace, torchvision's create_feature_extractor, timm's FX feature
net); torch.jit.trace with its trace check; torch.jit.script's error.

On converted torchvision ResNet-18 and ResNet-50 and timm ResNet-50 (eval, BN
randomised), every output against the plain model by the package's rule.
"""
import copy
import io
import warnings
from collections import Counter

import pytest
import torch
from torch import fx, nn

from blockcheck import randomize_bn
from resnet_fused import FusedResidual, Residual, available_backends, fuse_model
from resnet_fused.schemas import NAMESPACES
from tolerance import assert_within


def _tv(name):
    return lambda: getattr(pytest.importorskip("torchvision.models"), name)()


def _timm_resnet50():
    return pytest.importorskip("timm").create_model("resnet50")


MODELS = {  # name: (the plain model, its last block)
    "torchvision resnet18": (_tv("resnet18"), "layer4.1"),
    "torchvision resnet50": (_tv("resnet50"), "layer4.2"),
    "timm resnet50": (_timm_resnet50, "layer4.2"),
}
X_SHAPE = (2, 3, 32, 32)  # ResNet-50's last stage at 1x1: seconds per test


class Case:
    """A plain model (eval, BN randomised), its converted copy, an input, and the plain
    model's outputs in float32 and float64 (the rule's plain error and reference)."""

    def __init__(self, name):
        self.name = name
        make, self.last_block = MODELS[name]
        torch.manual_seed(0)
        self.plain = make().eval()
        randomize_bn(self.plain)
        self.fused = fuse_model(copy.deepcopy(self.plain)).eval()
        self.blocks = [n for n, m in self.fused.named_modules() if isinstance(m, FusedResidual)]
        assert len(self.blocks) == (8 if "18" in name else 16)
        self.x = torch.randn(X_SHAPE)
        self.plain64 = copy.deepcopy(self.plain).double()
        with torch.no_grad():
            self.out32 = self.plain(self.x)
            self.out64 = self.plain64(self.x.double())

    def check(self, what, out):
        assert_within(what, out.float(), self.out32, self.out64, factor=2)


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    return Case(request.param)


# ------------------------------------------------------------------ ONNX
def _onnx_checked(case, path, name):
    """The ONNX file at `path`: standard operators only, no BatchNormalization left (BN
    folded into the convolutions), one Conv per convolution; its onnxruntime output
    matches the plain model."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = onnx.load(path)
    onnx.checker.check_model(model)
    ops = Counter(n.op_type for n in model.graph.node)
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node), ops
    assert not model.functions, [f.name for f in model.functions]
    assert "BatchNormalization" not in ops, ops
    convs = sum(isinstance(m, nn.Conv2d) for m in case.plain.modules())
    assert ops["Conv"] == convs, ops
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: case.x.numpy()})[0]
    case.check(name, torch.from_numpy(out))


def test_onnx_default_exporter(case, tmp_path):
    """torch.onnx.export with its defaults (the dynamo exporter on torch >= 2.9)."""
    pytest.importorskip("onnxscript")
    path = str(tmp_path / "m.onnx")
    torch.onnx.export(case.fused, (case.x,), path)  # nothing passed but the file
    _onnx_checked(case, path, "onnx (default exporter)")


def test_onnx_torchscript_exporter(case, tmp_path):
    path = str(tmp_path / "m.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the exporter's own notice
        torch.onnx.export(case.fused, (case.x,), path, dynamo=False)
    _onnx_checked(case, path, "onnx (dynamo=False)")


def test_onnx_dynamic_batch_d2l_blocks(tmp_path):
    """D2L's blocks (conv biases, a projection without BN) with a dynamic batch: the
    exported graph takes any batch size."""
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    plain = _d2l_net()
    fused = fuse_model(copy.deepcopy(plain)).eval()
    path = str(tmp_path / "m.onnx")
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(fused, (torch.randn(2, 4, 9, 9),), path, verbose=False,
                      dynamic_shapes=({0: batch},))
    ops = Counter(n.op_type for n in onnx.load(path).graph.node)
    assert "BatchNormalization" not in ops and ops["Conv"] == 5, ops
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for n in (1, 5):
        x = torch.randn(n, 4, 9, 9)
        out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
        with torch.no_grad():
            ref = copy.deepcopy(plain).double()(x.double())
            assert_within(f"onnx batch {n}", out, plain(x), ref, factor=2)


# ------------------------------------------------------------------ torch.fx
def _leaf_blocks(gm: fx.GraphModule) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_module"
            and isinstance(gm.get_submodule(n.target), FusedResidual)}


def test_fx_symbolic_trace_calls_the_blocks(case):
    gm = fx.symbolic_trace(case.fused)
    assert _leaf_blocks(gm) == set(case.blocks)  # each block one node: its output
    with torch.no_grad():
        out = gm(case.x)
        assert torch.equal(out, case.fused(case.x))  # the same calls, the same kernels
    case.check("fx.symbolic_trace", out)


def _module_outputs(model, names, x) -> dict:
    """The outputs of model's submodules `names` on x (forward hooks: the plain model
    run as it is, no tracer involved)."""
    out = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, y, n=n: out.__setitem__(n, y)) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return out


def test_feature_extraction(case):
    """torchvision's create_feature_extractor returns the blocks' outputs; for timm's
    model also timm's FX feature net (what features_only=True, feature_cls="fx"
    builds), made from the converted model."""
    create_feature_extractor = pytest.importorskip(
        "torchvision.models.feature_extraction").create_feature_extractor
    names = ["layer2", case.last_block]
    fe = create_feature_extractor(case.fused, {n: n for n in names})
    assert isinstance(fe.get_submodule(case.last_block), FusedResidual)
    nets = [("create_feature_extractor", fe, names)]
    if case.name.startswith("timm"):
        from timm.models import FeatureGraphNet
        net = FeatureGraphNet(case.fused, out_indices=(1, 2, 3, 4))
        assert _leaf_blocks(net.graph_module) == set(case.blocks)
        layers = net.feature_info.module_name()
        assert layers == ["layer1", "layer2", "layer3", "layer4"]
        nets.append(("timm FeatureGraphNet", lambda x, f=net, n=layers: dict(zip(n, f(x))),
                     layers))
    for what, net, layers in nets:
        with torch.no_grad():
            got = net(case.x)
        out32 = _module_outputs(case.plain, layers, case.x)
        out64 = _module_outputs(case.plain64, layers, case.x.double())
        assert list(got) == layers, (what, list(got))
        for k in layers:
            assert_within(f"{what} {k}", got[k], out32[k], out64[k], factor=2)


def test_fx_trace_of_a_lone_block_says_what_to_trace():
    with pytest.raises(TypeError, match="FusedResidual.*Trace the model or container"):
        fx.symbolic_trace(FusedResidual(8, 8).eval())
    gm = fx.symbolic_trace(nn.Sequential(FusedResidual(8, 8)).eval())  # held: one node
    assert _leaf_blocks(gm) == {"0"}


# ------------------------------------------------------------------ TorchScript
def test_jit_trace_passes_its_check_and_follows_the_weights(case):
    """The default trace check re-traces under torch.no_grad(): the graph must not
    depend on the grad mode nor on the fold cache. The fold is traced, so a later
    change of the running statistics reaches the traced module."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)  # jit's deprecation
        traced = torch.jit.trace(case.fused, case.x)
    kinds = Counter(n.kind() for n in traced.inlined_graph.nodes())
    stem_bns = sum(isinstance(m, nn.BatchNorm2d) for m in case.plain.modules()) - sum(
        len(b.parts().bns()) for b in case.fused.modules() if isinstance(b, FusedResidual))
    assert kinds["aten::batch_norm"] == stem_bns, kinds  # the blocks' BNs are folded
    with torch.no_grad():
        out = traced(case.x)
        assert torch.equal(out, case.fused(case.x))
    case.check("jit.trace", out)
    # On CPU `auto` folds with ATen ops: the saved trace holds no op of ours.
    assert not [k for k in kinds if k.startswith("resnet_fused")], kinds
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=FutureWarning)  # jit's deprecation
        torch.jit.save(traced, buf)
        buf.seek(0)
        assert torch.equal(torch.jit.load(buf)(case.x), out)
    # A recalibrated BN after tracing: the trace folds it anew, like the module.
    plain, plain64 = copy.deepcopy(case.plain), copy.deepcopy(case.plain64)
    fused_bn = case.fused.get_submodule(case.last_block).get_submodule("bn1")
    saved = fused_bn.running_var.clone()
    try:
        for m in (plain, plain64):
            m.get_submodule(case.last_block).get_submodule("bn1").running_var.mul_(3.0)
        fused_bn.running_var.mul_(3.0)
        with torch.no_grad():
            assert_within("jit.trace after a BN update", traced(case.x), plain(case.x),
                          plain64(case.x.double()), factor=2)
    finally:
        fused_bn.running_var.copy_(saved)


def _d2l_net():
    plain = nn.Sequential(Residual(4, 8, use_1x1conv=True, strides=2), Residual(8, 8)).eval()
    randomize_bn(plain)
    return plain


# CPU only: bench/device.sh's 480 s plan has no room for one more CUDA test stage (a
# file of its own would push out native_ops), and the traced graph is the same op list.
@pytest.mark.parametrize("backend, device", [
    (b, "cpu") for b in ("torch", "native", "triton", "eager")
    if b in available_backends("cpu")])
def test_jit_trace_each_backend(backend, device):
    """Each backend's eval path traces with the check on, with autograd on (the
    default) and under torch.no_grad() from a fresh block (whose first call folds: the
    check's re-trace then found the fold cached); the composite backends' traces call
    their ops (one per stage), which run when the trace is called."""
    plain = _d2l_net().to(device)
    x = torch.randn(1, 4, 6, 6, device=device)  # small: Triton's interpreter on a CPU
    for grad in (True, False):
        fused = fuse_model(copy.deepcopy(plain), backend=backend).eval()
        with warnings.catch_warnings(), torch.set_grad_enabled(grad):
            warnings.simplefilter("error", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)  # jit's deprecation
            traced = torch.jit.trace(fused, x)
        ours = [n.kind() for n in traced.inlined_graph.nodes()
                if n.kind().split("::")[0] in NAMESPACES.values()]
        assert len(ours) == (0 if backend == "eager" else 4), ours
        with torch.no_grad():
            out = traced(x)
            if device == "cpu":  # (a GPU's convolution may pick another algorithm per call)
                assert torch.equal(out, fused(x))
            assert_within(f"jit.trace (grad {grad})", out, plain(x),
                          copy.deepcopy(plain).double()(x.double()))


def test_jit_script_names_the_block_and_the_alternatives():
    for model in (nn.Sequential(FusedResidual(4, 8, use_1x1conv=True, strides=2)),
                  fuse_model(nn.Sequential(Residual(4, 4)))):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # jit's deprecation
            with pytest.raises(RuntimeError, match="FusedResidual.*torch.compile, "
                                                   "torch.export.*torch.jit.trace"):
                torch.jit.script(model)
