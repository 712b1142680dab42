"""Bottleneck blocks (ResNet-50/101/152, Wide ResNet, ResNeXt, dilated backbones, timm)
through FusedResidual on every backend that runs on CPU, against the float64 plain
block by the tolerance rule (tests/blockcheck.py; BN weights and running statistics
randomised). Triton runs in its interpreter (fp32, tiny shapes); grouped and dilated
blocks are declined by it and routed to the others.
"""
import copy

import pytest
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, conv1x1

import resnet_fused.backends as backends_pkg
from blockcheck import check_block, make_input, randomize_bn
from tolerance import assert_within
from resnet_fused import FusedResidual, fuse_model, serving
from resnet_fused.backends.triton import TritonBackend

CIN = 16   # input channels of the identity blocks (planes 4, expansion 4)


def _down(cin, cout, stride):
    return nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


def tv_identity():
    return Bottleneck(CIN, 4)


def tv_down_s2():  # v1.5: the stride on the 3x3
    return Bottleneck(8, 4, stride=2, downsample=_down(8, 16, 2))


def tv_v1_s2():  # v1: the stride on the first 1x1
    b = Bottleneck(8, 4, stride=2, downsample=_down(8, 16, 2))
    b.conv1.stride, b.conv2.stride = (2, 2), (1, 1)
    return b


def tv_groups4():  # ResNeXt-style: width 16 in 4 groups
    return Bottleneck(CIN, 4, groups=4, base_width=64, downsample=None)


def tv_dilated():  # replace_stride_with_dilation
    return Bottleneck(CIN, 4, dilation=2)


def timm_down():
    tr = pytest.importorskip("timm.models.resnet")
    return tr.Bottleneck(8, 4, stride=2, downsample=_down(8, 16, 2))


BLOCKS = {"identity": tv_identity, "down_s2": tv_down_s2, "v1_s2": tv_v1_s2,
          "groups4": tv_groups4, "dilated": tv_dilated, "timm_down": timm_down}
DENSE = ("identity", "down_s2", "v1_s2", "timm_down")


def _shape(kind):
    return (2, 8 if kind in ("down_s2", "v1_s2", "timm_down") else CIN, 6, 6)


