"""The triton backend in eval mode: the K1/K2 ops and FusedResidual(backend="triton").

Without a GPU these run through Triton's interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before resnet_fused is imported), on tiny shapes; with a GPU the
same tests run compiled, plus bfloat16 and torch.compile with Inductor.
Reference: float64 PyTorch, by the tolerance rule of tests/tolerance.py.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from blockcheck import check_block, make_input, randomize_bn
from conftest import DEVICES
from test_module import BLOCKS
from tolerance import assert_within

import resnet_fused.backends.triton as triton_backend  # noqa: E402
from resnet_fused import FusedResidual, Residual, backends

CL = torch.channels_last
OPS = torch.ops.resnet_fused_triton

DTYPE_DEVICE = [(dt, "cpu") for dt in (torch.float32, torch.float16)] + [
    pytest.param(dt, "cuda", marks=pytest.mark.cuda)
    for dt in (torch.float32, torch.float16, torch.bfloat16)
]


def _fmt(channels_last):
    return CL if channels_last else torch.contiguous_format


def _rand(device, dtype, *shape, scale=1.0, fmt=torch.contiguous_format):
    return (torch.randn(*shape, device=device) * scale).to(dtype).contiguous(memory_format=fmt)


def _k1_ref(x, w, b, stride, padding):
    return torch.relu(F.conv2d(x, w, b, stride=stride, padding=padding))


def _k2_ref(y, w, b, x, w3, padding, stride3, padding3):
    sc = x if w3 is None else F.conv2d(x, w3, None, stride=stride3, padding=padding3)
    return torch.relu(F.conv2d(y, w, b, padding=padding) + sc)


# --------------------------------------------------------------------------- the ops
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype,device", DTYPE_DEVICE)
def test_k1_conv_bias_relu(stride, channels_last, dtype, device):
    fmt = _fmt(channels_last)
    x = _rand(device, dtype, 2, 24, 13 if stride == 2 else 9, 11, fmt=fmt)  # odd, non-square
    w = _rand(device, dtype, 40, 24, 3, 3, scale=1 / 15, fmt=fmt)
    b = _rand(device, dtype, 40)
    out = OPS.conv_bias_relu(x, w, b, stride, 1)
    assert out.is_contiguous(memory_format=fmt), "output lost the input's memory format"
    ref = _k1_ref(x.double(), w.double(), b.double(), stride, 1)
    assert_within("K1", out, _k1_ref(x, w, b, stride, 1), ref)


@pytest.mark.parametrize("shortcut", ["identity", "proj1x1s2", "proj3x3s2", "proj1x1s1"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype,device", DTYPE_DEVICE)
def test_k2_conv_bias_shortcut_relu(shortcut, channels_last, dtype, device):
    fmt = _fmt(channels_last)
    N, C, K = 2, 24, 40
    if shortcut == "identity":
        C, H, P, w3, s3, p3 = K, 9, 9, None, 0, 0
    else:
        r3, s3 = (1 if shortcut.startswith("proj1x1") else 3), (2 if shortcut.endswith("s2") else 1)
        p3 = (r3 - 1) // 2
        H = 13 if s3 == 2 else 7
        P = (H + 2 * p3 - r3) // s3 + 1
        w3 = _rand(device, dtype, K, C, r3, r3, scale=(C * r3 * r3) ** -0.5, fmt=fmt)
    x = _rand(device, dtype, N, C, H, H, fmt=fmt)
    y = _rand(device, dtype, N, K, P, P, fmt=fmt)
    w = _rand(device, dtype, K, K, 3, 3, scale=1 / 19, fmt=fmt)
    b = _rand(device, dtype, K)
    out = OPS.conv_bias_shortcut_relu(y, w, b, x, w3, 1, s3, p3)
    assert out.is_contiguous(memory_format=fmt), "output lost the input's memory format"
    d = (lambda t: None if t is None else t.double())
    ref = _k2_ref(y.double(), w.double(), b.double(), x.double(), d(w3), 1, s3, p3)
    assert_within("K2", out, _k2_ref(y, w, b, x, w3, 1, s3, p3), ref)


# --------------------------------------------------------------------------- the block
@pytest.mark.parametrize("kind", list(BLOCKS))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_block_eval_fp32_with_grads(kind, channels_last):
    """Every block kind (D2L identity/1x1/3x3 projection, torchvision BasicBlock), output
    and (through the op layer's autograd) every input and parameter gradient."""
    check_block(BLOCKS[kind], backend="triton", dtype=torch.float32, train=False,
                channels_last=channels_last, shape=(2, 8, 9, 9))


@pytest.mark.parametrize("kind", ["identity", "proj1x1_s2", "proj3x3_s2", "basic_down_s2"])
def test_block_eval_fp16(kind):
    check_block(BLOCKS[kind], backend="triton", dtype=torch.float16, train=False,
                channels_last=True, shape=(2, 8, 9, 9), grads=False)


@pytest.mark.parametrize("shape,cin,cout,proj,stride", [
    ((1, 24, 13, 13), 24, 40, True, 2),    # batch 1, odd size, C not a power of two
    ((2, 40, 7, 7), 40, 40, False, 1),     # identity at 7x7
    ((2, 3, 11, 11), 3, 24, True, 1),      # C=3
], ids=["b1-24to40-13-s2", "40ch-7x7", "c3-to-24"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_block_eval_odd_shapes(shape, cin, cout, proj, stride, dtype):
    check_block(lambda: Residual(cin, cout, use_1x1conv=proj, strides=stride), backend="triton",
                dtype=dtype, train=False, channels_last=True, shape=shape, grads=False)


def test_fold_cache_refreshes_after_bn_change():
    """Eval output follows a changed running statistic (the fold cache is refreshed)."""
    plain = Residual(8, 8).eval()
    randomize_bn(plain)
    fused = FusedResidual.from_residual(plain, backend="triton").eval()
    x = make_input((2, 8, 7, 7), torch.float32, True, requires_grad=False)
    with torch.no_grad():
        a = fused(x)
        plain.bn2.running_mean.add_(0.5)
        b = fused(x)
        assert_within("after change", b, plain(x), plain.double()(x.double()))
    assert not torch.allclose(a, b)


def test_compile_fullgraph_eval():
    """torch.compile(fullgraph=True) of a model holding triton blocks: no graph break.
    On a GPU Inductor traces into the Triton kernels (triton_op); under the interpreter
    the ops are opaque (aot_eager)."""
    model = torch.nn.Sequential(Residual(8, 16, use_1x1conv=True, strides=2), Residual(16, 16))
    for m in model:
        randomize_bn(m)
    model = model.eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    from resnet_fused import fuse_model
    fused = fuse_model(model, backend="triton")
    x = make_input((2, 8, 9, 9), torch.float32, True, device=device, requires_grad=False)
    with torch.no_grad():
        fused(x)  # backend import outside the compiled region
        torch._dynamo.reset()
        compiled = torch.compile(fused, fullgraph=True,
                                 backend="inductor" if device == "cuda" else "aot_eager")
        out = compiled(x)
        ref = model.double()(x.double())
        assert_within("compiled", out, model.float()(x), ref)


# --------------------------------------------------------------------------- availability
def test_available_on_cpu_under_interpreter():
    if torch.cuda.is_available():
        pytest.skip("the interpreter is only set up without a GPU (tests/conftest.py)")
    assert "triton" in backends.available("cpu")
    assert backends.unavailable_reason("triton", torch.device("cpu")) is None


def test_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = triton_backend.TritonBackend().unavailable_reason(torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason and "CUDA GPU" in reason


def test_dtype_support():
    be = triton_backend.TritonBackend()
    cpu = torch.device("cpu")
    for dt in (torch.float32, torch.float16):
        assert be.unsupported_dtype_reason(dt, cpu) is None
    assert "interpreter" in be.unsupported_dtype_reason(torch.bfloat16, cpu)
    assert "float64" in be.unsupported_dtype_reason(torch.float64, cpu)
    if os.environ.get("TRITON_INTERPRET") == "1":
        blk = FusedResidual(8, 8, backend="triton").eval().to(torch.bfloat16)
        with pytest.raises(TypeError, match="bfloat16"):
            blk(torch.randn(1, 8, 5, 5, dtype=torch.bfloat16))


# --------------------------------------------------------------------------- GPU only
@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["identity", "proj1x1_s2", "proj3x3_s2", "basic_down_s2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_block_eval_cuda(kind, dtype):
    check_block(BLOCKS[kind], backend="triton", dtype=dtype, train=False, channels_last=True,
                shape=(4, 8, 16, 16), device="cuda", grads=False)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_resnet_stage_block_eval_cuda(dtype):
    """A ResNet-18 stage-sized block (64->128, stride 2, 56x56) at batch 8."""
    check_block(lambda: Residual(64, 128, use_1x1conv=True, strides=2), backend="triton",
                dtype=dtype, train=False, channels_last=True, shape=(8, 64, 56, 56),
                device="cuda", grads=False)
