"""FusedResidual(backend="native") against the plain block (the tolerance rule of
README.md, "Numerics policy"), eval and
train: outputs, every gradient, running statistics. With the CPU kernels of the
extension on CPU, and its CUDA kernels on a GPU (the `cuda` parametrisations)."""
import os

import pytest
import torch

from blockcheck import check_block
from conftest import DEVICES
from test_module import BLOCKS

if os.environ.get("RESNET_FUSED_SKIP_EXT") == "1":
    pytest.skip("built without the extension (RESNET_FUSED_SKIP_EXT=1)", allow_module_level=True)


def test_native_backend_is_available_on_cpu():
    from resnet_fused import backends

    assert backends.unavailable_reason("native", torch.device("cpu")) is None
    assert "native" in backends.available("cpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["identity", "proj1x1_s2", "proj3x3_s2", "basic_down_s2"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_float64(device, kind, train):
    check_block(BLOCKS[kind], backend="native", dtype=torch.float64, train=train, steps=2,
                device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["identity", "proj1x1_s2", "basic_down_s2"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_low_precision(device, kind, train, channels_last, dtype):
    check_block(BLOCKS[kind], backend="native", dtype=dtype, train=train,
                channels_last=channels_last, steps=2, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [None, 0.3])
def test_running_stats_over_steps(device, momentum):
    def make():
        block = BLOCKS["proj1x1_s2"]()
        for bn in (block.bn1, block.bn2):
            bn.momentum = momentum
        return block

    check_block(make, backend="native", dtype=torch.float64, train=True, steps=3, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hw", [7, 13])
def test_odd_sizes_and_batch_one(device, hw):
    check_block(BLOCKS["proj1x1_s2"], backend="native", dtype=torch.float32, train=True,
                shape=(2, 8, hw, hw), device=device)
    check_block(BLOCKS["identity"], backend="native", dtype=torch.float32, train=False,
                shape=(1, 8, hw, hw), device=device)


@pytest.mark.cuda
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_cuda_resnet18_stage_shape_bf16(train):
    """A real stage shape (batch 8, 64 channels, 56x56, channels_last bf16): vector
    paths, multi-block reductions, cuDNN's fused eval convolutions."""
    from resnet_fused import Residual

    check_block(lambda: Residual(64, 64), backend="native", dtype=torch.bfloat16, train=train,
                channels_last=True, shape=(8, 64, 56, 56), device="cuda")
