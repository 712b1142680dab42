"""Ahead-of-time compilation of the Triton backend's kernels for Hopper (sm_90) with the
installed Triton's real compiler, on CPU (csrc/tools/triton_aot.py).

The interpreter the other Triton tests run in checks none of the compiler's rules, so
this is what catches a tl.dot shape/dtype error, a constexpr misuse, a layout the
compiler rejects or a config over the shared-memory limit before a GPU session does.
Each run compiles in a child process: the kernels must be defined without
TRITON_INTERPRET, which conftest sets for this process. A fresh cache directory makes
every variant really compile.

Default: a representative subset (about 55 compiles, ~35-45 s on 2 cores). The sweep
over every stage shape, shortcut kind, precision and autotune config is `slow`
(hundreds of compiles, tens of minutes): run it with `pytest -m slow tests/test_triton_compile.py`.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AOT = os.path.join(ROOT, "csrc", "tools", "triton_aot.py")

# Every kernel a launcher of the backend can run (the test fails when one is added
# without being covered by the AOT scenarios).
KERNELS = {
    ("resnet_fused.backends.triton.conv", "_conv_kernel"),
    ("resnet_fused.backends.triton.conv", "_conv_tma_kernel"),
    ("resnet_fused.backends.triton.conv", "_tile_stats_combine_kernel"),
    ("resnet_fused.backends.triton.conv_bwd", "_dgrad_kernel"),
    ("resnet_fused.backends.triton.conv_bwd", "_wgrad_kernel"),
    ("resnet_fused.backends.triton.bn", "_stats_partial_kernel"),
    ("resnet_fused.backends.triton.bn", "_chunk_stats_combine_kernel"),
    ("resnet_fused.backends.triton.bn", "_finalize_kernel"),
    ("resnet_fused.backends.triton.bn", "_bn_act_kernel"),
    ("resnet_fused.backends.triton.bn", "_bn_bwd_reduce_kernel"),
    ("resnet_fused.backends.triton.bn", "_bn_bwd_coef_kernel"),
    ("resnet_fused.backends.triton.bn", "_bn_bwd_apply_kernel"),
    ("resnet_fused.backends.triton.gate", "_gate_join_kernel"),
}


def _aot_unavailable():
    """Why this Triton cannot compile for sm_90 here, or None."""
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        return "this Triton has no NVIDIA backend"
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
    except ImportError as e:
        return f"this Triton has no ahead-of-time compile API ({e})"
    import triton.backends.nvidia as nv
    bindir = os.path.join(os.path.dirname(nv.__file__), "bin")
    for tool in ("ptxas", "cuobjdump"):
        if not os.access(os.path.join(bindir, tool), os.X_OK):
            return f"this Triton wheel ships no {tool} in {bindir}"
    return None


pytestmark = pytest.mark.skipif(_aot_unavailable() is not None,
                                reason=str(_aot_unavailable()))


def _compile(tmp_path, *args, timeout):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    out = tmp_path / "aot.json"
    proc = subprocess.run(
        [sys.executable, AOT, *args, "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if not out.exists():
        pytest.fail(f"aot produced no results (rc {proc.returncode}):\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    data = json.loads(out.read_text())
    return proc, data


def _check(proc, data):
    assert data["arch"] == 90
    results = data["results"]
    problems = [f"{r['module']}.{r['kernel']} [{r['dtype']} {r['constexprs']} {r['options']}] "
                f"({r['label']}): {'; '.join(r['problems'])}" for r in results if r["problems"]]
    assert not problems, "\n".join(problems) + "\n" + proc.stdout[-6000:]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    covered = {(r["module"], r["kernel"]) for r in results}
    assert KERNELS <= covered, f"kernels never compiled: {sorted(KERNELS - covered)}"
    for r in results:
        assert r["regs"] > 0 and r["shared"] >= 0, r
        # aot.check (the problems above) flags a 16-bit/TF32 GEMM of a warpgroup-sized
        # config that did not lower to wgmma; the main convolutions must be such GEMMs.
        if r["kernel"] in ("_conv_kernel", "_conv_tma_kernel") and r["dtype"] != "float32" \
                and r["num_warps"] >= 4 and r["tile_m"] >= 64:
            assert r["dot"] == "wgmma", r
    return results


def test_aot_compile_representative_sm90(tmp_path):
    proc, data = _compile(tmp_path, "--quick", timeout=900)
    results = _check(proc, data)
    dtypes = {r["dtype"] for r in results if r["kernel"] == "_conv_kernel"}
    assert {"float16", "bfloat16", "float32"} <= dtypes
    for dt in ("float16", "bfloat16"):
        assert any(r["dot"] == "wgmma" for r in results
                   if r["kernel"] == "_conv_kernel" and r["dtype"] == dt), dt
    # The forward conv variants the block uses: stats, prologue, projection GEMM,
    # residual, the fused final pass (BN'd residual + ReLU mask), 1x1 and 3x3, stride 1
    # and 2.
    conv = [r["constexprs"] for r in results if r["kernel"] == "_conv_kernel"]
    for feature in ("STATS", "HAS_PRO", "HAS_X2", "HAS_RES", "RES_BN OUT_MASK", "STRIDE=2",
                    "R=1 S=1", "AVGPOOL=2", "AVGPOOL2=2", "RES_GATE", "POOL"):
        assert any(feature in c for c in conv), feature
    # The paired BN2 + BN3 backward reduction of the BN'd projection.
    assert any("TWO" in r["constexprs"] for r in results
               if r["kernel"] == "_bn_bwd_reduce_kernel")


@pytest.mark.slow
def test_aot_compile_full_sweep_sm90(tmp_path, request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the full sweep takes tens of minutes: run it with -m slow")
    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    proc, data = _compile(tmp_path, "--full", "--jobs", jobs, timeout=6 * 3600)
    _check(proc, data)
