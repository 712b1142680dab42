"""FusedResidual, the drop-in block, and conversion of existing models.

FusedResidual has the parameters and buffers of the block it replaces, under the
same names, so state_dict, torch.save/load, deepcopy, .to(), .half() and
channels_last behave as for the plain block:
- built directly or from a D2L Residual: conv1, conv2, [conv3], bn1, bn2;
- converted from torchvision's BasicBlock: conv1, bn1, conv2, bn2,
  [downsample = Sequential(conv, BatchNorm2d)], so torchvision checkpoints load.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from . import backends, distributed
from .backends.preference import shape_key
from .fold import block_tensors, folded
from .ops import memory_format_of
from .reference import plain_block_forward


class ConversionError(ValueError):
    """A block that cannot be converted; the message says why."""


@dataclass
class BlockParts:
    conv1: nn.Conv2d
    bn1: nn.BatchNorm2d
    conv2: nn.Conv2d
    bn2: nn.BatchNorm2d
    conv3: Optional[nn.Conv2d]
    bn3: Optional[nn.BatchNorm2d]
    layout: str  # "d2l" (conv3 attribute) or "torchvision" (downsample attribute)


def _child(block: nn.Module, name: str):
    return block._modules.get(name, getattr(block, name, None))


def block_parts(block: nn.Module) -> BlockParts:
    """The pieces of a residual block, matched by structure (no import of torchvision
    needed), or ConversionError naming what does not match."""
    if isinstance(block, FusedResidual):
        return BlockParts(block.conv1, block.bn1, block.conv2, block.bn2, block.conv3,
                          block.bn3, block._layout)
    missing = [n for n in ("conv1", "bn1", "conv2", "bn2") if _child(block, n) is None]
    if missing:
        raise ConversionError(f"no {', '.join(missing)} submodule(s): not a residual block")
    conv1, bn1, conv2, bn2 = (_child(block, n) for n in ("conv1", "bn1", "conv2", "bn2"))
    if "downsample" in block._modules or hasattr(block, "downsample"):
        layout = "torchvision"
        ds = _child(block, "downsample")
        if _child(block, "conv3") is not None or _child(block, "bn3") is not None:
            raise ConversionError("has conv3/bn3 and downsample: a bottleneck block, "
                                  "not a basic residual block")
        if ds is None:
            conv3 = bn3 = None
        elif (isinstance(ds, nn.Sequential) and len(ds) == 2
              and isinstance(ds[0], nn.Conv2d) and isinstance(ds[1], _BN_TYPES)):
            conv3, bn3 = ds[0], ds[1]
        else:
            raise ConversionError(f"downsample is {type(ds).__name__}, expected "
                                  "Sequential(Conv2d, BatchNorm2d)")
    else:
        layout = "d2l"
        conv3, bn3 = _child(block, "conv3"), None
        if _child(block, "bn3") is not None:
            raise ConversionError("has a bn3 submodule: a bottleneck block, not a basic "
                                  "residual block")
    parts = BlockParts(conv1, bn1, conv2, bn2, conv3, bn3, layout)
    _check_parts(parts)
    return parts


def _conv_geometry_error(name, conv, kernel, stride, in_ch=None):
    if not isinstance(conv, nn.Conv2d) or type(conv).forward is not nn.Conv2d.forward:
        return f"{name} is {type(conv).__name__}, expected nn.Conv2d"
    k = kernel
    pad = k // 2
    want = dict(kernel_size=(k, k), dilation=(1, 1), groups=1, padding_mode="zeros",
                stride=(stride, stride), padding=(pad, pad))
    for attr, value in want.items():
        if getattr(conv, attr) != value:
            return f"{name}.{attr} is {getattr(conv, attr)}, expected {value}"
    if in_ch is not None and conv.in_channels != in_ch:
        return f"{name} has {conv.in_channels} input channels, expected {in_ch}"
    return None


# nn.SyncBatchNorm (convert_sync_batchnorm, before or after fuse_model): the block
# normalises over its process group (resnet_fused/distributed.py).
_BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)


def _bn_error(name, bn, channels):
    if type(bn) not in _BN_TYPES:
        return f"{name} is {type(bn).__name__}, expected nn.BatchNorm2d or nn.SyncBatchNorm"
    if bn.num_features != channels:
        return f"{name} has {bn.num_features} features, expected {channels}"
    if not bn.affine:
        return f"{name} has affine=False (no weight/bias), which is not supported"
    if not bn.track_running_stats:
        return f"{name} has track_running_stats=False, which is not supported"
    return None


def _check_parts(p: BlockParts) -> None:
    if not isinstance(p.conv1, nn.Conv2d):
        raise ConversionError(f"conv1 is {type(p.conv1).__name__}, expected nn.Conv2d")
    stride = p.conv1.stride[0]
    cin, cout = p.conv1.in_channels, p.conv1.out_channels
    errs = [
        _conv_geometry_error("conv1", p.conv1, 3, stride),
        None if stride in (1, 2) else f"conv1 stride {stride} is not supported (1 or 2)",
        _conv_geometry_error("conv2", p.conv2, 3, 1, in_ch=cout),
        _bn_error("bn1", p.bn1, cout),
        _bn_error("bn2", p.bn2, cout),
    ]
    if getattr(p.conv2, "out_channels", cout) != cout:
        errs.append(f"conv2 has {p.conv2.out_channels} output channels, expected {cout}")
    if p.conv3 is None:
        if stride != 1 or cin != cout:
            errs.append(f"identity shortcut but conv1 maps {cin}->{cout} channels with "
                        f"stride {stride}: shapes would not add")
    else:
        k3 = p.conv3.kernel_size[0] if isinstance(p.conv3, nn.Conv2d) else 0
        if k3 not in (1, 3):
            errs.append(f"conv3 kernel {getattr(p.conv3, 'kernel_size', '?')} is not "
                        "supported (1x1 or 3x3)")
        else:
            errs.append(_conv_geometry_error("conv3", p.conv3, k3, stride, in_ch=cin))
            if p.conv3.out_channels != cout:
                errs.append(f"conv3 has {p.conv3.out_channels} output channels, "
                            f"expected {cout}")
        if p.bn3 is not None:
            errs.append(_bn_error("downsample BN", p.bn3, cout))
    errs = [e for e in errs if e]
    if errs:
        raise ConversionError("; ".join(errs))


class FusedResidual(nn.Module):
    """A ResNet basic block computed by fused kernels.

    Same constructor as D2L's Residual(input_channels, num_channels, use_1x1conv,
    strides), plus `backend` ("auto", "torch", "native", "triton"). Training mode
    uses batch statistics and updates the running statistics as nn.BatchNorm2d
    does; eval mode folds BN into the convolutions (cached). The output keeps the
    input's memory format (NCHW or channels_last). BN children that are
    nn.SyncBatchNorm (convert_sync_batchnorm, before or after conversion) normalise
    over their process group in training (resnet_fused/distributed.py).
    """

    def __init__(self, input_channels: int, num_channels: int, use_1x1conv: bool = False,
                 strides: int = 1, *, backend: str = "auto"):
        super().__init__()
        # Same creation order as Residual, so the same seed gives the same weights.
        self.conv1 = nn.Conv2d(input_channels, num_channels, kernel_size=3, padding=1,
                               stride=strides)
        self.conv2 = nn.Conv2d(num_channels, num_channels, kernel_size=3, padding=1)
        if use_1x1conv:
            self.conv3 = nn.Conv2d(input_channels, num_channels, kernel_size=1, stride=strides)
        self.bn1 = nn.BatchNorm2d(num_channels)
        self.bn2 = nn.BatchNorm2d(num_channels)
        self._layout = "d2l"
        self.backend = backends.check_name(backend)
        _check_parts(block_parts(self))

    # conv3 / bn3 live in `conv3` (D2L) or in `downsample` (torchvision names).
    @property
    def conv3(self) -> Optional[nn.Conv2d]:
        if "conv3" in self._modules:
            return self._modules["conv3"]
        ds = self._modules.get("downsample")
        return ds[0] if ds is not None else None

    @property
    def bn3(self) -> Optional[nn.BatchNorm2d]:
        ds = self._modules.get("downsample")
        return ds[1] if ds is not None else None

    @property
    def in_channels(self) -> int:
        return self.conv1.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv1.out_channels

    @property
    def stride(self) -> int:
        return self.conv1.stride[0]

    @classmethod
    def from_residual(cls, block: nn.Module, backend: str = "auto") -> "FusedResidual":
        """A FusedResidual computing `block` (D2L Residual, its 3x3-projection variant,
        or torchvision's BasicBlock). It shares `block`'s parameters and buffers (the
        same tensors); deepcopy the block first for an independent copy. Raises
        ConversionError saying why when the block does not fit."""
        p = block_parts(block)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        mine = {"conv1": p.conv1, "bn1": p.bn1, "conv2": p.conv2, "bn2": p.bn2}
        if p.conv3 is not None:
            if p.layout == "torchvision":
                mine["downsample"] = block._modules["downsample"]
            else:
                mine["conv3"] = p.conv3
        # Register in the source block's order, so state_dict keys come out in its order.
        order = [n for n in block._modules if n in mine]
        for name in order + [n for n in mine if n not in order]:
            setattr(self, name, mine[name])
        if p.layout == "torchvision" and p.conv3 is None:
            self.downsample = None
        self._layout = p.layout
        self.backend = backends.check_name(backend)
        # The block's own flag only: self.train() would also reset the submodules, and a
        # BN deliberately left in eval (frozen BN) must stay so.
        self.training = block.training
        return self

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"

    def __getstate__(self):
        # torch.save / deepcopy / pickle: the fold cache is derived state (and holds
        # tensors), so it is not saved; the copy refolds on its first eval call.
        state = self.__dict__.copy()
        state.pop("_fold_cache", None)
        return state

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_fold_cache", None)  # .to()/.half(): refold for the new tensors
        return super()._apply(fn, *args, **kwargs)

    # ------------------------------------------------------------------ forward
    def _validate(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"FusedResidual expects a torch.Tensor, got {type(x).__name__}")
        if x.layout != torch.strided:
            raise TypeError(f"FusedResidual expects a dense (strided) tensor, got layout "
                            f"{x.layout}")
        if x.dim() != 4:
            raise ValueError(f"FusedResidual expects a 4-D input (N, C, H, W), got a "
                             f"{x.dim()}-D tensor of shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"FusedResidual expects {self.in_channels} input channels, got "
                             f"input of shape {tuple(x.shape)} with {x.shape[1]} channels")
        if not x.is_floating_point():
            raise TypeError(f"FusedResidual expects a floating-point input, got {x.dtype}")
        w = self.conv1.weight
        if x.device != w.device:
            raise RuntimeError(f"FusedResidual: input is on {x.device} but the module's "
                               f"parameters are on {w.device}; move one with .to()")
        if min(x.shape) == 0:
            raise ValueError(f"FusedResidual: input of shape {tuple(x.shape)} is empty")

    def _backend_for(self, x: torch.Tensor, training: bool):
        if self.backend == "auto":
            key = shape_key(x.shape, self.out_channels, self.stride)
            return backends.choose(x.device, x.dtype, training, key)
        backend = backends.get(self.backend, x.device)
        reason = backend.unsupported_dtype_reason(x.dtype, x.device)
        if reason is not None:
            raise TypeError(f"FusedResidual(backend={self.backend!r}): {reason}; use "
                            "backend='torch' for this dtype")
        return backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._validate(x)
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            # The block runs in the autocast dtype (convolutions autocast to it anyway;
            # BN statistics accumulate in float32 inside the ops).
            cdtype = torch.get_autocast_dtype(dev)
            # The output is in the autocast dtype, as the plain blocks' in-place
            # `Y += X` / `out += identity` leaves it.
            with torch.autocast(dev, enabled=False):
                return self._forward(x.to(cdtype))
        w = self.conv1.weight
        if x.dtype != w.dtype:
            raise TypeError(f"FusedResidual: input dtype {x.dtype} does not match the "
                            f"module's parameter dtype {w.dtype}; convert the module "
                            f"(e.g. .to({x.dtype})) or run under torch.autocast")
        return self._forward(x)

    def _bn_modes(self) -> tuple:
        return tuple(b.training for b in (self.bn1, self.bn2, self.bn3) if b is not None)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=memory_format_of(x))
        # The BatchNorm modules' own mode decides, as in the plain block: a model in
        # train() whose BNs were put in eval() (frozen-BN fine-tuning) normalises with
        # running statistics.
        modes = self._bn_modes()
        # Resolved (and the dtype checked) on every path, so a backend that cannot take
        # this input says so even where the unfused path below would serve it.
        backend = self._backend_for(x, all(modes))
        if all(modes):
            n, _, h, w = x.shape
            s = self.stride
            if n * ((h - 1) // s + 1) * ((w - 1) // s + 1) <= 1:
                raise ValueError("Expected more than 1 value per channel when training, got "
                                 f"input size {tuple(x.shape)} (BatchNorm needs N*H*W > 1)")
            # Synchronized BNs (nn.SyncBatchNorm over more than one process): their groups.
            groups = distributed.block_groups(self, x.device)
            return backend.forward_train(self, x, groups=groups)
        if any(modes):
            # Some BNs train, some not: no fused path computes that mix.
            return plain_block_forward(self, x)
        if torch.is_grad_enabled() and not torch.compiler.is_exporting() and (
                x.requires_grad or any(t.requires_grad for t in block_tensors(self))):
            # Eval while autograd records (frozen-BN fine-tuning, saliency maps):
            # unfolded, so every gradient, BN's weight and bias included, has the plain
            # block's numerics (a bf16-folded weight would round the gradient of gamma).
            # Inference under torch.no_grad()/inference_mode() takes the folded kernels,
            # and so does torch.export, which traces with grad mode on: an exported eval
            # model is served, and must keep the fused ops in its graph.
            return plain_block_forward(self, x)
        return backend.forward_eval(self, folded(self, x.dtype, memory_format_of(x)), x)


def fuse_model(model: nn.Module, backend: str = "auto", inplace: bool = False) -> nn.Module:
    """Replace every residual block of `model` by a FusedResidual.

    Converts D2L Residual blocks (either projection kind) and torchvision BasicBlocks,
    found by structure. A block that looks residual but cannot be converted is left as
    it is, with a warning naming it and the reason. Returns the converted model (a deep
    copy unless inplace=True).
    """
    backends.check_name(backend)
    if not inplace:
        model = copy.deepcopy(model)
    if _looks_residual(model):
        converted = _try_convert("(the model itself)", model, backend)
        return converted if converted is not None else model
    for name, module in list(model.named_modules()):
        for child_name, child in list(module._modules.items()):
            if child is None or isinstance(child, FusedResidual) or not _looks_residual(child):
                continue
            full = f"{name}.{child_name}" if name else child_name
            converted = _try_convert(full, child, backend)
            if converted is not None:
                module._modules[child_name] = converted
    return model


def _looks_residual(m: nn.Module) -> bool:
    return (not isinstance(m, FusedResidual)
            and all(_child(m, n) is not None for n in ("conv1", "bn1", "conv2", "bn2")))


def _try_convert(name: str, block: nn.Module, backend: str) -> Optional[FusedResidual]:
    try:
        return FusedResidual.from_residual(block, backend=backend)
    except ConversionError as e:
        warnings.warn(f"fuse_model: left {name} ({type(block).__name__}) as it is: {e}",
                      stacklevel=3)
        return None
