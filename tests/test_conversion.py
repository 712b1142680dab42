"""fuse_model / from_residual: the D2L network, torchvision's ResNet (BasicBlock), the
3x3-projection variant, and blocks that cannot be converted."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from blockcheck import randomize_bn
from resnet_fused import ConversionError, FusedResidual, Residual, fuse_model, resnet18
from test_module import BasicBlockLike, Residual3x3Proj


def _compare_models(plain, fused, shape, train):
    """Outputs and every parameter gradient of two float64 models on one input."""
    plain.train(train), fused.train(train)
    x = torch.randn(shape, dtype=torch.float64)
    outs = []
    for m in (plain, fused):
        xi = x.clone().requires_grad_()
        out = m(xi)
        out.square().sum().backward()
        outs.append((out, xi.grad))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-8, atol=1e-8)
    fused_params = dict(fused.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(fused_params[name].grad, p.grad, rtol=1e-8, atol=1e-8,
                                   msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_d2l_resnet18_converts_every_block(train):
    plain = resnet18(in_channels=1, num_classes=10).double()
    randomize_bn(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing in this network should be left behind
        fused = fuse_model(plain, backend="torch")
    blocks = [m for m in fused.modules() if isinstance(m, FusedResidual)]
    assert len(blocks) == 8
    assert not any(isinstance(m, Residual) for m in fused.modules())
    assert not any(isinstance(m, FusedResidual) for m in plain.modules()), "not a copy"
    assert list(fused.state_dict()) == list(plain.state_dict())
    _compare_models(plain, fused, (2, 1, 64, 64), train)


def test_fuse_model_inplace_and_block_itself():
    plain = nn.Sequential(Residual(4, 4), nn.ReLU())
    same = fuse_model(plain, backend="torch", inplace=True)
    assert same is plain and isinstance(plain[0], FusedResidual)
    fused_block = fuse_model(Residual(4, 8, True, 2), backend="torch")
    assert isinstance(fused_block, FusedResidual)


def test_from_residual_shares_parameters():
    plain = Residual(4, 8, True, 2)
    fused = FusedResidual.from_residual(plain, backend="torch")
    assert fused.conv3 is plain.conv3 and fused.bn1.weight is plain.bn1.weight
    assert fused.training == plain.training


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_basicblock_network_by_structure(train):
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BasicBlockLike(8, 8),
                          BasicBlockLike(8, 16, stride=2), nn.AdaptiveAvgPool2d(1)).double()
    randomize_bn(plain)
    fused = fuse_model(plain, backend="torch")
    assert sum(isinstance(m, FusedResidual) for m in fused.modules()) == 2
    assert list(fused.state_dict()) == list(plain.state_dict())  # torchvision names kept
    _compare_models(plain, fused, (2, 3, 12, 12), train)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_torchvision_resnet18(train):
    torchvision = pytest.importorskip("torchvision")
    plain = torchvision.models.resnet18(num_classes=10).double()
    randomize_bn(plain)
    fused = fuse_model(plain, backend="torch")
    assert sum(isinstance(m, FusedResidual) for m in fused.modules()) == 8
    # A torchvision checkpoint loads into the converted model unchanged.
    fused.load_state_dict(plain.state_dict())
    # 64x64 leaves 2x2 at the last stage: BN over N*H*W = 8 values, not 2 (with 2, BN's
    # output ignores its input and every gradient upstream is rounding noise).
    _compare_models(plain, fused, (2, 3, 64, 64), train)


def test_3x3_projection_variant():
    plain = nn.Sequential(Residual3x3Proj(4, 8, True, 2), Residual3x3Proj(8, 8)).double()
    randomize_bn(plain)
    fused = fuse_model(plain, backend="torch")
    assert isinstance(fused[0], FusedResidual) and fused[0].conv3.kernel_size == (3, 3)
    _compare_models(plain, fused, (2, 4, 9, 9), True)
    _compare_models(plain, fused, (2, 4, 9, 9), False)


class Bottleneck(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.downsample = None

    def forward(self, x):  # written unlike torchvision's: functional ReLUs, torch.add
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y)).relu_()
        return F.relu(torch.add(self.bn3(self.conv3(y)), x), inplace=True)


def _dilated():
    b = Residual(4, 4)
    b.conv1 = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
    return b


def _no_affine():
    b = Residual(4, 4)
    b.bn2 = nn.BatchNorm2d(4, affine=False)
    return b


def _no_running_stats():
    b = Residual(4, 4)
    b.bn1 = nn.BatchNorm2d(4, track_running_stats=False)
    return b


def _stride3():
    return Residual(4, 8, True, 3)


def _identity_mismatch():
    b = Residual(4, 8)  # no projection but channels change: the plain block fails too
    return b


def _grouped():
    b = Residual(4, 4)
    b.conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=2)
    return b


def _dilated_wrong_padding():
    b = Residual(4, 4)
    b.conv1 = nn.Conv2d(4, 4, 3, padding=1, dilation=2)  # shrinks: shapes would not add
    return b


def _kernel5():
    b = Residual(4, 4)
    b.conv2 = nn.Conv2d(4, 4, 5, padding=2)
    return b


def _grouped_shortcut():
    b = Residual(4, 8, True)
    b.conv3 = nn.Conv2d(4, 8, 1, groups=2)
    return b


@pytest.mark.parametrize("make,reason", [
    (_dilated_wrong_padding, "padding"),
    (_kernel5, "kernel"),
    (_grouped_shortcut, "groups=2"),
    (_no_affine, "affine=False"),
    (_no_running_stats, "track_running_stats=False"),
    (_stride3, "stride 3"),
    (_identity_mismatch, "identity shortcut"),
])
def test_unconvertible_blocks_are_left_with_a_warning(make, reason):
    model = nn.Sequential(nn.Identity(), make())
    with pytest.warns(UserWarning, match=rf"left 1 \({type(model[1]).__name__}\).*{reason}"):
        out = fuse_model(model, backend="torch")
    assert type(out[1]) is type(model[1])
    with pytest.raises(ConversionError, match=reason):
        FusedResidual.from_residual(make())


@pytest.mark.parametrize("make", [_dilated, _grouped])
def test_grouped_and_dilated_blocks_convert_and_compute_the_plain_block(make):
    """Groups and dilation are read off the convs (README.md, Design): every fused path
    takes them (the triton backend declines them and auto routes elsewhere)."""
    torch.manual_seed(0)
    plain = make()
    fused = FusedResidual.from_residual(copy.deepcopy(plain), backend="torch")
    x = torch.randn(2, 4, 6, 6)
    for train in (True, False):
        plain.train(train), fused.train(train)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), plain(x))


def test_a_hand_written_bottleneck_converts():
    fused = FusedResidual.from_residual(Bottleneck(), backend="torch")
    assert fused._spec.kind == "bottleneck"
    assert list(fused.state_dict()) == list(Bottleneck().state_dict())


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        FusedResidual(4, 4, backend="cudnn")
    with pytest.raises(ValueError, match="unknown backend"):
        fuse_model(nn.Sequential(Residual(4, 4)), backend="fast")


def test_converted_model_trains_like_plain_over_steps():
    torch.manual_seed(0)
    plain = resnet18(in_channels=1, num_classes=4).double()
    fused = fuse_model(plain, backend="torch")
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.01, momentum=0.9)
    for _ in range(2):
        x = torch.randn(4, 1, 64, 64, dtype=torch.float64)
        y = torch.randint(0, 4, (4,))
        for m, opt in ((plain, opt_p), (fused, opt_f)):
            m.train()
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    plain.eval(), fused.eval()
    x = torch.randn(2, 1, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-8, atol=1e-8)
    _ = copy.deepcopy(fused)
