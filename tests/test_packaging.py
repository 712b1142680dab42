"""What a distribution of resnet_fused holds: the package and the extension's sources,
not the test infrastructure (csrc/emu) nor the developer tools (csrc/tools)."""
import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tracked_package_files():
    out = subprocess.run(["git", "ls-files", "resnet_fused"], cwd=ROOT, capture_output=True,
                         text=True)
    if out.returncode != 0:
        pytest.skip(f"not a git checkout ({out.stderr.strip()[:200]})")
    return {p for p in out.stdout.split() if p.endswith((".py", ".json"))}


def test_sdist_holds_the_package_and_extension_sources_only(tmp_path):
    env = dict(os.environ, RESNET_FUSED_SKIP_CUDA="1")
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
         "sdist", "-d", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for needed in ("setup.py", "pyproject.toml", "csrc/ops.cpp", "csrc/common.h", "csrc/schemas.h",
                   "csrc/cuda/bn_kernels.cu", "csrc/cuda/conv_cudnn.cpp"):
        assert needed in names, f"{needed} missing from the sdist"
    assert _tracked_package_files() <= names
    shipped_elsewhere = sorted(n for n in names if n.startswith(("csrc/emu", "csrc/tools",
                                                                 "tests/", "bench/")))
    assert not shipped_elsewhere, shipped_elsewhere
    assert not [n for n in names if n.endswith(".so")]


def test_wheel_packages_are_resnet_fused_only():
    """Wheels take the packages pyproject.toml finds: resnet_fused and its subpackages
    (csrc has no __init__.py and is matched by no pattern)."""
    tomllib = pytest.importorskip("tomllib")
    from setuptools import find_packages

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        find = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(ROOT, include=find["include"])
    assert packages and all(p.split(".")[0] == "resnet_fused" for p in packages), packages
    assert "resnet_fused.backends.triton" in packages
    assert not os.path.exists(os.path.join(ROOT, "resnet_fused", "backends", "triton",
                                           "aot.py"))  # the compile checker is csrc/tools'
