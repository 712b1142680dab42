"""Gated branches and pooled shortcuts (README.md, Design, "Gates and pooled
shortcuts"): single timm bottlenecks with an SE or ECA channel gate, a drop path, and
ResNet-D's avg-pool shortcut, through FusedResidual on each backend that computes them,
against the float64 plain block by the tolerance rule (tests/blockcheck.py; BN
randomised), training (2 steps: output, every gradient, running statistics) and eval,
NCHW and channels_last (native: its C++ CPU kernels of the gate ops). Backends without
kernels for them decline such blocks.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

import resnet_fused.backends as backends_pkg
from blockcheck import check_block, randomize_bn
from resnet_fused import FusedResidual, fuse_model
from tolerance import assert_within

tr = pytest.importorskip("timm.models.resnet")
layers = pytest.importorskip("timm.layers")


def _down_avg(cin, cout, stride):
    """timm's avg_down shortcut (resnet*d): AvgPool2d(2, s, ceil_mode, no pad count)."""
    return nn.Sequential(nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False),
                         nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))


def _down(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


def _block(attn=None, drop=0.0, avg=False, stride=2):
    def make():
        cin = 8 if stride == 2 else 16
        ds = (_down_avg if avg else _down)(cin, 16, stride) if (stride == 2 or avg) else None
        return tr.Bottleneck(cin, 4, stride=stride, downsample=ds, attn_layer=attn,
                             drop_path=layers.DropPath(drop) if drop else None)
    return make


def _torchvision_gates():
    """torchvision's own gate modules in timm's block: SqueezeExcitation as `se`,
    StochasticDepth("row") as `drop_path`."""
    from torchvision.ops import SqueezeExcitation, StochasticDepth
    b = _block()()
    b.se, b.drop_path = SqueezeExcitation(16, 4), StochasticDepth(0.3, "row")
    return b


BLOCKS = {
    "se": _block(layers.SEModule),
    "tv_se_stochastic_depth": _torchvision_gates,
    "eca_identity": _block(layers.EcaModule, stride=1),
    "drop_path": _block(drop=0.3),
    "avg_down": _block(avg=True),
    "se_drop_avg": _block(layers.SEModule, 0.2, avg=True),
}


def _shape(kind):
    # 7x7 with stride 2: ceil_mode windows of 1 tap on the last row and column
    return (3, 16 if kind == "eca_identity" else 8, 7, 7)


def _require_native():
    be = backends_pkg._load("native")
    if be is None or be.unavailable_reason(torch.device("cpu")):
        pytest.fail("the native backend is not available (CI builds the extension)")


@pytest.mark.parametrize("kind", list(BLOCKS))
@pytest.mark.parametrize("backend", ["torch", "eager", "native"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_train_and_eval(kind, backend, channels_last):
    if backend == "native":
        _require_native()
    check_block(BLOCKS[kind], backend=backend, train=True, channels_last=channels_last,
                shape=_shape(kind), steps=2, reseed=True)
    check_block(BLOCKS[kind], backend=backend, train=False, channels_last=channels_last,
                shape=_shape(kind), grads=False)


@pytest.mark.parametrize("kind", ["se", "tv_se_stochastic_depth", "se_drop_avg"])
@pytest.mark.parametrize("backend", ["torch", "eager", "native"])
def test_frozen_bn_training(kind, backend):
    """Frozen-BN fine-tuning of a gated block (every BN in eval in a training block):
    the frozen path computes the gates and the shortcut's pool as the plain block does,
    every gradient by the rule, the BN buffers untouched."""
    check_block(BLOCKS[kind], backend=backend, train=True, bn_eval=True,
                shape=_shape(kind), steps=2, reseed=True)


@pytest.mark.parametrize("kind", ["se", "drop_path", "eca_identity", "avg_down"])
@pytest.mark.parametrize("backend", ["torch", "native"])
def test_float16(kind, backend):
    check_block(BLOCKS[kind], backend=backend, dtype=torch.float16, train=True,
                shape=_shape(kind), steps=1, reseed=True)
    check_block(BLOCKS[kind], backend=backend, dtype=torch.float16, train=False,
                shape=_shape(kind), grads=False)


@pytest.mark.parametrize("backend", ["triton"])
def test_backends_without_kernels_decline(backend, monkeypatch):
    """triton does not compute a gate inside the chain of convolutions (a scale on an
    inner stage's output, tests/test_scaled_branch.py's "inner"; its gated last stages,
    with or without a pooled shortcut: tests/test_triton_gates.py,
    tests/test_triton_gated_pooled.py): it says so, an explicit choice raises with it,
    and auto takes a backend that computes the block."""
    from test_scaled_branch import BLOCKS as SCALED
    block = FusedResidual.from_residual(SCALED["inner"](), backend="torch")
    be = backends_pkg._load(backend)
    if be is None:
        pytest.skip(f"{backend} is not importable here")
    for training in (True, False):
        reason = be.unsupported_block_reason(block.parts(), training)
        assert reason and "no kernels" in reason and "inside the chain" in reason
    block.backend = backend
    with pytest.raises(ValueError, match=f"backend='{backend}'.*no kernels"):
        block(torch.randn(3, 16, 7, 7))
    monkeypatch.setattr(backends_pkg, "preferred_order", lambda *a: (backend, "torch"))
    assert backends_pkg.choose(torch.device("cpu"), torch.float32, True, None,
                               block.parts()).name == "torch"


# --------------------------------------------------------------------------- networks
def _timm(name, **kw):
    timm = pytest.importorskip("timm")
    return lambda: timm.create_model(name, **kw)


def _tv(name):
    tvm = pytest.importorskip("torchvision.models")
    return lambda: getattr(tvm, name)()


NETWORKS = {   # name -> (model, residual blocks)
    "seresnet50": (_timm("seresnet50"), 16),
    "seresnext26d_32x4d": (_timm("seresnext26d_32x4d"), 8),
    "ecaresnet50d": (_timm("ecaresnet50d"), 16),
    "resnet50_drop_path": (_timm("resnet50", drop_path_rate=0.1), 16),
    "resnet50d": (_timm("resnet50d"), 16),
    "regnet_y_400mf": (_tv("regnet_y_400mf"), 16),
}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_networks_convert_every_block_and_compute_the_same(name):
    """fuse_model converts every residual block (no warning), keeps the state_dict keys,
    and computes the same function: eval (folded kernels, auto) by the rule against
    float64; a seeded training step (auto on CPU: the eager backend) bit for bit as
    the plain model: output, every parameter gradient, running statistics."""
    make, blocks = NETWORKS[name]
    torch.manual_seed(0)
    model = make().eval()
    randomize_bn(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = fuse_model(copy.deepcopy(model))
    assert sum(isinstance(m, FusedResidual) for m in fused.modules()) == blocks
    assert list(fused.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out, out_p, out_ref = fused(x), model(x), copy.deepcopy(model).double()(x.double())
    assert_within("eval output", out, out_p, out_ref)
    model.train(), fused.train()
    torch.manual_seed(7)
    out_p = model(x)
    torch.manual_seed(7)
    out = fused(x)
    assert torch.equal(out, out_p)
    out_p.square().mean().backward()
    out.square().mean().backward()
    grads = {n: p.grad for n, p in fused.named_parameters()}
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters())
    state = fused.state_dict()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_fullgraph(train, backend):
    """A gated block with a pooled shortcut and a drop path compiles without graph
    breaks (f, the sample gate's draw and the gate ops traced through their fakes) and
    computes the plain block's function, the same mask drawn under the same seed."""
    torch.manual_seed(0)
    plain = BLOCKS["se_drop_avg"]()
    randomize_bn(plain)
    fused = FusedResidual.from_residual(copy.deepcopy(plain), backend=backend).train(train)
    plain.train(train)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(_shape("se_drop_avg"))
    with torch.set_grad_enabled(train):
        torch.manual_seed(1)
        out_c = compiled(x)
        torch.manual_seed(1)
        out_p = plain(x)
    torch.testing.assert_close(out_c, out_p, rtol=1e-4, atol=1e-4)


def _se_pair():
    """(plain SE block in eval with randomised BN, its FusedResidual on torch, an input)."""
    torch.manual_seed(0)
    plain = BLOCKS["se"]().eval()
    randomize_bn(plain)
    fused = FusedResidual.from_residual(copy.deepcopy(plain), backend="torch").eval()
    return plain, fused, torch.randn(_shape("se"))


def test_replaced_gate_submodule_is_used():
    """The fused block calls the gate's submodules as they are now: replacing one
    (se.fc2) after conversion changes the result as it changes the plain block's."""
    plain, fused, x = _se_pair()
    with torch.no_grad():
        fused(x)  # resolved and folded once
        fc2 = nn.Conv2d(plain.se.fc2.in_channels, plain.se.fc2.out_channels, 1)
        plain.se.fc2, fused.se.fc2 = fc2, copy.deepcopy(fc2)
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "eager"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_autocast(backend, train):
    """Under autocast the block runs in the autocast dtype with autocast off; the gate's
    own modules (fp32 parameters) run with it back on, as in the plain block: no dtype
    error, the plain block's output within bf16 rounding."""
    torch.manual_seed(0)
    plain = BLOCKS["se_drop_avg"]()
    randomize_bn(plain)
    fused = FusedResidual.from_residual(copy.deepcopy(plain), backend=backend).train(train)
    plain.train(train)
    x = torch.randn(_shape("se_drop_avg"))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(train):
        torch.manual_seed(1)
        out = fused(x)
        torch.manual_seed(1)
        ref = plain(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


@pytest.mark.parametrize("kind,last_ops", [("se_drop_avg", ["conv_bias_pool",
                                                             "gate_shortcut_relu"]),
                                           ("avg_down", ["conv_bias_shortcut_relu"])])
def test_export_keeps_one_fused_op_per_stage(kind, last_ops):
    """torch.export of a gated / pooled-shortcut block in eval: one op per stage, a
    gated last stage as its branch with its pool, then the gated join (the gate's f
    and the shortcut's pool run as ATen ops around them)."""
    from resnet_fused import serving
    torch.manual_seed(0)
    plain = BLOCKS[kind]().eval()
    randomize_bn(plain)
    fused = FusedResidual.from_residual(copy.deepcopy(plain), backend="torch").eval()
    x = torch.randn(_shape(kind))
    ep = serving.export(fused, (x,))
    assert [o.split(".")[1] for o in serving.fused_ops(ep)] == [
        "conv_bias_relu", "conv_bias_relu", *last_ops]
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), plain(x), rtol=1e-4, atol=1e-5)


def test_check_model_skips_backends_that_decline_the_blocks():
    """check_model on a model of gated blocks: the backends that compute them (native
    among them) pass by the rule (a drop path included: reseeded before each copy's
    forward), the ones without gate kernels are listed as skipped with their reason, not
    failed."""
    from resnet_fused.testing import check_model
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BLOCKS["se_drop_avg"](),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    randomize_bn(model)
    report = check_model(model, torch.randn(4, 3, 9, 9), steps=1)
    assert report.ok, str(report)
    ran = {r.backend for r in report.rows}
    assert {"torch", "eager", "native"} <= ran
    assert all(s[0] != "native" for s in report.skipped), report.skipped


def test_save_load_and_deepcopy():
    """A gated block's f rides with its gate module: torch.save/load and deepcopy give a
    block computing the same function, f calling the copy's own submodules, and the
    gate's parameters are still only its own (nothing added to state_dict)."""
    import io
    plain, fused, x = _se_pair()
    with torch.no_grad():
        want = fused(x)
        buf = io.BytesIO()
        torch.save(fused, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        copied = copy.deepcopy(fused)
        for m in (loaded, copied):
            torch.testing.assert_close(m(x), want, rtol=0, atol=0)
            assert list(m.state_dict()) == list(plain.state_dict())
        copied.se.fc1.weight.mul_(2)   # the copy's f uses the copy's fc1
        assert not torch.equal(copied(x), want) and torch.equal(fused(x), want)


@pytest.mark.parametrize("name", ["seresnet50", "ecaresnet50d", "resnet50d"])
def test_network_blocks_on_native(name):
    """The native backend's kernels (its C++ CPU twins here) on the blocks of timm's SE,
    ECA and ResNet-D networks as the library builds them: layer2's downsampling block
    (resnet50d, ecaresnet50d: the avg-pool shortcut) and an identity block, training and
    eval, against float64 (the whole networks convert and compute the same function in
    test_networks_convert_every_block_and_compute_the_same; checking every gradient of a
    whole ResNet-50 on these CPU kernels takes minutes, and at inputs small enough to be
    quick its last stage normalises over 2 values per channel, where the plain model's
    own float32 gradient error is > 100%)."""
    _require_native()
    model = NETWORKS[name][0]()
    for block in (model.layer2[0], model.layer2[1]):
        shape = (2, block.conv1.in_channels, 8, 8)
        for train in (True, False):
            check_block(lambda: copy.deepcopy(block), backend="native", train=train,
                        shape=shape, steps=1, grads=train)
