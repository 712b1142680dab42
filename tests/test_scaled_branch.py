"""A constant scale of the branch (README.md, "What converts"): `bn3(c) * 0.2` written
in the block's forward (residual scaling), a gate of kind SCALE with no module, alone or
with a drop path, on the last stage or inside the chain; against the float64 plain
block by the tolerance rule (tests/blockcheck.py; BN randomised), training and eval,
NCHW and channels_last, fp32 and fp16. A learnt scale (a parameter) is no constant: the
block is left as it is, with a warning.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

from blockcheck import check_block, randomize_bn
from resnet_fused import FusedResidual, fuse_model
from resnet_fused import spec as S
from resnet_fused.matching import spec_of

tvr = pytest.importorskip("torchvision.models.resnet")


class ScaledBottleneck(tvr.Bottleneck):
    """torchvision's Bottleneck with its branch scaled before the add, optionally a
    drop path after the scale, or the scale written in place on an inner stage."""

    def __init__(self, cin, planes, stride=1, scale=0.2, drop=None, inner=False):
        ds = None
        if stride != 1 or cin != planes * 4:
            ds = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride, bias=False),
                               nn.BatchNorm2d(planes * 4))
        super().__init__(cin, planes, stride, ds)
        self.scale, self.inner = scale, inner
        self.drop_path = drop

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        if self.inner:
            out = out * self.scale           # on stage 0's output, before conv2
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if not self.inner:
            out = self.scale * out           # the number on either side
        if self.drop_path is not None:
            out = self.drop_path(out)
        if self.downsample is not None:
            x = self.downsample(x)
        return self.relu(out + x)


class HalfScaleBasic(tvr.BasicBlock):
    """A basic block written functionally: x + 0.5 * branch (the add's operands the
    other way round)."""

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return torch.relu(x + 0.5 * out)


def _drop():
    from torchvision.ops import StochasticDepth
    return StochasticDepth(0.3, "row")


BLOCKS = {
    "last_stride2": lambda: ScaledBottleneck(8, 4, stride=2),
    "last_identity": lambda: ScaledBottleneck(16, 4, scale=-1.5),
    "inner": lambda: ScaledBottleneck(16, 4, scale=0.5, inner=True),
    "with_drop_path": lambda: ScaledBottleneck(8, 4, stride=2, drop=_drop()),
    "basic_half": lambda: HalfScaleBasic(16, 16),
}


def _shape(kind):
    return (3, 8 if kind in ("last_stride2", "with_drop_path") else 16, 7, 7)


def test_spec_holds_the_constant():
    spec = spec_of(BLOCKS["last_stride2"]())
    assert spec.gates == (S.Gate("", S.SCALE, 2, 0.2),)
    assert "" not in spec.module_paths()
    spec = spec_of(BLOCKS["inner"]())
    assert spec.gates == (S.Gate("", S.SCALE, 0, 0.5),)
    spec = spec_of(BLOCKS["with_drop_path"]())
    assert [(g.kind, g.stage) for g in spec.gates] == [(S.SCALE, 2), (S.SAMPLE, 2)]


@pytest.mark.parametrize("kind", list(BLOCKS))
@pytest.mark.parametrize("backend", ["torch", "eager", "native"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_train_and_eval(kind, backend, channels_last):
    check_block(BLOCKS[kind], backend=backend, train=True, channels_last=channels_last,
                shape=_shape(kind), steps=2, reseed=True)
    check_block(BLOCKS[kind], backend=backend, train=False, channels_last=channels_last,
                shape=_shape(kind), grads=False)


@pytest.mark.parametrize("kind", ["last_identity", "with_drop_path"])
def test_triton(kind):
    """On triton (its interpreter on CPU) a constant scale is block_train's `gate` in
    training and the gated join's in eval; a scale inside the chain ("inner") is
    declined there (tests/test_gated_blocks.py)."""
    import os
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the triton backend on CPU needs TRITON_INTERPRET=1")
    check_block(BLOCKS[kind], backend="triton", train=True, shape=_shape(kind), steps=2,
                reseed=True)
    check_block(BLOCKS[kind], backend="triton", train=False, channels_last=True,
                shape=_shape(kind), grads=False)


@pytest.mark.parametrize("kind", ["last_stride2", "inner"])
@pytest.mark.parametrize("backend", ["torch", "native"])
def test_float16_and_frozen(kind, backend):
    check_block(BLOCKS[kind], backend=backend, dtype=torch.float16, train=True,
                shape=_shape(kind), steps=1, reseed=True)
    check_block(BLOCKS[kind], backend=backend, dtype=torch.float16, train=False,
                shape=_shape(kind), grads=False)
    check_block(BLOCKS[kind], backend=backend, train=True, bn_eval=True,
                shape=_shape(kind), steps=1, reseed=True)


class LearntScale(ScaledBottleneck):
    """The scale a parameter (layer scale): not a constant."""

    def __init__(self):
        super().__init__(16, 4)
        self.scale = nn.Parameter(torch.tensor(0.2))


class TensorScale(ScaledBottleneck):
    """The scale a buffer: a tensor the forward reads, not a number."""

    def __init__(self):
        super().__init__(16, 4)
        del self.scale
        self.register_buffer("scale", torch.tensor(0.2))


@pytest.mark.parametrize("make", [LearntScale, TensorScale])
def test_a_tensor_scale_is_left_with_a_warning(make):
    model = nn.Sequential(make())
    randomize_bn(model)
    with pytest.warns(UserWarning, match=r"(`\*`|`\.mul\(\)`) between bn3 and the add is not part"):
        fused = fuse_model(copy.deepcopy(model))
    assert not any(isinstance(m, FusedResidual) for m in fused.modules())


def test_fuse_model_keeps_keys_and_computes_the_same():
    """A stack of scaled blocks: every block converted without a warning, the same keys,
    eval by the rule against float64 and a seeded training step bit for bit on eager
    (the drop path's mask drawn as the module draws it)."""
    torch.manual_seed(0)
    model = nn.Sequential(BLOCKS["with_drop_path"](), BLOCKS["last_identity"](),
                          BLOCKS["inner"]()).eval()
    randomize_bn(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = fuse_model(copy.deepcopy(model), backend="eager")
    assert sum(isinstance(m, FusedResidual) for m in fused.modules()) == 3
    assert list(fused.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        assert (fused(x).double() - ref).abs().max() < 1e-4 * ref.abs().max()
    model.train(), fused.train()
    torch.manual_seed(3)
    out_p = model(x)
    torch.manual_seed(3)
    out = fused(x)
    assert torch.equal(out, out_p)
