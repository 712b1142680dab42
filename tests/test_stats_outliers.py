"""BatchNorm batch statistics with one outlier per channel, on every backend.

A reduction that shifts by one element (or sums x and x^2) loses the variance to
cancellation when that element is far from the rest: x[0, :, 0, 0] = v is the first
element of every channel, where a "shift by the first element" scheme takes its
shift. Each backend's statistics must stay within the 2x rule
(resnet_fused/testing/tolerance.py) of torch.var_mean in fp32 against float64, and within 1e-6 relative per channel (a few
fp32 ulps more than the final rounding: torch.var_mean on the CPU accumulates fp32 in
double). The CUDA kernels' own arithmetic is checked the same way through their host
emulation (tests/test_native_emulation.py::test_stats_outlier_first_element).

Triton runs through its interpreter on CPU (tests/conftest.py), at smaller shapes.
"""
import pytest
import torch

from resnet_fused import backends
from tolerance import assert_within

OUTLIERS = [20.0, 100.0, 1000.0]
CL = torch.channels_last


def outlier_input(shape, v, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[0, :, 0, 0] = v
    return x.contiguous(memory_format=CL) if channels_last else x


def check_stats(name, x, mean, var):
    var64, mean64 = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    var32, mean32 = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    assert_within(f"{name} mean", mean, mean32, mean64)
    assert_within(f"{name} var", var, var32, var64)
    rel = ((var.double() - var64) / var64).abs().max().item()
    rel32 = ((var32.double() - var64) / var64).abs().max().item()
    assert rel <= 2 * rel32 + 1e-6, (
        f"{name}: variance relative error {rel:.2e} (torch.var_mean in fp32: {rel32:.2e})")


@pytest.mark.parametrize("v", OUTLIERS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backend", ["torch", "native"])
def test_composite_backends_cpu(backend, v, channels_last):
    """The channel_stats op of the torch backend and the native backend's C++ kernel."""
    reason = backends.unavailable_reason(backend, torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)
    x = outlier_input((32, 64, 28, 28), v, channels_last)
    mean, var = backends.get(backend, torch.device("cpu")).ops.channel_stats(x)
    check_stats(f"{backend} backend (CPU)", x, mean, var)


@pytest.mark.parametrize("v", OUTLIERS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_triton_bn_stats(v, channels_last):
    pytest.importorskip("triton")
    from resnet_fused.backends.triton import bn  # noqa: F401  (registers the ops)

    x = outlier_input((8, 32, 14, 14), v, channels_last)
    mean, var = torch.ops.resnet_fused_triton.channel_stats(x)
    check_stats("triton channel_stats", x, mean, var)


@pytest.mark.parametrize("v", OUTLIERS)
def test_triton_conv_epilogue_stats(v):
    """The statistics the Triton conv computes in its epilogue (training block): a 1x1
    identity convolution writes x itself, so its statistics are x's."""
    pytest.importorskip("triton")
    from resnet_fused.backends.triton import conv

    C = 16
    x = outlier_input((4, C, 14, 14), v, True)
    w = torch.eye(C).reshape(C, C, 1, 1)
    out, _, mean, var = conv.conv2d_nhwc(x, w, 1, 0, stats=True)
    torch.testing.assert_close(out, x, rtol=0, atol=0)  # the identity is exact in fp32
    check_stats("triton conv epilogue", x, mean, var)
