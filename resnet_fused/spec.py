"""What a residual block computes, described once (README.md, Design, "One description").

A block is a chain of stages on the main path, each `conv -> BN -> ReLU?`, a shortcut
(the identity, or `conv -> BN?`) and the join `relu(last stage + shortcut)`:

    basic block   stages (3x3 stride s; 3x3), ReLU after the first only
    bottleneck    stages (1x1; 3x3 stride s, groups g, dilation d; 1x1), ReLU after the
                  first two (ResNet v1 puts the stride on the first 1x1 instead)

A BlockSpec names the block's modules by their attribute paths inside the block
("conv1", "downsample.0", at any depth: "layer.0.convolution", "f.a.0"), so the fused module holds the user's modules under the
user's names and checkpoints load unchanged. Convolution geometry (kernel, stride,
padding, groups, dilation) is read off the modules themselves, never copied here.

Conversion (matching.py) builds a spec from the block's traced dataflow; the module,
the fold, the plain computation and every backend read the block through
`resolve(block, spec)`: a Parts tuple of the modules themselves, looked up on every
call (a SyncBatchNorm conversion after fuse_model swaps the BN objects under the same
names).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

from torch import nn

from .leaves import composite_bn

BASIC, BOTTLENECK = "basic", "bottleneck"


@dataclass(frozen=True)
class Stage:
    """One `conv -> BN? -> ReLU?` of the block, by module path inside the block."""
    conv: str               # "conv1", "downsample.0"
    bn: Optional[str]       # "bn1", "downsample.1"; None: no BN (D2L's projection)
    relu: bool = False      # ReLU after the BN (main path: every stage but the last)
    # The ReLU is applied by the BN module's own forward (a composite BN, leaves.py:
    # timm's BatchNormAct2d): calling that module computes BN then ReLU; its BN
    # parameters are still read as a BatchNorm's.
    relu_in_bn: bool = False


@dataclass(frozen=True)
class BlockSpec:
    kind: str                     # BASIC or BOTTLENECK
    stages: tuple                 # tuple[Stage, ...], the main path in order
    shortcut: Optional[Stage]     # None: identity; else conv (+ BN), never a ReLU

    def module_paths(self) -> tuple:
        """Every module path the spec names, main path first."""
        out = []
        for st in self.stages + ((self.shortcut,) if self.shortcut else ()):
            out += [st.conv] + ([st.bn] if st.bn else [])
        return tuple(out)


class StageParts(NamedTuple):
    """A stage resolved to its modules."""
    conv: nn.Conv2d
    bn: Optional[nn.BatchNorm2d]
    relu: bool
    relu_in_bn: bool = False   # calling `bn` applies the ReLU too (Stage.relu_in_bn)


class Parts(NamedTuple):
    """A block resolved to its modules: what the fold, the plain computation and the
    backends read."""
    kind: str
    stages: tuple                 # tuple[StageParts, ...]
    shortcut: Optional[StageParts]

    def bns(self) -> tuple:
        """Every BN of the block, main path first (then the shortcut's, if any)."""
        sts = self.stages + ((self.shortcut,) if self.shortcut is not None else ())
        return tuple(st.bn for st in sts if st.bn is not None)


def get_path(block: nn.Module, path: str) -> nn.Module:
    """The submodule at `path` ("downsample.0"), read off the _modules dicts."""
    m = block
    for name in path.split("."):
        m = m._modules[name]
    return m


def _resolve_stage(block: nn.Module, st: Stage) -> StageParts:
    bn = get_path(block, st.bn) if st.bn is not None else None
    # Only while the module there still is the composite: a BN swapped in under the
    # same name (a SyncBatchNorm conversion) does not apply the ReLU.
    return StageParts(get_path(block, st.conv), bn, st.relu,
                      st.relu_in_bn and composite_bn(bn) is not None)


def resolve(block: nn.Module, spec: BlockSpec) -> Parts:
    """The modules of `block` that `spec` names."""
    return Parts(spec.kind, tuple(_resolve_stage(block, st) for st in spec.stages),
                 _resolve_stage(block, spec.shortcut) if spec.shortcut is not None else None)


# The specs of the blocks this package names itself (the D2L Residual, torchvision's
# BasicBlock and Bottleneck); matching.py returns these same objects for those blocks.
D2L_IDENTITY = BlockSpec(BASIC, (Stage("conv1", "bn1", True), Stage("conv2", "bn2")), None)
D2L_PROJECTION = BlockSpec(BASIC, D2L_IDENTITY.stages, Stage("conv3", None))
TV_BASIC_IDENTITY = D2L_IDENTITY
TV_BASIC_PROJECTION = BlockSpec(BASIC, D2L_IDENTITY.stages,
                                Stage("downsample.0", "downsample.1"))
BOTTLENECK_STAGES = (Stage("conv1", "bn1", True), Stage("conv2", "bn2", True),
                     Stage("conv3", "bn3"))
TV_BOTTLENECK_IDENTITY = BlockSpec(BOTTLENECK, BOTTLENECK_STAGES, None)
TV_BOTTLENECK_PROJECTION = BlockSpec(BOTTLENECK, BOTTLENECK_STAGES,
                                     Stage("downsample.0", "downsample.1"))
