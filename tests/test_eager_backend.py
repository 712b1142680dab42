"""The eager backend (resnet_fused/backends/eager.py), auto's choice on CPU.

Training computes the plain block operation for operation, so a converted model's
training step is the plain model's bit for bit (outputs, every gradient, running
statistics), which is the strongest form of "same numbers" and what makes converting
free on CPU; the float64 tolerance rule for it runs with the other backends
(test_bottleneck.py, test_model_check.py, test_distributed.py). Eval takes the folded
ops, checked here against float64.
"""
import copy

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from blockcheck import randomize_bn
from tolerance import assert_within
from resnet_fused import FusedResidual, Residual, backends, fuse_model
from resnet_fused.plan import make_plan


def _down(cin, cout, stride):
    return nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


BLOCKS = {
    "d2l_proj": (lambda: Residual(4, 8, use_1x1conv=True, strides=2), 4),
    "d2l_identity": (lambda: Residual(8, 8), 8),
    "tv_basic_down": (lambda: BasicBlock(4, 8, stride=2, downsample=_down(4, 8, 2)), 4),
    "tv_bottleneck": (lambda: Bottleneck(16, 4), 16),
    "tv_bottleneck_down": (lambda: Bottleneck(8, 4, stride=2, downsample=_down(8, 16, 2)), 8),
}


def _pair(kind, momentum=0.1):
    build, cin = BLOCKS[kind]
    torch.manual_seed(0)
    plain = build()
    randomize_bn(plain)
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    return plain, cin


def test_auto_on_cpu_is_eager_in_both_modes():
    plain, cin = _pair("tv_bottleneck")
    fused = FusedResidual.from_residual(copy.deepcopy(plain))
    assert fused.backend == "auto"
    x = torch.randn(2, cin, 6, 6)
    for train in (True, False):
        plan = make_plan(fused, x, (train,) * 3, False)
        assert plan.backend.name == "eager", train
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert backends.choose(torch.device("cpu"), dtype, True).name == "eager"


@pytest.mark.parametrize("kind", list(BLOCKS))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "cumulative"])
def test_training_is_the_plain_block_bit_for_bit(kind, channels_last, momentum):
    plain, cin = _pair(kind, momentum)
    fused = FusedResidual.from_residual(copy.deepcopy(plain), backend="eager")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    plain, fused = plain.to(memory_format=fmt), fused.to(memory_format=fmt)
    for step in range(3):
        x = torch.randn(4, cin, 6, 6).to(memory_format=fmt)
        xp, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_p, out_f = plain(xp), fused(xf)
        gy = torch.randn_like(out_p)
        out_p.backward(gy)
        out_f.backward(gy)
        assert out_f.is_contiguous(memory_format=fmt)
        assert torch.equal(out_f, out_p), f"step {step}: output"
        assert torch.equal(xf.grad, xp.grad), f"step {step}: input gradient"
    params_f = dict(fused.named_parameters())
    for name, p in plain.named_parameters():
        assert torch.equal(params_f[name].grad, p.grad), name
    buffers_f = dict(fused.named_buffers())
    for name, b in plain.named_buffers():
        if momentum is None and b.is_floating_point():
            # The device-side 1/n of the cumulative average (no host sync) and ATen's
            # host-side one differ in the last bit; the update itself is the same.
            torch.testing.assert_close(buffers_f[name], b, rtol=2e-6, atol=1e-7, msg=name)
        else:
            assert torch.equal(buffers_f[name], b), name


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_eval_folded_against_float64(kind):
    plain, cin = _pair(kind)
    plain.eval()
    fused = FusedResidual.from_residual(copy.deepcopy(plain), backend="eager").eval()
    ref = copy.deepcopy(plain).double()
    x = torch.randn(3, cin, 6, 6)
    with torch.no_grad():
        out, out_p, out_ref = fused(x), plain(x), ref(x.double())
    assert_within(f"{kind} eval output", out, out_p, out_ref)


def test_fuse_model_default_trains_like_the_plain_model():
    """A whole converted ResNet on CPU with the default backend: one training step,
    the same loss and gradients as the plain model."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(1)
    plain = torchvision.models.resnet50(num_classes=10)
    randomize_bn(plain)
    fused = fuse_model(copy.deepcopy(plain))
    assert sum(isinstance(m, FusedResidual) for m in fused.modules()) == 16
    x = torch.randn(2, 3, 32, 32)
    loss_p, loss_f = plain(x).square().mean(), fused(x).square().mean()
    loss_p.backward()
    loss_f.backward()
    assert torch.equal(loss_f, loss_p)
    grads_f = {n: p.grad for n, p in fused.named_parameters()}
    for n, p in plain.named_parameters():
        assert torch.equal(grads_f[n], p.grad), n
