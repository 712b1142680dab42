"""Caches of device tensors keep nothing made while a CUDA graph captures
(resnet_fused/graph_capture.py): the eval fold (fold.py) and the torch backend's bit
weights (backends/torch_ops.py pack_mask). Without a GPU the capture is faked by the
predicate; the results must stay right, and CPU tensors must never ask torch.cuda.
"""
import copy
import types

import pytest
import torch

from blockcheck import randomize_bn
from resnet_fused import FusedResidual, Residual, graph_capture
from resnet_fused.backends import torch_ops


@pytest.fixture
def capturing(monkeypatch):
    """The predicate says "capturing" for every tensor."""
    monkeypatch.setattr(graph_capture, "capturing", lambda t: True)


@pytest.fixture
def no_cuda_query(monkeypatch):
    def boom():
        raise AssertionError("torch.cuda.is_current_stream_capturing asked for a CPU tensor")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", boom)


def test_predicate_asks_cuda_only_for_cuda_tensors(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing",
                        lambda: asked.append(1) or True)
    assert graph_capture.capturing(torch.zeros(2)) is False and not asked
    assert graph_capture.capturing(types.SimpleNamespace(is_cuda=True)) is True
    assert asked == [1]


# ------------------------------------------------------------------ pack_mask
def _packed_by_hand(bits: torch.Tensor) -> torch.Tensor:
    flat = bits.reshape(-1).tolist()
    flat += [False] * (-len(flat) % 8)
    return torch.tensor([sum(int(b) << i for i, b in enumerate(flat[j:j + 8]))
                         for j in range(0, len(flat), 8)], dtype=torch.uint8)


def test_pack_mask_keeps_no_bit_weights_made_while_capturing(capturing, monkeypatch):
    monkeypatch.setattr(torch_ops, "_BIT_WEIGHTS", {})
    bits = torch.rand(2, 3, 5, 3) > 0.5  # 90 elements: the last byte padded
    for _ in range(2):
        torch.testing.assert_close(torch_ops.pack_mask(bits), _packed_by_hand(bits),
                                   rtol=0, atol=0)
    assert torch_ops._BIT_WEIGHTS == {}


def test_pack_mask_on_cpu_caches_and_asks_no_cuda(no_cuda_query, monkeypatch):
    monkeypatch.setattr(torch_ops, "_BIT_WEIGHTS", {})
    bits = torch.rand(1, 4, 3, 3) > 0.5
    torch.testing.assert_close(torch_ops.pack_mask(bits), _packed_by_hand(bits), rtol=0, atol=0)
    assert list(torch_ops._BIT_WEIGHTS) == [torch.device("cpu")]


# ------------------------------------------------------------------ the eval fold
def _pair():
    plain = Residual(8, 8, use_1x1conv=True)
    randomize_bn(plain)
    fused = FusedResidual.from_residual(copy.deepcopy(plain), backend="torch")
    plain.eval(), fused.eval()
    return plain, fused


def _agree(plain, fused, x):
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)


def test_fold_made_while_capturing_is_not_cached(capturing):
    plain, fused = _pair()
    x = torch.randn(2, 8, 7, 7)
    for _ in range(2):
        _agree(plain, fused, x)
        assert "_fold_cache" not in fused.__dict__


def test_a_stale_fold_cache_is_dropped_when_refolding_during_a_capture(monkeypatch):
    plain, fused = _pair()
    x = torch.randn(2, 8, 7, 7)
    _agree(plain, fused, x)
    assert "_fold_cache" in fused.__dict__  # eager, on the CPU: cached
    with torch.no_grad():
        for m in (plain, fused):
            m.conv2.weight.mul_(-0.5)  # the cache is now stale
    monkeypatch.setattr(graph_capture, "capturing", lambda t: True)
    _agree(plain, fused, x)  # refolded from the new weights
    assert "_fold_cache" not in fused.__dict__


def test_fold_on_cpu_caches_and_asks_no_cuda(no_cuda_query):
    plain, fused = _pair()
    x = torch.randn(2, 8, 7, 7)
    _agree(plain, fused, x)
    cache = fused.__dict__["_fold_cache"]
    _agree(plain, fused, x)
    assert fused.__dict__["_fold_cache"] is cache  # reused, not refolded
