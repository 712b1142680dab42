"""Which backend "auto" tries first, per device, mode, dtype and block shape.

Measured winners come from resnet_fused/backends/measured.json, written from
benchmark results by bench/make_preference.py (format documented there). Where no
measurement matches the card and shape, the defaults below apply. A backend that is
not available here, or does not support the dtype, is skipped by the caller.
"""
from __future__ import annotations

import functools
import json
import os

import torch

# Order on CUDA without a measurement: cuDNN convolutions + our BN kernels first (the
# convolutions are the bulk of the time and cuDNN's are the fastest we measured),
# then Triton, then the ATen composite.
CUDA_DEFAULT = {
    "eval": ("native", "triton", "torch"),
    "train": ("native", "triton", "torch"),
}
# On CPU nothing fused trains faster than PyTorch's own kernels, and folding BN is the
# eval gain (eager.py; figures in bench/NOTES.md).
CPU_ORDER = ("eager",)
MEASURED_PATH = os.path.join(os.path.dirname(__file__), "measured.json")


@functools.lru_cache(maxsize=None)
def measured() -> dict:
    """{(gpu, mode, dtype, shape_key): backend} from measured.json ({} when absent)."""
    try:
        with open(MEASURED_PATH) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    table = {}
    for e in data.get("entries", []):
        table[(e["gpu"], e["mode"], e["dtype"], e["shape"])] = e["backend"]
    return table


def shape_key(x_shape, out_channels: int, stride: int) -> str:
    """The key of a basic block's shape: cin-cout-h-w-stride (input H, W)."""
    _, cin, h, w = x_shape
    return f"{cin}-{out_channels}-{h}-{w}-{stride}"


def block_shape_key(x_shape, parts) -> str:
    """The key of a block (a spec.Parts) on input x_shape, as measured.json writes it:

        basic       cin-cout-h-w-stride                    (shape_key; "64-64-56-56-1")
        bottleneck  b-cin-width-cout-h-w-stride[-gG][-dD][-v1]
                    width: the 3x3's channels, gG/dD: its groups/dilation when not 1,
                    v1: the stride sits on the first 1x1 (ResNet v1), not the 3x3
                    ("b-256-128-512-56-56-2": ResNet-50's first block of stage 2)
    """
    convs = [st.conv for st in parts.stages]
    stride = 1
    for c in convs:
        stride *= c.stride[0]
    if parts.kind != "bottleneck":
        return shape_key(x_shape, convs[-1].out_channels, stride)
    mid = convs[1]
    return bottleneck_key(x_shape, mid.out_channels, convs[-1].out_channels, stride,
                          mid.groups, mid.dilation[0], convs[0].stride[0] != 1)


def bottleneck_key(x_shape, width: int, out_channels: int, stride: int, groups: int = 1,
                   dilation: int = 1, v1: bool = False) -> str:
    """A bottleneck's key (block_shape_key), from its numbers."""
    _, cin, h, w = x_shape
    key = f"b-{cin}-{width}-{out_channels}-{h}-{w}-{stride}"
    key += (f"-g{groups}" if groups != 1 else "") + (f"-d{dilation}" if dilation != 1 else "")
    return key + ("-v1" if v1 else "")


@functools.lru_cache(maxsize=64)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def preferred_order(device: torch.device, dtype: torch.dtype, training: bool,
                    key: str | None = None) -> tuple:
    if device.type != "cuda":
        return CPU_ORDER
    return _cuda_order(device.index, str(dtype).replace("torch.", ""), bool(training), key)


# Under torch.compile, Dynamo calls this once while tracing and bakes the answer into the
# graph (the measured table and the card's name are fixed for the process), so a
# compiled model picks the same backend as eager instead of tracing host-side file and
# device-name reads.
@torch.compiler.assume_constant_result
def _cuda_order(index, dname: str, training: bool, key) -> tuple:
    order = CUDA_DEFAULT["train" if training else "eval"]
    winner = measured_winner(index, dname, training, key)
    if winner is None:
        return order
    return (winner,) + tuple(n for n in order if n != winner)


def measured_winner(index, dname: str, training: bool, key):
    """The backend measured fastest on CUDA device `index` for this dtype name
    ("bfloat16"), mode and shape key, or None where measured.json has no entry."""
    table = measured()
    if not table or key is None:
        return None
    mode = "train" if training else "eval"
    name = _device_name(index if index is not None else torch.cuda.current_device())
    for (gpu, m, dt, shape), winner in table.items():
        if m == mode and dt == dname and shape == key and gpu in name:
            return winner
    return None
