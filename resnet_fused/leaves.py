"""The modules whose computation the package knows without tracing into them, beyond
the convolutions, BN types and activations that matching.py classifies one by one
(README.md, "What converts").

A composite BN is one module computing BatchNorm and then, in its own forward, more
modules applied in order: timm's `BatchNormAct2d` (an nn.BatchNorm2d subclass whose
forward is BatchNorm2d's, then `self.drop`, then `self.act`). Its BN parameters and
buffers are its own, so the fold and every backend read it as a BatchNorm; matching.py
expands it into BN -> drop -> act in the traced graph, so an identity drop falls away
and a ReLU act is the stage's ReLU (spec.Stage.relu_in_bn records that calling the
module applies it).

Known by class name and defining package rather than imported: timm is optional, and
a subclass (which may override forward) is not the known class.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

# (package prefix, class name) -> children applied after BatchNorm, in order.
_COMPOSITE_BN = {
    ("timm.", "BatchNormAct2d"): ("drop", "act"),
}


def composite_bn(m: nn.Module) -> Optional[tuple]:
    """The names of the children `m`'s forward applies after its BatchNorm, when `m` is
    a known composite BN (an nn.BatchNorm2d computing BatchNorm2d's forward first);
    else None."""
    cls = type(m)
    if not isinstance(m, nn.BatchNorm2d):
        return None
    for (package, name), after in _COMPOSITE_BN.items():
        if cls.__name__ == name and cls.__module__.startswith(package) and all(
                isinstance(m._modules.get(c), nn.Module) for c in after):
            return after
    return None
