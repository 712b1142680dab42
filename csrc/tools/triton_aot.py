"""Ahead-of-time compilation of every Triton kernel of resnet_fused's triton backend for
a GPU target, with the real compiler and no GPU (nothing is launched). A developer tool
beside resource_report.py (the CUDA kernels' counterpart), not part of the package:
tests/test_triton_compile.py runs it.

Why: on CPU the kernels only ever run in Triton's interpreter, which checks none of the
compiler's rules (tl.dot shapes/dtypes, layouts, constexpr use, register and shared
memory budgets). Here the launchers run for real on CPU tensors with the kernel
launches intercepted, so every (kernel, signature, constexprs) the code can launch is
recorded exactly as the runtime would specialise it; each is then compiled for the
target (default sm_90, Hopper) through `triton.compile`, every autotune config that
the launcher's own pruning keeps included. Nothing here depends on the values of the
tensors: the launchers never read device data on the host (no host syncs), so the
uninitialised outputs of the skipped launches are harmless.

Needs TRITON_INTERPRET unset when the kernels are defined (the interpreter binds them
at definition and the interpreter configs differ), so run it as its own process:

    python csrc/tools/triton_aot.py            # representative variants
    python csrc/tools/triton_aot.py --full     # every variant the stages use
    python csrc/tools/triton_aot.py --quick    # the subset tests/test_triton_compile.py runs

Reported per compiled variant: registers per thread, spilled bytes (local memory per
thread: cuobjdump's STACK + LOCAL), shared memory (bytes, the kernel's dynamic
allocation, checked against the target's opt-in limit) and how tl.dot lowered
(wgmma = Hopper warpgroup MMA, mma = mma.sync, fma = no tensor cores).
Works with triton 3.6 (the GPU image) and 3.8 (the development venv).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # run from a checkout without `pip install -e .`

import torch  # noqa: E402
import triton  # noqa: E402

# Opt-in shared memory per block: 227 KiB on sm_90 (H100/H200), 163 KiB on sm_80.
SMEM_LIMIT = {90: 232448, 80: 166912, 89: 101376, 86: 101376}


@dataclasses.dataclass
class Launch:
    kernel: object           # the JITFunction
    args: tuple
    kwargs: dict             # constexprs and launch options (num_warps, num_stages, ...)
    label: str               # where it came from (scenario)


@dataclasses.dataclass
class Result:
    kernel: str
    label: str
    dtype: str
    constexprs: str
    options: str
    num_warps: int = 4
    tile_m: int = 0          # rows of the GEMM tile (BM, or BH*BW); 0 without a dot
    autotuned: bool = False  # one of several configs the autotuner measures
    regs: int = -1
    spill_bytes: int = -1
    shared: int = -1
    dot: str = "-"
    seconds: float = 0.0
    error: Optional[str] = None


def _require_compiled_mode():
    from resnet_fused.backends.triton import launcher
    if launcher.INTERPRET:
        raise RuntimeError("aot: the kernels were defined under TRITON_INTERPRET=1; run this "
                           "in a process without it (python csrc/tools/triton_aot.py)")


# =========================================================================== capture
@contextlib.contextmanager
def capture(label_ref: list):
    """Within the block, every kernel launch of the backend is recorded, not run.
    label_ref[0] is the label attached to launches recorded from then on."""
    from resnet_fused.backends.triton import bn, conv, conv_bwd, gate

    launches: list[Launch] = []

    def launch(kernel, grid, *args, **kwargs):
        launches.append(Launch(kernel, args, kwargs, label_ref[0]))

    # Every launcher calls launcher.launch through its own module's name for it (train.py
    # launches only through bn, conv, conv_bwd and gate).
    mods = (bn, conv, conv_bwd, gate)
    saved = [(mod, mod.launch) for mod in mods]
    for mod in mods:
        mod.launch = launch
    try:
        yield launches
    finally:
        for mod, value in saved:
            mod.launch = value


# Stage shapes of ResNet-18 (input channels, output channels, input size, stride). The
# batch only changes runtime integers and the M-based config pruning (which keeps every
# config once M >= 256), so a batch of 16 stands for 128 without touching more memory
# (and M stays a multiple of 16 at every stage, as at batch 128).
STAGES = [(64, 64, 56, 1), (64, 128, 56, 2), (128, 128, 28, 1), (128, 256, 28, 2),
          (256, 256, 14, 1), (256, 512, 14, 2), (512, 512, 7, 1)]
BATCH = 16

# Shortcut kinds: identity; D2L 1x1 projection (bias, no BN); D2L copies with a 3x3
# projection; torchvision (no conv bias, BN'd 1x1 projection).
KINDS = ("identity", "1x1", "3x3", "bn")


def _t(shape, dtype, cl=True):
    t = torch.empty(shape, dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last) if cl and len(shape) == 4 else t


def _block_launches(cin, k, hw, stride, kind, dt, pdt, frozen=False):
    """Eval (K1, K2) and the fused training forward and backward of one block."""
    from resnet_fused.backends.triton import eval_ops, train

    bias = kind != "bn"
    x = _t((BATCH, cin, hw, hw), dt)
    w1, w2 = _t((k, cin, 3, 3), dt), _t((k, k, 3, 3), dt)
    b1, b2 = (_t((k,), dt), _t((k,), dt)) if bias else (None, None)
    w3 = b3 = g3 = beta3 = None
    pad3 = 0
    if kind != "identity":
        r3 = 3 if kind == "3x3" else 1
        pad3 = r3 // 2
        w3 = _t((k, cin, r3, r3), dt)
        b3 = _t((k,), dt) if bias else None
        if kind == "bn":
            g3, beta3 = torch.ones(k, dtype=pdt), torch.zeros(k, dtype=pdt)
    g1, beta1 = torch.ones(k, dtype=pdt), torch.zeros(k, dtype=pdt)
    g2, beta2 = torch.ones(k, dtype=pdt), torch.zeros(k, dtype=pdt)

    # Eval: folded weights and biases in the activation dtype (fold.py).
    fb = _t((k,), dt)
    y1 = eval_ops.conv_bias_relu(x, w1, fb, stride, 1)
    eval_ops.conv_bias_shortcut_relu(y1, w2, fb, x, w3, 1, stride, pad3)

    _train_launches(x, [w1, w2], [b1, b2], [stride, 1], w3, b3, g3, beta3, pdt, frozen)


def _channel_gated_train_launches(x, w, b, strides, w_sc, b_sc, g_sc, beta_sc, pdt, sc_pool=0):
    """A channel-gated block's training (train_gated.py): block_branch (the last conv's
    pool sums beside its statistics), gate_join_train and both backwards; sc_pool:
    ResNet-D's pooled shortcut."""
    from resnet_fused.backends.triton import train_gated as tg

    g = [torch.ones(wi.shape[0], dtype=pdt) for wi in w]
    beta = [torch.zeros(wi.shape[0], dtype=pdt) for wi in w]
    eps = [1e-5] * len(w)
    c_last, pooled, c, stats = tg._block_branch(x, w, b, g, beta, strides, eps)
    gate = torch.empty((x.shape[0], c_last.shape[1], 1, 1), dtype=x.dtype)
    s_sc = math.prod(strides)
    out, mask, c_sc, st_sc = tg._gate_join_train(c_last, stats[-1], g[-1], beta[-1], 1e-5, gate,
                                                 x, w_sc, b_sc, g_sc, beta_sc, 1e-5, s_sc,
                                                 sc_pool)
    tg._gate_join_train_backward(_t(tuple(out.shape), x.dtype), mask, c_last, stats[-1], g[-1],
                                 beta[-1], 1e-5, gate, x, w_sc, g_sc, c_sc, st_sc,
                                 b_sc is not None, s_sc, 1e-5, sc_pool)
    tg._block_branch_backward(_t(tuple(c_last.shape), x.dtype), pooled, x, c, c_last, stats,
                              w, g, beta, [t is not None for t in b], strides, eps)


