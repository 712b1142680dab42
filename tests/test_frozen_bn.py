"""Frozen BatchNorm (README.md, "What converts"): torchvision's FrozenBatchNorm2d (and
modules computing the same affine map of the running statistics) and nn.BatchNorm2d in
eval inside a model in train() (frozen-BN fine-tuning). Blocks through FusedResidual on
every backend that runs on CPU (Triton through its interpreter, small shapes), against
the float64 plain block by the tolerance rule (tests/blockcheck.py: BN parameters and
running statistics randomised), in eval and in a training step (output, input and
every parameter gradient, BN weight/bias gradients where they are parameters, running
statistics unchanged); and whole torchvision networks built with FrozenBatchNorm2d
through fuse_model.
"""
import copy

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1
from torchvision.ops.misc import FrozenBatchNorm2d

from blockcheck import check_block, randomize_bn
from resnet_fused import FusedResidual, fuse_model
from resnet_fused.testing import check_model
from resnet_fused.blocks import ConversionError, is_frozen_bn
from tolerance import assert_within


def _norm(frozen):
    return FrozenBatchNorm2d if frozen else nn.BatchNorm2d


def _down(cin, cout, stride, frozen):
    return nn.Sequential(conv1x1(cin, cout, stride), _norm(frozen)(cout))


# name -> (builder(frozen), input shape, dense: triton computes it)
BLOCKS = {
    "basic_identity": (lambda f: BasicBlock(8, 8, norm_layer=_norm(f)), (2, 8, 6, 6), True),
    "basic_s2": (lambda f: BasicBlock(4, 8, 2, _down(4, 8, 2, f), norm_layer=_norm(f)),
                 (2, 4, 6, 6), True),
    "bottleneck_identity": (lambda f: Bottleneck(16, 4, norm_layer=_norm(f)),
                            (2, 16, 5, 5), True),
    "bottleneck_s2": (lambda f: Bottleneck(8, 4, 2, _down(8, 16, 2, f), norm_layer=_norm(f)),
                      (2, 8, 6, 6), True),
    "bottleneck_v1_s2": (lambda f: _v1(Bottleneck(8, 4, 2, _down(8, 16, 2, f),
                                                  norm_layer=_norm(f))), (2, 8, 6, 6), True),
    "bottleneck_groups4": (lambda f: Bottleneck(16, 4, groups=4, base_width=64,
                                                norm_layer=_norm(f)), (2, 16, 5, 5), False),
    "bottleneck_dilated": (lambda f: Bottleneck(16, 4, dilation=2, norm_layer=_norm(f)),
                           (2, 16, 5, 5), False),
}


def _v1(b):  # ResNet v1: the stride on the first 1x1
    b.conv1.stride, b.conv2.stride = (2, 2), (1, 1)
    return b


# frozen: FrozenBatchNorm2d (buffers); bn_eval: nn.BatchNorm2d in eval in a train() block
KINDS = ("frozen", "bn_eval")


def _check(block, kind, backend, train):
    make, shape, _ = BLOCKS[block]
    frozen = kind == "frozen"
    return check_block(lambda: make(frozen), backend=backend, train=train, shape=shape,
                       bn_eval=kind == "bn_eval")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("block", list(BLOCKS))
@pytest.mark.parametrize("backend", ["torch", "native", "eager"])
def test_train_step(backend, block, kind):
    # bn_eval: the BN weight/bias gradients are compared too (check_block: every
    # parameter's gradient, by name)
    _check(block, kind, backend, train=True)


@pytest.mark.parametrize("backend", ["torch", "native", "eager"])
def test_train_step_channels_last(backend):
    make, shape, _ = BLOCKS["bottleneck_s2"]
    check_block(lambda: make(True), backend=backend, train=True, shape=shape,
                channels_last=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["torch", "native"])
