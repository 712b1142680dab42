"""No host synchronisation in a training or eval step, shown on the CPU.

On a GPU, `torch.cuda.set_sync_debug_mode("error")` catches a synchronisation
(tests/test_cuda_block.py). On the CPU nothing synchronises, so these tests catch the
Python-level causes instead, which are the same on every device: building a tensor
from a Python number (`torch.tensor(x, device=...)` is a pageable host-to-device copy,
illegal under CUDA-graph capture) and reading a tensor's value on the host (`.item()`,
`bool(t)`, `float(t)`, `.tolist()`: a device-to-host copy and a wait).

The Triton backend is left out: on CPU it runs Triton's interpreter, which reads every
tensor on the host by design; on a GPU the CUDA test covers it.
"""
import pytest
import torch

from blockcheck import make_input, randomize_bn
from resnet_fused import FusedResidual, available_backends

BACKENDS = [b for b in ("torch", "native", "eager") if b in available_backends("cpu")]


class _HostSyncSpy:
    """Records every Python-level host round trip while installed."""

    def __init__(self, monkeypatch):
        self.calls = []
        for name in ("tensor", "as_tensor"):
            real = getattr(torch, name)
            monkeypatch.setattr(torch, name, self._wrap(f"torch.{name}", real))
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(f"Tensor.{name}", real))

    def _wrap(self, label, real):
        def spy(*args, **kwargs):
            self.calls.append(label)
            return real(*args, **kwargs)
        return spy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("proj", [False, True], ids=["identity", "projection"])
def test_training_step_never_syncs(backend, momentum, proj, monkeypatch):
    blk = FusedResidual(8, 8 if not proj else 16, use_1x1conv=proj, strides=1 if not proj else 2,
                        backend=backend)
    randomize_bn(blk)
    for bn in (blk.bn1, blk.bn2):
        bn.momentum = momentum
    x = make_input((2, 8, 6, 6), torch.float32, channels_last=False)
    blk(x).sum().backward()  # first call: imports, registration
    spy = _HostSyncSpy(monkeypatch)
    blk(x).sum().backward()
    monkeypatch.undo()
    assert spy.calls == [], f"host round trips in a {backend} training step: {spy.calls}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_step_never_syncs(backend, monkeypatch):
    blk = FusedResidual(8, 16, use_1x1conv=True, strides=2, backend=backend).eval()
    randomize_bn(blk)
    x = make_input((2, 8, 6, 6), torch.float32, channels_last=True, requires_grad=False)
    with torch.no_grad():
        blk(x)  # first call folds BN (cached)
        spy = _HostSyncSpy(monkeypatch)
        blk(x)
    monkeypatch.undo()
    assert spy.calls == [], f"host round trips in a {backend} eval step: {spy.calls}"