def _gated_launches(cin, k, hw, stride, kind, dt, pdt):
    """The eval of a gated last stage (eval_ops.py): the branch conv with its pooled
    sums (conv_bias_pool), then the join relu(g * branch + shortcut), in the projection
    GEMM's epilogue (kind "1x1") or one elementwise pass (identity); and the training
    block with a sample gate (block_train's `gate`) and with a channel gate
    (train_gated.py) for each shortcut kind."""
    from resnet_fused.backends.triton import eval_ops

    x = _t((BATCH, cin, hw, hw), dt)
    p = (hw - 1) // stride + 1
    y1, w2, fb = _t((BATCH, k, p, p), dt), _t((k, k, 3, 3), dt), _t((k,), dt)
    branch, _ = eval_ops.conv_bias_pool(y1, w2, fb, 1, 1)
    gate = torch.empty((BATCH, k, 1, 1), dtype=dt)
    if kind == "identity":
        eval_ops.gate_shortcut_relu(branch, gate, x, None, None, 1, 0)
    else:
        eval_ops.gate_shortcut_relu(branch, gate, x, _t((k, cin, 1, 1), dt), _t((k,), dt),
                                    stride, 0)
    w = [_t((k, cin, 3, 3), dt), _t((k, k, 3, 3), dt)]
    sample = torch.empty((BATCH, 1, 1, 1), dtype=dt)
    if kind == "identity":
        _train_launches(x, w, [None, None], [stride, 1], None, None, None, None, pdt,
                        gate=sample)
        _channel_gated_train_launches(x, w, [None, None], [stride, 1], None, None, None, None,
                                      pdt)
        return
    w_sc, ones, zeros = _t((k, cin, 1, 1), dt), torch.ones(k, dtype=pdt), torch.zeros(k, dtype=pdt)
    # D2L projection (the join in the projection GEMM's epilogue), then a BN'd one.
    _train_launches(x, w, [_t((k,), dt)] * 2, [stride, 1], w_sc, _t((k,), dt), None, None,
                    pdt, gate=sample)
    _train_launches(x, w, [None, None], [stride, 1], w_sc, None, ones, zeros, pdt,
                    gate=sample)
    _channel_gated_train_launches(x, w, [_t((k,), dt)] * 2, [stride, 1], w_sc, _t((k,), dt),
                                  None, None, pdt)
    _channel_gated_train_launches(x, w, [None, None], [stride, 1], w_sc, None, ones, zeros,
                                  pdt)


