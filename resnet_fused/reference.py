"""The plain PyTorch block and network this project starts from.

`Residual` and `resnet18` are Dive into Deep Learning's ResNet-18, as written
there: every convolution keeps its bias, the projection shortcut is a 1x1 strided
convolution without BatchNorm. They are the numerical reference of every test and
the "eager" provider of the benchmark, and what `fuse_model` converts.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .blocks import bn_eps
from .gates import apply_gate
from .matching import spec_of
from .spec import Parts, resolve


class Residual(nn.Module):
    """The D2L residual block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    def __init__(self, input_channels: int, num_channels: int, use_1x1conv: bool = False,
                 strides: int = 1):
        super().__init__()
        # FusedResidual.__init__ (module.py) mirrors these lines on purpose: the same
        # modules in the same order, so one seed gives both blocks the same weights.
        self.conv1 = nn.Conv2d(input_channels, num_channels, kernel_size=3, padding=1,
                               stride=strides)
        self.conv2 = nn.Conv2d(num_channels, num_channels, kernel_size=3, padding=1)
        if use_1x1conv:
            self.conv3 = nn.Conv2d(input_channels, num_channels, kernel_size=1, stride=strides)
        else:
            self.conv3 = None
        self.bn1 = nn.BatchNorm2d(num_channels)
        self.bn2 = nn.BatchNorm2d(num_channels)

    def forward(self, X):
        Y = F.relu(self.bn1(self.conv1(X)))
        Y = self.bn2(self.conv2(Y))
        if self.conv3:
            X = self.conv3(X)
        Y += X
        return F.relu(Y)


def resnet_block(input_channels: int, num_channels: int, num_residuals: int,
                 first_block: bool = False) -> list[nn.Module]:
    blk = []
    for i in range(num_residuals):
        if i == 0 and not first_block:
            blk.append(Residual(input_channels, num_channels, use_1x1conv=True, strides=2))
        else:
            blk.append(Residual(num_channels, num_channels))
    return blk


def resnet18(in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    """D2L's ResNet-18: 7x7/2 stem + BN + ReLU + 3x3/2 max-pool, four stages of two
    residual blocks (64, 128, 256, 512 channels; stages 2-4 start with a strided
    projection block), global average pool, flatten, linear."""
    b1 = nn.Sequential(nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3),
                       nn.BatchNorm2d(64), nn.ReLU(),
                       nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    b2 = nn.Sequential(*resnet_block(64, 64, 2, first_block=True))
    b3 = nn.Sequential(*resnet_block(64, 128, 2))
    b4 = nn.Sequential(*resnet_block(128, 256, 2))
    b5 = nn.Sequential(*resnet_block(256, 512, 2))
    return nn.Sequential(b1, b2, b3, b4, b5, nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(),
                         nn.Linear(512, num_classes))


def conv_forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) with the weights in x's dtype (a no-op cast when they match; inside an
    autocast region FusedResidual runs the block in the autocast dtype)."""
    w, b = conv.weight, conv.bias
    # Compared first: a same-dtype .to() is still a dispatcher call (~1 us each), and
    # this runs for every convolution of every training step on every backend.
    if w.dtype != x.dtype:
        w = w.to(x.dtype)
    if b is not None and b.dtype != x.dtype:
        b = b.to(x.dtype)
    return F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)


def frozen_stats(bn: nn.Module, c: torch.Tensor) -> tuple:
    """(running_mean, rsqrt(running_var + eps)) of a BN normalising with its running
    statistics, in c's statistics dtype (float32; float64 for float64 c): the mean and
    invstd the frozen ops take. Constants: no gradient flows into the statistics."""
    acc = torch.float64 if c.dtype == torch.float64 else torch.float32
    rm, rv = bn.running_mean.detach(), bn.running_var.detach()
    return rm.to(acc), torch.rsqrt(rv.to(acc) + bn_eps(bn))


def frozen_batch_norm(c: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    """bn(c) with its running statistics (ATen's batch_norm in inference mode):
    differentiable in c and in the BN's weight/bias where they are parameters."""
    return F.batch_norm(c, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                        bn_eps(bn))


def plain_parts_forward(parts: Parts, x: torch.Tensor) -> torch.Tensor:
    """The plain computation of a resolved block (spec.Parts): each stage's
    convolution, its BatchNorm module called as it is (training or eval, as that
    module is set), its ReLU, its gate modules; the shortcut (its pool, convolution
    and BN modules); the add and ReLU."""
    y = x
    for i, st in enumerate(parts.stages):
        y = conv_forward(st.conv, y)
        if st.bn is not None:
            y = st.bn(y)
        if st.relu and not st.relu_in_bn:  # a composite BN applied it already
            y = F.relu(y)
        for gate in parts.stage_gates(i):
            y = apply_gate(gate, y)
    sc = x
    if parts.shortcut is not None:
        if parts.shortcut.pool is not None:
            sc = parts.shortcut.pool(sc)
        sc = conv_forward(parts.shortcut.conv, sc)
        if parts.shortcut.bn is not None:
            sc = parts.shortcut.bn(sc)
    return F.relu(y + sc)


def plain_block_forward(block: nn.Module, x: torch.Tensor, spec=None) -> torch.Tensor:
    """The plain computation of any block fuse_model converts (D2L Residual,
    torchvision's BasicBlock or Bottleneck, timm's, or a FusedResidual's modules), by
    its spec (default: the block's own, or what its traced dataflow computes). The
    reference of the tests, and FusedResidual's own path where no fused path applies."""
    if spec is None:
        spec = spec_of(block)
    return plain_parts_forward(resolve(block, spec), x)
