"""fuse_model on the ResNet family as the libraries build it (README.md, "What
converts"): blocks inside any nesting of modules (torchvision's RegNet X, timm's RegNet
X with BatchNormAct2d, transformers' ResNet layers) convert with the same function and
state_dict keys; every residual block that cannot be fused is left with a warning
naming what does not fit, and a model without one gets one warning saying so. BN
weights and statistics randomised throughout.
"""
import re
import warnings

import pytest
import torch
from torch import nn

from resnet_fused import ConversionError, FusedResidual, fuse_model
from resnet_fused.testing import check_model
from test_conversion_zoo import _assert_same_function, randomize_bns
from test_explain import GroupNormBlock

tv = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


class LastHiddenState(nn.Module):
    """A transformers backbone returning its last hidden state (a tensor)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).last_hidden_state


def _hf(**kw):
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[2, 1],
                                    **kw)
    return LastHiddenState(transformers.ResNetModel(cfg))


# RegNets at 64x64: at 32x32 their last stage is 1x1, and training BN over 2 values per
# channel amplifies float64 rounding about 10x per block (1e-4 after 12 blocks).
FAMILIES = {
    # name: (model, residual blocks, input H = W)
    "transformers resnet bottleneck": (lambda: _hf(), 3, 32),
    "transformers resnet bottleneck, stride in 1x1": (
        lambda: _hf(downsample_in_bottleneck=True), 3, 32),
    "transformers resnet basic": (lambda: _hf(layer_type="basic"), 3, 32),
    "torchvision regnet_x_400mf": (lambda: tv.models.regnet_x_400mf(num_classes=10), 22, 64),
    "timm regnetx_002": (lambda: timm.create_model("regnetx_002", num_classes=10), 13, 64),
}


def _fuse_silently(plain):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here may be left behind
        return fuse_model(plain, backend="torch")


@pytest.mark.parametrize("case", list(FAMILIES), ids=list(FAMILIES))
def test_every_block_converts_with_the_same_function_and_keys(case):
    make, n_blocks, size = FAMILIES[case]
    torch.manual_seed(0)
    plain = randomize_bns(make().double())
    fused = _fuse_silently(plain)
    assert sum(isinstance(m, FusedResidual) for m in fused.modules()) == n_blocks
    assert list(fused.state_dict()) == list(plain.state_dict())
    fused.load_state_dict(plain.state_dict())
    _assert_same_function(plain, fused, (2, 3, size, size))


def test_transformers_resnet50_config_converts_every_layer():
    """The microsoft/resnet-50 architecture (ResNetConfig's defaults), not run."""
    plain = transformers.ResNetModel(transformers.ResNetConfig())
    fused = _fuse_silently(plain)
    assert sum(isinstance(m, FusedResidual) for m in fused.modules()) == 16
    assert list(fused.state_dict()) == list(plain.state_dict())


def test_timm_batchnormact_keeps_its_relu_in_the_bn_module():
    """timm's BatchNormAct2d applies the stage's ReLU itself: the spec says so, and the
    plain computation by the spec calls it once."""
    plain = randomize_bns(timm.create_model("regnetx_002").double())
    block = plain.s1.b1
    fused = FusedResidual.from_residual(block, backend="torch")
    stages = fused._spec.stages
    assert [(s.conv, s.bn, s.relu, s.relu_in_bn) for s in stages] == [
        ("conv1.conv", "conv1.bn", True, True), ("conv2.conv", "conv2.bn", True, True),
        ("conv3.conv", "conv3.bn", False, False)]
    assert fused._spec.shortcut.conv == "downsample.conv"


@pytest.mark.parametrize("case", ["transformers resnet bottleneck",
                                  "timm regnetx_002"])
def test_check_model_passes(case):
    plain = randomize_bns(FAMILIES[case][0]())
    size = FAMILIES[case][2]
    report = check_model(plain, torch.randn(2, 3, size, size), backends=["torch"],
                         dtypes=[torch.float32], steps=1)
    assert report.ok, report.table()


# --------------------------------------------------------------------------- never silent
class Wrapped(nn.Module):
    """A residual block two wrappers deep, with a LayerNorm-like norm: still found."""

    def __init__(self):
        super().__init__()
        self.stage = nn.ModuleDict({"inner": nn.Sequential(GroupNormBlock())})

    def forward(self, x):
        return self.stage["inner"](x)


CANNOT = {
    # name: (model, number of blocks, what the warning names)
    "timm resnet50_gn": (lambda: timm.create_model("resnet50_gn"), 16,
                         r"`bn3` \(GroupNorm\) between conv3 and the add"),
    "timm resnet18 SiLU": (lambda: timm.create_model("resnet18", act_layer="silu"), 8,
                           r"`act2` \(SiLU\) between the add and the output"),
    "transformers gelu": (lambda: _hf(hidden_act="gelu"), 3,
                          r"`activation` \(GELUActivation\) between the add and the output"),
    "GroupNorm toy, nested": (lambda: nn.Sequential(Wrapped(), Wrapped()), 2,
                              r"`n2` \(GroupNorm\) between conv2 and the add"),
}


@pytest.mark.parametrize("case", list(CANNOT), ids=list(CANNOT))
def test_every_residual_block_left_gets_a_warning(case):
    make, n_left, names = CANNOT[case]
    plain = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = fuse_model(plain, backend="torch")
    msgs = [str(w.message) for w in caught]
    n_fused = sum(isinstance(m, FusedResidual) for m in fused.modules())
    left = [m for m in msgs if m.startswith("fuse_model: left ")]
    assert len(left) == n_left, msgs
    assert len(msgs) == n_left, msgs  # nothing else, and not for stages or the model
    assert all(re.search(names, m) for m in left), left
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert n_fused == 0


@pytest.mark.parametrize("make", [lambda: timm.create_model("regnetx_002"),
                                  lambda: timm.create_model("seresnet18"),
                                  lambda: _hf()], ids=["timm regnetx_002",
                                                       "timm seresnet18", "transformers"])
def test_conversion_changes_no_tensor_of_the_model(make):
    """Reading what a block computes traces its forward on the model's real tensors
    (torch.fx runs the Python of every module it traces into): nothing of the model,
    a BatchNorm's num_batches_tracked included, may change, in training or eval."""
    for training in (True, False):
        plain = randomize_bns(make()).train(training)
        before = {k: v.clone() for k, v in plain.state_dict().items()}
        fused = fuse_model(plain, backend="torch", inplace=True)
        assert any(isinstance(m, FusedResidual) for m in fused.modules())
        for k, v in fused.state_dict().items():
            assert torch.equal(v, before[k]), f"{k} changed by fuse_model"


def test_frozen_batchnorm_resnet_is_never_silent():
    """torchvision's detection backbones: FrozenBatchNorm2d. Whatever conversion makes
    of them, no block is left without a warning."""
    plain = tv.models.resnet50(norm_layer=tv.ops.FrozenBatchNorm2d)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = fuse_model(plain, backend="torch")
    n_fused = sum(isinstance(m, FusedResidual) for m in fused.modules())
    left = [str(w.message) for w in caught if "fuse_model: left" in str(w.message)]
    assert n_fused + len(left) == 16, left
    assert all("FrozenBatchNorm2d" in m for m in left), left


def test_a_model_without_residual_blocks_gets_one_warning():
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    with pytest.warns(UserWarning, match=r"found no residual block in Sequential") as rec:
        fused = fuse_model(plain, backend="torch")
    assert len(rec) == 1
    assert list(fused.state_dict()) == list(plain.state_dict())


def test_a_plain_block_stays_the_from_residual_error_names_the_node():
    with pytest.raises(ConversionError, match=r"`n2` \(GroupNorm\)"):
        FusedResidual.from_residual(GroupNormBlock())


class DropPathInWrapper(nn.Module):
    """A wrapper holding a BN that branches on its own training flag: traced into, so
    the branch is seen and the block is left (one trace cannot hold in both modes)."""

    class Stage(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y * 0.5 if self.training else y

    def __init__(self, c=8):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.b = self.Stage(c)

    def forward(self, x):
        return torch.relu(self.b(self.a(x)) + x)


def test_a_wrapper_branching_on_training_is_named():
    with pytest.raises(ConversionError, match=r"the forward of `b` \(Stage\) branches on "
                                              r"self.training"):
        FusedResidual.from_residual(DropPathInWrapper())


# --------------------------------------------------------------------------- every backend
def _timm_regnet_block():
    from timm.models.regnet import Bottleneck
    return Bottleneck(8, 16, stride=2, bottle_ratio=1.0, group_size=8, se_ratio=0)


def _hf_bottleneck():
    from transformers.models.resnet.modeling_resnet import ResNetBottleNeckLayer
    return ResNetBottleNeckLayer(8, 16, stride=2)


def _hf_basic():
    from transformers.models.resnet.modeling_resnet import ResNetBasicLayer
    return ResNetBasicLayer(8, 8)


def _tv_regnet_block():
    from torchvision.models.regnet import ResBottleneckBlock
    return ResBottleneckBlock(8, 16, stride=2, norm_layer=nn.BatchNorm2d,
                              activation_layer=nn.ReLU, group_width=8, bottleneck_multiplier=1.0)


@pytest.mark.parametrize("backend", ["torch", "eager", "native"])
@pytest.mark.parametrize("make", [_timm_regnet_block, _hf_bottleneck, _hf_basic,
                                  _tv_regnet_block])
@pytest.mark.parametrize("train", [True, False])
def test_nested_blocks_on_every_cpu_backend(make, backend, train):
    """The composite BN and the nested paths reach each backend as BNs and convs:
    outputs, every gradient and the running statistics by the package's rule."""
    from blockcheck import check_block
    from resnet_fused import available_backends
    if backend not in available_backends("cpu"):
        pytest.skip(f"{backend} is not available on this CPU")
    check_block(make, backend=backend, dtype=torch.float32, train=train, shape=(2, 8, 8, 8))


@pytest.mark.parametrize("train", [True, False])
def test_a_bn_swapped_in_for_a_composite_bn_still_gets_the_stage_relu(train):
    """A plain BatchNorm2d put under a BatchNormAct2d's name after conversion (what a
    BN conversion does) does not apply the ReLU: the block applies it."""
    import copy
    plain = randomize_bns(_timm_regnet_block().double())
    fused = FusedResidual.from_residual(copy.deepcopy(plain), backend="torch")
    bn = nn.BatchNorm2d(fused.conv1.bn.num_features).double()
    bn.load_state_dict(fused.conv1.bn.state_dict())
    fused.conv1.bn = bn
    assert fused.parts().stages[0].relu_in_bn is False
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    for m in (plain, fused):
        m.train(train)
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("make", [_hf_bottleneck, _hf_basic])
@pytest.mark.parametrize("train", [True, False])
def test_nested_dense_blocks_on_triton(make, train):
    """Triton (its interpreter on CPU) reads the nested paths too; dense blocks only
    (it declines grouped ones, which auto routes elsewhere)."""
    from blockcheck import check_block
    from resnet_fused import available_backends
    if "triton" not in available_backends("cpu"):
        pytest.skip("triton is not available on this CPU")
    check_block(make, backend="triton", dtype=torch.float32, train=train, shape=(2, 8, 6, 6))