def _train_launches(x, w, b, strides, w_sc, b_sc, g_sc, beta_sc, pdt, frozen=False, sc_pool=0,
                    gate=None):
    """The fused training forward and backward of one chain of stages (train.py);
    frozen: every BN on its running statistics (block_train's `running`); sc_pool:
    ResNet-D's pooled shortcut (block_train's sc_pool); gate: a sample gate
    (block_train's `gate`)."""
    from resnet_fused.backends.triton import train

    g = [torch.ones(wi.shape[0], dtype=pdt) for wi in w]
    beta = [torch.zeros(wi.shape[0], dtype=pdt) for wi in w]
    eps = [1e-5] * len(w)
    running = None
    if frozen:
        ks = [wi.shape[0] for wi in w] + ([w_sc.shape[0]] if g_sc is not None else [])
        running = [torch.ones((2, k), dtype=torch.float32) for k in ks]
    out, c, c_sc, mask, stats = train._block_train(x, w, b, g, beta, strides, eps, w_sc,
                                                   b_sc, g_sc, beta_sc, 1e-5, "", running,
                                                   sc_pool, gate)
    train._block_train_backward(_t(tuple(out.shape), x.dtype), x, c, c_sc, mask, stats, w, g,
                                beta, w_sc, g_sc, [t is not None for t in b],
                                b_sc is not None, strides, eps, 1e-5, "", frozen, sc_pool,
                                gate)


# ResNet-50 bottleneck blocks (input channels, width, input size, stride): layer1's
# first (projection, stride 1) and later (identity) blocks, layer2's first (stride 2).
BOTTLENECKS = [(64, 64, 56, 1), (256, 64, 56, 1), (256, 128, 56, 2)]


def _bottleneck_launches(cin, width, hw, stride, v1, dt, pdt, frozen=False):
    """The fused training op on a torchvision bottleneck (no conv biases, BN'd 1x1
    projection when the shape changes); v1: the stride on the first 1x1."""
    out = 4 * width
    x = _t((BATCH, cin, hw, hw), dt)
    w = [_t((width, cin, 1, 1), dt), _t((width, width, 3, 3), dt), _t((out, width, 1, 1), dt)]
    strides = [stride, 1, 1] if v1 else [1, stride, 1]
    proj = cin != out or stride != 1
    w_sc = _t((out, cin, 1, 1), dt) if proj else None
    g_sc, beta_sc = ((torch.ones(out, dtype=pdt), torch.zeros(out, dtype=pdt)) if proj
                     else (None, None))
    _train_launches(x, w, [None] * 3, strides, w_sc, None, g_sc, beta_sc, pdt, frozen)


# ResNet-D downsampling blocks (input channels, width, input size): resnet18d's layer2
# (basic, 64->128) and resnet50d's layer2 (bottleneck, 256->128->512), stride 2, the
# shortcut AvgPool2d(2, 2, ceil_mode=True) -> 1x1 -> BN; "d2l": the basic block with
# conv biases and a pooled projection without BN (the join in the pooled GEMM's
# epilogue).
AVG_DOWN = [("basic", 64, 128, 56), ("bottleneck", 256, 128, 56), ("d2l", 64, 128, 56)]


