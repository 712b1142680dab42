"""Child process of tests/test_triton_trace.py (its `report` fixture).

Traces the Triton backend's GPU ops (triton_ops: TRITON_INTERPRET must be unset) with
AOTAutograd on fake CUDA tensors, as torch.compile does, and prints a JSON report:
per traced graph, the kernels of its triton_kernel_wrapper_functional nodes, the
arguments each clones (the ones torch's analysis of the kernel found written), the
resnet_fused_triton ops left undecomposed, and the warnings of torch's kernel wrapper.
No GPU is needed: tracing only generates Triton IR, for which the Triton driver is
given an sm_90 target here (a stub: nothing is launched).
"""
import json
import logging
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402


class _Sm90:
    """Just enough of a Triton driver for torch's kernel analysis (TTIR only)."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0


triton.runtime.driver.set_active(_Sm90())

from functorch.compile import aot_function, make_boxed_func  # noqa: E402
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

import resnet_fused.backends.triton  # noqa: E402,F401  (defines the ops)

warnings = []


class _Collect(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.WARNING:
            warnings.append(record.getMessage().splitlines()[0])



OPS = torch.ops.resnet_fused_triton
CL = torch.channels_last
report = {}


def _summary(gm):
    kernels, left = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
            k = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            name = getattr(getattr(k, "fn", k), "__name__", str(k))
            kernels.append([name, sorted(node.kwargs["tensors_to_clone"])])
        elif "resnet_fused_triton" in str(node.target):
            left.append(str(node.target))
    return {"kernels": kernels, "undecomposed": left}


def trace(label, fn, *args):
    """The forward graph of fn (no gradients: a backward on fake CUDA tensors would need
    a CUDA device; the training backward op is traced as a function of its own)."""
    graphs = []

    def compiler(gm, _):
        graphs.append(_summary(gm))
        return make_boxed_func(gm)

    # torch's kernel wrapper logs as torch._dynamo. Attached here: torch's logging
    # setup, done lazily, may reset the handlers.
    logger = logging.getLogger("torch._dynamo")
    if not any(isinstance(h, _Collect) for h in logger.handlers):
        logger.addHandler(_Collect())
    aot_function(fn, fw_compiler=compiler)(*args)
    report[label] = graphs[0]


def fake(mode, *shape, cl=True, dtype=torch.float16):
    t = torch.empty(shape, device="cuda", dtype=dtype)
    if cl and len(shape) == 4:
        t = t.contiguous(memory_format=CL)
    return t


with FakeTensorMode() as mode:
    x = fake(mode, 2, 16, 8, 8)
    w, b = fake(mode, 16, 16, 3, 3), fake(mode, 16)
    trace("eval identity", lambda x, w, b: OPS.conv_bias_shortcut_relu(
        OPS.conv_bias_relu(x, w, b, 1, 1), w, b, x, None, 1, 1, 0), x, w, b)
    w3 = fake(mode, 16, 8, 1, 1)
    xp = fake(mode, 2, 8, 16, 16)
    w1p = fake(mode, 16, 8, 3, 3)
    trace("eval projection", lambda x, w1, w2, w3, b: OPS.conv_bias_shortcut_relu(
        OPS.conv_bias_relu(x, w1, b, 2, 1), w2, b, x, w3, 1, 2, 0), xp, w1p, w, w3, b)

    # A gated last stage in eval (README.md, Design, "Gates and pooled shortcuts"): the
    # branch with its pool sums, a gate on (N, C, 1, 1), the gated join (the projection
    # GEMM's epilogue, or the elementwise pass).
    def gated(x, w, b, w3, b3, stride):
        branch, pooled = OPS.conv_bias_pool(x, w, b, 1, 1)
        gate = pooled.view(pooled.shape[0], -1, 1, 1).sigmoid()
        return OPS.gate_shortcut_relu(branch, gate, x if w3 is None else xp, w3, b3, stride, 0)

    trace("gated eval identity", lambda x, w, b: gated(x, w, b, None, None, 1), x, w, b)
    trace("gated eval projection", lambda x, w, b, w3: gated(x, w, b, w3, b, 2), x, w, b, w3)

    # The training block: basic (identity, D2L 1x1 projection, BN'd projection) and
    # bottleneck (BN'd projection, v1.5 stride on the 3x3) chains of stages.
    for label, ks, strides, proj, bn3 in (
            ("train identity", (3, 3), (1, 1), False, False),
            ("train 1x1", (3, 3), (2, 1), True, False),
            ("train bn", (3, 3), (2, 1), True, True),
            ("train bottleneck", (1, 3, 1), (1, 2, 1), True, True)):
        cin = 8 if proj else 16
        N, K = 2, 16
        widths = [K] * len(ks)
        xt = fake(mode, N, cin, 8, 8)
        w, chans = [], cin
        for k, kout in zip(ks, widths):
            w.append(fake(mode, kout, chans, k, k))
            chans = kout
        g = [fake(mode, kout, dtype=torch.float32) for kout in widths]
        beta = [fake(mode, kout, dtype=torch.float32) for kout in widths]
        bias = [fake(mode, kout) for kout in widths]
        w3 = fake(mode, K, cin, 1, 1) if proj else None
        b3 = fake(mode, K) if proj and not bn3 else None
        g3, beta3 = ((fake(mode, K, dtype=torch.float32), fake(mode, K, dtype=torch.float32))
                     if bn3 else (None, None))
        sts, eps = list(strides), [1e-5] * len(ks)
        trace(label + " forward", lambda x, w, b, g, beta, w3, b3, g3, beta3, sts=sts,
              eps=eps: OPS.block_train(x, w, b, g, beta, sts, eps, w3, b3, g3, beta3,
                                       1e-5)[0],
              xt, w, bias, g, beta, w3, b3, g3, beta3)
        if label == "train bn":
            # A channel-gated block's training (train_gated.py): the stages with the
            # pool beside the last statistics, the gate, the gated join.
            def channel_gated(x, w, b, g, beta, w3, g3, beta3, sts=sts, eps=eps):
                c_last, pooled, _, st = OPS.block_branch(x, w, b, g, beta, sts, eps)
                gate = pooled.view(pooled.shape[0], -1, 1, 1).sigmoid()
                return OPS.gate_join_train(c_last, st[-1], g[-1], beta[-1], eps[-1], gate, x,
                                           w3, None, g3, beta3, 1e-5, 2)[0]

            trace("train channel-gated forward", channel_gated, xt, w, bias, g, beta, w3, g3,
                  beta3)
        P = 8 // (strides[0] * strides[1] * (strides[2] if len(strides) > 2 else 1))
        cs, h = [], 8
        for st, kout in zip(strides, widths):
            h //= st
            cs.append(fake(mode, N, kout, h, h))
        c3 = fake(mode, N, K, P, P) if bn3 else fake(mode, 0, cl=False)
        mask = fake(mode, (N * K * P * P + 7) // 8, dtype=torch.uint8)
        # One [mean; var; count] per BN: the stages', then the shortcut's.
        stats = [fake(mode, 3, kout, dtype=torch.float32)
                 for kout in widths + ([K] if bn3 else [])]
        trace(label + " backward", lambda *a, sts=sts, eps=eps, n=len(ks),
              b3=b3 is not None: tuple(
                  t for t in OPS.block_train_backward(*a, [True] * n, b3, sts, eps, 1e-5)
                  if t is not None),
              fake(mode, N, K, P, P), xt, cs, c3, mask, stats, w, g, beta, w3, g3)

    # ResNet-D's pooled shortcut (a 2x2/2 ceil_mode window average in the projection
    # GEMM's loader, pool.py): the eval join, and a basic block's fused training
    # forward and backward (block_train's sc_pool; odd 7x7 input).
    xo = fake(mode, 2, 8, 7, 7)
    w1o, w2o, b16 = fake(mode, 16, 8, 3, 3), fake(mode, 16, 16, 3, 3), fake(mode, 16)
    w3o = fake(mode, 16, 8, 1, 1)
    trace("eval avg_down", lambda x, w1, w2, w3, b: OPS.conv_bias_pool_shortcut_relu(
        OPS.conv_bias_relu(x, w1, b, 2, 1), w2, b, x, w3, 1, 2, 2, True), xo, w1o, w2o, w3o,
        b16)

    # A gated block beside it: the branch with its pool sums, a gate, the gated join in
    # the pooled projection GEMM's epilogue (eval); the channel-gated training forward
    # (gate_join_train's sc_pool).
    def gated_pooled(x, w1, w2, w3, b):
        branch, pooled = OPS.conv_bias_pool(OPS.conv_bias_relu(x, w1, b, 2, 1), w2, b, 1, 1)
        gate = pooled.view(pooled.shape[0], -1, 1, 1).sigmoid()
        return OPS.gate_pool_shortcut_relu(branch, gate, x, w3, b, 2, 2, True)

    trace("gated eval avg_down", gated_pooled, xo, w1o, w2o, w3o, b16)
    gs = [fake(mode, 16, dtype=torch.float32) for _ in range(6)]

    def channel_gated_pooled(x, w1, w2, w3, *v):
        c_last, pooled, _, st = OPS.block_branch(x, [w1, w2], [None, None], [v[0], v[1]],
                                                 [v[2], v[3]], [2, 1], [1e-5, 1e-5])
        gate = pooled.view(pooled.shape[0], -1, 1, 1).sigmoid()
        return OPS.gate_join_train(c_last, st[-1], v[1], v[3], 1e-5, gate, x, w3, None, v[4],
                                   v[5], 1e-5, 2, 2)[0]

    trace("train channel-gated avg_down forward", channel_gated_pooled, xo, w1o, w2o, w3o,
          *gs)
    trace("train avg_down forward", lambda x, w1, w2, w3, *v: OPS.block_train(
        x, [w1, w2], [None, None], [v[0], v[1]], [v[2], v[3]], [2, 1], [1e-5, 1e-5], w3, None,
        v[4], v[5], 1e-5, "", None, 2)[0], xo, w1o, w2o, w3o, *gs)
    co = [fake(mode, 2, 16, 4, 4) for _ in range(3)]
    so = [fake(mode, 3, 16, dtype=torch.float32) for _ in range(3)]
    masko = fake(mode, (2 * 16 * 4 * 4 + 7) // 8, dtype=torch.uint8)
    trace("train avg_down backward", lambda g, x, c1, c2, csc, mk, s1, s2, s3, w1, w2, w3, *v:
          tuple(t for t in OPS.block_train_backward(
              g, x, [c1, c2], csc, mk, [s1, s2, s3], [w1, w2], [v[0], v[1]], [v[2], v[3]], w3,
              v[4], [False, False], False, [2, 1], [1e-5, 1e-5], 1e-5, "", False, 2)
              if t is not None),
          co[0], xo, co[1], co[2], co[0], masko, *so, w1o, w2o, w3o, *gs)

    # The BN ops of the unfused training path, the mutating bn_finalize included.
    c = fake(mode, 2, 16, 8, 8)
    vec = [fake(mode, 16, dtype=torch.float32) for _ in range(4)]
    trace("bn ops forward", lambda c, m, v, w, bb: OPS.bn_act(
        c, *OPS.channel_stats(c)[:1], v, w, bb, c), c, *vec)
    nbt = fake(mode, dtype=torch.int64, cl=False)
    trace("bn_finalize", lambda m, v, w, bb, rm, rv, n: OPS.bn_finalize(
        m, v, w, bb, rm, rv, n, 0.1, 1e-5, 128), *vec, *vec[:2], nbt)
    mask = fake(mode, 2 * 16 * 8 * 8 // 8, dtype=torch.uint8)
    trace("bn_act_backward", lambda g, mk, c, m, i, w: OPS.bn_act_backward(
        g, mk, c, m, i, w, True), c, mask, c, *vec[:3])

report["warnings"] = warnings
json.dump(report, sys.stdout)