def test_train_step_bfloat16(backend, kind):
    # bf16 gradients at a few hundred elements are dominated by single ReLU-mask flips
    # (an output the plain block rounds to exactly 0 and the fused one, summing in fp32,
    # to +1e-3); at a few thousand the comparison with the plain block is meaningful.
    make = BLOCKS["basic_s2"][0]
    check_block(lambda: make(kind == "frozen"), backend=backend, dtype=torch.bfloat16,
                train=True, shape=(8, 4, 16, 16), bn_eval=kind == "bn_eval")


@pytest.mark.parametrize("block", list(BLOCKS))
@pytest.mark.parametrize("backend", ["torch", "native", "eager"])
def test_eval(backend, block):
    _check(block, "frozen", backend, train=False)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("block", ["basic_s2", "bottleneck_s2"])
def test_triton_interpreter_train_step(block, kind):
    _check(block, kind, "triton", train=True)


def test_triton_interpreter_eval():
    _check("bottleneck_identity", "frozen", "triton", train=False)


def test_float64_native_train_step():
    make, shape, _ = BLOCKS["bottleneck_s2"]
    check_block(lambda: make(True), backend="native", dtype=torch.float64, train=True,
                shape=shape)


def test_frozen_path_runs_the_frozen_ops(monkeypatch):
    """The frozen training step goes through bn_frozen_act (the fused path), not the
    plain modules and not the training BN ops."""
    make, shape, _ = BLOCKS["bottleneck_s2"]
    plain = make(True)
    randomize_bn(plain)
    fused = FusedResidual.from_residual(plain, backend="torch").train()
    ops = torch.ops.resnet_fused_torch
    calls = []
    for name in ("bn_frozen_act", "bn_act", "channel_stats"):
        op = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _op=op, _n=name: calls.append(_n) or _op(*a),
                            raising=False)
    for m in fused.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.forward = None  # calling the module would fail
    fused(torch.randn(shape, requires_grad=True)).sum().backward()
    assert calls == ["bn_frozen_act"] * 3


def test_mixed_modes_run_the_plain_path():
    """A block whose BNs mix training and running statistics: each BN's own mode, the
    plain computation (no fused path computes a mix)."""
    torch.manual_seed(0)
    plain = BLOCKS["basic_s2"][0](False).double()
    randomize_bn(plain)
    fused = FusedResidual.from_residual(copy.deepcopy(plain), backend="torch")
    for m in (plain, fused):
        m.train()
        m.bn1.eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(fused(x), plain(x))
    torch.testing.assert_close(fused.state_dict(), plain.state_dict())


class _AffineFrozenBN(nn.Module):
    """transformers' *FrozenBatchNorm2d, as written there: buffers, eps 1e-5 in the
    forward (no attribute)."""

    def __init__(self, n):
        super().__init__()
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x):
        scale = self.weight.reshape(1, -1, 1, 1) * (
            self.running_var.reshape(1, -1, 1, 1) + 1e-5).rsqrt()
        return x * scale + (self.bias.reshape(1, -1, 1, 1)
                            - self.running_mean.reshape(1, -1, 1, 1) * scale)


class _BatchStatsLookalike(_AffineFrozenBN):
    """The same buffers, but normalising with the batch's statistics: not frozen."""

    def forward(self, x):
        return nn.functional.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, 1e-5)


def test_frozen_bn_is_recognised_by_what_it_computes():
    assert is_frozen_bn(FrozenBatchNorm2d(4))
    assert is_frozen_bn(_AffineFrozenBN(4))
    assert not is_frozen_bn(_BatchStatsLookalike(4))
    assert not is_frozen_bn(nn.BatchNorm2d(4))
    assert not is_frozen_bn(nn.Identity())
    with pytest.raises(ConversionError, match=r"`bn2` \(_BatchStatsLookalike\) between "
                                              "conv2 and the add is not part"):
        FusedResidual.from_residual(BasicBlock(8, 8, norm_layer=_BatchStatsLookalike))


