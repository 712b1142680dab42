"""FusedResidual's two caches (README.md, Design): the eval fold (fold.py), refolded on
every kind of change to the block, and the plan per input signature (plan.py), made
again when anything it was decided from differs. Each invalidation test fails when
its check is removed: it compares with the plain block after the change."""
import copy
import io

import pytest
import torch
from torch import nn

import resnet_fused.module as module_py
from blockcheck import randomize_bn
from resnet_fused import FusedResidual, Residual, backends


def _pair(**kw):
    plain = Residual(8, 8, use_1x1conv=True, **kw)
    randomize_bn(plain)
    return plain, FusedResidual.from_residual(copy.deepcopy(plain), backend="torch")


def _agree(plain, fused, x):
    plain.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)


def _new_bn(c):
    bn = nn.BatchNorm2d(c)
    randomize_bn(bn)
    return bn


def _train_step(m):
    m.train()
    m(torch.randn(4, 8, 9, 9, generator=torch.Generator().manual_seed(5)) * 3 + 1)


# Each change is applied to the plain block and the fused one alike. What the fold cache
# sees of it: a tensor's version, an object replaced in a module's dict, or a tensor's
# storage swapped under the same object.
CHANGES = {
    # versions
    "optimizer_step": lambda m: torch.no_grad()(lambda: (m.conv2.weight.mul_(1.5),
                                                         m.bn1.bias.add_(0.25),
                                                         m.conv3.bias.sub_(0.1)))(),
    "running_stats": _train_step,
    "load_state_dict": lambda m: m.load_state_dict(_CHECKPOINT),
    # replaced objects
    "new_parameter": lambda m: setattr(m.conv1, "weight",
                                       nn.Parameter(m.conv1.weight.detach() * -0.5)),
    "new_submodule": lambda m: setattr(m, "bn2", copy.deepcopy(_BN)),
    "bn_eps": lambda m: setattr(m.bn1, "eps", 0.5),
    "load_state_dict_assign": lambda m: m.load_state_dict(copy.deepcopy(_CHECKPOINT),
                                                          assign=True),
    # storage swapped (same Parameter object, same version)
    "data_assigned": lambda m: setattr(m.conv2.weight, "data", m.conv2.weight.data * 2),
    # .to()/.half() round trip: the values come back rounded to float16
    "half_then_float": lambda m: m.half().float(),
}
_checkpoint_source = Residual(8, 8, use_1x1conv=True)
randomize_bn(_checkpoint_source)
_CHECKPOINT = _checkpoint_source.state_dict()
_BN = _new_bn(8)


@pytest.mark.parametrize("change", list(CHANGES))
def test_fold_cache_refolds_on_every_change(change):
    plain, fused = _pair()
    with torch.no_grad():
        plain.conv1.weight.mul_(3.0)  # so the float16 round trip moves the values
        fused.conv1.weight.mul_(3.0)
    x = torch.randn(2, 8, 9, 9)
    _agree(plain, fused, x)
    first = fused._fold_cache
    for m in (plain, fused):
        CHANGES[change](m)
    _agree(plain, fused, x)
    assert fused._fold_cache is not first


def test_fold_cache_is_reused_when_nothing_changed():
    fused = FusedResidual(8, 8, backend="torch").eval()
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        fused(x)
        first = fused._fold_cache.folded
        fused(x)
        fused(x.contiguous(memory_format=torch.channels_last))  # another format: refold
        assert fused._fold_cache.folded is not first
        fused(x)
        second = fused._fold_cache.folded
        fused(x)
        assert fused._fold_cache.folded is second


def test_inference_tensors_refold_every_call():
    """A block built under inference_mode holds tensors without versions: nothing to
    watch, so no cache, and a change made inside inference mode is still seen."""
    with torch.inference_mode():
        plain, fused = _pair()
        x = torch.randn(2, 8, 9, 9)
        _agree(plain, fused, x)
        assert "_fold_cache" not in fused.__dict__
        for m in (plain, fused):
            m.bn1.running_mean.add_(1.0)
        _agree(plain, fused, x)


def test_caches_are_not_saved_or_copied():
    fused = FusedResidual(8, 8, backend="torch").eval()
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        ref = fused(x)
    assert "_fold_cache" in fused.__dict__ and "_plans" in fused.__dict__
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    for copied in (torch.load(buf, weights_only=False), copy.deepcopy(fused)):
        assert "_fold_cache" not in copied.__dict__ and "_plans" not in copied.__dict__
        with torch.no_grad():
            torch.testing.assert_close(copied(x), ref)


@pytest.fixture
def plans_made(monkeypatch):
    made = []
    real = module_py.make_plan

    def spy(block, x, modes, autocast=False):
        made.append((tuple(x.shape), x.dtype, modes, block.backend))
        return real(block, x, modes, autocast)
    monkeypatch.setattr(module_py, "make_plan", spy)
    return made


