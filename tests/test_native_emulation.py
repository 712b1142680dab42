"""The CUDA BatchNorm kernels (csrc/cuda/bn_kernels.cu) run WITHOUT a GPU, through the
host emulation of csrc/emu/: the same source compiled as C++, every CUDA thread a host
thread with real barriers and warp shuffles (see csrc/emu/cuda_emu.h), registered as
torch.ops.resnet_fused_emu on CPU tensors. Each op is compared with the CPU kernels
(torch.ops.resnet_fused, themselves tested against float64 in test_native_ops.py) on
shapes chosen to take every branch of the kernels and launchers: NHWC with C % 8 == 0
(16-byte vector path) and not, NCHW with H*W % 8 == 0 and not, mask tails, batch 1,
misaligned views (scalar path) and aligned views with a storage offset, more channels
than one block spans, grids too small for the data (grid-stride loops) and the
channel-cache rounding of the NHWC grid. The emulator also fails a launch whose grid
exceeds the GPU's limits, or whose barriers or shuffles are divergent.

What this cannot show: races that depend on GPU timing, FMA contraction (nvcc fuses
a*b+c, the host build does not: the GPU's outputs can differ in the last bit, which
the `cuda` tests in test_native_ops.py allow for), and speed.

Building the emulation takes ~30 s of one core the first time (cached afterwards).
"""
import hashlib
import os

import pytest
import torch
from poisoning import poison_allocator
from tolerance import assert_within

if os.environ.get("RESNET_FUSED_SKIP_EXT") == "1":
    pytest.skip("built without the extension (RESNET_FUSED_SKIP_EXT=1)", allow_module_level=True)

from resnet_fused.backends.native import load_extension  # noqa: E402

_C, _err = load_extension()
if _C is None:
    raise ImportError(f"resnet_fused._C is not built: {_err}")

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
EMU_SOURCES = ["emu/bn_kernels_emu.cpp", "emu/cuda_emu.h", "cuda/bn_kernels.cu",
               "cuda/gate_kernels.cu", "cuda/kernel_util.cuh", "common.h", "schemas.h"]

ref = torch.ops.resnet_fused
IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


@pytest.fixture(scope="module")
def emu():
    from torch.utils import cpp_extension

    # load() hashes only the listed source, not what it includes: name the build after
    # the contents of every file it depends on, so an edit rebuilds it, and after the
    # torch it compiles against (two stacks must not share one build).
    h = hashlib.sha1(torch.__version__.encode())
    for rel in EMU_SOURCES:
        with open(os.path.join(CSRC, rel), "rb") as f:
            h.update(f.read())
    name = "resnet_fused_emu_" + h.hexdigest()[:12]
    if not hasattr(torch.ops.resnet_fused_emu, "bn_gate_act"):
        cpp_extension.load(
            name=name,
            sources=[os.path.join(CSRC, "emu", "bn_kernels_emu.cpp")],
            extra_include_paths=[CSRC],
            # -ffp-contract=off: no FMA, so elementwise results are bit-identical to the
            # CPU kernels and any difference is an indexing error.
            extra_cflags=["-O1", "-std=c++20", "-ffp-contract=off", "-pthread"],
            extra_ldflags=["-pthread"],
            is_python_module=False,
            verbose=False,
        )
    return torch.ops.resnet_fused_emu


@pytest.fixture
def sms(monkeypatch):
    """Set the SM count the emulated launchers see (grid sizes scale with it)."""
    def set_sms(n):
        monkeypatch.setenv("RESNET_FUSED_EMU_SMS", str(n))
    set_sms(2)
    return set_sms


def view_in_buffer(shape, dtype, channels_last, offset, fill=float("nan")):
    """A contiguous (NCHW or channels_last) tensor of `shape` that is a view into a larger
    buffer starting `offset` elements in, with NaN guards on both sides: out-of-bounds
    reads show up as NaN, and offset % (16 / itemsize) != 0 makes the data pointer
    misaligned for 16-byte accesses."""
    N, C, H, W = shape
    numel = N * C * H * W
    buf = torch.full((offset + numel + 64,), fill, dtype=dtype)
    data = (torch.randn(numel, dtype=torch.float64) * 1.5 + 0.3).to(dtype)
    buf[offset:offset + numel] = data
    flat = buf[offset:offset + numel]
    if channels_last:
        return flat.view(N, H, W, C).permute(0, 3, 1, 2)
    return flat.view(N, C, H, W)


