"""Shared pieces of the benchmark: shapes, cost model, timers, providers, rows.

Used by bench/run.py (the main job), the pytest-benchmark suite (bench/test_bench_*.py)
and the result scripts (bench/make_tables.py, bench/make_preference.py). Nothing here
queries CUDA at import time.
"""
from __future__ import annotations

import datetime as _dt
import itertools
import math
import os
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn
from torch.nn import functional as F


# ----------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class BlockShape:
    """One residual block configuration: input channels, output channels, input
    height = width, the block's stride, batch; for a bottleneck also the width of its
    3x3 (torchvision's `planes * base_width / 64 * groups`) and its groups. The stride
    sits on conv1 of a basic block and on the 3x3 of a bottleneck (ResNet v1.5)."""

    name: str
    cin: int
    cout: int
    hw: int
    stride: int
    batch: int
    kind: str = "basic"      # "basic" or "bottleneck"
    width: int = 0           # bottleneck: channels of the 1x1 -> 3x3 -> 1x1 middle
    groups: int = 1          # bottleneck: groups of the 3x3 (ResNeXt)
    # bottleneck: "" (torchvision's), "se" (timm's with an SEModule gate: SE-ResNet-50),
    # "avgd" (timm's with ResNet-D's avg-pool shortcut: ResNet-50-D)
    variant: str = ""

    @property
    def proj(self) -> bool:
        # Both networks project exactly where shape or channels change.
        return self.cin != self.cout or self.stride != 1

    @property
    def hw_out(self) -> int:
        # 3x3 / padding 1 and 1x1 / padding 0 give the same size at one stride.
        return (self.hw + 2 - 3) // self.stride + 1

    @property
    def key(self) -> str:
        """The shape key make_preference.py writes, the package's own format
        (resnet_fused.backends.preference.block_shape_key): cin-cout-h-w-stride (input
        H, W), b-cin-width-cout-h-w-stride[-gG] for a bottleneck."""
        from resnet_fused.backends.preference import bottleneck_key, shape_key

        x_shape = (self.batch, self.cin, self.hw, self.hw)
        if self.kind == "bottleneck":
            return bottleneck_key(x_shape, self.width, self.cout, self.stride, self.groups)
        return shape_key(x_shape, self.cout, self.stride)

    def with_batch(self, n: int) -> "BlockShape":
        return replace(self, batch=n)


# The five ResNet-18 stage shapes at a 224x224 input (the anchors' shapes).
GPU_STAGES = [
    BlockShape("s2_64x56", 64, 64, 56, 1, 128),
    BlockShape("s3_down_64to128", 64, 128, 56, 2, 128),
    BlockShape("s3_128x28", 128, 128, 28, 1, 128),
    BlockShape("s4_256x14", 256, 256, 14, 1, 128),
    BlockShape("s5_512x7", 512, 512, 7, 1, 128),
]
GPU_SWEEP_SHAPE = "s3_128x28"
GPU_SWEEP_BATCHES = [1, 8, 32, 256]
# Numerics on the GPU: the anchors' shape (128ch 28x28, batch 32) and a projection block.
GPU_NUMERICS = [BlockShape("s3_128x28", 128, 128, 28, 1, 32),
                BlockShape("s3_down_64to128", 64, 128, 28, 2, 16)]

# CPU: the same structure at sizes two shared cores finish in seconds. These figures say
# nothing about GPU speed; they check that every path runs and is right.
CPU_STAGES = [
    BlockShape("s2_64x56", 16, 16, 14, 1, 4),
    BlockShape("s3_down_64to128", 16, 32, 14, 2, 4),
    BlockShape("s3_128x28", 32, 32, 14, 1, 4),
    BlockShape("s4_256x14", 64, 64, 7, 1, 4),
]
CPU_SWEEP_SHAPE = "s3_128x28"
CPU_SWEEP_BATCHES = [1, 8]
# Large enough that bf16 training errors are not decided by one or two ReLU mask flips
# (an output near zero whose sign differs from float64's: the plain block can have none
# by luck, and 3x nothing is a tight bound).
CPU_NUMERICS = [BlockShape("s3_128x28", 16, 16, 10, 1, 4),
                BlockShape("s3_down_64to128", 8, 16, 10, 2, 4)]
