"""Every bad input gets a clear error naming what was wrong."""
import os
import subprocess
import sys

import pytest
import torch

from resnet_fused import BackendUnavailable, FusedResidual, backends


@pytest.fixture
def blk():
    return FusedResidual(8, 8, backend="torch")


@pytest.mark.parametrize("shape,match", [
    ((8, 9, 9), "4-D input"),
    ((2, 8, 9, 9, 1), "4-D input"),
    ((2, 6, 9, 9), "expects 8 input channels"),
    ((2, 8, 0, 9), "empty"),  # an empty batch (N = 0) is served: test_empty_batch.py
])
def test_bad_shapes(blk, shape, match):
    with pytest.raises(ValueError, match=match):
        blk(torch.randn(shape))


def test_integer_dtype(blk):
    with pytest.raises(TypeError, match="floating-point input, got torch.int64"):
        blk(torch.ones(2, 8, 5, 5, dtype=torch.long))


def test_dtype_mismatch_with_parameters(blk):
    with pytest.raises(TypeError, match="input dtype torch.float16 does not match.*float32"):
        blk(torch.randn(2, 8, 5, 5, dtype=torch.float16))


def test_device_mismatch(blk):
    with pytest.raises(RuntimeError, match="input is on meta but the module's parameters are on cpu"):
        blk(torch.empty(2, 8, 5, 5, device="meta"))


def test_not_a_tensor_and_sparse(blk):
    with pytest.raises(TypeError, match="torch.Tensor"):
        blk([[1.0]])
    with pytest.raises(TypeError, match="dense"):
        blk(torch.randn(2, 8, 5, 5).to_sparse())


def test_noncontiguous_input_is_fine(blk):
    x = torch.randn(2, 8, 9, 18)[..., ::2]
    blk.eval()
    with torch.no_grad():
        ref = blk(x.contiguous())
        torch.testing.assert_close(blk(x), ref)


def test_float64_on_a_backend_without_it():
    """float64 runs on the torch backend; the others refuse it by name."""
    FusedResidual(4, 4, backend="torch").double()(torch.randn(2, 4, 5, 5, dtype=torch.float64))
    refused = 0
    for name in ("native", "triton"):
        cpu = torch.device("cpu")
        if backends.unavailable_reason(name, cpu) is not None:
            continue
        blk = FusedResidual(4, 4, backend=name).double()
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
        if backends.get(name, cpu).unsupported_dtype_reason(torch.float64, cpu) is None:
            blk(x)  # this backend's CPU kernels take float64
            continue
        refused += 1
        with pytest.raises(TypeError, match=f"backend='{name}'.*float64.*backend='torch'"):
            blk(x)
    # A backend refusing a dtype must say so: exercise the message with a stand-in.
    blk = FusedResidual(4, 4, backend="torch").half()
    torch_backend = backends.get("torch", torch.device("cpu"))
    original = torch_backend.unsupported_dtype_reason
    try:
        torch_backend.unsupported_dtype_reason = lambda d, dev: f"no {d} here"
        with pytest.raises(TypeError, match="backend='torch'.*no torch.float16 here"):
            blk(torch.randn(2, 4, 5, 5, dtype=torch.float16))
    finally:
        del torch_backend.unsupported_dtype_reason
    assert torch_backend.unsupported_dtype_reason == original


def test_unavailable_backend_says_why(monkeypatch):
    monkeypatch.setattr(backends, "_INSTANCES", {})
    monkeypatch.setattr(backends, "_IMPORT_ERRORS", {"native": "ImportError: no _C"})
    blk = FusedResidual(4, 4, backend="native")
    with pytest.raises(BackendUnavailable, match="'native' is not available on cpu.*no _C"):
        blk(torch.randn(2, 4, 5, 5))


def test_auto_on_cpu_uses_an_available_backend():
    assert "torch" in backends.available("cpu")
    blk = FusedResidual(4, 4)
    assert blk.backend == "auto"
    blk(torch.randn(2, 4, 5, 5))


def test_import_queries_no_cuda():
    """Importing the package and building a block never touches CUDA."""
    code = (
        "import torch\n"
        "def boom(*a, **k): raise SystemExit('CUDA queried at import')\n"
        "torch.cuda.is_available = boom\n"
        "torch.cuda.device_count = boom\n"
        "torch.cuda.get_device_capability = boom\n"
        "torch.cuda.get_device_name = boom\n"
        "import resnet_fused\n"
        "b = resnet_fused.FusedResidual(4, 4, backend='torch')\n"
        "b(torch.randn(2, 4, 5, 5))\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr + res.stdout
