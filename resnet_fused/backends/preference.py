"""Which backend "auto" tries first, per device and mode.

The order comes from measured benchmark results (bench/results/<gpu>/); where no
measurement exists for a card, the defaults below apply. A backend that is not
available, or does not support the dtype, is skipped.
"""
from __future__ import annotations

import torch

# (mode) -> order on CUDA. Rewritten by the benchmark (bench/make_preference.py)
# from measured per-shape winners; shape keys are (C_in, C_out, H, W, stride).
CUDA_DEFAULT = {
    "eval": ("native", "triton", "torch"),
    "train": ("native", "triton", "torch"),
}
# Measured per-shape winners: {(gpu_substring, mode, (cin, cout, h, w, stride)): name}
MEASURED: dict = {}


def preferred_order(device: torch.device, dtype: torch.dtype, training: bool, x_shape=None):
    if device.type != "cuda":
        return ("torch",)
    mode = "train" if training else "eval"
    order = CUDA_DEFAULT[mode]
    if MEASURED and x_shape is not None:
        name = torch.cuda.get_device_name(device)
        for (gpu, m, shape), winner in MEASURED.items():
            if m == mode and gpu in name and tuple(shape[:4]) == tuple(x_shape[1:]) + shape[4:4]:
                return (winner,) + tuple(n for n in order if n != winner)
    return order
