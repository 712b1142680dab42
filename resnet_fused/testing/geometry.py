"""Block geometries: which fused blocks of a model run the same kernels, so that
check_model can check one block of each kind instead of the whole network where a
backend is slow on this device (Triton through its interpreter, the C++ twins on CPU).

Two blocks share a geometry when everything a kernel launch depends on, other than the
weights' values, is equal: the block's class and its spec (every field of it, so a
field added to spec.BlockSpec or spec.Stage separates blocks by itself), each submodule's
class, hyper-parameters (extra_repr: kernel, stride, padding, bias, eps, momentum,
affine, ...), training flag and the shapes and dtypes of its parameters and buffers, and
the shape of the input the block is checked at. Nothing in the key is a hand-picked
list of features: a frozen BN (another class, or a BN left in eval), a gate or a pooled
shortcut (new spec fields or modules) lands in it without a change here.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

# The reduced input a representative block is checked at: at most this many images and
# this many rows and columns (the top-left crop of the block's input in the model,
# computed in float64). 9 is odd, so a stride-2 block's output (5x5) is odd too and
# neither is a multiple of any tile; 2 x 9 x 9 = 162 rows of the implicit GEMM fill
# five 32-row tiles of the interpreter's config and part of a sixth, so the masked row
# and padding edges run. Two images keep BN's batch statistics over more than one
# image in training. Smaller inputs in the model stay at their own size, and keep more
# images, up to the example's, so that BN normalises over BN_VALUES values per channel
# where the example gives that many (over a handful the plain model's own float32
# gradient error grows towards 1e-2 and would hide a defect of 1e-3).
BLOCK_BATCH = 2
BLOCK_SPATIAL = 9
BN_VALUES = 64


def module_signature(block: nn.Module) -> tuple:
    """What a kernel launch depends on in `block`, other than the values of its weights
    (see the module docstring)."""
    sig = [type(block).__qualname__, repr(getattr(block, "_spec", None))]
    for name, m in block.named_modules():
        tensors = tuple((n, tuple(t.shape), str(t.dtype))
                        for n, t in (*m.named_parameters(recurse=False),
                                     *m.named_buffers(recurse=False)) if t is not None)
        extra = m.extra_repr() if name else ""  # the block's own: its backend, not a shape
        sig.append((name, type(m).__qualname__, extra, m.training, tensors))
    return tuple(sig)


@dataclass
class Geometry:
    """One distinct block geometry: the block checked for it and every block it stands
    for (in model order), with the reduced input it is checked at."""
    representative: str
    members: list = field(default_factory=list)
    input: torch.Tensor = None          # float64, the reduced block input
    model_input_shape: tuple = ()       # what the representative sees in the model

    def describe(self) -> str:
        shape = "x".join(map(str, self.input.shape))
        full = "x".join(map(str, self.model_input_shape))
        others = [m for m in self.members if m != self.representative]
        stands = f"stands for {', '.join(others)}" if others else "stands for itself"
        return f"{self.representative} (checked at {shape}, in the model {full}) {stands}"


def _reduce(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4:
        return x
    h, w = min(x.shape[2], BLOCK_SPATIAL), min(x.shape[3], BLOCK_SPATIAL)
    n = max(BLOCK_BATCH, -(-BN_VALUES // (h * w)))
    return x[:n, :, :h, :w].contiguous()


def block_inputs(plain: nn.Module, names, example_input: torch.Tensor) -> dict:
    """{name: the float64 input the plain model's module `name` receives on
    example_input in eval mode (its first call)}; a name with no module or no call is
    absent."""
    model = copy.deepcopy(plain).to(dtype=torch.float64).eval()
    modules = dict(model.named_modules())
    seen, hooks = {}, []
    for name in names:
        m = modules.get(name)
        if m is None:
            continue

        def hook(mod, args, name=name):
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = args[0].detach().clone()
        hooks.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(example_input.detach().to(torch.float64))
    finally:
        for h in hooks:
            h.remove()
    return seen


def group_blocks(plain: nn.Module, fused: nn.Module, block_type, example_input,
                 ) -> tuple[list, list]:
    """(geometries in model order, problems): the fused blocks (instances of block_type)
    of `fused` grouped by geometry, each with its representative's reduced input.
    problems names blocks that cannot be checked on their own (no module of that name in
    the plain model, or never called)."""
    blocks = [(n, m) for n, m in fused.named_modules() if isinstance(m, block_type)]
    inputs = block_inputs(plain, [n for n, _ in blocks], example_input)
    groups: dict = {}
    problems = []
    for name, block in blocks:
        if name not in inputs:
            problems.append(f"block {name}: no module of that name in the plain model is "
                            "called on the example input, so it cannot be checked alone")
            continue
        x = _reduce(inputs[name])
        key = (module_signature(block), tuple(x.shape))
        g = groups.get(key)
        if g is None:
            g = groups[key] = Geometry(name, input=x,
                                       model_input_shape=tuple(inputs[name].shape))
        g.members.append(name)
    return list(groups.values()), problems
