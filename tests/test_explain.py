"""resnet_fused.explain: every residual block of a plain or converted model, converted
or left with fuse_model's reason, and what runs for a converted one here."""
import warnings

import torch
from torch import nn

from resnet_fused import FusedResidual, Residual, explain, fuse_model


class GroupNormBlock(nn.Module):
    """A residual block with GroupNorm: found, never fused."""

    def __init__(self, c=8):
        super().__init__()
        self.conv1, self.n1 = nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(2, c)
        self.conv2, self.n2 = nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(2, c)

    def forward(self, x):
        return torch.relu(self.n2(self.conv2(torch.relu(self.n1(self.conv1(x))))) + x)


def _model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Residual(8, 8), GroupNormBlock(8),
                         Residual(8, 16, True, 2))


def test_a_plain_model_lists_what_would_convert_and_what_is_left():
    e = explain(_model())
    assert [(b.path, b.cls, b.status) for b in e.blocks] == [
        ("1", "Residual", "converts"), ("2", "GroupNormBlock", "left"),
        ("3", "Residual", "converts")]
    assert e.blocks[1].reason.startswith("`n2` (GroupNorm) between conv2 and the add")
    assert e.blocks[0].kind == "basic" and e.blocks[1].kind is None
    # CPU: auto takes eager, folded in eval and PyTorch's own kernels in training
    assert e.blocks[0].eval.startswith("eager: folded")
    assert e.blocks[0].train.startswith("eager: the plain block's")


def test_a_converted_model_reports_its_blocks_backend_and_reasons_like_fuse_model():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = fuse_model(_model(), backend="torch")
    e = explain(fused)
    assert [(b.path, b.cls, b.status) for b in e.blocks] == [
        ("1", "Residual", "converted"), ("2", "GroupNormBlock", "left"),
        ("3", "Residual", "converted")]
    assert len(e.converted) == 2 and len(e.left) == 1
    assert [str(w.message) for w in caught] == [
        f"fuse_model: left 2 (GroupNormBlock) as it is: {e.left[0].reason}"]
    assert e.blocks[0].eval.startswith("torch: ") and e.blocks[0].train.startswith("torch: ")


def test_a_backend_that_cannot_run_here_is_named_with_why(monkeypatch):
    from resnet_fused import backends
    fused = FusedResidual.from_residual(Residual(8, 8), backend="native")
    monkeypatch.setattr(backends, "unavailable_reason",
                        lambda name, device: "no GPU" if name == "native" else None)
    e = explain(nn.Sequential(fused))
    assert e.blocks[0].eval == "native: unavailable on cpu (no GPU)"


def test_the_table():
    text = str(explain(_model()))
    lines = text.splitlines()
    assert lines[0] == ("Sequential: 3 residual block(s), 0 converted, 2 would convert "
                        "with fuse_model, 1 left as they are")
    header = lines[2].split()
    assert header[:3] == ["block", "class", "status"]
    assert lines[4].split()[:4] == ["1", "Residual", "converts", "(basic)"]
    assert lines[5].split()[:3] == ["2", "GroupNormBlock", "left"]
    assert lines[6].strip().startswith("why: `n2` (GroupNorm)")
    assert repr(explain(_model())) == text


def test_a_model_without_blocks():
    e = explain(nn.Sequential(nn.Conv2d(3, 3, 1)))
    assert e.blocks == [] and "0 residual block(s)" in str(e)


def test_explain_leaves_the_model_as_it_is():
    m = _model()
    keys = list(m.state_dict())
    explain(m)
    assert [type(c) for c in m] == [nn.Conv2d, Residual, GroupNormBlock, Residual]
    assert list(m.state_dict()) == keys
