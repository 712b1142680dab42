"""FusedResidual (torch backend) against the plain block in float64: outputs, every
gradient, running statistics; eval folding; module behaviour. Its caches:
test_module_caches.py."""
import copy
import io

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from blockcheck import check_block, make_input, randomize_bn
from resnet_fused import FusedResidual, Residual


class Residual3x3Proj(nn.Module):
    """A circulating copy of D2L's block whose conv3 is a 3x3, padding 1, strided conv."""

    def __init__(self, cin, cout, use_1x1conv=False, strides=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, kernel_size=3, padding=1, stride=strides)
        self.conv2 = nn.Conv2d(cout, cout, kernel_size=3, padding=1)
        self.conv3 = (nn.Conv2d(cin, cout, kernel_size=3, padding=1, stride=strides)
                      if use_1x1conv else None)
        self.bn1 = nn.BatchNorm2d(cout)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, X):
        Y = F.relu(self.bn1(self.conv1(X)))
        Y = self.bn2(self.conv2(Y))
        if self.conv3:
            X = self.conv3(X)
        return F.relu(Y + X)


class BasicBlockLike(nn.Module):
    """torchvision's BasicBlock, re-typed here so the test runs without torchvision."""

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


BLOCKS = {
    "identity": lambda: Residual(8, 8),
    "proj1x1_s2": lambda: Residual(8, 12, use_1x1conv=True, strides=2),
    "proj1x1_s1": lambda: Residual(8, 12, use_1x1conv=True, strides=1),
    "proj3x3_s2": lambda: Residual3x3Proj(8, 12, use_1x1conv=True, strides=2),
    "basic_identity": lambda: BasicBlockLike(8, 8),
    "basic_down_s2": lambda: BasicBlockLike(8, 12, stride=2),
}


@pytest.mark.parametrize("kind", list(BLOCKS))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_float64_matches_plain(kind, train):
    check_block(BLOCKS[kind], dtype=torch.float64, train=train, steps=2)


@pytest.mark.parametrize("kind", ["identity", "proj1x1_s2", "basic_down_s2"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_low_precision_within_tolerance(kind, train, channels_last, dtype):
    # bf16 gradients at a few hundred elements are dominated by single ReLU-mask flips;
    # at a few thousand the comparison with the plain block is meaningful.
    shape = (8, 8, 16, 16) if dtype == torch.bfloat16 else (2, 8, 9, 9)
    check_block(BLOCKS[kind], dtype=dtype, train=train, channels_last=channels_last, steps=3,
                shape=shape)


@pytest.mark.parametrize("hw", [7, 13, 57])
def test_odd_spatial_sizes(hw):
    check_block(BLOCKS["proj1x1_s2"], dtype=torch.float32, train=True, shape=(2, 8, hw, hw))


def test_batch_one_train_and_eval():
    check_block(BLOCKS["identity"], dtype=torch.float32, train=True, shape=(1, 8, 5, 5))
    check_block(BLOCKS["proj1x1_s2"], dtype=torch.float32, train=False, shape=(1, 8, 1, 1))


def test_train_with_one_value_per_channel_fails_like_batchnorm():
    blk = FusedResidual(8, 8, True, 2, backend="torch").train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        blk(torch.randn(1, 8, 1, 1))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        Residual(8, 8, True, 2).train()(torch.randn(1, 8, 1, 1))


@pytest.mark.parametrize("momentum", [None, 0.3])
def test_running_stats_momentum_and_eps(momentum):
    def make():
        blk = Residual(8, 8)
        for bn in (blk.bn1, blk.bn2):
            bn.momentum = momentum
            bn.eps = 1e-3
        return blk

    check_block(make, dtype=torch.float64, train=True, steps=3)


def test_fresh_construction_matches_residual_init():
    torch.manual_seed(7)
    plain = Residual(8, 16, use_1x1conv=True, strides=2)
    torch.manual_seed(7)
    fused = FusedResidual(8, 16, use_1x1conv=True, strides=2, backend="torch")
    for (n1, a), (n2, b) in zip(plain.state_dict().items(), fused.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b)


def test_state_dict_both_ways_and_save_load():
    plain = Residual(8, 16, use_1x1conv=True, strides=2)
    randomize_bn(plain)
    fused = FusedResidual(8, 16, use_1x1conv=True, strides=2, backend="torch")
    assert list(fused.state_dict()) == list(plain.state_dict())
    fused.load_state_dict(plain.state_dict())
    plain2 = Residual(8, 16, use_1x1conv=True, strides=2)
    plain2.load_state_dict(fused.state_dict())
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(2, 8, 9, 9)
    for m in (plain, plain2, fused, loaded):
        m.eval()
    ref = plain(x)
    for m in (plain2, fused, loaded, copy.deepcopy(fused)):
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def test_half_and_to_and_channels_last_keep_working():
    plain = Residual(8, 8).eval()
    randomize_bn(plain)
    fused = FusedResidual.from_residual(copy.deepcopy(plain), backend="torch").eval()
    x = torch.randn(2, 8, 9, 9)
    fused(x)  # fills the fold cache in float32
    fused = fused.to(torch.bfloat16)  # .to() must drop the float32 cache
    xb = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    out = fused(xb)
    assert out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.float(), plain(x), rtol=3e-2, atol=3e-2)


def test_eval_with_autograd_gives_parameter_gradients():
    check_block(BLOCKS["proj1x1_s2"], dtype=torch.float64, train=False)


def test_sequential_training_with_optimizer_matches_plain():
    torch.manual_seed(3)
    plain = nn.Sequential(Residual(4, 8, True, 2), Residual(8, 8)).double()
    fused = nn.Sequential(*(FusedResidual.from_residual(b, backend="torch")
                            for b in copy.deepcopy(plain)))
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (plain, fused)]
    for _ in range(3):
        x = torch.randn(3, 4, 10, 10, dtype=torch.float64)
        for m, opt in zip((plain, fused), opts):
            m.train()
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    plain.eval(), fused.eval()
    x = torch.randn(2, 4, 10, 10, dtype=torch.float64)
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-10, atol=1e-10)


