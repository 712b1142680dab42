"""Build of resnet_fused and its C++/CUDA extension resnet_fused._C (csrc/).

    CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .

Environment (flash-attention style):
    RESNET_FUSED_SKIP_EXT=1      no extension at all: pure-Python install (torch and
                                 triton backends only)
    RESNET_FUSED_SKIP_CUDA=1     CPU kernels only, even when CUDA is available
    RESNET_FUSED_CUDA_ARCHS      ';'-separated SM list, default "90a" (H100/H200);
                                 e.g. "80;90a" -> -gencode arch=compute_80,code=sm_80 ...
    RESNET_FUSED_PTXAS_VERBOSE=1 nvcc -Xptxas -v: registers, spills and shared memory of
                                 every kernel in the build log (see csrc/tools/resource_report.py)
    MAX_JOBS                     parallel compile jobs (read by torch's BuildExtension)
    CUDA_HOME                    CUDA toolkit root; nvcc must be at $CUDA_HOME/bin/nvcc.
                                 Unset (and no CUDA_PATH): the toolkit holding the real
                                 file behind `nvcc` on PATH (cuda_home_from_nvcc)

CUDA sources are compiled whenever torch is a CUDA build (torch.version.cuda) and
nvcc is found, whether or not a GPU is present: the build needs no GPU.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = "resnet_fused"


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_archs():
    """RESNET_FUSED_CUDA_ARCHS (default "90a") as a list such as ["80", "90a"]."""
    archs = os.environ.get("RESNET_FUSED_CUDA_ARCHS", "90a")
    # Accept "90a", "sm_90a", "compute_90a" and torch's dotted "9.0" / "9.0a".
    out = [a.strip().replace("sm_", "").replace("compute_", "").replace(".", "")
           for a in archs.replace(",", ";").split(";") if a.strip()]
    if not out or not all(a.rstrip("af").isdigit() for a in out):
        sys.exit(f"RESNET_FUSED_CUDA_ARCHS={archs!r}: expected e.g. '90a', '80;90a' or '9.0a'")
    return out


def _gencode_flags(archs):
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def cuda_home_from_nvcc(environ=os.environ, which=shutil.which, run=subprocess.run):
    """(toolkit root, problem) when neither CUDA_HOME nor CUDA_PATH is set and `nvcc` is
    on PATH: the toolkit of the nvcc that actually runs. torch guesses the folder above
    the bin/ that PATH names, so a symlink or wrapper outside the toolkit
    (/usr/local/bin/nvcc -> /opt/cuda/bin/nvcc) made it take /usr/local and fail on
    missing CUDA headers. problem: why no candidate is a toolkit (no
    include/cuda_runtime.h), naming the variable to set. (None, None) when a variable is
    set or no nvcc is on PATH: torch's own lookup applies. run: subprocess.run (tests
    pass a stand-in)."""
    if environ.get("CUDA_HOME") or environ.get("CUDA_PATH"):
        return None, None
    nvcc = which("nvcc")
    if nvcc is None:
        return None, None
    real = os.path.realpath(nvcc)
    # In order: the real file's toolkit (a symlink); the one nvcc itself runs from (a
    # wrapper script such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`); the folder
    # above PATH's bin/, torch's own guess (a distribution's /usr/bin/nvcc with the
    # headers in /usr/include).
    bins = [os.path.dirname(real), _nvcc_bin_dir(nvcc, run), os.path.dirname(nvcc)]
    roots = list(dict.fromkeys(os.path.dirname(os.path.realpath(b)) for b in bins if b))
    for root in roots:
        if os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            return root, None
    shown = nvcc if real == nvcc else f"{nvcc} -> {real}"
    looked = ", ".join(os.path.join(r, "include", "cuda_runtime.h") for r in roots)
    return None, (f"nvcc on PATH ({shown}) is not inside a CUDA toolkit: no {looked}. Set "
                  "CUDA_HOME to the toolkit's root (the folder holding bin/nvcc and "
                  "include/cuda_runtime.h), or RESNET_FUSED_SKIP_CUDA=1 for the CPU "
                  "kernels only")


def _nvcc_bin_dir(nvcc: str, run) -> str | None:
    """The bin/ folder of the nvcc that `nvcc` runs, from its dry run's `#$ _HERE_=`
    line (nvcc prints the commands it would run, compiling nothing); None when it
    does not say (not an nvcc, or it fails)."""
    try:
        res = run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                  capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (res.stdout + "\n" + res.stderr).splitlines():
        if line.startswith("#$ _HERE_="):
            return line[len("#$ _HERE_="):].strip() or None
    return None


def _extensions():
    if _flag("RESNET_FUSED_SKIP_EXT"):
        print("resnet_fused: RESNET_FUSED_SKIP_EXT=1, building no extension", file=sys.stderr)
        return [], {}
    import torch
    resolved = None
    if not _flag("RESNET_FUSED_SKIP_CUDA") and torch.version.cuda is not None:
        resolved, problem = cuda_home_from_nvcc()
        if problem:
            sys.exit(f"resnet_fused: {problem}")
        if resolved:
            # Before torch.utils.cpp_extension reads it (at its import; `import torch`
            # does not import it).
            os.environ["CUDA_HOME"] = resolved
            print(f"resnet_fused: CUDA_HOME unset; using {resolved}, the toolkit of nvcc on "
                  "PATH", file=sys.stderr)
    from torch.utils import cpp_extension
    if resolved and cpp_extension.CUDA_HOME != resolved:
        cpp_extension.CUDA_HOME = resolved  # imported before this script set the variable

    # No -std flag: torch's cpp_extension picks the standard its headers need
    # (C++17 up to some versions, C++20 for torch 2.14).
    cxx = ["-O3"]
    sources = ["csrc/ops.cpp", "csrc/gate_ops.cpp"]
    include_dirs = [os.path.join(HERE, "csrc")]
    # The CUDA 13 wheels of torch ship the CUDA headers (cublas, cusparse, ...) that
    # torch's CUDA headers include in site-packages/nvidia/cu13/include.
    wheel_cuda_inc = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "cu13", "include")
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    with_cuda = (
        not _flag("RESNET_FUSED_SKIP_CUDA")
        and torch.version.cuda is not None
        and nvcc is not None
        and os.path.exists(nvcc)
    )
    if not with_cuda and not _flag("RESNET_FUSED_SKIP_CUDA") and torch.version.cuda is not None:
        print(f"resnet_fused: torch is a CUDA build but nvcc was not found (CUDA_HOME={cuda_home!r}); "
              "building CPU kernels only. Set CUDA_HOME to the CUDA toolkit root.", file=sys.stderr)
    if with_cuda:
        archs = _cuda_archs()
        sources += ["csrc/cuda/bn_kernels.cu", "csrc/cuda/gate_kernels.cu", "csrc/cuda/conv_cudnn.cpp"]
        # The SM list goes into the module (resnet_fused._C.cuda_archs) so the backend can
        # say "rebuild for this GPU" instead of failing with "no kernel image".
        sm_list = ",".join(a.rstrip("af") for a in archs)
        cxx += ["-DRESNET_FUSED_WITH_CUDA=1", f"-DRESNET_FUSED_SM_LIST={sm_list}"]
        if os.path.isdir(wheel_cuda_inc):
            include_dirs.append(wheel_cuda_inc)
        nvcc_flags = ["-O3", "-lineinfo", "-DRESNET_FUSED_WITH_CUDA=1"]
        nvcc_flags += _gencode_flags(archs)
        if _flag("RESNET_FUSED_PTXAS_VERBOSE"):
            nvcc_flags += ["-Xptxas", "-v"]
        ext = cpp_extension.CUDAExtension(
            f"{PACKAGE}._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc_flags}, py_limited_api=True,
        )
    else:
        ext = cpp_extension.CppExtension(
            f"{PACKAGE}._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
            py_limited_api=True,
        )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


# Run as a script (`python setup.py`, and pip: setuptools' build backend runs it as
# __main__); imported (tests/test_packaging.py), it only defines the functions above.
if __name__ == "__main__":
    # py_limited_api=True (torch's cpp_extension then defines Py_LIMITED_API): the module
    # init in csrc/ops.cpp uses only CPython's stable ABI, so the built _C.abi3.so loads
    # on every CPython >= 3.10. torch's C++ ABI still ties it to the torch it was built
    # against.
    ext_modules, cmdclass = _extensions()

    # Metadata and dependencies live in pyproject.toml; this file only adds the extension.
    setup(
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        # One build serves every CPython >= 3.10 (the extension uses only the stable ABI
        # of Python itself), so a build made here can run on a GPU machine's other Python.
        options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
    )
