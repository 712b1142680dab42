"""FusedResidual on a GPU, every available backend: numerics at a ResNet stage-like
shape, TF32 switches, no host synchronisation, CUDA-graph capture, torch.compile.
All skipped without CUDA (see conftest.py)."""
import copy

import pytest
import torch

from blockcheck import check_block, randomize_bn
from resnet_fused import FusedResidual, Residual, backends

pytestmark = pytest.mark.cuda


def _backends():
    if not torch.cuda.is_available():
        return ["torch", "native", "triton"]  # collected, then skipped by the marker
    return backends.available("cuda")


@pytest.fixture(params=["torch", "native", "triton"])
def backend(request):
    if request.param not in _backends():
        pytest.skip(f"{request.param}: {backends.unavailable_reason(request.param, torch.device('cuda'))}")
    return request.param


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("proj", [False, True], ids=["identity", "proj"])
def test_stage_shape_low_precision(backend, train, dtype, proj):
    make = (lambda: Residual(64, 128, True, 2)) if proj else (lambda: Residual(64, 64))
    check_block(make, backend=backend, dtype=dtype, train=train, channels_last=True,
                shape=(16, 64, 28, 28), steps=2, device="cuda")


@pytest.mark.parametrize("allow_tf32", [False, True], ids=["ieee", "tf32"])
def test_fp32_honours_tf32_switches(backend, allow_tf32, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allow_tf32)
    fused = check_block(lambda: Residual(32, 32), backend=backend, dtype=torch.float32,
                        train=False, shape=(8, 32, 14, 14), device="cuda", grads=False)
    if not allow_tf32:
        # Without TF32 an fp32 block is accurate to ~1e-6; TF32 would give ~1e-4.
        plain = copy.deepcopy(fused).double()
        x = torch.randn(8, 32, 14, 14, device="cuda")
        with torch.no_grad():
            err = (fused(x).double() - plain(x.double())).norm() / plain(x.double()).norm()
        assert err < 2e-5, f"fp32 error {err:.2e}: TF32 used although disallowed"


def _block(backend, train):
    blk = FusedResidual(32, 64, True, 2, backend=backend).cuda().to(torch.bfloat16)
    randomize_bn(blk)
    return blk.train(train)


def _x():
    return torch.randn(8, 32, 14, 14, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_no_host_synchronisation(backend, train):
    blk = _block(backend, train)
    x = _x().requires_grad_(train)
    blk(x)  # warm-up: autotuning and first-call setup may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        if train:
            blk(x).float().sum().backward()
        else:
            with torch.no_grad():
                blk(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_graph_capture_eval(backend):
    blk = _block(backend, False)
    x = _x()
    with torch.no_grad():
        ref = blk(x)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            blk(x)  # warm-up on the capture stream
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = blk(x)
        x.copy_(_x())
        g.replay()
        torch.testing.assert_close(out, blk(x))
        assert not torch.equal(out, ref)


def test_cuda_graph_capture_train_step(backend):
    blk = _block(backend, True)
    x = _x().requires_grad_()
    graphed = torch.cuda.make_graphed_callables(blk, (x,))
    out = graphed(x)
    out.float().sum().backward()
    ref = copy.deepcopy(blk)
    torch.testing.assert_close(out, ref(x.detach()), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_inductor_fullgraph(backend, train):
    torch._dynamo.reset()
    blk = _block(backend, train)
    plain = copy.deepcopy(blk)
    compiled = torch.compile(blk, fullgraph=True)
    x = _x()
    with torch.set_grad_enabled(train):
        out = compiled(x)
        ref = plain(x)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_nan_propagates_like_plain(backend, train):
    """ReLU keeps NaN on the GPU too (our kernels and cuDNN's fused conv+ReLU)."""
    blk = _block(backend, train)
    plain = copy.deepcopy(blk)
    x = _x()
    x[1, 3, 4, 4] = float("nan")
    with torch.no_grad():
        out = blk(x)
        ref = plain_block(plain, x)
    assert torch.isnan(ref).any()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))


def plain_block(blk, x):
    from resnet_fused.reference import plain_block_forward
    return plain_block_forward(blk, x)
