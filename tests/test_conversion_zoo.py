"""fuse_model decides from what a block computes (README.md, "What converts").

A zoo of blocks that look residual (convs and BNs under torchvision's names) but compute
something else: each is left as it is, with a warning naming the part that does not fit,
and the model computes and saves what it did. Blocks that compute the fused block, in
the usual spellings, convert on every conversion path with the same function and the
same state_dict keys. BatchNorm weights and statistics are randomised throughout:
zero-initialised last BNs (timm's and torchvision's option) hide wrong conversions.
"""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from resnet_fused import ConversionError, FusedResidual, Residual, fuse_model, resnet18
from test_module import BasicBlockLike, Residual3x3Proj


def randomize_bns(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for t, lo, hi in ((m.weight, 0.5, 1.5), (m.bias, -0.5, 0.5),
                                  (m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2.0)):
                    t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) * (hi - lo) + lo)
    return model


# --------------------------------------------------------------------------- the zoo
class _Base(nn.Module):
    """conv1/bn1/conv2/bn2 (+ downsample) under torchvision's names."""

    def __init__(self, c=8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)


class PreActBlock(_Base):
    """The well-known CIFAR pre-activation block."""

    def __init__(self, c=8):
        super().__init__(c)
        self.shortcut = nn.Sequential()

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


class HalfScaleNoRelu(_Base):
    def forward(self, x):
        return x + 0.5 * self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


class DropoutBetween(_Base):
    def __init__(self, c=8):
        super().__init__(c)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        out = self.drop(self.relu(self.bn1(self.conv1(x))))
        return self.relu(self.bn2(self.conv2(out)) + x)


class GeluAsRelu(BasicBlockLike):
    def __init__(self):
        super().__init__(8, 8)
        self.relu = nn.GELU()


class ConvTwice(_Base):
    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv1(out)) + x)


class ReluBeforeBn(_Base):
    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(F.relu(self.conv2(out))) + x)


class ExtraBias(_Base):
    def __init__(self, c=8):
        super().__init__(c)
        self.bias = nn.Parameter(torch.randn(c, 1, 1))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.bias + x)


class LearnedScale(_Base):
    def __init__(self, c=8):
        super().__init__(c)
        self.scale = nn.Parameter(torch.full((1,), 0.7))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.scale * self.bn2(self.conv2(out)) + x)


class AddIntoInput(_Base):
    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        x += self.bn2(self.conv2(out))
        return self.relu(x)


class BranchOnTraining(_Base):
    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.training:
            out = out * 0.9
        return self.relu(out + x)


class DataDependent(_Base):
    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        if out.sum() > 0:
            out = out.flip(1)
        return self.relu(self.bn2(self.conv2(out)) + x)


class UnusedConv(BasicBlockLike):
    def __init__(self):
        super().__init__(8, 8)
        self.extra = nn.Conv2d(8, 8, 1)


def _overriding_subclass():
    tv = pytest.importorskip("torchvision")

    class ScaledBasicBlock(tv.models.resnet.BasicBlock):
        def forward(self, x):
            return super().forward(x) * 2

    return ScaledBasicBlock(8, 8)


def _hooked():
    b = BasicBlockLike(8, 8)
    b.conv1.register_forward_hook(lambda m, i, o: None)
    return b


def _timm_block(name, **kw):
    timm = pytest.importorskip("timm")
    return timm.create_model(name, **kw).layer1[1]


ZOO = {
    "pre-activation": (PreActBlock, r"no ReLU after the add"),
    "0.5 scale, no final relu": (HalfScaleNoRelu, r"no ReLU after the add"),
    "dropout between the convs": (DropoutBetween,
                                  r"`drop` \(Dropout\) between the ReLU after bn1 and conv2"),
    "gelu as self.relu": (GeluAsRelu, r"`relu` \(GELU\) between the add and the output"),
    "timm silu": (lambda: _timm_block("resnet18", act_layer="silu"),
                  r"`act2` \(SiLU\) between the add and the output"),
    "conv applied twice": (ConvTwice, r"`conv1` is applied 2 times"),
    "relu before bn": (ReluBeforeBn, r"`relu` between conv2 and bn2"),
    "extra bias": (ExtraBias, r"an add of the attribute `bias` between bn2 and the add"),
    "learned scale": (LearnedScale, r"`\*` between bn2 and the add"),
    "+= into the input": (AddIntoInput, r"`\+=` writes into the block's input"),
    "branch on self.training": (BranchOnTraining, r"branches on self.training"),
    "data-dependent control flow": (DataDependent, r"cannot be traced by torch.fx"),
    "unused conv": (UnusedConv, r"`extra` \(Conv2d\) holds `weight`"),
    "subclass overriding forward": (_overriding_subclass,
                                    r"`\*` between the ReLU after the add and the output"),
    "forward hook": (_hooked, r"`conv1` has a module hook"),
}


