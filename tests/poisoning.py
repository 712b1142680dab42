"""NaN poisoning: the tests' one way to make an element a kernel leaves unwritten show up.

Two allocators hand kernels their output memory, so there are two entry points:
- `poison` (a fixture, registered by conftest.py): torch.empty / torch.empty_like hand
  out NaN-filled memory (0xA5 bytes for uint8) while the test runs. Every
  Python launcher (the Triton backend: conv.py, conv_bwd.py, bn.py, train.py) allocates
  through them, looked up at call time, so the patch reaches all of its outputs.
- `poison_allocator(nbytes, device)`: fills freed memory with NaN before a C++ op
  allocates inside ATen (the native backend, the emulated CUDA kernels), so its outputs
  likely reuse NaN-filled blocks: reliable with the CUDA caching allocator, best effort
  on CPU. The pattern is bf16 NaN (0x7FC0) repeated, which reads as NaN in float32,
  float16 and bfloat16 alike (a float32 NaN's low half would read as 16-bit zero).
"""
import pytest
import torch

_BYTE = 0xA5  # alternating bits: neither an all-zero nor an all-one mask byte


def poisoned(t: torch.Tensor) -> torch.Tensor:
    """t filled in place with NaN (floating point) or 0xA5 (uint8: the packed masks);
    other dtypes (index tensors) are left as they are. Returns t."""
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype == torch.uint8:
        t.fill_(_BYTE)
    return t


@pytest.fixture
def poison(monkeypatch):
    """torch.empty / empty_like return poisoned memory for the rest of the test."""
    real_empty, real_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(real_like(*a, **k)))


def poison_allocator(nbytes: int, device="cpu", copies: int = 2) -> None:
    """Leave NaN-filled freed blocks in `device`'s allocator: `copies` each of nbytes,
    nbytes / 2, ... down to 64 bytes, so that outputs of any size up to nbytes find a
    poisoned block of their size class."""
    blocks = []
    while nbytes >= 64:
        blocks += [torch.full(((nbytes + 1) // 2,), float("nan"), device=device,
                              dtype=torch.bfloat16) for _ in range(copies)]
        nbytes //= 2
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    del blocks


__all__ = ["poison", "poison_allocator", "poisoned"]