def _avg_down_chain(kind, cin, width, hw, dt):
    """A ResNet-D downsampling block's operands (stride 2): x, the stages' weights and
    strides, the output channels, the output size and the pooled shortcut's 1x1 weight."""
    x = _t((BATCH, cin, hw, hw), dt)
    if kind == "bottleneck":
        out = 4 * width
        w = [_t((width, cin, 1, 1), dt), _t((width, width, 3, 3), dt), _t((out, width, 1, 1), dt)]
        strides = [1, 2, 1]
    else:
        out = width
        w = [_t((out, cin, 3, 3), dt), _t((out, out, 3, 3), dt)]
        strides = [2, 1]
    return x, w, strides, out, (hw + 1) // 2, _t((out, cin, 1, 1), dt)


def _avg_down_launches(kind, cin, width, hw, dt, pdt, frozen=False):
    """The pooled shortcut's variants: the eval join (conv_bias_pool_shortcut_relu: the
    pooled second GEMM), the fused training forward (the pooled GEMM with its BN
    statistics) and backward (pooled wgrad; pooled dgrad as the basic block's second
    GEMM, as the bottleneck's own launch)."""
    from resnet_fused.backends.triton import eval_ops

    x, w, strides, out, p, w_sc = _avg_down_chain(kind, cin, width, hw, dt)
    if not frozen and kind != "d2l":
        y = _t((BATCH, w[-1].shape[1], p, p), dt)
        eval_ops.conv_bias_pool_shortcut_relu(y, w[-1], _t((out,), dt), x, w_sc,
                                              w[-1].shape[2] // 2, 2, 2, True)
    if kind == "d2l":
        _train_launches(x, w, [_t((out,), dt)] * 2, strides, w_sc, _t((out,), dt), None,
                        None, pdt, frozen, sc_pool=2)
        return
    _train_launches(x, w, [None] * len(w), strides, w_sc, None, torch.ones(out, dtype=pdt),
                    torch.zeros(out, dtype=pdt), pdt, frozen, sc_pool=2)


def _gated_avg_down_launches(kind, cin, width, hw, dt, pdt):
    """A gated block beside the pooled shortcut (ecaresnet*d, SE + avg_down): the eval
    join gate_pool_shortcut_relu (the pooled GEMM with the gated epilogue), the training
    block with a sample gate (block_train's sc_pool and gate) and with a channel gate
    (train_gated.py's gate_join_train with sc_pool)."""
    from resnet_fused.backends.triton import eval_ops

    x, w, strides, out, p, w_sc = _avg_down_chain(kind, cin, width, hw, dt)
    sample = torch.empty((BATCH, 1, 1, 1), dtype=dt)
    if kind == "d2l":
        b, b_sc, g_sc, beta_sc = [_t((out,), dt)] * 2, _t((out,), dt), None, None
    else:
        b, b_sc = [None] * len(w), None
        g_sc, beta_sc = torch.ones(out, dtype=pdt), torch.zeros(out, dtype=pdt)
        eval_ops.gate_pool_shortcut_relu(_t((BATCH, out, p, p), dt),
                                         torch.empty((BATCH, out, 1, 1), dtype=dt), x, w_sc,
                                         _t((out,), dt), 2, 2, True)
    _train_launches(x, w, b, strides, w_sc, b_sc, g_sc, beta_sc, pdt, sc_pool=2, gate=sample)
    _channel_gated_train_launches(x, w, b, strides, w_sc, b_sc, g_sc, beta_sc, pdt, sc_pool=2)


def _tma_launches(cin, k, hw, stride, kind, dt):
    """The descriptor (TMA) path where it is legal: stride-1 convolutions without a
    prologue or stats (K1 of stride-1 blocks, every K2)."""
    from resnet_fused.backends.triton.conv import (Epilogue, ResidualAdd, SecondGemm,
                                                   _input_precision, conv2d_nhwc)

    if dt == torch.float32 and _input_precision(dt) == "ieee":
        return    # automatic selection never takes the descriptor path for IEEE fp32
    x = _t((BATCH, cin, hw, hw), dt)
    p = (hw - 1) // stride + 1
    y1 = _t((BATCH, k, p, p), dt)
    w1, w2, b = _t((k, cin, 3, 3), dt), _t((k, k, 3, 3), dt), _t((k,), dt)
    epi = Epilogue(b, relu=True)
    if stride == 1:
        conv2d_nhwc(x, w1, 1, 1, epilogue=epi, _path="tma")
    if kind == "identity":
        conv2d_nhwc(y1, w2, 1, 1, residual=ResidualAdd(x), epilogue=epi, _path="tma")
    elif kind in ("1x1", "3x3"):
        r3 = 3 if kind == "3x3" else 1
        w3 = _t((k, cin, r3, r3), dt)
        conv2d_nhwc(y1, w2, 1, 1, second=SecondGemm(x, w3, stride, r3 // 2), epilogue=epi,
                    _path="tma")
        # The training block's fused final pass of a stride-1 D2L projection (taken
        # with RESNET_FUSED_TRITON_TMA=1): BN'd residual, ReLU and mask in the epilogue.
        xs = _t((BATCH, cin, p, p), dt)
        conv2d_nhwc(xs, w3, 1, r3 // 2,
                    residual=ResidualAdd(y1, torch.ones(k), torch.zeros(k)),
                    epilogue=Epilogue(b, relu=True, mask=True), _path="tma")


def _bn_op_launches(k, hw, dt, pdt, cl):
    """The standalone BN ops (channel_stats, bn_finalize, bn_act, bn_act_backward) in
    NCHW or channels_last: a unit stride is specialised, so each layout is a variant."""
    from resnet_fused.backends.triton import bn

    c = _t((BATCH, k, hw, hw), dt, cl)
    mean, var = bn._channel_stats(c)
    w, b = torch.ones(k, dtype=pdt), torch.zeros(k, dtype=pdt)
    rm, rv = torch.zeros(k, dtype=pdt), torch.ones(k, dtype=pdt)
    invstd, _, _ = bn._bn_finalize(mean, var, w, b, rm, rv, torch.zeros((), dtype=torch.int64),
                                   0.1, 1e-5, BATCH * hw * hw)
    for res in (None, torch.empty_like(c)):
        out, mask = bn._bn_act(c, mean, invstd, w, b, res)
        bn._bn_act_backward(torch.empty_like(c), mask, c, mean, invstd, w, res is not None)


def _precisions(full: bool):
    """(label, activation dtype, fp32 conv precision) cases; fp32 TF32 and IEEE differ in
    the kernels' INPUT_PRECISION constexpr."""
    cases = [("fp16", torch.float16, None), ("bf16", torch.bfloat16, None),
             ("fp32-tf32", torch.float32, "tf32")]
    if full:
        cases.append(("fp32-ieee", torch.float32, "ieee"))
    return cases


@contextlib.contextmanager
def _fp32_precision(prec: Optional[str]):
    conv_b = getattr(torch.backends.cudnn, "conv", None)
    if prec is None or conv_b is None or not hasattr(conv_b, "fp32_precision"):
        yield
        return
    old = conv_b.fp32_precision
    conv_b.fp32_precision = prec
    try:
        yield
    finally:
        conv_b.fp32_precision = old


def collect(full: bool = False) -> list:
    """Every launch of the scenarios, as recorded (autotuned kernels not yet expanded).

    full: every ResNet-18 stage, shortcut kind, precision (fp32 TF32 and IEEE too) and
    BN parameter dtype. Otherwise: a stride-2 block of each projection kind and a
    64-channel 56x56 identity block (whose statistics need the two-pass combine), in
    fp16, bf16 and fp32-TF32, with fp32 BN parameters."""
    _require_compiled_mode()
    label = [""]
    stages = STAGES if full else [(64, 128, 56, 2), (64, 64, 56, 1)]
    with capture(label) as launches:
        for plabel, dt, prec in _precisions(full):
            with _fp32_precision(prec):
                pdts = [torch.float32] + ([dt] if full and dt != torch.float32 else [])
                for cin, k, hw, stride in stages:
                    for kind in KINDS:
                        if (kind == "identity") != (cin == k and stride == 1):
                            continue
                        for pdt in pdts:
                            label[0] = f"{plabel} {kind} {cin}->{k}@{hw}/{stride}"
                            _block_launches(cin, k, hw, stride, kind, dt, pdt)
                        label[0] = f"{plabel} tma {kind} {cin}->{k}@{hw}/{stride}"
                        _tma_launches(cin, k, hw, stride, kind, dt)
                for cin, width, hw, stride in BOTTLENECKS:
                    for v1 in ((False, True) if stride != 1 else (False,)):
                        label[0] = (f"{plabel} bottleneck{' v1' if v1 else ''} "
                                    f"{cin}->{width}->{4 * width}@{hw}/{stride}")
                        _bottleneck_launches(cin, width, hw, stride, v1, dt, torch.float32)
                for kind, cin, width, hw in AVG_DOWN:
                    label[0] = f"{plabel} avgdown {kind} {cin}->{width}@{hw}/2"
                    _avg_down_launches(kind, cin, width, hw, dt, torch.float32)
                # Frozen BN (every BN on its running statistics): after the others, so
                # the variants only it launches keep its label (--filter frozen).
                for cin, k, hw, stride in stages:
                    for kind in KINDS:
                        if (kind == "identity") != (cin == k and stride == 1):
                            continue
                        label[0] = f"{plabel} frozen {kind} {cin}->{k}@{hw}/{stride}"
                        _block_launches(cin, k, hw, stride, kind, dt, torch.float32, True)
                for cin, width, hw, stride in BOTTLENECKS:
                    label[0] = (f"{plabel} frozen bottleneck "
                                f"{cin}->{width}->{4 * width}@{hw}/{stride}")
                    _bottleneck_launches(cin, width, hw, stride, False, dt, torch.float32, True)
                for kind, cin, width, hw in AVG_DOWN:
                    label[0] = f"{plabel} frozen avgdown {kind} {cin}->{width}@{hw}/2"
                    _avg_down_launches(kind, cin, width, hw, dt, torch.float32, True)
                # Gated eval (SE / ECA / drop path): after the others, so its variants
                # keep its label (--filter gated).
                for cin, k, hw, stride in stages:
                    kind = "identity" if cin == k and stride == 1 else "1x1"
                    label[0] = f"{plabel} gated {kind} {cin}->{k}@{hw}/{stride}"
                    _gated_launches(cin, k, hw, stride, kind, dt, torch.float32)
                # Gated beside the pooled shortcut: after the others (--filter "gated
                # avgdown").
                for kind, cin, width, hw in AVG_DOWN:
                    label[0] = f"{plabel} gated avgdown {kind} {cin}->{width}@{hw}/2"
                    _gated_avg_down_launches(kind, cin, width, hw, dt, torch.float32)
                if prec != "ieee":
                    for pdt in pdts:
                        for cl in (False, True):
                            label[0] = f"{plabel} bn ops {'NHWC' if cl else 'NCHW'}"
                            _bn_op_launches(64, 56, dt, pdt, cl)
    return launches


# =========================================================================== compile
@dataclasses.dataclass
class Job:
    fn: object               # JITFunction
    args: tuple
    kwargs: dict
    label: str
    autotuned: bool = False


def _configs_of(kernel, args, kwargs):
    """(JITFunction, [kwargs per config]): an Autotuner expands into every config its
    early pruning keeps for these arguments, as a launch would benchmark them all."""
    from triton.runtime.autotuner import Autotuner

    if not isinstance(kernel, Autotuner):
        return kernel, [dict(kwargs)]
    configs = kernel.configs
    prune = getattr(kernel, "early_config_prune", None)
    if prune:
        nargs = dict(zip(kernel.arg_names, args))
        configs = prune(configs, nargs, **kwargs)
    out = []
    for cfg in configs:
        kw = dict(kwargs)
        kw.update(cfg.all_kwargs() if hasattr(cfg, "all_kwargs") else
                  dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        out.append(kw)
    return kernel.fn, out


def _first_only(kernel, args, kwargs):
    fn, kws = _configs_of(kernel, args, kwargs)
    return fn, kws[:1]


def _specialise(fn, backend, args, kwargs):
    """(signature, constexprs, attrs, options) exactly as JITFunction.run derives them."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    return fn._pack_args(backend, kwargs, bound, spec, opts)


def jobs_of(launches, all_configs: bool = True) -> list:
    """Deduplicated compile jobs (same kernel, signature, constexprs, attrs, options)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", 90, 32))
    seen = {}
    for ln in launches:
        fn, kws = (_configs_of if all_configs else _first_only)(ln.kernel, ln.args, ln.kwargs)
        autotuned = fn is not ln.kernel
        for kw in kws:
            options, sig, constexprs, attrs = _specialise(fn, backend, ln.args, kw)
            key = (fn.__module__, fn.__name__, repr(sorted(sig.items())), repr(sorted(constexprs.items())),
                   repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
            if key not in seen:
                seen[key] = Job(fn, ln.args, kw, ln.label, autotuned)
    return list(seen.values())


def representative_jobs() -> list:
    """The default test's subset (about 55 compiles): every kernel and constexpr variant
    of the fp16 scenarios but the 3x3 projection, with the first config autotuning
    keeps; the bf16 and fp32-TF32 forward convolutions with the prologue and with the
    projection GEMM; and the fp32 prologue convolution in the config with the largest
    tiles (the one closest to the shared-memory limit)."""
    launches = collect(full=False)
    # The pooled shortcut's (avgdown): its basic and bottleneck blocks in training and
    # eval; the frozen and bias-only variants differ from them only in the epilogue.
    fp16 = [ln for ln in launches if ln.label.startswith("fp16 ") and " 3x3 " not in ln.label
            and "frozen avgdown" not in ln.label and "avgdown d2l" not in ln.label]
    conv_other = [ln for ln in launches
                  if ln.label.split(" ")[0] in ("bf16", "fp32-tf32")
                  and ln.label.endswith("bn 64->128@56/2")
                  and getattr(ln.kernel, "fn", None) is not None
                  and ln.kernel.fn.__name__ == "_conv_kernel"
                  and (ln.kwargs.get("HAS_PRO") or ln.kwargs.get("HAS_X2"))]
    jobs = jobs_of(fp16 + conv_other, all_configs=False)
    pro = [ln for ln in conv_other if ln.label.startswith("fp32") and ln.kwargs.get("HAS_PRO")]
    big = jobs_of(pro, all_configs=True)
    if big:
        jobs.append(max(big, key=lambda j: (j.kwargs["BM"] * j.kwargs["BK"] + j.kwargs["BK"]
                                            * j.kwargs["BN"]) * j.kwargs.get("num_stages", 3)))
    return jobs


def _bin_tool(name: str) -> str:
    import triton.backends.nvidia as nv
    return os.path.join(os.path.dirname(nv.__file__), "bin", name)


def _resource_usage(cubin: bytes, name: str):
    """(registers, stack + local bytes per thread, static shared bytes) of the cubin's
    function, via cuobjdump. Register spills land in the stack frame (ptxas -v's
    "bytes stack frame"), so STACK + LOCAL is the spill measure (Triton kernels have
    no local arrays or calls that would need a stack otherwise)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_bin_tool("cuobjdump"), "--dump-resource-usage", f.name],
                             check=True, capture_output=True, text=True).stdout
    m = re.search(r"Function " + re.escape(name) + r":\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) "
                  r"LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"aot: no resource usage for {name} in:\n{out}")
    return int(m.group(1)), int(m.group(2)) + int(m.group(4)), int(m.group(3))


def _dot_kind(asm: dict) -> str:
    ttgir = asm.get("ttgir", "")
    if "tt.dot" not in ttgir and "warp_group_dot" not in ttgir:
        return "-"
    ptx = asm.get("ptx", "")
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma"
    return "fma"


def _short_constexprs(fn, kw) -> str:
    names = [p.name for p in fn.params if p.is_constexpr]
    parts = []
    for n in names:
        if n in kw and n not in ("BM", "BN", "BK", "GROUP_M", "BH", "BW"):
            v = kw[n]
            if v is False:
                continue
            parts.append(n if v is True else f"{n}={v}")
    return " ".join(parts)


def _tile(kw) -> str:
    t = "x".join(str(kw[k]) for k in ("BH", "BW", "BM", "BN", "BK") if k in kw)
    return f"{t} w{kw.get('num_warps', 4)} s{kw.get('num_stages', 3)}"


def _dtype_of(job) -> str:
    for a in job.args:
        if isinstance(a, torch.Tensor) and a.dim() == 4:
            return str(a.dtype).replace("torch.", "")
    return "-"


def compile_job(job: Job, arch: int = 90) -> Result:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    res = Result(job.fn.__name__, job.label, _dtype_of(job),
                 _short_constexprs(job.fn, job.kwargs), _tile(job.kwargs),
                 num_warps=job.kwargs.get("num_warps", 4),
                 tile_m=job.kwargs.get("BM", job.kwargs.get("BH", 0) * job.kwargs.get("BW", 0)),
                 autotuned=job.autotuned)
    t0 = time.perf_counter()
    try:
        options, sig, constexprs, attrs = _specialise(job.fn, backend, job.args, job.kwargs)
        ck = triton.compile(ASTSource(job.fn, sig, constexprs, attrs), target=target,
                            options=options.__dict__)
        res.regs, res.spill_bytes, static_smem = _resource_usage(ck.asm["cubin"], ck.name
                                                                 if hasattr(ck, "name")
                                                                 else job.fn.__name__)
        res.shared = int(ck.metadata.shared) + static_smem
        res.dot = _dot_kind(ck.asm)
    except Exception as e:  # noqa: BLE001  (reported per variant)
        res.error = f"{type(e).__name__}: {e}"
    res.seconds = time.perf_counter() - t0
    return res


def needs_wgmma(res: Result) -> bool:
    """Whether a Hopper GEMM of this variant should lower to wgmma: a tl.dot kernel with
    16-bit or TF32 inputs, at least one warpgroup (4 warps) and a 64-row tile (smaller
    configs legitimately use mma.sync; fp32 with IEEE precision has no tensor-core
    instruction)."""
    ieee32 = res.dtype == "float32" and "=ieee" in res.constexprs
    return res.dot != "-" and not ieee32 and res.num_warps >= 4 and res.tile_m >= 64


# Spills tolerated in an autotune candidate (the autotuner measures it against the
# others; a few bytes can still win). Fixed-config kernels must not spill at all.
AUTOTUNED_SPILL_OK = 64


def check(res: Result, arch: int = 90) -> list:
    """What is wrong with a compiled variant: a compile error, shared memory over the
    target's limit (the launch would fail), register spills (any in a fixed-config
    kernel, more than AUTOTUNED_SPILL_OK bytes in an autotune candidate), or a GEMM that
    should be on Hopper's warpgroup tensor cores and is not."""
    bad = []
    if res.error:
        return [res.error]
    if res.shared > SMEM_LIMIT.get(arch, 232448):
        bad.append(f"shared memory {res.shared} B > {SMEM_LIMIT.get(arch)} B")
    if res.spill_bytes > (AUTOTUNED_SPILL_OK if res.autotuned else 0):
        bad.append(f"spills {res.spill_bytes} B/thread")
    if arch >= 90 and needs_wgmma(res) and res.dot != "wgmma":
        bad.append(f"tl.dot lowered to {res.dot}, not wgmma")
    return bad


def _compile_all(jobs, arch, workers):
    if workers <= 1:
        return [compile_job(j, arch) for j in jobs]
    import multiprocessing as mp
    global _JOBS
    _JOBS = jobs
    with mp.get_context("fork").Pool(workers) as pool:
        return pool.starmap(_compile_index, [(i, arch) for i in range(len(jobs))])


_JOBS: list = []


def _compile_index(i, arch):
    return compile_job(_JOBS[i], arch)


def format_table(results) -> str:
    head = ("kernel", "dtype", "constexprs", "tile", "regs", "spill", "smem", "dot", "s", "first seen in")
    rows = [head]
    for r in results:
        rows.append((r.kernel, r.dtype, r.constexprs, r.options,
                     str(r.regs) if not r.error else "ERR", str(r.spill_bytes),
                     str(r.shared), r.dot, f"{r.seconds:.1f}", r.label))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
                     for row in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="every stage, kind, dtype and config")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--jobs", type=int, default=1, help="compile processes")
    ap.add_argument("--first-config", action="store_true",
                    help="only the first config autotuning keeps (faster)")
    ap.add_argument("--filter", default="", help="only kernels whose name (or scenario "
                    "label: 'frozen') contains this")
    ap.add_argument("--quick", action="store_true",
                    help="the representative subset the default test compiles")
    ap.add_argument("--json", default="", help="also write the results here")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    if a.quick:
        jobs = representative_jobs()
    else:
        jobs = jobs_of(collect(a.full), all_configs=not a.first_config)
    jobs = [j for j in jobs if a.filter in j.fn.__name__ or a.filter in j.label]
    print(f"triton {triton.__version__}, torch {torch.__version__}, sm_{a.arch}: "
          f"{len(jobs)} variants", flush=True)
    results = _compile_all(jobs, a.arch, a.jobs)
    print(format_table(results))
    failed = [(r, check(r, a.arch)) for r in results]
    failed = [(r, p) for r, p in failed if p]
    for r, p in failed:
        print(f"PROBLEM {r.kernel} [{r.dtype} {r.constexprs} {r.options}] ({r.label}): "
              + "; ".join(p))
    if a.json:
        import json
        with open(a.json, "w") as f:
            json.dump({"triton": triton.__version__, "arch": a.arch,
                       "results": [dict(dataclasses.asdict(r), module=j.fn.__module__,
                                        problems=check(r, a.arch))
                                   for r, j in zip(results, jobs)]}, f, indent=1)
    print(f"{len(results)} variants, {len(failed)} with problems, "
          f"{time.perf_counter() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
