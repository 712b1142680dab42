"""`python -m resnet_fused`: the environment report users paste into bug reports."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, env=None):
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", "resnet_fused", *args], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_report_names_versions_backends_and_auto_picks():
    out = _run()
    for word in ("resnet_fused 0.1.0", "torch ", "triton ", "cuDNN", "driver", "gpu",
                 "extension", "backends", "auto on cpu", "s2", "s3d", "s3 ", "s4", "s5",
                 "512-512-7-7-1", "r50 l1.0", "b-256-128-512-56-56-2"):
        assert word in out, f"{word!r} missing from:\n{out}"
    for name in ("torch", "native", "triton", "eager"):
        assert f"cpu     {name}" in out


def test_report_says_why_a_backend_is_unavailable():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    out = _run(env=env)
    assert "triton  Triton needs a CUDA GPU" in out


def test_report_as_json():
    info = json.loads(_run("--json"))
    assert info["torch"] and set(info["backends"]["cpu"]) == {"torch", "native", "triton", "eager"}
    basic = {"s2", "s3d", "s3", "s4", "s5"}
    r50 = {f"r50 l{i}{sfx}" for i in range(1, 5) for sfx in ("", ".0")}
    assert {r["stage"] for r in info["auto"]["cpu"]} == basic | r50
    # On CPU auto computes with PyTorch's own kernels (training) and folded BN (eval).
    assert all(r["backend"] == "eager" for r in info["auto"]["cpu"])


def test_importing_the_user_modules_queries_no_cuda():
    code = (
        "import torch\n"
        "def boom(*a, **k): raise SystemExit('CUDA queried at import')\n"
        "for n in ('is_available', 'device_count', 'get_device_capability',\n"
        "          'get_device_name', 'get_device_properties'):\n"
        "    setattr(torch.cuda, n, boom)\n"
        "import resnet_fused, resnet_fused.testing, resnet_fused.serving\n"
        "import resnet_fused.__main__\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr + res.stdout