def params(C, dtype=torch.float32):
    w = (torch.rand(C, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(C, dtype=torch.float64).to(dtype)
    return w, b


# (shape, channels_last, what it exercises)
CASES = [
    ((2, 16, 3, 5), True, "nhwc vec, 2 channel groups"),
    ((3, 24, 5, 3), True, "nhwc vec, C/8 = 3: grid rounded to a multiple of 3"),
    ((2, 20, 3, 5), True, "nhwc scalar (C % 8 != 0)"),
    ((1, 3, 5, 7), True, "nhwc C=3, batch 1, mask tail"),
    ((2, 264, 2, 3), True, "nhwc vec, 33 channel groups: two blocks across channels"),
    ((2, 8, 4, 6), False, "nchw vec (H*W % 8 == 0)"),
    ((3, 5, 3, 5), False, "nchw scalar, mask tail"),
    ((1, 7, 1, 1), False, "H = W = 1"),
]
CASE_IDS = [c[2] for c in CASES]


def check_equal(name, got, want):
    assert got.shape == want.shape and got.dtype == want.dtype, name
    bad = ~((got == want) | (got.isnan() & want.isnan())) if got.is_floating_point() else got != want
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {got.numel()} elements differ, first at "
                           f"{bad.reshape(-1).nonzero()[0].item()}")


def close(name, got, want, rtol, scale=None):
    scale = want.double().abs().max().item() if scale is None else scale
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=rtol * max(scale, 1e-30),
                               msg=lambda m: f"{name}: {m}")


# fp32 and bf16 on every case; fp16 (same code as bf16 but the conversion) and fp64 (its
# own register layout: 4 words per group) on one vector and one scalar case per layout:
# each emulated launch starts 256 host threads per block, so the matrix is kept small.
MATRIX = [(dt, *case) for dt in (torch.float32, torch.bfloat16) for case in CASES] + [
    (dt, *case) for dt in (torch.float16, torch.float64) for case in (CASES[0], CASES[2], CASES[5], CASES[6])]


@pytest.mark.parametrize("dtype,shape,channels_last,what", MATRIX,
                         ids=[f"{IDS[m[0]]}-{m[3]}" for m in MATRIX])
def test_emulated_kernels_match_cpu_kernels(emu, sms, dtype, shape, channels_last, what):
    c = view_in_buffer(shape, dtype, channels_last, offset=0)
    tol = 1e-12 if dtype == torch.float64 else 2e-6

    m_e, v_e = emu.channel_stats(c)
    m_r, v_r = ref.channel_stats(c)
    close("mean", m_e, m_r, tol, scale=v_r.max().item() ** 0.5)
    close("var", v_e, v_r, 4 * tol)

    invstd = (v_r + 1e-5).rsqrt()
    w, b = params(shape[1])
    r = view_in_buffer(shape, dtype, channels_last, offset=0)
    for res in (None, r):
        poison_allocator(c.numel() * 8)   # outputs likely reuse NaN-filled memory
        out_e, mask_e = emu.bn_act(c, m_r, invstd, w, b, res)
        out_r, mask_r = ref.bn_act(c, m_r, invstd, w, b, res)
        assert out_e.stride() == out_r.stride()
        check_equal("bn_act out", out_e, out_r)
        check_equal("bn_act mask", mask_e, mask_r)

    dy = view_in_buffer(shape, dtype, channels_last, offset=0)
    for residual_grad in (False, True):
        poison_allocator(c.numel() * 8)   # outputs likely reuse NaN-filled memory
        got = emu.bn_act_backward(dy, mask_r, c, m_r, invstd, w, residual_grad)
        want = ref.bn_act_backward(dy, mask_r, c, m_r, invstd, w, residual_grad)
        gtol = 1e-10 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 1e-2)
        close("grad_c", got[0], want[0], gtol)
        close("grad_weight", got[1], want[1], 10 * tol)
        close("grad_bias", got[2], want[2], 10 * tol)
        check_equal("grad_residual", got[3], want[3])


