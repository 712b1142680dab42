"""The residual block per provider at the ResNet-18 stage shapes (bf16, channels_last,
batch 128), eval and training forward+backward. Needs CUDA."""
import copy

import pytest
import torch

import benchlib as bl

CFG = bl.suite_config()
DEV, DT, CL = CFG["device"], CFG["dtype"], CFG["cl"]
PROVIDERS = ["eager", "cudnn_fused", "fused_torch", "fused_native", "fused_triton"]


def _block(provider, s, train):
    base = bl.make_block(s, seed=7)
    m = bl.to_layout(copy.deepcopy(base), DEV, DT, CL).train(train)
    if provider == "cudnn_fused":
        if train:
            pytest.skip("cuDNN's fused ops are inference-only")
        if DEV.type != "cuda":
            pytest.skip("cuDNN's fused ops need CUDA")
        return bl.cudnn_fused_eval(m, DT, CL)
    if provider.startswith("fused_"):
        from resnet_fused import FusedResidual, backends
        name = provider[len("fused_"):]
        reason = backends.unavailable_reason(name, DEV)
        if reason:
            pytest.skip(f"{provider}: {reason}")
        if name == "triton" and DEV.type != "cuda":
            pytest.skip("Triton on the CPU is its interpreter: not timed")
        return FusedResidual.from_residual(m, backend=name).train(train)
    return m


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("s", CFG["shapes"], ids=lambda s: s.key)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_block(cuda_bench, benchmark, provider, s, mode):
    train = mode == "train"
    m = _block(provider, s, train)
    xs, gys = [], []
    for _ in range(2):  # two distinct input sets, alternated
        x = bl.to_layout(torch.randn(s.batch, s.cin, s.hw, s.hw), DEV, DT, CL)
        xs.append(x.requires_grad_(train))
        gys.append(bl.to_layout(torch.randn(s.batch, s.cout, s.hw_out, s.hw_out), DEV, DT, CL))
    rot = bl.Rotating(range(2))
    if train:
        def fn():
            j = rot.next()
            m(xs[j]).backward(gys[j])
    else:
        def fn():
            with torch.no_grad():
                return m(xs[rot.next()])
        out = fn()
        assert out.shape == (s.batch, s.cout, s.hw_out, s.hw_out)
        assert torch.isfinite(out.float()).all()
    benchmark.group = f"block-{mode}-{s.key}"
    sec = cuda_bench(fn, provider=provider, shape=s.key, batch=s.batch, mode=mode,
                     dtype=bl.dtype_name(DT), layout="NHWC" if CL else "NCHW")
    benchmark.extra_info["tflops"] = bl.block_flops(s, training=train) / sec / 1e12
