"""What a residual block computes, described once (README.md, Design, "One description").

A block is a chain of stages on the main path, each `conv -> BN -> ReLU?`, a shortcut
(the identity, or `conv -> BN?`) and the join `relu(last stage + shortcut)`:

    basic block   stages (3x3 stride s; 3x3), ReLU after the first only
    bottleneck    stages (1x1; 3x3 stride s, groups g, dilation d; 1x1), ReLU after the
                  first two (ResNet v1 puts the stride on the first 1x1 instead)

Two optional elements ride on the same description (README.md, Design, "Gates and
pooled shortcuts"):

    gate          a factor multiplying a stage's output (after its BN and ReLU; the
                  last stage: before the add): a channel gate `y * f(mean_hw(y))` (SE,
                  ECA), `f` the user's own submodules run on the pooled (N, C, 1, 1)
                  tensor; a sample gate `y * mask / keep` (drop path, stochastic
                  depth; training only, the identity in eval); or a constant scale
                  `y * 0.2` written in the block's forward (no module)
    shortcut pool an nn.AvgPool2d before the shortcut's 1x1 convolution (ResNet-D)

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
CHANNEL, SAMPLE, SCALE = "channel", "sample", "scale"   # Gate.kind


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
    pool: Optional[str] = None  # the shortcut only: an nn.AvgPool2d before its conv


@dataclass(frozen=True)
class Gate:
    """A factor multiplying the output of main-path stage `stage` (after its BN and
    ReLU; for the last stage that is the branch, before the add): a module's, or a
    constant's (kind SCALE: `value`, path "")."""
    path: str               # "se", "drop_path", "f.se"; "" for a constant scale
    kind: str               # CHANNEL, SAMPLE or SCALE
    stage: int              # index into BlockSpec.stages
    value: Optional[float] = None   # the constant of a SCALE gate


@dataclass(frozen=True)
class BlockSpec:
    kind: str                     # BASIC or BOTTLENECK
    stages: tuple                 # tuple[Stage, ...], the main path in order
    shortcut: Optional[Stage]     # None: identity; else (pool ->) conv (+ BN), never a ReLU
    gates: tuple = ()             # tuple[Gate, ...] in the order the forward applies them

    def module_paths(self) -> tuple:
        """Every module path the spec names, main path first, then the shortcut's, then
        the gates'."""
        out = []
        for st in self.stages + ((self.shortcut,) if self.shortcut else ()):
            out += ([st.pool] if st.pool else []) + [st.conv] + ([st.bn] if st.bn else [])
        return tuple(out) + tuple(g.path for g in self.gates if g.path)


class StageParts(NamedTuple):
    """A stage resolved to its modules."""
    conv: nn.Conv2d
    bn: Optional[nn.BatchNorm2d]
    relu: bool
    relu_in_bn: bool = False   # calling `bn` applies the ReLU too (Stage.relu_in_bn)
    pool: Optional[nn.AvgPool2d] = None   # the shortcut's, before its conv


class GateParts(NamedTuple):
    """A gate resolved: its module and, for a channel gate, `fn`, the part of the
    module after its pooling (gates.py), run on the pooled (N, C, 1, 1) tensor; a
    constant scale has no module, only its `value`."""
    kind: str
    stage: int
    module: Optional[nn.Module]
    fn: Optional[nn.Module]
    value: Optional[float] = None


class Parts(NamedTuple):
    """A block resolved to its modules: what the fold, the plain computation and the
    backends read."""
    kind: str
    stages: tuple                 # tuple[StageParts, ...]
    shortcut: Optional[StageParts]
    gates: tuple = ()             # tuple[GateParts, ...], in the forward's order

    def stage_gates(self, i: int) -> tuple:
        """The gates on stage i's output, in order."""
        return tuple(g for g in self.gates if g.stage == i)

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
                      st.relu_in_bn and composite_bn(bn) is not None,
                      get_path(block, st.pool) if st.pool is not None else None)


def _resolve_gate(block: nn.Module, g: Gate) -> GateParts:
    from .gates import channel_gate_fn  # gates.py traces with fx; spec.py stays light
    if g.kind == SCALE:
        return GateParts(SCALE, g.stage, None, None, g.value)
    m = get_path(block, g.path)
    return GateParts(g.kind, g.stage, m, channel_gate_fn(m) if g.kind == CHANNEL else None)


def resolve(block: nn.Module, spec: BlockSpec) -> Parts:
    """The modules of `block` that `spec` names."""
    return Parts(spec.kind, tuple(_resolve_stage(block, st) for st in spec.stages),
                 _resolve_stage(block, spec.shortcut) if spec.shortcut is not None else None,
                 tuple(_resolve_gate(block, g) for g in spec.gates))


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
