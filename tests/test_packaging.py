"""What a distribution of resnet_fused holds: the package and the extension's sources,
not the test infrastructure (csrc/emu) nor the developer tools (csrc/tools)."""
import importlib.util
import os
import shutil
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


# ----------------------------------------------------------------- CUDA toolkit lookup
def _setup_module():
    """setup.py imported, not run: it builds only as __main__ (python setup.py, pip)."""
    spec = importlib.util.spec_from_file_location("resnet_fused_setup",
                                                  os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _script(path, body):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def _toolkit(root):
    """A stand-in CUDA toolkit: include/cuda_runtime.h and a bin/nvcc whose dry run
    names its own folder as nvcc's does (`#$ _HERE_=...` on stderr)."""
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime.h").write_text("")
    return _script(root / "bin" / "nvcc",
                   'echo "#\\$ _HERE_=$(cd "$(dirname "$0")" && pwd)" >&2\n')


def _which_in(folder):
    return lambda name: shutil.which(name, path=str(folder))


def test_importing_setup_builds_nothing():
    mod = _setup_module()
    assert callable(mod.cuda_home_from_nvcc)
    assert not hasattr(mod, "ext_modules")  # _extensions() and setup() did not run


def test_cuda_home_is_the_toolkit_behind_a_symlinked_nvcc(tmp_path):
    """PATH's nvcc is a symlink in a folder outside the toolkit (/usr/local/bin/nvcc ->
    /opt/cuda/bin/nvcc): the toolkit is the real file's, not the folder above PATH's bin/
    (torch's guess, /usr/local here)."""
    mod = _setup_module()
    real = _toolkit(tmp_path / "opt" / "cuda-13.0")
    (tmp_path / "usr" / "local" / "bin").mkdir(parents=True)
    (tmp_path / "usr" / "local" / "bin" / "nvcc").symlink_to(real)
    root, problem = mod.cuda_home_from_nvcc({}, _which_in(tmp_path / "usr" / "local" / "bin"))
    assert (root, problem) == (str(tmp_path / "opt" / "cuda-13.0"), None)
    # symlinked folders on the way resolve too
    (tmp_path / "cuda").symlink_to(tmp_path / "opt" / "cuda-13.0")
    root, _ = mod.cuda_home_from_nvcc({}, _which_in(tmp_path / "cuda" / "bin"))
    assert root == str(tmp_path / "opt" / "cuda-13.0")


def test_cuda_home_is_the_toolkit_a_wrapper_script_runs(tmp_path):
    """PATH's nvcc is a script outside the toolkit, `exec /opt/cuda-13.0/bin/nvcc "$@"`
    (realpath cannot see through it): the toolkit is the one nvcc's dry run names."""
    mod = _setup_module()
    real = _toolkit(tmp_path / "opt" / "cuda-13.0")
    wrapper = _script(tmp_path / "usr" / "local" / "bin" / "nvcc", f'exec {real} "$@"\n')
    root, problem = mod.cuda_home_from_nvcc({}, _which_in(wrapper.parent))
    assert (root, problem) == (str(tmp_path / "opt" / "cuda-13.0"), None)


def test_cuda_home_keeps_a_wrapper_whose_own_folder_has_the_headers(tmp_path):
    """A distribution's /usr/bin/nvcc wrapper script with the headers in /usr/include."""
    mod = _setup_module()
    wrapper = _toolkit(tmp_path / "usr")
    root, problem = mod.cuda_home_from_nvcc({}, _which_in(wrapper.parent))
    assert (root, problem) == (str(tmp_path / "usr"), None)


def test_nvcc_outside_any_toolkit_names_the_variable_to_set(tmp_path):
    mod = _setup_module()
    wrapper = _script(tmp_path / "wrap" / "bin" / "nvcc",
                      f'exec {tmp_path / "nowhere" / "nvcc"} "$@"\n')  # fails: says nothing
    root, problem = mod.cuda_home_from_nvcc({}, _which_in(wrapper.parent))
    assert root is None
    assert str(wrapper) in problem and "Set CUDA_HOME" in problem
    assert str(tmp_path / "wrap" / "include" / "cuda_runtime.h") in problem


@pytest.mark.parametrize("env", [{"CUDA_HOME": "/x"}, {"CUDA_PATH": "/y"}, {}])
def test_cuda_home_lookup_leaves_set_variables_and_a_missing_nvcc_to_torch(tmp_path, env):
    mod = _setup_module()
    nvcc = _toolkit(tmp_path / "tk")
    folder = nvcc.parent if env else tmp_path / "empty"  # {}: no nvcc on PATH
    assert mod.cuda_home_from_nvcc(env, _which_in(folder)) == (None, None)


def test_build_takes_the_toolkit_of_a_symlinked_nvcc(tmp_path):
    """setup.py's extension step with CUDA_HOME unset and PATH's nvcc a symlink: it sets
    CUDA_HOME (and torch's cpp_extension.CUDA_HOME) to the real toolkit, and says so. A
    CUDA build of torch only (a CPU torch never looks for nvcc)."""
    import torch
    if torch.version.cuda is None:
        pytest.skip("a CPU build of torch compiles no CUDA sources")
    real = _toolkit(tmp_path / "opt" / "cuda")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(real)
    code = ("import importlib.util, os, sys\n"
            f"spec = importlib.util.spec_from_file_location('s', {os.path.join(ROOT, 'setup.py')!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "exts, _ = m._extensions()\n"
            "from torch.utils import cpp_extension\n"
            "print(os.environ['CUDA_HOME'], cpp_extension.CUDA_HOME, exts[0].name)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, text=True,
                         capture_output=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    want = str(tmp_path / "opt" / "cuda")
    assert res.stdout.split() == [want, want, "resnet_fused._C"], res.stdout
    assert f"CUDA_HOME unset; using {want}" in res.stderr
