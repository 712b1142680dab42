"""The Triton backend's GPU ops (triton_ops) traced as torch.compile traces them, on CPU.

Under torch.compile a triton_op's body is traced and each launch becomes a
triton_kernel_wrapper_functional node; torch analyses the kernel's Triton IR to learn
which arguments it writes, and clones only those. When that analysis fails, torch
assumes every argument is written; this backend passes one tensor in several
argument slots (unused dummies), so the output could then come back from an untouched
clone: a wrong answer under torch.compile only. torch 2.11's analysis passes scalar
arguments as Python numbers, so e.g. `M.to(tl.float32)` on an int argument made it
fail there (bn.py's coefficient kernel).

The tracing runs in a child process (tests/triton_trace_child.py): the ops must be
defined without TRITON_INTERPRET, which conftest sets for this process. It needs
Triton's NVIDIA backend (IR generation for sm_90), no GPU.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None,
                                reason="this Triton has no NVIDIA backend")

# The arguments each kernel writes (all the others are read-only or unused dummies).
WRITES = {
    "_conv_kernel": {"out_ptr", "omask_ptr", "pmean_ptr", "pm2_ptr", "pcnt_ptr", "psum_ptr"},
    "_gate_join_kernel": {"out_ptr"},
    "_tile_stats_combine_kernel": {"omean_ptr", "om2_ptr", "ocnt_ptr"},
    "_chunk_stats_combine_kernel": {"mean_ptr", "var_ptr"},
    "_stats_partial_kernel": {"pmean_ptr", "pm2_ptr"},
    "_finalize_kernel": {"invstd_ptr", "scale_ptr", "shift_ptr", "rm_ptr", "rv_ptr", "nbt_ptr"},
    "_bn_act_kernel": {"out_ptr", "mask_ptr"},
    "_bn_bwd_reduce_kernel": {"red_ptr", "redb_ptr"},
    "_bn_bwd_coef_kernel": {"coef_ptr", "gw_ptr", "gb_ptr"},
    "_bn_bwd_apply_kernel": {"gc_ptr", "gr_ptr"},
    "_dgrad_kernel": {"out_ptr", "red_ptr"},
    "_wgrad_kernel": {"dw_ptr", "db_ptr"},
}


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "triton_trace_child.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-8000:]
    return json.loads(proc.stdout)


# torch before 2.12: triton_op infers the schema from annotations (ignoring schema=),
# and block_train's optional tensor list has no inferred form there.
OPAQUE_BLOCK_TRAIN = tuple(int(v) for v in __import__("torch").__version__.split(".")[:2]) < (2, 12)


def test_every_launch_traces_into_a_kernel_node_that_clones_only_what_it_writes(report):
    assert not report["warnings"], report["warnings"]
    seen = set()
    for label, graph in report.items():
        if label == "warnings":
            continue
        opaque = graph["undecomposed"]
        if OPAQUE_BLOCK_TRAIN and label.endswith("forward"):
            # torch 2.11's triton_op cannot infer block_train's schema (ops.define_op):
            # there it is a custom_op that the trace keeps as one node, and only it.
            opaque = [o for o in opaque if o != "resnet_fused_triton.block_train.default"]
        assert not opaque, f"{label}: ops left opaque {opaque}"
        if not graph["kernels"] and OPAQUE_BLOCK_TRAIN and graph["undecomposed"]:
            continue
        assert graph["kernels"], f"{label}: no kernel in the traced graph"
        for name, cloned in graph["kernels"]:
            seen.add(name)
            extra = set(cloned) - WRITES[name]
            assert not extra, (f"{label}: {name} is taken to write {sorted(extra)} (torch's "
                               f"analysis of the kernel failed?)")
    # The TMA convolution is eager-only (device-side descriptors need an allocator).
    # On torch 2.11 the kernels only block_train's forward launches are inside its
    # opaque node (OPAQUE_BLOCK_TRAIN): the epilogue statistics' combine.
    expected = set(WRITES) - ({"_tile_stats_combine_kernel"} if OPAQUE_BLOCK_TRAIN else set())
    assert seen >= expected, f"never traced: {sorted(expected - seen)}"


def test_gated_eval_kernels_write_only_their_outputs(report):
    """The pool's atomic adds are seen as writes of psum_ptr (so the traced graph keeps
    its zeroed buffer), the gated join writes only its output."""
    assert report["gated eval identity"]["kernels"] == [
        ["_conv_kernel", ["out_ptr", "psum_ptr"]], ["_gate_join_kernel", ["out_ptr"]]]
    assert report["gated eval projection"]["kernels"] == [
        ["_conv_kernel", ["out_ptr", "psum_ptr"]], ["_conv_kernel", ["out_ptr"]]]
    # Beside a pooled shortcut: the pooled projection GEMM with the gated epilogue.
    assert report["gated eval avg_down"]["kernels"] == [
        ["_conv_kernel", ["out_ptr"]], ["_conv_kernel", ["out_ptr", "psum_ptr"]],
        ["_conv_kernel", ["out_ptr"]]]


def test_eval_kernels_write_only_their_output(report):
    for label in ("eval identity", "eval projection", "eval avg_down"):
        assert report[label]["kernels"] == [["_conv_kernel", ["out_ptr"]]] * 2, report[label]