FROZEN_MATRIX = [(dt, *case) for dt in (torch.float32, torch.bfloat16)
                 for case in (CASES[0], CASES[2], CASES[5], CASES[6])]


@pytest.mark.parametrize("dtype,shape,channels_last,what", FROZEN_MATRIX,
                         ids=[f"{IDS[m[0]]}-{m[3]}" for m in FROZEN_MATRIX])
def test_emulated_frozen_kernels_match_cpu_kernels(emu, sms, dtype, shape, channels_last, what):
    """bn_frozen_act (bn_act's kernels on running statistics) and its backward (the
    apply kernels with zero sums; the reduction only for param_grads)."""
    c = view_in_buffer(shape, dtype, channels_last, offset=0)
    C = shape[1]
    mean = torch.randn(C, dtype=torch.float64).float()
    invstd = (torch.rand(C, dtype=torch.float64) + 0.5).float()
    w, b = params(C)
    r = view_in_buffer(shape, dtype, channels_last, offset=0)
    for res in (None, r):
        poison_allocator(c.numel() * 8)
        out_e, mask_e = emu.bn_frozen_act(c, mean, invstd, w, b, res)
        out_r, mask_r = ref.bn_frozen_act(c, mean, invstd, w, b, res)
        check_equal("bn_frozen_act out", out_e, out_r)
        check_equal("bn_frozen_act mask", mask_e, mask_r)
    dy = view_in_buffer(shape, dtype, channels_last, offset=0)
    gtol = 1e-6 if dtype == torch.float32 else 1e-2
    for residual_grad, param_grads in ((False, True), (True, False)):
        poison_allocator(c.numel() * 8)
        got = emu.bn_frozen_act_backward(dy, mask_r, c, mean, invstd, w, residual_grad,
                                         param_grads)
        want = ref.bn_frozen_act_backward(dy, mask_r, c, mean, invstd, w, residual_grad,
                                          param_grads)
        close("grad_c", got[0], want[0], gtol)
        for name, g, wt in (("grad_weight", got[1], want[1]), ("grad_bias", got[2], want[2])):
            assert g.shape == wt.shape == ((C,) if param_grads else (0,)), name
            if param_grads:
                close(name, g, wt, 2e-5)
        check_equal("grad_residual", got[3], want[3])


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("offset", [1, 3, 8], ids=["off1", "off3", "off8-aligned"])
def test_views_with_storage_offset(emu, sms, channels_last, offset):
    """bf16 views 1 or 3 elements in (misaligned: scalar path) or 8 in (16 bytes: vector
    path with a storage offset), for c, residual and grad_out in turn."""
    shape = (2, 16, 4, 4)
    dtype = torch.bfloat16
    aligned = view_in_buffer(shape, dtype, channels_last, 0)
    shifted = view_in_buffer(shape, dtype, channels_last, offset)
    w, b = params(16)
    for c, r in ((shifted, aligned), (aligned, shifted)):
        m, v = ref.channel_stats(c)
        m_e, v_e = emu.channel_stats(c)
        close("mean", m_e, m, 1e-5, scale=v.max().item() ** 0.5)
        close("var", v_e, v, 1e-5)
        invstd = (v + 1e-5).rsqrt()
        out_e, mask_e = emu.bn_act(c, m, invstd, w, b, r)
        out_r, mask_r = ref.bn_act(c, m, invstd, w, b, r)
        check_equal("out", out_e, out_r)
        check_equal("mask", mask_e, mask_r)
        for dy in (shifted, aligned):
            got = emu.bn_act_backward(dy, mask_r, c, m, invstd, w, True)
            want = ref.bn_act_backward(dy, mask_r, c, m, invstd, w, True)
            close("grad_c", got[0], want[0], 1e-2)
            close("grad_weight", got[1], want[1], 1e-5)
            check_equal("grad_residual", got[3], want[3])