# Triton on the CPU runs in its interpreter: tiny, so it finishes in seconds.
CPU_NUMERICS_TRITON = [BlockShape("s3_128x28", 8, 8, 6, 1, 2),
                       BlockShape("s3_down_64to128", 8, 16, 6, 2, 2)]

# ResNet-50 v1.5 at a 224x224 input: each stage's downsampling (first) block and one
# identity block, at the batch of the MLPerf / NVIDIA training recipes.
def _r50(name, cin, cout, hw, stride, width, batch=256):
    return BlockShape(name, cin, cout, hw, stride, batch, "bottleneck", width)


R50_GPU_STAGES = [
    _r50("r50_l1_down", 64, 256, 56, 1, 64), _r50("r50_l1", 256, 256, 56, 1, 64),
    _r50("r50_l2_down", 256, 512, 56, 2, 128), _r50("r50_l2", 512, 512, 28, 1, 128),
    _r50("r50_l3_down", 512, 1024, 28, 2, 256), _r50("r50_l3", 1024, 1024, 14, 1, 256),
    _r50("r50_l4_down", 1024, 2048, 14, 2, 512), _r50("r50_l4", 2048, 2048, 7, 1, 512),
]
# CPU: the same structure (expansion 4, a strided downsampling block) at small sizes.
R50_CPU_STAGES = [
    _r50("r50_l1_down", 16, 64, 14, 1, 16, batch=4), _r50("r50_l1", 64, 64, 14, 1, 16, batch=4),
    _r50("r50_l2_down", 64, 128, 14, 2, 32, batch=4),
]
# run.py --quick on a GPU (bench/device.sh): the memory-bound first stage, a strided
# downsampling block and the two compute-bound stages.
R50_GPU_QUICK = ("r50_l1", "r50_l2_down", "r50_l3", "r50_l4")
# The same stages with a gate or a pooled shortcut (README.md, Design, "Gates and pooled
# shortcuts"): SE-ResNet-50 (timm's SEModule, reduction 16) where the gate's pool and
# multiply are extra passes over the block's largest tensor, and ResNet-50-D's
# downsampling blocks (AvgPool2d 2x2 before the 1x1 projection).
def _gated(name, variant, cin, cout, hw, stride, width, batch=256):
    return BlockShape(name, cin, cout, hw, stride, batch, "bottleneck", width, 1, variant)


GATED_GPU_STAGES = [
    _gated("se_r50_l1", "se", 256, 256, 56, 1, 64),
    _gated("se_r50_l2_down", "se", 256, 512, 56, 2, 128),
    _gated("se_r50_l3", "se", 1024, 1024, 14, 1, 256),
    _gated("se_r50_l4", "se", 2048, 2048, 7, 1, 512),
    _gated("r50d_l2_down", "avgd", 256, 512, 56, 2, 128),
    _gated("r50d_l3_down", "avgd", 512, 1024, 28, 2, 256),
]
# --quick on a GPU (bench/device.sh's time plan): the SE block where its gate weighs most
# (layer 1, memory-bound), one where it weighs least (layer 3, compute-bound), and the
# ResNet-D downsampling block whose pool reads the most; each beside its R50_GPU_QUICK twin.
GATED_GPU_QUICK = ("se_r50_l1", "se_r50_l3", "r50d_l2_down")
GATED_CPU_STAGES = [
    _gated("se_r50_l1", "se", 64, 64, 14, 1, 16, batch=4),
    _gated("r50d_l2_down", "avgd", 64, 128, 14, 2, 32, batch=4),
]
GATED_SHAPE_ALIASES = {"se1": "se_r50_l1", "se2d": "se_r50_l2_down", "se3": "se_r50_l3",
                       "se4": "se_r50_l4", "d2d": "r50d_l2_down", "d3d": "r50d_l3_down"}

