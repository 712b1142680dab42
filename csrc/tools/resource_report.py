"""Resource report of the CUDA kernels, no GPU needed: compiles the kernel files of
csrc/cuda (bn_kernels.cu, gate_kernels.cu; --files picks) with nvcc -Xptxas -v (the flags of the extension build) and disassembles the cubin with
cuobjdump -sass, then prints one row per kernel: registers, spills, static shared
memory, and what the SASS does to memory (128-bit global loads/stores, other global
accesses, local-memory accesses, which a hot loop must not have).

    CUDA_HOME=/usr/local/cuda .venv/bin/python csrc/tools/resource_report.py [--filter bf16]

cuobjdump comes from CUDA_HOME/bin or, failing that, from triton's bundled copy. The
rows go into bench/NOTES.md ("native backend: compiler report").
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def find_tool(name):
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    p = os.path.join(cuda_home, "bin", name)
    if os.path.exists(p):
        return p
    try:
        import triton
        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(p):
            return p
    except ImportError:
        pass
    return shutil.which(name)


KERNEL_FILES = ("bn_kernels.cu", "gate_kernels.cu")


def compile_cu(arch, out_obj, source="bn_kernels.cu"):
    import torch
    from torch.utils import cpp_extension
    nvcc = find_tool("nvcc")
    inc = cpp_extension.include_paths(device_type="cuda") if "device_type" in \
        cpp_extension.include_paths.__code__.co_varnames else cpp_extension.include_paths(cuda=True)
    wheel_inc = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "cu13", "include")
    cmd = [nvcc, "-c", os.path.join(ROOT, "csrc", "cuda", source), "-o", out_obj,
           "-I" + os.path.join(ROOT, "csrc"), "-I" + sysconfig.get_paths()["include"]]
    cmd += ["-I" + p for p in inc] + (["-I" + wheel_inc] if os.path.isdir(wheel_inc) else [])
    cmd += ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
            "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
            "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "-O3", "-lineinfo",
            "-DRESNET_FUSED_WITH_CUDA=1", f"-gencode=arch=compute_{arch},code=sm_{arch}",
            "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-std=c++20",
            "-Xptxas", "-v"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(r.stderr[-4000:])
    return r.stderr


def demangle(names):
    r = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return [re.sub(r"resnet_fused::\(anonymous namespace\)::", "", s) for s in r.stdout.split("\n")]


def _per_function(text, header):
    """(function name, line) for every line after a line matching `header` (whose
    group 1 is the function's name); the header line itself comes with line None."""
    cur = None
    for line in text.splitlines():
        m = re.search(header, line)
        if m:
            cur = m.group(1)
            yield cur, None
        elif cur is not None:
            yield cur, line


def parse_ptxas(text):
    rows = {}
    for cur, line in _per_function(text, r"Compiling entry function '(\w+)'"):
        if line is None:
            rows[cur] = {}
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            rows[cur].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            rows[cur]["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            rows[cur]["smem"] = int(s.group(1)) if s else 0
    return rows


def parse_sass(text):
    out = {}
    for cur, line in _per_function(text, r"Function : (\w+)"):
        if line is None:
            out[cur] = dict(ldg128=0, stg128=0, ldg_other=0, stg_other=0, local=0, insts=0)
            continue
        if not re.search(r"/\*[0-9a-f]{4}\*/", line):
            continue
        d = out[cur]
        d["insts"] += 1
        if re.search(r"\bLDG\.E[.\w]*\.128\b", line):
            d["ldg128"] += 1
        elif re.search(r"\bLDG\b", line):
            d["ldg_other"] += 1
        if re.search(r"\bSTG\.E[.\w]*\.128\b", line):
            d["stg128"] += 1
        elif re.search(r"\bSTG\b", line):
            d["stg_other"] += 1
        if re.search(r"\b(LDL|STL)\b", line):
            d["local"] += 1
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="90a")
    ap.add_argument("--filter", default="", help="substring of the demangled name, e.g. BFloat16")
    ap.add_argument("--sass-out", default="", help="also write the full SASS here")
    ap.add_argument("--files", default=",".join(KERNEL_FILES),
                    help="comma-separated kernel files of csrc/cuda to compile")
    args = ap.parse_args()
    ptxas, sass_text = {}, ""
    with tempfile.TemporaryDirectory() as d:
        for source in args.files.split(","):
            obj = os.path.join(d, source + ".o")
            ptxas.update(parse_ptxas(compile_cu(args.arch, obj, source)))
            cuobjdump = find_tool("cuobjdump")
            sass_text += subprocess.run([cuobjdump, "-sass", obj], capture_output=True,
                                        text=True).stdout
    if args.sass_out:
        with open(args.sass_out, "w") as f:
            f.write(sass_text)
    sass = parse_sass(sass_text)
    names = sorted(ptxas)
    pretty = dict(zip(names, demangle(names)))
    print("| kernel | regs | spill st/ld B | smem B | LDG.128 | STG.128 | other LDG/STG | LDL/STL | SASS insts |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in sorted(names, key=lambda k: pretty[k]):
        p = pretty[n]
        if args.filter and args.filter not in p:
            continue
        r, s = ptxas[n], sass.get(n, {})
        short = re.sub(r"\(.*\)$", "", p).replace("void ", "").replace("c10::", "")
        print(f"| {short} | {r.get('regs')} | {r.get('spill_st')}/{r.get('spill_ld')} | {r.get('smem')} | "
              f"{s.get('ldg128')} | {s.get('stg128')} | {s.get('ldg_other')}/{s.get('stg_other')} | "
              f"{s.get('local')} | {s.get('insts')} |")


if __name__ == "__main__":
    main()