@pytest.mark.parametrize("nsms", [1, 3])
@pytest.mark.parametrize("shape,channels_last", [
    ((2, 64, 16, 17), True),   # V=8, 3 row splits, the 4-row unrolled loop and its remainder
    ((2, 40, 16, 16), True),   # C/8 = 5: elementwise grid rounded to a multiple of 5
    ((3, 5, 20, 20), True),    # V=1 reduction, several row splits
    ((3, 24, 16, 24), False),  # NCHW vector items
    ((4, 2, 64, 64), False),   # NCHW vector, 2 batch splits per channel
    ((7, 2, 45, 47), False),   # NCHW scalar, 6 batch splits: blocks with 2 planes and with 1
], ids=["nhwc64", "nhwc40", "nhwc5", "nchw-vec", "nchw-vec-split", "nchw-odd-split"])
def test_grid_stride_loops(emu, sms, nsms, shape, channels_last):
    """More data than the grid covers in one sweep (the emulated GPU has 1 or 3 SMs, so
    at most 16 or 48 elementwise blocks): every thread loops, its channel advances
    through ChanIter, and the reductions combine several partials per channel."""
    sms(nsms)
    dtype = torch.float32
    c = view_in_buffer(shape, dtype, channels_last, 0)
    m_e, v_e = emu.channel_stats(c)
    m, v = ref.channel_stats(c)
    close("mean", m_e, m, 2e-6, scale=v.max().item() ** 0.5)
    close("var", v_e, v, 1e-5)
    invstd = (v + 1e-5).rsqrt()
    w, b = params(shape[1])
    r = view_in_buffer(shape, dtype, channels_last, 0)
    out_e, mask_e = emu.bn_act(c, m, invstd, w, b, r)
    out_r, mask_r = ref.bn_act(c, m, invstd, w, b, r)
    check_equal("out", out_e, out_r)
    check_equal("mask", mask_e, mask_r)
    dy = view_in_buffer(shape, dtype, channels_last, 0)
    got = emu.bn_act_backward(dy, mask_r, c, m, invstd, w, True)
    want = ref.bn_act_backward(dy, mask_r, c, m, invstd, w, True)
    close("grad_c", got[0], want[0], 1e-5)
    close("grad_weight", got[1], want[1], 1e-5)
    close("grad_bias", got[2], want[2], 1e-5)
    check_equal("grad_residual", got[3], want[3])


def test_stats_stable_when_mean_dominates(emu, sms):
    """Shifted sums: mean 1000, std 0.01 in float32 keeps the variance to ~1e-3 relative."""
    for channels_last in (False, True):
        x = view_in_buffer((4, 16, 8, 8), torch.float64, channels_last, 0)
        x = (x * 0.01 + 1000.0).float()
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
        _, v = emu.channel_stats(x)
        v64 = x.double().var(dim=(0, 2, 3), unbiased=False)
        close("var", v, v64, 1e-3)


