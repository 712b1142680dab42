"""Serving: models converted or loaded under torch.inference_mode(), torch.export with
a dynamic batch keeping our ops in the graph, an AOTInductor package run in a fresh
process."""
import copy
import io
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from blockcheck import randomize_bn
from resnet_fused import FusedResidual, Residual, available_backends, fuse_model, serving
from tolerance import assert_within

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plain_net():
    torch.manual_seed(0)
    net = nn.Sequential(Residual(4, 8, use_1x1conv=True, strides=2), Residual(8, 8)).eval()
    randomize_bn(net)
    return net


def assert_matches_plain(out, plain, x, name="output"):
    """out (fp32) against the plain model in fp32 and float64, by the package's rule."""
    with torch.no_grad():
        ref = copy.deepcopy(plain).double()(x.double())
        assert_within(name, out, plain(x), ref, factor=2)


def _ckpt(model) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return buf


# ------------------------------------------------------------------ inference mode
def _converted_inside(plain):
    with torch.inference_mode():
        return fuse_model(plain)


def _state_dict_assigned_inside(plain):
    buf = _ckpt(fuse_model(plain).state_dict())
    with torch.inference_mode():
        model = fuse_model(plain_net())
        model.load_state_dict(torch.load(buf), assign=True)
    return model


def _state_dict_copied_inside(plain):
    buf = _ckpt(fuse_model(plain).state_dict())
    model = fuse_model(nn.Sequential(Residual(4, 8, True, 2), Residual(8, 8)))
    with torch.inference_mode():
        model.load_state_dict(torch.load(buf))
    return model


def _whole_model_loaded_inside(plain):
    buf = _ckpt(fuse_model(plain))
    with torch.inference_mode():
        return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("make, inference_tensors", [
    (_converted_inside, True), (_state_dict_assigned_inside, True),
    (_state_dict_copied_inside, False), (_whole_model_loaded_inside, True)])
def test_model_made_under_inference_mode_runs(make, inference_tensors):
    plain = plain_net()
    fused = make(plain).eval()
    tensors = list(fused.parameters()) + list(fused.buffers())
    assert any(t.is_inference() for t in tensors) == inference_tensors
    x = torch.randn(3, 4, 9, 9)
    with torch.inference_mode():
        out = fused(x)
    assert_matches_plain(out, plain, x)
    with torch.no_grad():  # and outside inference mode, too
        assert_matches_plain(fused(x), plain, x)


def test_inference_tensors_changed_in_place_are_seen():
    """Inference tensors keep no version counter: a change made in place inside
    inference mode (here a BN recalibration pass in train mode, then a scaled
    running_var) must still reach the eval output, so their fold is not cached."""
    plain = plain_net()
    with torch.inference_mode():
        fused = fuse_model(plain).eval()
        x = torch.randn(3, 4, 9, 9)
        fused(x)  # would fill a cache
        calib = torch.randn(6, 4, 9, 9)
        for m in (plain, fused):
            m.train()
            m(calib)
            m.eval()
            m[1].bn2.running_var.mul_(3.0)
        out = fused(x)
    assert_matches_plain(out, plain, x)


# ------------------------------------------------------------------ torch.export
def _cpu_backends():
    return [b for b in ("torch", "native", "triton", "eager") if b in available_backends("cpu")]


@pytest.mark.parametrize("backend", _cpu_backends())
def test_export_keeps_fused_ops_with_a_dynamic_batch(backend):
    plain = plain_net()
    fused = fuse_model(plain, backend=backend).eval()
    x = torch.randn(2, 4, 9, 9)
    program = serving.export(fused, (x,))
    ops = serving.fused_ops(program)
    assert len(ops) == 4 and all(o.split(".")[1] in ("conv_bias_relu",
                                                      "conv_bias_shortcut_relu") for o in ops)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in t or "convolution" in t or "conv2d" in t
                   for t in targets), targets
    for n in (1, 5):
        xb = torch.randn(n, 4, 9, 9)
        with torch.no_grad():
            assert_matches_plain(program.module()(xb), plain, xb, f"batch {n}")


def test_plain_torch_export_keeps_fused_ops():
    """torch.export.export itself (no helper) traces with grad mode on: the eval block
    must still take the folded ops, not the unfused path it uses under autograd."""
    fused = fuse_model(plain_net(), backend="torch").eval()
    program = torch.export.export(fused, (torch.randn(2, 4, 9, 9),))
    assert len(serving.fused_ops(program)) == 4


def test_export_refuses_training_mode_and_silent_fallback(monkeypatch):
    fused = fuse_model(plain_net(), backend="torch")
    x = torch.randn(2, 4, 9, 9)
    with pytest.raises(ValueError, match="model.eval"):
        serving.export(fused.train(), (x,))
    with pytest.raises(TypeError, match="args must be a tuple"):
        serving.export(fused.eval(), x)
    # Were the block to take its unfused path while exporting, export says so.
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: False)
    with pytest.raises(RuntimeError, match="exported as plain ops"):
        serving.export(fused.eval(), (x,))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_export_on_cuda(backend):
    if backend not in available_backends("cuda"):
        pytest.skip(f"{backend} unavailable on cuda")
    plain = plain_net().cuda()
    fused = fuse_model(plain, backend=backend).eval()
    program = serving.export(fused, (torch.randn(2, 4, 9, 9, device="cuda"),))
    xb = torch.randn(5, 4, 9, 9, device="cuda")
    with torch.no_grad():
        assert_matches_plain(program.module()(xb), plain, xb)


# ------------------------------------------------------------------ AOTInductor
_RUNNER = """
import sys, torch
from resnet_fused import serving
runner = serving.load_package(sys.argv[1])
x = torch.load(sys.argv[2])
torch.save(runner(x), sys.argv[3])
"""


def test_aoti_package_runs_in_a_fresh_process(tmp_path):
    """Export one projection block, compile it with AOTInductor (about 30-40 s on
    2 cores), load and run it in a new Python process at another batch size."""
    backend = "native" if "native" in available_backends("cpu") else "torch"
    torch.manual_seed(0)
    plain = nn.Sequential(Residual(4, 8, use_1x1conv=True, strides=2)).eval()
    randomize_bn(plain)
    fused = fuse_model(plain, backend=backend).eval()
    program = serving.export(fused, (torch.randn(2, 4, 9, 9),))
    pkg = torch._inductor.aoti_compile_and_package(program,
                                                   package_path=str(tmp_path / "m.pt2"))
    x = torch.randn(3, 4, 9, 9)
    torch.save(x, tmp_path / "x.pt")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _RUNNER, pkg, str(tmp_path / "x.pt"),
                           str(tmp_path / "y.pt")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_matches_plain(torch.load(tmp_path / "y.pt"), plain, x)


def test_load_package_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such package"):
        serving.load_package(str(tmp_path / "nope.pt2"))
