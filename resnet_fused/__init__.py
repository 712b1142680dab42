"""resnet_fused: a ResNet residual block (conv, BatchNorm, residual add, ReLU) as a
few fused GPU kernels, behind a drop-in module.

    from resnet_fused import FusedResidual, Residual, fuse_model, resnet18
    blk = FusedResidual(64, 128, use_1x1conv=True, strides=2)  # same signature as Residual
    fast = fuse_model(model)                                    # every residual block replaced
    print(explain(fast))                                        # what fused, what not and why

Importing the package never needs the C++ extension, Triton or a GPU, and does not
query CUDA; backends load on first use.
"""
from . import backends
from .backends import BackendUnavailable
from .blocks import ConversionError
from .conversion import fuse_model
from .explain import explain
from .module import FusedResidual
from .reference import Residual, resnet18

__version__ = "0.1.0"


def available_backends(device="cpu") -> list:
    """Names of the backends that can run on `device` ("cpu", "cuda", torch.device)."""
    return backends.available(device)


__all__ = [
    "FusedResidual", "Residual", "fuse_model", "explain", "resnet18", "available_backends",
    "BackendUnavailable", "ConversionError", "backends", "__version__",
]
