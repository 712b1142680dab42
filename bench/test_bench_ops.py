"""Each fused op of each backend (the ops of resnet_fused/schemas.py) at the ResNet-18
stage shapes, bf16 channels_last. Needs CUDA."""
import pytest
import torch

import benchlib as bl

CFG = bl.suite_config()
DEV, DT, CL = CFG["device"], CFG["dtype"], CFG["cl"]
NAMESPACE = {"native": "resnet_fused", "torch": "resnet_fused_torch",
             "triton": "resnet_fused_triton"}
OPS = ["channel_stats", "bn_finalize", "bn_act", "bn_act_backward", "conv_bias_relu",
       "conv_bias_shortcut_relu"]


@pytest.mark.cuda
@pytest.mark.parametrize("s", CFG["shapes"], ids=lambda s: s.key)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", list(NAMESPACE))
def test_op(cuda_bench, benchmark, backend, op, s):
    from resnet_fused import backends
    reason = backends.unavailable_reason(backend, DEV)
    if reason:
        pytest.skip(f"{backend}: {reason}")
    if backend == "triton" and DEV.type != "cuda":
        pytest.skip("Triton on the CPU is its interpreter: not timed")
    backends.get(backend, DEV)  # importing the backend registers its ops
    ns = getattr(torch.ops, NAMESPACE[backend])
    cases = {name: (fn, nbytes, flops)
             for name, fn, nbytes, flops in bl.op_cases(ns, s, DT, CL, DEV)}
    fn, nbytes, flops = cases[op]
    try:
        out = fn()
    except (AttributeError, NotImplementedError) as e:
        pytest.skip(f"{backend} has no {op} here: {e}")
    first = out[0] if isinstance(out, (tuple, list)) else out
    assert torch.isfinite(first.float()).all()
    benchmark.group = f"op-{op}-{s.key}"
    sec = cuda_bench(fn, backend=backend, op=op, shape=s.key, dtype=bl.dtype_name(DT),
                     layout="NHWC" if CL else "NCHW")
    if nbytes:
        benchmark.extra_info["gbps"] = nbytes / sec / 1e9
    if flops:
        benchmark.extra_info["tflops"] = flops / sec / 1e12