def test_autocast_cpu_bf16_matches_plain_autocast():
    plain = Residual(8, 8).train()
    randomize_bn(plain)
    fused = FusedResidual.from_residual(copy.deepcopy(plain), backend="torch")
    plain64 = copy.deepcopy(plain).double()
    x = make_input((2, 8, 9, 9), torch.float32, False, requires_grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_p = plain(x)
        out_f = fused(x)
    assert out_f.dtype == out_p.dtype
    from tolerance import assert_within
    assert_within("autocast output", out_f, out_p, plain64(x.double()), dtype=torch.bfloat16)


def test_repr_names_backend():
    assert "backend='torch'" in repr(FusedResidual(4, 4, backend="torch"))


@pytest.mark.parametrize("frozen", ["all", "bn1", "downsample"])
def test_bn_modules_own_mode_decides_like_plain(frozen):
    """model.train() with BNs put back in eval (frozen-BN fine-tuning), or only some of
    them: each BN behaves as its own mode says, as in the plain block."""
    def make():
        blk = BLOCKS["basic_down_s2"]()
        blk.train()
        bns = {"all": [blk.bn1, blk.bn2, blk.downsample[1]], "bn1": [blk.bn1],
               "downsample": [blk.downsample[1]]}[frozen]
        for bn in bns:
            bn.eval()
        return blk

    plain = make().double()
    randomize_bn(plain)
    fused = FusedResidual.from_residual(copy.deepcopy(plain), backend="torch")
    assert fused.training
    x = torch.randn(3, 8, 9, 9, dtype=torch.float64)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [plain(xs[0]), fused(xs[1])]
    for o in outs:
        o.square().sum().backward()
    torch.testing.assert_close(outs[1], outs[0])
    torch.testing.assert_close(xs[1].grad, xs[0].grad)
    for (name, a), b in zip(plain.named_buffers(), fused.buffers()):
        torch.testing.assert_close(b, a, msg=name)
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


@pytest.mark.parametrize("backend", ["torch", "native", "triton", "eager"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_nan_propagates_like_plain(backend, train):
    """A NaN in the input must show in the output where the plain block's shows (ReLU
    keeps NaN); a kernel computing max(v, 0) would silently turn it into 0."""
    from resnet_fused import backends
    if backends.unavailable_reason(backend, torch.device("cpu")) is not None:
        pytest.skip(backends.unavailable_reason(backend, torch.device("cpu")))
    plain = Residual(4, 4).train(train)
    randomize_bn(plain)
    fused = FusedResidual.from_residual(copy.deepcopy(plain), backend=backend)
    x = torch.randn(2, 4, 6, 6)
    x[1, 2, 3, 3] = float("nan")
    with torch.no_grad():
        out_p, out_f = plain(x), fused(x)
    assert torch.isnan(out_p).any()
    assert torch.equal(torch.isnan(out_f), torch.isnan(out_p))