R50_SHAPE_ALIASES = {"l1d": "r50_l1_down", "l1": "r50_l1", "l2d": "r50_l2_down",
                     "l2": "r50_l2", "l3d": "r50_l3_down", "l3": "r50_l3",
                     "l4d": "r50_l4_down", "l4": "r50_l4"}

SHAPE_ALIASES = {"s2": "s2_64x56", "s3d": "s3_down_64to128", "s3": "s3_128x28",
                 "s4": "s4_256x14", "s5": "s5_512x7"}


def select_shapes(stages: list[BlockShape], spec: Optional[str],
                  aliases: Optional[dict] = None, flag: str = "--shapes") -> list[BlockShape]:
    """Shapes named in a comma list (aliases such as s2,s3d,s3,s4,s5, or full names); all
    when spec is None."""
    if not spec:
        return list(stages)
    aliases = SHAPE_ALIASES if aliases is None else aliases
    by_name = {s.name: s for s in stages}
    out = []
    for word in spec.split(","):
        word = word.strip()
        name = aliases.get(word, word)
        if name not in by_name:
            raise SystemExit(f"{flag}: unknown shape {word!r}; choose from "
                             f"{', '.join(list(aliases) + list(by_name))}")
        out.append(by_name[name])
    return out


# ----------------------------------------------------------------------------- cost model
def block_flops(s: BlockShape, training: bool = False) -> float:
    """Convolution FLOPs of one block: 2*N*Hout*Wout*Cout*Cin*R*S/groups per conv.
    Training (forward + backward: data and weight gradients) counts 3x the forward."""
    ho = s.hw_out
    if s.kind == "bottleneck":
        w = s.width
        f = 2.0 * s.batch * (s.hw * s.hw * s.cin * w                       # 1x1 in
                             + ho * ho * (9 * w * w // s.groups + w * s.cout  # 3x3, 1x1
                                          + (s.cin * s.cout if s.proj else 0)))
    else:
        per_pixel = s.cout * (s.cin * 9 + s.cout * 9 + (s.cin if s.proj else 0))
        f = 2.0 * s.batch * ho * ho * per_pixel
    return 3.0 * f if training else f


def eval_bytes(s: BlockShape, elt: int = 2) -> float:
    """Bytes the fused eval path moves (one read or write of each tensor, weights aside):
    basic, two kernels: x, y1 written and read, x again, out; bottleneck, three: x, y1
    and y2 written and read, x again (identity or projection input), out."""
    hi, ho = s.hw * s.hw, s.hw_out * s.hw_out
    if s.kind == "bottleneck":
        elems = s.cin * hi + 2 * s.width * hi + 2 * s.width * ho + s.cin * hi + s.cout * ho
    else:
        elems = s.cin * hi + 2 * s.cout * ho + s.cin * hi + s.cout * ho
    return float(elt * s.batch * elems)