def test_transformers_frozen_bn_class():
    """transformers' own frozen BN class (eps written into its forward) converts and
    computes the same, in eval and in a training step."""
    detr = pytest.importorskip("transformers.models.detr.modeling_detr")
    check_block(lambda: BasicBlock(4, 8, 2, nn.Sequential(
        conv1x1(4, 8, 2), detr.DetrFrozenBatchNorm2d(8)), norm_layer=detr.DetrFrozenBatchNorm2d),
        backend="torch", train=True, shape=(2, 4, 6, 6))


def _frozen_network(name, blocks):
    """fuse_model on torchvision's `name` built with FrozenBatchNorm2d (the detection
    backbones'): every block converts, the same state_dict keys, the same function in
    eval (by the rule against float64) and in a seeded training step (output, every
    parameter gradient; the buffers unchanged)."""
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = getattr(tvm, name)(norm_layer=FrozenBatchNorm2d)
    randomize_bn(model)
    fused = fuse_model(copy.deepcopy(model))
    assert sum(isinstance(m, FusedResidual) for m in fused.modules()) == blocks
    assert list(fused.state_dict()) == list(model.state_dict())
    ref = copy.deepcopy(model).double()
    x = torch.randn(2, 3, 16, 16)
    model.eval(), fused.eval(), ref.eval()
    with torch.no_grad():
        assert_within("eval output", fused(x), model(x), ref(x.double()))
    model.train(), fused.train(), ref.train()
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_(),
          x.double().requires_grad_()]
    outs = [m(xi) for m, xi in zip((fused, model, ref), xs)]
    assert_within("train output", *outs)
    for o in outs:
        o.square().mean().backward()
    assert_within("grad x", *(xi.grad for xi in xs), factor=3)
    named = [dict(m.named_parameters()) for m in (fused, model, ref)]
    for n in named[1]:
        assert_within(f"grad {n}", *(d[n].grad for d in named), factor=3)
    state = fused.state_dict()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name,blocks", [("resnet18", 8), ("resnet50", 16)])
def test_torchvision_frozen_bn_networks(name, blocks):
    _frozen_network(name, blocks)


def test_check_model_frozen_resnet18():
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = tvm.resnet18(norm_layer=FrozenBatchNorm2d)
    randomize_bn(model)
    report = check_model(model, torch.randn(2, 3, 16, 16), backends=["torch"], steps=1)
    assert report.ok, str(report)


def test_compile_fullgraph_frozen_training_step():
    """torch.compile(fullgraph=True) traces the frozen path (the frozen ops and their
    autograd) and computes what eager does."""
    torch.manual_seed(0)
    make, shape, _ = BLOCKS["bottleneck_s2"]
    plain = make(True)
    randomize_bn(plain)
    fused = FusedResidual.from_residual(copy.deepcopy(plain), backend="torch").train()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(shape)
    xc, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_c, out_p = compiled(xc), plain.train()(xp)
    torch.testing.assert_close(out_c, out_p, rtol=1e-4, atol=1e-4)
    out_c.square().sum().backward()
    out_p.square().sum().backward()
    torch.testing.assert_close(xc.grad, xp.grad, rtol=1e-4, atol=1e-4)
    for (n, p), (_, q) in zip(fused.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=n)


def test_triton_frozen_training_runs_the_fused_block(monkeypatch):
    """The triton backend's frozen step is the fused training op (block_train with the
    running statistics), not the composite path."""
    import resnet_fused.backends.triton as tb
    calls = []
    real = tb.train_block
    monkeypatch.setattr(tb, "train_block",
                        lambda *a, **k: calls.append(k.get("frozen")) or real(*a, **k))
    make, shape, _ = BLOCKS["basic_s2"]
    plain = make(True)
    randomize_bn(plain)
    fused = FusedResidual.from_residual(plain, backend="triton").train()
    fused(torch.randn(shape, requires_grad=True)).sum().backward()
    assert calls == [True]