@pytest.mark.parametrize("kind", list(BLOCKS))
@pytest.mark.parametrize("backend", ["torch", "native", "eager"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_train_and_eval(kind, backend, channels_last):
    """Training: output, input and every parameter gradient, running statistics after
    2 steps. Eval (autograd off): the folded kernels' output."""
    check_block(BLOCKS[kind], backend=backend, dtype=torch.float32, train=True,
                channels_last=channels_last, shape=_shape(kind), steps=2)
    check_block(BLOCKS[kind], backend=backend, dtype=torch.float32, train=False,
                channels_last=channels_last, shape=_shape(kind), grads=False)


@pytest.mark.parametrize("kind", DENSE)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_triton_interpreter(kind, train):
    check_block(BLOCKS[kind], backend="triton", dtype=torch.float32, train=train,
                channels_last=True, shape=_shape(kind), steps=2 if train else 1,
                grads=train)


@pytest.mark.parametrize("kind", ["groups4", "dilated"])
def test_triton_declines_grouped_and_dilated(kind, monkeypatch):
    block = FusedResidual.from_residual(BLOCKS[kind](), backend="triton")
    reason = TritonBackend().unsupported_block_reason(block.parts(), True)
    assert reason and ("groups=4" in reason or "dilation=2" in reason)
    with pytest.raises(ValueError, match="backend='triton'.*dense convolutions"):
        block(torch.randn(_shape(kind)))
    # auto skips a backend that declines the block, whatever its preference order.
    monkeypatch.setattr(backends_pkg, "preferred_order", lambda *a: ("triton", "torch"))
    chosen = backends_pkg.choose(torch.device("cpu"), torch.float32, True, None,
                                 block.parts())
    assert chosen.name == "torch"
    dense = FusedResidual.from_residual(tv_identity(), backend="auto")
    assert backends_pkg.choose(torch.device("cpu"), torch.float32, True, None,
                               dense.parts()).name == "triton"


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_float64_train_native(kind):
    check_block(BLOCKS[kind], backend="native", dtype=torch.float64, train=True,
                shape=_shape(kind), steps=2)


def test_frozen_bn_in_training_model():
    """A model in train() whose BNs are eval (frozen-BN fine-tuning): running stats
    normalise, gradients flow, nothing is updated."""
    torch.manual_seed(0)
    plain = tv_down_s2()
    randomize_bn(plain)
    fused = FusedResidual.from_residual(copy.deepcopy(plain), backend="torch")
    for m in (plain, fused):
        m.train()
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.eval()
    x = make_input((2, 8, 6, 6), torch.float64, False)
    xf = x.detach().clone().requires_grad_()
    plain.double(), fused.double()
    out_p, out_f = plain(x), fused(xf)
    torch.testing.assert_close(out_f, out_p)
    out_p.sum().backward(), out_f.sum().backward()
    torch.testing.assert_close(xf.grad, x.grad)
    for (n, p), (_, q) in zip(fused.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)
    torch.testing.assert_close(fused.state_dict(), plain.state_dict())


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_state_dict_keys_and_tensors_are_the_source_blocks(kind):
    plain = BLOCKS[kind]()
    fused = FusedResidual.from_residual(plain)
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert all(a is b for a, b in zip(fused.state_dict(keep_vars=True).values(),
                                      plain.state_dict(keep_vars=True).values()))


def _same_network(model, blocks: int):
    """fuse_model converts all `blocks` residual blocks of `model` (BN randomised), keeps
    its state_dict keys, and computes the same function: eval (folded kernels) by the
    rule against float64, a training step (auto on CPU: PyTorch's own kernels) bit for
    bit, running statistics included."""
    torch.manual_seed(0)
    model = model.eval()
    randomize_bn(model)
    fused = fuse_model(copy.deepcopy(model))
    assert sum(isinstance(m, FusedResidual) for m in fused.modules()) == blocks
    assert list(fused.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out, out_p, out_ref = fused(x), model(x), copy.deepcopy(model).double()(x.double())
    assert_within("eval output", out, out_p, out_ref)
    model.train(), fused.train()
    out_p, out = model(x), fused(x)
    assert torch.equal(out, out_p)
    out_p.square().mean().backward()
    out.square().mean().backward()
    grads = {n: p.grad for n, p in fused.named_parameters()}
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters())
    state = fused.state_dict()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name,blocks", [
    ("resnet50", 16), ("resnet101", 33), ("wide_resnet50_2", 16), ("resnext50_32x4d", 16),
    ("resnet50_dilated", 16)])
def test_torchvision_bottleneck_networks_convert_and_compute_the_same(name, blocks):
    tvm = pytest.importorskip("torchvision.models")
    if name == "resnet50_dilated":  # segmentation backbones: dilation in stages 3 and 4
        model = tvm.resnet50(replace_stride_with_dilation=[False, True, True])
    else:
        model = getattr(tvm, name)()
    _same_network(model, blocks)


@pytest.mark.parametrize("name,blocks", [("resnet26", 8), ("resnet50", 16)])
def test_timm_bottleneck_networks_convert_and_compute_the_same(name, blocks):
    timm = pytest.importorskip("timm")
    _same_network(timm.create_model(name), blocks)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_torch_backend(train):
    torch.manual_seed(0)
    plain = tv_down_s2()
    randomize_bn(plain)
    fused = FusedResidual.from_residual(copy.deepcopy(plain), backend="torch").train(train)
    plain.train(train)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 8, 6, 6)
    with torch.set_grad_enabled(train):
        out_c, out_p = compiled(x), plain(x)
    torch.testing.assert_close(out_c, out_p, rtol=1e-4, atol=1e-4)
    if train:
        torch.testing.assert_close(fused.bn1.running_mean, plain.bn1.running_mean)


@pytest.mark.parametrize("backend", ["torch", "native", "eager"])
def test_export_keeps_one_fused_op_per_stage(backend):
    torch.manual_seed(0)
    plain = tv_down_s2().eval()
    randomize_bn(plain)
    fused = FusedResidual.from_residual(copy.deepcopy(plain), backend=backend).eval()
    x = torch.randn(2, 8, 6, 6)
    ep = serving.export(fused, (x,))
    ops = [o.split(".")[1] for o in serving.fused_ops(ep)]
    assert ops == ["conv_bias_relu", "conv_bias_relu", "conv_bias_shortcut_relu"]
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), plain(x), rtol=1e-4, atol=1e-4)
