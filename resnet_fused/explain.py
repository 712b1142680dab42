"""explain(model): which residual blocks of a model fuse, which do not and why, and what
runs for each on this machine (README.md, "What converts").

It finds the blocks as fuse_model does (conversion.walk: the same detection and the
same matching, so the reasons are fuse_model's warnings) and asks the backend
registry what a converted block runs in eval and in training: its own backend, or
auto's choice for the device and dtype of its parameters (backends.choose; without an
input the per-shape measured entries do not apply, so the default order does). The
model is not changed.

    print(resnet_fused.explain(model))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from . import backends
from .conversion import Found, walk
from .module import FusedResidual

# What each backend runs per block (README.md, Backends), in a few words.
KERNELS = {
    ("torch", False): "folded conv+bias(+shortcut)+ReLU per stage (ATen custom ops)",
    ("torch", True): "ATen convs; BN stats/finalize, BN+ReLU, BN+add+ReLU ops, 1-bit mask",
    ("native", False): "conv+bias(+add)+ReLU on folded weights (cuDNN/ATen)",
    ("native", True): "cuDNN convs; C++/CUDA BN stats, finalize, BN+add+ReLU, 1-bit mask",
    ("eager", False): "folded conv+bias(+shortcut)+ReLU per stage (ATen)",
    ("eager", True): "the plain block's ATen conv, batch_norm, ReLU, add",
    ("triton", False): "one implicit-GEMM kernel per stage, shortcut GEMM in the last",
    ("triton", True): "implicit-GEMM convs, stats in epilogue, BN+ReLU in next prologue",
}


@dataclass
class BlockExplanation:
    path: str                 # "layer1.0"; "" for the model itself
    cls: str                  # the block's class (the source class of a FusedResidual)
    status: str               # "converted", "converts" (by fuse_model) or "left"
    reason: Optional[str]     # why it is left (fuse_model's warning text)
    kind: Optional[str]       # "basic" / "bottleneck" for a block that (is) converted
    eval: Optional[str]       # "backend: kernels" in eval (no_grad), or why none runs
    train: Optional[str]      # the same in training


@dataclass
class Explanation:
    model: str
    blocks: list              # list[BlockExplanation], in module order

    @property
    def converted(self) -> list:
        return [b for b in self.blocks if b.status == "converted"]

    @property
    def left(self) -> list:
        return [b for b in self.blocks if b.status == "left"]

    def __str__(self) -> str:
        n = len(self.blocks)
        counts = {s: sum(b.status == s for b in self.blocks)
                  for s in ("converted", "converts", "left")}
        head = (f"{self.model}: {n} residual block(s), {counts['converted']} converted, "
                f"{counts['converts']} would convert with fuse_model, {counts['left']} "
                "left as they are")
        if not n:
            return head + " (no module adds two tensors derived from its input with a " \
                "convolution on one path)"
        rows = [("block", "class", "status", "eval (no_grad)", "training")]
        for b in self.blocks:
            rows.append((b.path or "(the model itself)", b.cls,
                         b.status + (f" ({b.kind})" if b.kind else ""),
                         b.eval or "-", b.train or "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [head, ""]
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
            elif self.blocks[i - 1].reason:
                lines.append(f"    why: {self.blocks[i - 1].reason}")
        lines += ["", "Eval with autograd recording and blocks whose BNs are in mixed "
                  "modes compute the plain way; backends: README.md, Backends."]
        return "\n".join(lines)

    __repr__ = __str__


def _runs(fused: FusedResidual, training: bool) -> str:
    """The backend and kernels the block runs in this mode here, or why none does."""
    w = fused.parts().stages[0].conv.weight
    device, dtype, parts = w.device, w.dtype, fused.parts()
    if fused.backend == "auto":
        backend = backends.choose(device, dtype, training, None, parts)
    else:
        why = backends.unavailable_reason(fused.backend, device)
        if why is not None:
            return f"{fused.backend}: unavailable on {device} ({why})"
        backend = backends.get(fused.backend, device)
        why = (backend.unsupported_dtype_reason(dtype, device)
               or backend.unsupported_block_reason(parts, training))
        if why is not None:
            return f"{fused.backend}: refuses it ({why})"
    return f"{backend.name}: {KERNELS.get((backend.name, training), '?')}"


def _explain_one(f: Found) -> BlockExplanation:
    if f.fused is None:
        return BlockExplanation(f.path, type(f.module).__name__, "left", f.reason,
                                None, None, None)
    converted = f.fused is f.module
    cls = (getattr(f.module, "_source_class", None) or "FusedResidual") if converted \
        else type(f.module).__name__
    return BlockExplanation(f.path, cls, "converted" if converted else "converts", None,
                            f.fused._spec.kind, _runs(f.fused, False), _runs(f.fused, True))


def explain(model: nn.Module, backend: str = "auto") -> Explanation:
    """For every residual block of `model` (plain or converted): its path, class,
    whether it is converted (or would be, by fuse_model(model, backend)) or left with
    the reason, and for a converted one the backend and kernels it runs in eval and in
    training on this machine. str() of the result is a table."""
    backends.check_name(backend)
    found = []
    with torch.no_grad():
        walk(model, backend, found.append)
    return Explanation(type(model).__name__, [_explain_one(f) for f in found])