def test_one_plan_per_signature(plans_made):
    fused = FusedResidual(8, 8, backend="torch")
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        fused.eval()
        fused(x), fused(x)
        assert len(plans_made) == 1
        fused(x.clone())  # another tensor, same signature
        assert len(plans_made) == 1
        fused(x.contiguous(memory_format=torch.channels_last))  # strides
        fused(torch.randn(3, 8, 5, 5))  # batch
        fused(torch.randn(2, 8, 5, 10)[..., ::2])  # not contiguous
        assert len(plans_made) == 4
    fused.train()
    fused(x), fused(x)
    fused.bn1.eval()  # a mix of BN modes: the plain path
    fused(x), fused(x)
    assert [p[2] for p in plans_made[4:]] == [(True, True), (False, True)]
    fused.double()  # _apply: plans made again for the new parameters
    fused(x.double())
    assert len(plans_made) == 7


def test_changing_backend_takes_effect(plans_made):
    cpu = torch.device("cpu")
    if backends.unavailable_reason("native", cpu) is not None:
        pytest.skip(backends.unavailable_reason("native", cpu))
    called = []
    spied = [backends.get(name, cpu) for name in ("torch", "native")]
    for be in spied:  # an instance attribute over the class's method, deleted below
        be.forward_eval = (lambda *a, _b=be: called.append(_b.name)
                           or type(_b).forward_eval(_b, *a))
    fused = FusedResidual(8, 8, backend="torch").eval()
    x = torch.randn(2, 8, 5, 5)
    try:
        with torch.no_grad():
            ref = fused(x)
            fused.backend = "native"
            torch.testing.assert_close(fused(x), ref, rtol=1e-5, atol=1e-5)
            fused.backend = "torch"
            fused(x)
    finally:
        for be in spied:
            del be.forward_eval
    assert called == ["torch", "native", "torch"]
    assert [p[3] for p in plans_made] == ["torch", "native"]


def test_a_kept_plan_never_skips_a_check():
    """Bad inputs after good ones (and good after bad) get the same errors as on a
    fresh block: a signature that fails a check is never kept."""
    fused = FusedResidual(8, 8, backend="torch")
    x = torch.randn(2, 8, 5, 5)
    fused(x)
    with pytest.raises(ValueError, match="expects 8 input channels"):
        fused(torch.randn(2, 6, 5, 5))
    with pytest.raises(TypeError, match="input dtype torch.float64 does not match"):
        fused(x.double())
    with pytest.raises(TypeError, match="dense"):
        fused(x.to_sparse())
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused(torch.randn(1, 8, 1, 1))
    assert "_plans" in fused.__dict__ and len(fused._plans) == 1
    fused.eval()
    fused(torch.randn(1, 8, 1, 1))  # fine in eval: the mode is part of the signature
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused(x).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="input dtype torch.bfloat16 does not match"):
        fused(x.bfloat16())  # the autocast plan is not this call's
    fused(x)  # this signature is planned; then the weight changes dtype, or device
    w = fused.conv1.weight
    fused.conv1.weight = nn.Parameter(w.detach().double())
    with pytest.raises(TypeError, match="input dtype torch.float32 does not match.*float64"):
        fused(x)
    fused.conv1.weight = nn.Parameter(torch.empty_like(w, device="meta"))
    with pytest.raises(RuntimeError, match="input is on cpu but the module's parameters "
                                           "are on meta"):
        fused(x)


# A child replaced under its name after the first training call: at the top of the
# block, inside the shortcut's Sequential, and the Sequential itself. The block resolves
# its modules once and keeps them (module.py, _resolved); each swap must be seen.
SWAPS = {
    "bn2": lambda m: setattr(m, "bn2", copy.deepcopy(_BN16)),
    "downsample.1": lambda m: m.downsample.__setitem__(1, copy.deepcopy(_BN16)),
    "downsample": lambda m: setattr(m, "downsample", copy.deepcopy(_DOWNSAMPLE)),
    "conv1": lambda m: setattr(m, "conv1", copy.deepcopy(_CONV1)),
}
torch.manual_seed(21)
_BN16 = _new_bn(16)
_DOWNSAMPLE = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), _new_bn(16))
_CONV1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)


@pytest.mark.parametrize("swap", list(SWAPS))
def test_training_sees_a_replaced_child(swap):
    from torchvision.models.resnet import BasicBlock

    from resnet_fused import fuse_model
    torch.manual_seed(3)
    ds = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    plain = BasicBlock(8, 16, stride=2, downsample=ds).train()
    randomize_bn(plain)
    fused = fuse_model(copy.deepcopy(plain), backend="eager").train()
    assert isinstance(fused, FusedResidual)
    x = torch.randn(4, 8, 9, 9, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(fused(x), plain(x))
    for m in (plain, fused):
        SWAPS[swap](m)
    torch.testing.assert_close(fused(x), plain(x))
    torch.testing.assert_close(fused.state_dict(), plain.state_dict())
