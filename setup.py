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
    CUDA_HOME                    CUDA toolkit root; nvcc must be at $CUDA_HOME/bin/nvcc

CUDA sources are compiled whenever torch is a CUDA build (torch.version.cuda) and
nvcc is found, whether or not a GPU is present: the build needs no GPU.
"""
import os
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


def _extensions():
    if _flag("RESNET_FUSED_SKIP_EXT"):
        print("resnet_fused: RESNET_FUSED_SKIP_EXT=1, building no extension", file=sys.stderr)
        return [], {}
    import torch
    from torch.utils import cpp_extension

    # No -std flag: torch's cpp_extension picks the standard its headers need
    # (C++17 up to some versions, C++20 for torch 2.14).
    cxx = ["-O3"]
    sources = ["csrc/ops.cpp"]
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
        sources += ["csrc/cuda/bn_kernels.cu", "csrc/cuda/conv_cudnn.cpp"]
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


# py_limited_api=True (torch's cpp_extension then defines Py_LIMITED_API): the module
# init in csrc/ops.cpp uses only CPython's stable ABI, so the built _C.abi3.so loads on
# every CPython >= 3.10. torch's C++ ABI still ties it to the torch it was built against.
ext_modules, cmdclass = _extensions()

# Metadata and dependencies live in pyproject.toml; this file only adds the extension.
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # One build serves every CPython >= 3.10 (the extension uses only the stable ABI of
    # Python itself), so a build made here can run on a GPU machine's other Python.
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