@pytest.mark.parametrize("C", [5, 1500], ids=["C5", "C1500-loops-over-1024-threads"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("buf_dtype", [torch.float32, torch.float16], ids=IDS.get)
def test_bn_finalize(emu, C, momentum, buf_dtype):
    mom = -1.0 if momentum is None else momentum
    mean = torch.randn(C)
    var = torch.rand(C) + 0.1
    w, b = params(C)
    rm_e, rv_e = torch.randn(C).to(buf_dtype), (torch.rand(C) + 0.5).to(buf_dtype)
    rm_r, rv_r = rm_e.clone(), rv_e.clone()
    n_e = torch.tensor(4, dtype=torch.int64)
    n_r = n_e.clone()
    for _ in range(3):  # 1/num_batches_tracked changes each step with momentum=None
        got = emu.bn_finalize(mean, var, w, b, rm_e, rv_e, n_e, mom, 1e-5, 98)
        want = ref.bn_finalize(mean, var, w, b, rm_r, rv_r, n_r, mom, 1e-5, 98)
        for name, g, e in zip(("invstd", "scale", "shift"), got, want):
            close(name, g, e, 1e-6)
        assert n_e.item() == n_r.item()
        rt = 1e-6 if buf_dtype == torch.float32 else 1e-3
        close("running_mean", rm_e, rm_r, rt)
        close("running_var", rv_e, rv_r, rt)
    assert n_e.item() == 7


def test_empty_batch_bn_act(emu):
    c = torch.randn(0, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    m, i = torch.zeros(16), torch.ones(16)
    w, b = params(16)
    out, mask = emu.bn_act(c, m, i, w, b, None)
    assert out.shape == c.shape and mask.numel() == 0


@pytest.mark.parametrize("v", [20.0, 100.0, 1000.0])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nchw-scalar"])
def test_stats_outlier_first_element(emu, sms, layout, v):
    """One outlier per channel, at the channel's first element (where a shifted-sums
    reduction takes its shift): the fp32 variance stays within 2x of torch.var's own
    fp32 error against float64 (the rule of tests/tolerance.py). The shifted sums this
    replaces had 5e-5 (v=20), 6e-4 (v=100) and 3e-3 (v=1000) relative error."""
    g = torch.Generator().manual_seed(int(v))
    x = torch.randn(32, 64, 28, 28, generator=g)
    x[0, :, 0, 0] = v
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "nchw-scalar":
        # A view one element into its storage: misaligned, so the scalar (V = 1) path.
        buf = torch.empty(x.numel() + 1)
        buf[1:] = x.reshape(-1)
        x = buf[1:].view(x.shape)
    sms(8)  # a realistic split: several partials per channel
    mean, var = emu.channel_stats(x)
    var64, mean64 = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    var32, mean32 = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    assert_within("mean", mean, mean32, mean64)
    assert_within("var", var, var32, var64)
    # Per channel too, with a floor of fp32 accumulation (~8 ulps; a thread adds ~25 rows
    # in fp32) instead of tolerance.py's 2e-5: torch.var on the CPU accumulates fp32 in
    # double, so its own error is little more than the final rounding.
    rel = ((var.double() - var64) / var64).abs().max().item()
    rel32 = ((var32.double() - var64) / var64).abs().max().item()
    assert rel <= 2 * rel32 + 1e-6, f"variance relative error {rel:.2e} vs torch.var fp32 {rel32:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=IDS.get)
def test_emulated_vector_access_must_be_aligned(emu, dtype):
    """The kernels' 16-byte vector loads and stores fault on a GPU unless the address is a
    multiple of 16; the emulation raises likewise, so a launcher that picks the vector
    path for a misaligned pointer fails on the CPU too."""
    per16 = 16 // dtype.itemsize
    src = torch.arange(64, dtype=dtype)
    dst = torch.zeros(64, dtype=dtype)
    emu.vec8_copy(src, per16, dst, 2 * per16)  # aligned: a plain copy
    assert torch.equal(dst[2 * per16:2 * per16 + 8], src[per16:per16 + 8])
    with pytest.raises(RuntimeError, match="misaligned 16-byte load"):
        emu.vec8_copy(src, 1, dst, 0)
    with pytest.raises(RuntimeError, match="misaligned 16-byte store"):
        emu.vec8_copy(src, 0, dst, 1)


# --------------------------------------------------------------------------- gate kernels
def _gate_shapes(shape):
    """Channel gate, sample gate, and one gate shared by the batch."""
    n, c = shape[:2]
    return [(n, c, 1, 1), (n, 1, 1, 1), (1, 1, 1, 1)]


GATE_MATRIX = [(dt, *case) for dt in (torch.float32, torch.bfloat16)
               for case in (CASES[0], CASES[2], CASES[3], CASES[5], CASES[6])] + [
    (torch.float64, *CASES[0]), (torch.float64, *CASES[6])]


@pytest.mark.parametrize("dtype,shape,channels_last,what", GATE_MATRIX,
                         ids=[f"{IDS[m[0]]}-{m[3]}" for m in GATE_MATRIX])
def test_emulated_gate_kernels_match_cpu_kernels(emu, sms, dtype, shape, channels_last, what):
    """The CUDA gate kernels (csrc/cuda/gate_kernels.cu): bn_pool (per-(n, c) reduction),
    bn_gate_act (the gated join, bit for bit: the same operations in the same order),
    bn_gate_act_backward (per-(n, c) sums, the per-channel finish and the apply),
    bn_pool_backward and gate_shortcut_relu, on every gate shape, against the CPU kernels."""
    C = shape[1]
    c = view_in_buffer(shape, dtype, channels_last, offset=0)
    m, v = ref.channel_stats(c)
    invstd = (v + 1e-5).rsqrt()
    w, b = params(C)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    gtol = 1e-10 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 1e-2)
    close("bn_pool", emu.bn_pool(c, m, invstd, w, b), ref.bn_pool(c, m, invstd, w, b), 10 * tol)
    gp = torch.randn(shape[0], C, dtype=torch.float64).float()
    got = emu.bn_pool_backward(gp, c, m, invstd, w)
    want = ref.bn_pool_backward(gp, c, m, invstd, w)
    # The scales of the terms: with batch 1, mean_hw(xhat) = 0 and grad_c and grad_weight
    # are rounding noise of terms this large, of which only the size can be compared.
    spread = (gp.abs().max() * (w * invstd).abs().max() / (shape[2] * shape[3])).item()
    scales = {"grad_c": spread, "grad_weight": gp.abs().max().item(), "grad_bias": 0.0}
    for name, g, e in zip(("grad_c", "grad_weight", "grad_bias"), got, want):
        assert g.dtype == e.dtype and g.stride() == e.stride(), name
        close(f"bn_pool_backward {name}", g, e, gtol if name == "grad_c" else 10 * tol,
              scale=max(scales[name], e.double().abs().max().item()))
    r = view_in_buffer(shape, dtype, channels_last, offset=0)
    dy = view_in_buffer(shape, dtype, channels_last, offset=0)
    for gshape in _gate_shapes(shape):
        gate = torch.rand(gshape, dtype=torch.float64) + 0.5
        for res in (None, r):
            poison_allocator(c.numel() * 8)
            out_e, mask_e = emu.bn_gate_act(c, m, invstd, w, b, gate, res)
            out_r, mask_r = ref.bn_gate_act(c, m, invstd, w, b, gate, res)
            assert out_e.stride() == out_r.stride()
            check_equal(f"bn_gate_act out {gshape}", out_e, out_r)
            check_equal(f"bn_gate_act mask {gshape}", mask_e, mask_r)
        for residual_grad in (False, True):
            poison_allocator(c.numel() * 8)
            got = emu.bn_gate_act_backward(dy, mask_r, c, m, invstd, w, b, gate, residual_grad)
            want = ref.bn_gate_act_backward(dy, mask_r, c, m, invstd, w, b, gate, residual_grad)
            for name, g, e in zip(("grad_c", "grad_weight", "grad_bias", "grad_gate"), got, want):
                assert g.shape == e.shape and g.dtype == e.dtype, f"{name} {gshape}"
                close(f"bn_gate_act_backward {name} {gshape}", g, e,
                      gtol if name == "grad_c" else 10 * tol)
            check_equal("grad_residual", got[4], want[4])
        y = r
        for x, sw, sb, stride in ((c, None, None, 1),
                                  (view_in_buffer((shape[0], 3, 2 * shape[2], 2 * shape[3]), dtype,
                                                  channels_last, 0),
                                   (torch.randn(C, 3, 1, 1) * 0.5).to(dtype), torch.randn(C), 2)):
            poison_allocator(c.numel() * 8)
            got = emu.gate_shortcut_relu(y, gate, x, sw, sb, stride, 0)
            want = ref.gate_shortcut_relu(y, gate, x, sw, sb, stride, 0)
            assert got.stride() == want.stride()
            close(f"gate_shortcut_relu {gshape} {'proj' if sw is not None else 'identity'}",
                  got, want, 0 if sw is None else (1e-12 if dtype == torch.float64 else 1e-2))


@pytest.mark.parametrize("shape,channels_last", [
    ((2, 64, 16, 17), True),   # 2 channel blocks per sample, rows strided over 8 ty
    ((3, 5, 20, 20), True),    # C < 32: TX = 8, TY = 32
    ((4, 2, 64, 64), False),   # NCHW vector items, 8 planes in one block's 8 warps
    ((3, 3, 45, 47), False),   # NCHW scalar, 9 planes: a second block with one warp busy
], ids=["nhwc64", "nhwc5", "nchw-vec", "nchw-odd"])
def test_gate_kernels_grid_stride_and_plane_blocks(emu, sms, shape, channels_last):
    """More data than the elementwise grid covers (1 emulated SM), and per-(n, c)
    reductions over several blocks: bn_gate_act, its backward and bn_pool against the
    CPU kernels with a channel gate."""
    sms(1)
    dtype = torch.float32
    c = view_in_buffer(shape, dtype, channels_last, 0)
    m, v = ref.channel_stats(c)
    invstd = (v + 1e-5).rsqrt()
    w, b = params(shape[1])
    gate = torch.rand(shape[0], shape[1], 1, 1, dtype=torch.float64) + 0.5
    r = view_in_buffer(shape, dtype, channels_last, 0)
    out_e, mask_e = emu.bn_gate_act(c, m, invstd, w, b, gate, r)
    out_r, mask_r = ref.bn_gate_act(c, m, invstd, w, b, gate, r)
    check_equal("out", out_e, out_r)
    check_equal("mask", mask_e, mask_r)
    close("bn_pool", emu.bn_pool(c, m, invstd, w, b), ref.bn_pool(c, m, invstd, w, b), 1e-5)
    dy = view_in_buffer(shape, dtype, channels_last, 0)
    got = emu.bn_gate_act_backward(dy, mask_r, c, m, invstd, w, b, gate, True)
    want = ref.bn_gate_act_backward(dy, mask_r, c, m, invstd, w, b, gate, True)
    for name, g, e in zip(("grad_c", "grad_weight", "grad_bias", "grad_gate"), got, want):
        close(name, g, e, 1e-5)
    check_equal("grad_residual", got[4], want[4])


@pytest.mark.parametrize("offset", [1, 8], ids=["off1-misaligned", "off8-aligned"])
def test_gate_kernels_views_with_storage_offset(emu, sms, offset):
    """bf16 views 1 element in (scalar paths) or 8 in (vector paths with an offset)."""
    shape = (2, 16, 4, 4)
    for channels_last in (False, True):
        c = view_in_buffer(shape, torch.bfloat16, channels_last, offset)
        m, v = ref.channel_stats(c)
        invstd = (v + 1e-5).rsqrt()
        w, b = params(16)
        gate = torch.rand(2, 16, 1, 1) + 0.5
        out_e, mask_e = emu.bn_gate_act(c, m, invstd, w, b, gate, None)
        out_r, mask_r = ref.bn_gate_act(c, m, invstd, w, b, gate, None)
        check_equal("out", out_e, out_r)
        check_equal("mask", mask_e, mask_r)
        close("bn_pool", emu.bn_pool(c, m, invstd, w, b), ref.bn_pool(c, m, invstd, w, b), 1e-5)
        dy = view_in_buffer(shape, torch.bfloat16, channels_last, offset)
        got = emu.bn_gate_act_backward(dy, mask_r, c, m, invstd, w, b, gate, True)
        want = ref.bn_gate_act_backward(dy, mask_r, c, m, invstd, w, b, gate, True)
        close("grad_c", got[0], want[0], 1e-2)
        close("grad_gate", got[3], want[3], 1e-5)
        check_equal("grad_residual", got[4], want[4])
