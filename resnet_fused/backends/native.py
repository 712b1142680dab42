"""The `native` backend: the C++/CUDA extension resnet_fused._C.

Same data flow as the torch backend (CompositeBackend): ATen/cuDNN convolutions, and
the ops of the `resnet_fused` namespace for everything around them (BatchNorm
statistics, finalize with the running update, BN-apply + residual + ReLU with the
packed mask, its backward; in eval, conv+bias(+add)+ReLU: ATen's convolution and
elementwise ops by default, which keep NaN as PyTorch does, or cuDNN's fused op with
RESNET_FUSED_CUDNN_FUSED_RELU=1, whose ReLU maps NaN to 0). Gated branches and pooled
shortcuts (README.md, Design, "Gates and pooled shortcuts") take the gate ops: the
branch pooled per (n, c) (bn_pool), relu(gate * bn(c) + residual) in the BN-apply pass
(bn_gate_act), their backwards, and gate_shortcut_relu in eval; a pooled shortcut runs
the user's AvgPool2d before ATen's 1x1 convolution. The ops have CPU kernels
(csrc/ops.cpp, csrc/gate_ops.cpp) and CUDA kernels (csrc/cuda/), so this backend runs
on CPU too (that is how CI tests it).

The extension is imported here, on first use of the backend, never by
`import resnet_fused`.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..schemas import BACKEND_OPS, NAMESPACES
from .composite import CompositeBackend

BUILD_HINT = (
    "build it from the source checkout with "
    "`CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .` "
    "(RESNET_FUSED_SKIP_CUDA=1 for CPU kernels only)"
)


def load_extension():
    """Import resnet_fused._C (registering its ops) and the op layer for it.

    Returns (module, None) or (None, the import error as text).
    """
    try:
        from .. import _C  # noqa: F401  (registers torch.ops.resnet_fused.*)
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"
    from ..ops import register_op_layer

    register_op_layer(NAMESPACES["native"], BACKEND_OPS["native"])
    return _C, None


class NativeBackend(CompositeBackend):
    """cuDNN convolutions + our BN kernels (CUDA), or their C++ twins on CPU."""

    name = "native"
    namespace = NAMESPACES["native"]

    def __init__(self):
        self._ext, self._import_error = load_extension()

    @property
    def built_with_cuda(self) -> bool:
        return bool(self._ext is not None and getattr(self._ext, "built_with_cuda", False))

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if self._ext is None:
            return (f"the C++ extension resnet_fused._C is not built ({self._import_error}); "
                    f"{BUILD_HINT}")
        device = torch.device(device)
        if device.type == "cpu":
            return None
        if device.type == "cuda":
            if not self.built_with_cuda:
                return ("the C++ extension resnet_fused._C was built without CUDA kernels "
                        "(torch without CUDA, nvcc not found, or RESNET_FUSED_SKIP_CUDA=1); "
                        "rebuild with CUDA_HOME set to the CUDA toolkit")
            if not torch.cuda.is_available():
                return "CUDA is not available"
            return self._arch_mismatch(device)
        return f"the native backend has CPU and CUDA kernels, not {device.type} ones"

    def _arch_mismatch(self, device: torch.device) -> Optional[str]:
        # A cubin for sm_XY runs on compute capability X.Z with Z >= Y (sm_90a: 9.0 only).
        archs = tuple(getattr(self._ext, "cuda_archs", ()))
        if not archs:
            return None
        major, minor = torch.cuda.get_device_capability(device)
        if any(a // 10 == major and a % 10 <= minor for a in archs):
            return None
        built = ", ".join(f"sm_{a}" for a in archs)
        return (f"resnet_fused._C was compiled for {built} but this GPU is sm_{major}{minor}; "
                f"rebuild with RESNET_FUSED_CUDA_ARCHS=\"{major}{minor}\"")

    def unsupported_dtype_reason(self, dtype: torch.dtype, device: torch.device) -> Optional[str]:
        # float64 is supported too (CPU and CUDA kernels), for gradcheck.
        if dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            return None
        return f"the native backend supports float32, float16, bfloat16 and float64, not {dtype}"