def _run(model, x, train, seed=0):
    """Outputs (and the input's value after the call) in eval or seeded training."""
    model.train(train)
    torch.manual_seed(seed)
    xi = x.clone()
    with torch.no_grad():
        return model(xi), xi


@pytest.mark.parametrize("case", list(ZOO), ids=list(ZOO))
def test_a_block_computing_something_else_is_left_with_a_warning(case):
    make, reason = ZOO[case]
    block = randomize_bns(make().double())
    c = block.conv1.in_channels
    model = nn.Sequential(nn.Conv2d(c, c, 1).double(), block)
    keys = list(model.state_dict())
    with pytest.warns(UserWarning, match=rf"left 1 \({type(block).__name__}\) as it is: "
                      rf".*{reason}"):
        out = fuse_model(model, backend="torch")
    assert type(out[1]) is type(block) and not any(
        isinstance(m, FusedResidual) for m in out.modules())
    assert list(out.state_dict()) == keys
    x = torch.randn(2, c, 6, 6, dtype=torch.float64)
    for train in (False, True):
        (want, x_want), (got, x_got) = _run(model, x, train), _run(out, x, train)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(x_got, x_want, rtol=0, atol=0)
    with pytest.raises(ConversionError, match=reason):
        FusedResidual.from_residual(make())


def test_the_warning_names_the_block_by_its_path_in_the_model():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", act_layer="silu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fuse_model(model, backend="torch")
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 8, msgs  # one per block, none for the model or its stages
    assert msgs[0] == ("fuse_model: left layer1.0 (BasicBlock) as it is: `act2` (SiLU) "
                       "between the add and the output is not part of a fused block")


# --------------------------------------------------------------------------- what converts
class Spellings(nn.Module):
    """The fused block written in the other usual ways: F.relu / torch.relu / .relu_(),
    +=, torch.add, .add_(), identities in between, one ReLU module reused."""

    def __init__(self, variant, c=8):
        super().__init__()
        self.variant = variant
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.act = nn.ReLU()
        self.drop, self.id, self.dp = nn.Dropout(0.0), nn.Identity(), nn.Dropout2d(0.0)

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        v = self.variant
        y = (torch.relu(y) if v == 0 else y.relu_() if v == 1 else
             F.relu(y, inplace=True) if v == 2 else self.act(y))
        y = self.bn2(self.conv2(self.drop(y)))
        if v == 0:
            y += x
        elif v == 1:
            y = torch.add(x, y)
        elif v == 2:
            y = y.add_(x)
        else:
            y = self.id(y) + self.dp(x)
        return (F.relu(y) if v == 0 else torch.relu_(y) if v == 1 else
                y.relu() if v == 2 else self.act(y))


def _d2l_model():
    return resnet18(in_channels=3, num_classes=10)


def _tv(name):
    def make():
        tv = pytest.importorskip("torchvision")
        return getattr(tv.models, name)(num_classes=10)
    return make


def _timm(name):
    def make():
        timm = pytest.importorskip("timm")
        return timm.create_model(name, num_classes=10)
    return make


CONVERTS = {
    "d2l 1x1 projection": (lambda: nn.Sequential(Residual(8, 16, True, 2), Residual(16, 16)), 2),
    "d2l 3x3 projection": (lambda: nn.Sequential(Residual3x3Proj(8, 16, True, 2),
                                                 Residual3x3Proj(16, 16)), 2),
    "spellings": (lambda: nn.Sequential(*[Spellings(v) for v in range(4)]), 4),
    "d2l resnet18": (_d2l_model, 8),
    "torchvision resnet18": (_tv("resnet18"), 8),
    "torchvision resnet34": (_tv("resnet34"), 16),
    "timm resnet18": (_timm("resnet18"), 8),
    "timm resnet34": (_timm("resnet34"), 16),
}


def _shape(model):
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return (2, first.in_channels, 64, 64) if first.in_channels == 3 else (2, 8, 8, 8)