def model_flops(model: nn.Module, x_shape, training: bool = False) -> float:
    """Convolution + linear FLOPs of one forward of `model` on an input of x_shape,
    counted with hooks on a copy run on the meta device (no arithmetic, no memory)."""
    import copy

    m = copy.deepcopy(model).to("meta").eval()
    total = [0.0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            total[0] += 2.0 * out.numel() * mod.in_channels // mod.groups * kh * kw
        else:
            total[0] += 2.0 * out.numel() * mod.in_features
    hs = [mod.register_forward_hook(hook) for mod in m.modules()
          if isinstance(mod, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        m(torch.empty(x_shape, device="meta"))
    for h in hs:
        h.remove()
    return 3.0 * total[0] if training else total[0]


# Dense bf16/fp16 tensor-core rates (TFLOP/s) used when the peak is not measured.
# Datasheet values are leads; measured ones are this workplace's (8192^3 bf16 matmul,
# random data, triton do_bench median): see bench/NOTES.md.
PEAK_TABLE = [  # (substring of torch.cuda.get_device_name, TFLOP/s, source)
    ("H200", 798.0, "measured: H200 bf16 matmul 8192^3, 2026-11-26"),
    ("H100 PCIe", 756.0, "datasheet"),
    ("H100 NVL", 835.0, "datasheet"),
    ("H100", 989.0, "datasheet (SXM)"),
    ("A100", 312.0, "datasheet"),
    ("L40S", 362.0, "datasheet"),
    ("L4", 121.0, "datasheet"),
    ("A10", 125.0, "datasheet"),
]


def peak_from_table(gpu_name: str) -> tuple[Optional[float], str]:
    for sub, tf, src in PEAK_TABLE:
        if sub in gpu_name:
            return tf, src
    return None, "unknown card: pass --peak-tflops"


def peak_for_dtype(peak_half: Optional[float], dtype: torch.dtype) -> Optional[float]:
    """The compute floor's rate for a dtype: fp16/bf16 the tensor-core peak; fp32 runs as
    TF32 in cuDNN by default (half the bf16 rate), else about 1/15 of it (plain fp32)."""
    if peak_half is None:
        return None
    if dtype in (torch.float16, torch.bfloat16):
        return peak_half
    if dtype == torch.float32:
        return peak_half / 2 if torch.backends.cudnn.allow_tf32 else peak_half / 15
    return None


# ----------------------------------------------------------------------------- timing
def quantile_ms(samples: list[float]) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) of samples, in their unit (ms here; us in
    overhead.py)."""
    samples = sorted(samples)
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=10, method="inclusive")  # deciles
    return statistics.median(samples), q[1], q[7]


def time_fn(fn: Callable[[], object], device: torch.device, *, quick: bool = False,
            grad_to_none=None) -> tuple[float, float, float]:
    """(p50, p20, p80) in ms of one call of fn.

    CUDA: triton.testing.do_bench (CUDA events around each call, L2 flushed between
    calls, warm-up first). CPU: host clock around each call after a warm-up call.
    """
    if device.type == "cuda":
        import triton.testing

        warmup, rep = (10, 40) if quick else (25, 100)
        res = triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                      quantiles=[0.5, 0.2, 0.8])
        return tuple(float(v) for v in res)
    fn()  # warm-up: first-call allocations and lazy initialisation stay out
    budget_s = 0.15 if quick else 0.5
    samples: list[float] = []
    t_end = time.perf_counter() + budget_s
    while len(samples) < 3 or (time.perf_counter() < t_end and len(samples) < 50):
        if grad_to_none is not None:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return quantile_ms(samples)


# glibc mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def steady_host_allocator() -> str:
    """CPU timing: fix glibc malloc's thresholds for the rest of the process, and say
    what was done ("" where nothing was: not glibc). By default glibc moves its mmap
    threshold with the sizes freed so far, so whether a step's activations (MBs at the
    CPU shapes) come from the heap or from fresh mmapped pages, faulted in on every
    call, depends on what the process allocated before: measured here, the same
    ResNet-18 training step ran at 30 ms or, in some processes, at 37-42 ms with 2-4
    thousand page faults per step, for the plain model or the converted one alike,
    which is a 0.73x or 1.3x row that says nothing about either (bench/NOTES.md). A
    fixed 32 MiB mmap threshold (glibc's largest) and a trim threshold that keeps freed
    memory make every provider's steady state the heap's, as jemalloc or tcmalloc
    (PyTorch's CPU tuning guide) would."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return ""
    if not (mallopt(_M_MMAP_THRESHOLD, 32 << 20) and mallopt(_M_TRIM_THRESHOLD, 1 << 30)):
        return ""
    return "glibc malloc: mmap threshold 32 MiB, trim threshold 1 GiB (fixed)"


class Timing(NamedTuple):
    """One provider's timing: (p50, p20, p80) in ms, and where it was timed in
    interleaved rounds (time_interleaved), its calls in round order and which
    interleaved run they belong to, to pair with the other providers' of that run
    (paired_speedup); None when timed alone."""
    p50: float
    p20: float
    p80: float
    rounds: Optional[tuple] = None
    group: Optional[int] = None


_GROUPS = itertools.count(1)  # one number per time_interleaved call


def time_interleaved(fns: list, *, quick: bool = False, min_rounds: int = 3) -> list:
    """CPU: a Timing of each (fn, grad_to_none) of `fns`, sampled in rounds, so a slow
    phase of the machine (another process, a frequency change) falls on every provider
    alike and their ratios are measured side by side (paired_speedup). In a round each
    provider, in a shuffled order, is called twice and its second call timed: a timed
    call follows one of its own, as a step follows a step in a training loop. A fixed
    cyclic order would have each provider always follow the same other one, and a
    provider that follows one running the same ATen kernels (the plain block after the
    eager backend) finds their caches warm: a 3-4% bias measured here (NOTES.md). One
    warm-up call each first; at least min_rounds rounds, then rounds until about the
    time budget time_fn gives one provider times their number, at most 200 (the fast
    shapes: more pairs, the same seconds)."""
    for fn, _ in fns:
        fn()
    budget_s = (0.15 if quick else 0.5) * len(fns) * 2
    samples: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    shuffle = random.Random(len(fns)).shuffle  # seeded: the same orders run to run
    t_end = time.perf_counter() + budget_s
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() < t_end and rounds < 200):
        shuffle(order)
        for i in order:
            fn, grads = fns[i]
            for timed in (False, True):
                if grads is not None:
                    for t in grads:
                        t.grad = None
                t0 = time.perf_counter()
                fn()
                if timed:
                    samples[i].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    group = next(_GROUPS)
    return [Timing(*quantile_ms(s), rounds=tuple(s), group=group) for s in samples]


def paired_speedup(base: Timing, other: Timing) -> float:
    """How many times faster `other` ran than `base`. Timed in the same interleaved
    rounds: the median over rounds of base's call time over other's in that round,
    each pair moments apart, so a slow phase of a shared machine (which moves both
    medians by several per cent on a 2-core VM) cancels in the ratio. Otherwise the
    ratio of the medians."""
    if base.group is not None and base.group == other.group:
        return statistics.median(x / y for x, y in zip(base.rounds, other.rounds))
    return base.p50 / other.p50


class Rotating:
    """Cycles through several distinct input sets so timed calls do not all hit one
    buffer (METHOD.md: rotate inputs that would fit in cache)."""

    def __init__(self, items):
        self.items = list(items)
        self.i = 0

    def next(self):
        item = self.items[self.i]
        self.i = (self.i + 1) % len(self.items)
        return item


def n_input_sets(nbytes: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    # Enough distinct sets to exceed a Hopper L2 (50-60 MB) twice over, within 1 GiB.
    want = math.ceil(2 * 64 * 2**20 / max(nbytes, 1))
    return int(max(2, min(8, want, (2**30) // max(nbytes, 1))))


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- models
def randomize_bn(m: nn.Module, seed: Optional[int] = None):
    """Non-trivial BN parameters and running statistics (never the identity init)."""
    g = None
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            with torch.no_grad():
                for t, lo, hi in ((mod.running_mean, -0.5, 0.5), (mod.running_var, 0.5, 2.0),
                                  (mod.weight, 0.5, 1.5), (mod.bias, -0.5, 0.5)):
                    t.copy_(torch.empty(t.shape, dtype=torch.float64).uniform_(lo, hi, generator=g))
    return m


def make_block(s: BlockShape, seed: int = 0) -> nn.Module:
    """The block as its users write it, in fp32 on the CPU: the D2L Residual, or
    torchvision's Bottleneck (ResNet-50 v1.5: the stride on the 3x3; downsample =
    conv1x1 + BN where shape or channels change). BN weights and statistics random."""
    torch.manual_seed(seed)
    if s.kind == "bottleneck" and s.variant:
        return randomize_bn(_timm_bottleneck(s), seed)
    if s.kind == "bottleneck":
        try:
            from torchvision.models.resnet import Bottleneck
        except ImportError as e:
            raise RuntimeError("the ResNet-50 shapes need torchvision (the README's install "
                               f"command brings it): {e}") from e
        ds = None
        if s.proj:
            ds = nn.Sequential(nn.Conv2d(s.cin, s.cout, 1, stride=s.stride, bias=False),
                               nn.BatchNorm2d(s.cout))
        planes = s.cout // Bottleneck.expansion
        blk = Bottleneck(s.cin, planes, stride=s.stride, downsample=ds, groups=s.groups,
                         base_width=64 * s.width // (planes * s.groups))
        return randomize_bn(blk, seed)
    from resnet_fused import Residual

    blk = Residual(s.cin, s.cout, use_1x1conv=s.proj, strides=s.stride)
    return randomize_bn(blk, seed)


def _timm_bottleneck(s: BlockShape) -> nn.Module:
    """timm's Bottleneck as seresnet50 ("se") or resnet50d ("avgd") build it."""
    try:
        from timm.layers import SEModule
        from timm.models.resnet import Bottleneck
    except ImportError as e:
        raise RuntimeError(f"the SE-ResNet-50 / ResNet-50-D shapes need timm: {e}") from e
    ds = None
    if s.proj:
        pool = (nn.AvgPool2d(2, s.stride, ceil_mode=True, count_include_pad=False)
                if s.variant == "avgd" and s.stride != 1 else nn.Identity())
        ds = nn.Sequential(pool, nn.Conv2d(s.cin, s.cout, 1, bias=False),
                           nn.BatchNorm2d(s.cout)) if s.variant == "avgd" else \
            nn.Sequential(nn.Conv2d(s.cin, s.cout, 1, stride=s.stride, bias=False),
                          nn.BatchNorm2d(s.cout))
    planes = s.cout // Bottleneck.expansion
    return Bottleneck(s.cin, planes, stride=s.stride, downsample=ds,
                      base_width=64 * s.width // planes,
                      attn_layer=SEModule if s.variant == "se" else None)


def to_layout(m_or_t, device, dtype, channels_last: bool):
    m_or_t = m_or_t.to(device=device, dtype=dtype)
    if channels_last:
        if isinstance(m_or_t, torch.Tensor):
            return m_or_t.contiguous(memory_format=torch.channels_last)
        return m_or_t.to(memory_format=torch.channels_last)
    return m_or_t


def fold_conv_bn(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d]):
    """Eval-mode BN folded into the preceding convolution: (weight, bias) in fp32, detached
    (the package's own fold, so the cuDNN baseline gets exactly our folded weights)."""
    from resnet_fused.fold import fold_conv_bn as package_fold  # lazy: run.py sets
    # TRITON_INTERPRET before the package is first imported
    with torch.no_grad():
        return package_fold(conv, bn)


def _folded(conv, bn, dtype, mf):
    w, b = fold_conv_bn(conv, bn)
    return w.to(dtype).contiguous(memory_format=mf), b.to(dtype)


def cudnn_fused_eval(blk: nn.Module, dtype: torch.dtype, channels_last: bool):
    """The anchors' cuDNN baseline: BN folded, every conv but the last as cuDNN's fused
    conv+bias+ReLU, the last as conv+bias+shortcut+ReLU (ATen cudnn_convolution_relu /
    cudnn_convolution_add_relu); a projection (folded bias included) runs as its own
    convolution. The D2L block (conv1, conv2; conv3 = projection) or torchvision's
    Bottleneck (conv1..conv3 with bn1..bn3; downsample = conv + BN). CUDA only."""
    mf = torch.channels_last if channels_last else torch.contiguous_format
    bottleneck = hasattr(blk, "bn3")
    main = ((blk.conv1, blk.bn1), (blk.conv2, blk.bn2)) + (
        ((blk.conv3, blk.bn3),) if bottleneck else ())
    if bottleneck:
        proj = (blk.downsample[0], blk.downsample[1]) if blk.downsample is not None else None
    else:
        proj = (blk.conv3, None) if blk.conv3 is not None else None
    stages = [(_folded(c, b, dtype, mf), c) for c, b in main]
    pw = _folded(proj[0], proj[1], dtype, mf) if proj is not None else None
    pc = proj[0] if proj is not None else None

    def geo(c):
        return c.stride, c.padding, c.dilation, c.groups

    def run(x):
        y = x
        for (w, b), c in stages[:-1]:
            y = torch.cudnn_convolution_relu(y, w, b, *geo(c))
        z = F.conv2d(x, pw[0], pw[1], pc.stride, pc.padding) if pw is not None else x
        (w, b), c = stages[-1]
        return torch.cudnn_convolution_add_relu(y, w, z, 1.0, b, *geo(c))
    return run


# ----------------------------------------------------------------------------- environment
def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def environment(device: torch.device) -> dict:
    env = {
        "device": device.type,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001 - triton is optional on CPU
        env["triton"] = f"unavailable ({type(e).__name__})"
    try:
        import resnet_fused
        env["package_version"] = getattr(resnet_fused, "__version__", "unknown")
    except Exception as e:  # noqa: BLE001
        env["package_version"] = f"import failed ({type(e).__name__}: {e})"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, sms=p.multi_processor_count,
                   mem_gib=round(p.total_memory / 2**30, 1),
                   capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(),
                   tf32_cudnn=bool(torch.backends.cudnn.allow_tf32))
    else:
        env.update(gpu="cpu", cpu_threads=torch.get_num_threads())
    return env


def measure_ceilings(device: torch.device) -> dict:
    """The card's bf16 matmul rate and device copy bandwidth (METHOD.md's two numbers),
    on random data, ~2 s of device time."""
    import triton.testing

    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=100, return_mode="median")
    tflops = 2 * n**3 / ms / 1e9
    del a, b
    src = torch.empty(2**29, device=device, dtype=torch.float32).uniform_()  # 2 GiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median")
    gbps = 2 * src.numel() * 4 / ms / 1e6  # bytes read + written
    del src, dst
    torch.cuda.empty_cache()
    return {"bf16_tflops": round(tflops, 1), "copy_gbps": round(gbps, 1)}


# ----------------------------------------------------------------------------- rows
# One schema for every row (Liger-Kernel style): the first columns identify the
# measurement, the p-columns hold it, the rest qualify it. Empty string where unused.
COLUMNS = [
    "section", "kernel", "provider", "mode", "metric", "unit", "x_name", "x_value",
    "p50", "p20", "p80",
    "dtype", "layout", "shape", "batch",
    "speedup_vs_eager", "speedup_vs_fp32", "speedup_vs_compile",
    "tflops", "of_peak", "floor_ms", "gbps", "of_bw", "img_s", "check_rel",
    "quantity", "plain", "status", "note",
    "device", "gpu", "peak_tflops", "torch", "triton", "package_version", "timestamp",
]


def dtype_name(dt: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
            torch.float64: "fp64"}[dt]


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16}


def fmt(v, digits=4) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        if v == 0 or (1e-3 <= abs(v) < 1e5):
            return f"{v:.{digits}g}"
        return f"{v:.3g}"
    return str(v)


# ----------------------------------------------------------------------------- op cases
def op_cases(ns, s: BlockShape, dtype: torch.dtype, cl: bool, device: torch.device):
    """[(op name, zero-argument callable, bytes moved or None, FLOPs or None)] for every op
    of resnet_fused/schemas.py in op namespace `ns` (torch.ops.<namespace>), on the
    tensors of block shape `s`: eval convolutions with BN folded, BN kernels on the conv
    output. Bytes count each tensor read or written once (the floor of any kernel)."""
    blk = make_block(s, seed=3).eval()
    w1, b1 = fold_conv_bn(blk.conv1, blk.bn1)
    w2, b2 = fold_conv_bn(blk.conv2, blk.bn2)
    w3 = None
    if blk.conv3 is not None:
        w3, b3 = fold_conv_bn(blk.conv3, None)
        b2 = b2 + b3  # the schema's K2 bias holds the projection's folded bias

    def prep(t):
        return to_layout(t, device, dtype, cl)

    g = torch.Generator().manual_seed(5)
    ho = s.hw_out
    elt = torch.finfo(dtype).bits // 8
    x = prep(torch.randn(s.batch, s.cin, s.hw, s.hw, generator=g))
    y = prep(torch.randn(s.batch, s.cout, ho, ho, generator=g).relu())
    c = prep(torch.randn(s.batch, s.cout, ho, ho, generator=g) * 2 + 0.5)
    res = prep(torch.randn(s.batch, s.cout, ho, ho, generator=g))
    gout = prep(torch.randn(s.batch, s.cout, ho, ho, generator=g))
    cf = c.float()
    mean = cf.mean((0, 2, 3))
    var = cf.var((0, 2, 3), unbiased=False)
    invstd = torch.rsqrt(var + 1e-5)
    wt = blk.bn1.weight.detach().float().to(device)
    bs = blk.bn1.bias.detach().float().to(device)
    rm, rv = torch.zeros_like(mean), torch.ones_like(mean)
    nbt = torch.zeros((), dtype=torch.long, device=device)
    numel = c.numel()
    count = s.batch * ho * ho
    sc = x if w3 is not None else y  # identity shortcut: a tensor shaped like y
    w1p, b1p = prep(w1), b1.to(device, dtype)
    w2p, b2p = prep(w2), b2.to(device, dtype)
    w3p = prep(w3) if w3 is not None else None
    masks = []

    def bn_act_backward():
        if not masks:  # the mask is bn_act's output; made on first use
            masks.append(ns.bn_act(c, mean, invstd, wt, bs, res)[1])
        return ns.bn_act_backward(gout, masks[0], c, mean, invstd, wt, True)
    return [
        ("channel_stats", lambda: ns.channel_stats(c), numel * elt, None),
        ("bn_finalize", lambda: ns.bn_finalize(mean, var, wt, bs, rm, rv, nbt, 0.1, 1e-5, count),
         None, None),
        ("bn_act", lambda: ns.bn_act(c, mean, invstd, wt, bs, res), 3 * numel * elt + numel // 8,
         None),
        ("bn_act_backward", bn_act_backward, 4 * numel * elt + numel // 8, None),
        ("conv_bias_relu", lambda: ns.conv_bias_relu(x, w1p, b1p, s.stride, 1), None,
         2.0 * numel * s.cin * 9),
        ("conv_bias_shortcut_relu",
         lambda: ns.conv_bias_shortcut_relu(y, w2p, b2p, sc, w3p, 1, s.stride, 0), None,
         2.0 * numel * (s.cout * 9 + (s.cin if w3 is not None else 0))),
    ]


def suite_config() -> dict:
    """What the pytest-benchmark suite runs on: CUDA, bf16 channels_last, the stage shapes;
    or, with BENCH_DEVICE=cpu (a dry run of the suite's code), tiny fp32 CPU shapes."""
    if os.environ.get("BENCH_DEVICE") == "cpu":
        return {"device": torch.device("cpu"), "dtype": torch.float32, "cl": False,
                "shapes": CPU_STAGES[:2]}
    return {"device": torch.device("cuda"), "dtype": torch.bfloat16, "cl": True,
            "shapes": GPU_STAGES}