def _assert_same_function(plain, fused, shape):
    """Eval outputs, seeded-training outputs, input and parameter gradients, and the
    running statistics after the step, of two float64 models."""
    x = torch.randn(shape, dtype=torch.float64)
    for train in (False, True):
        res = []
        for m in (plain, fused):
            m.train(train)
            torch.manual_seed(1)
            xi = x.clone().requires_grad_()
            out = m(xi)
            out.square().sum().backward()
            res.append((out, xi.grad, {n: p.grad for n, p in m.named_parameters()},
                        {n: b.clone() for n, b in m.named_buffers()}))
            m.zero_grad()
        (o0, g0, p0, b0), (o1, g1, p1, b1) = res
        torch.testing.assert_close(o1, o0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(g1, g0, rtol=1e-8, atol=1e-8)
        assert p1.keys() == p0.keys() and b1.keys() == b0.keys()
        for n in p0:
            torch.testing.assert_close(p1[n], p0[n], rtol=1e-8, atol=1e-8, msg=n)
        for n in b0:
            torch.testing.assert_close(b1[n], b0[n], rtol=1e-12, atol=1e-12, msg=n)


def _convert(plain, path):
    """plain converted by one of the conversion paths (a deep copy of plain)."""
    if path == "fuse_model":
        return fuse_model(plain, backend="torch")
    if path == "inplace":
        m = copy.deepcopy(plain)
        assert fuse_model(m, backend="torch", inplace=True) is m
        return m
    if path == "from_residual":
        m = copy.deepcopy(plain)
        for mod in list(m.modules()):
            for name, child in list(mod._modules.items()):
                try:
                    mod._modules[name] = FusedResidual.from_residual(child, backend="torch")
                except ConversionError:
                    pass
        return m
    if path == "syncbn before":
        return fuse_model(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain)),
                          backend="torch")
    if path == "syncbn after":
        return nn.SyncBatchNorm.convert_sync_batchnorm(fuse_model(plain, backend="torch"))
    if path == "already converted":
        once = fuse_model(plain, backend="torch")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return fuse_model(once, backend="torch")
    raise AssertionError(path)


PATHS = ["fuse_model", "inplace", "from_residual", "syncbn before", "syncbn after",
         "already converted"]


@pytest.mark.parametrize("case", list(CONVERTS), ids=list(CONVERTS))
def test_a_fused_block_converts_with_the_same_function_and_state_dict(case):
    make, n_blocks = CONVERTS[case]
    torch.manual_seed(0)
    plain = randomize_bns(make().double())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here may be left behind
        fused = fuse_model(plain, backend="torch")
    assert sum(isinstance(m, FusedResidual) for m in fused.modules()) == n_blocks
    assert list(fused.state_dict()) == list(plain.state_dict())
    # checkpoints load both ways
    fused.load_state_dict(plain.state_dict())
    copy.deepcopy(plain).load_state_dict(fused.state_dict())
    _assert_same_function(plain, fused, _shape(plain))


@pytest.fixture
def one_rank_group(tmp_path):
    """A one-process group: a fused SyncBatchNorm block trains only inside one."""
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("path", PATHS)
def test_every_conversion_path_keeps_function_and_keys(path, request):
    if path.startswith("syncbn"):
        request.getfixturevalue("one_rank_group")
    torch.manual_seed(0)
    plain = randomize_bns(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), BasicBlockLike(8, 8), BasicBlockLike(8, 16, stride=2),
        Residual(16, 16), Spellings(1, 16)).double())
    fused = _convert(plain, path)
    assert sum(isinstance(m, FusedResidual) for m in fused.modules()) == 4
    if path.startswith("syncbn"):
        # On one rank SyncBatchNorm is BatchNorm2d (torch's own refuses CPU tensors
        # in training, so the plain BatchNorm model is the reference), same keys.
        assert any(isinstance(m, nn.SyncBatchNorm) for m in fused.modules())
    assert list(fused.state_dict()) == list(plain.state_dict())
    _assert_same_function(plain, fused, (2, 3, 8, 8))


def test_timm_drop_path_blocks_convert_at_every_rate():
    """timm ramps the drop-path rate from 0 at the first block: that block is the plain
    fused block (the rate-0 drop path falls away), the others gate their branch with a
    sample gate (README.md, "What converts") drawn as the module draws it, so seeded
    training keeps the same stochastic depth."""
    timm = pytest.importorskip("timm")
    plain = randomize_bns(timm.create_model("resnet18", drop_path_rate=0.2,
                                            num_classes=10).double())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = fuse_model(plain, backend="torch")
    assert not fused.layer1[0]._spec.gates
    assert sum(isinstance(m, FusedResidual) for m in fused.modules()) == 8
    assert [g.path for g in fused.layer1[1]._spec.gates] == ["drop_path"]
    assert not caught, [str(w.message) for w in caught]
    assert list(fused.state_dict()) == list(plain.state_dict())
    _assert_same_function(plain, fused, (2, 3, 64, 64))
