"""`python -m resnet_fused`: what this machine has, for bug reports.

Versions (package, Python, torch, Triton, CUDA, cuDNN, driver), each GPU and its
compute capability, the architectures the C++ extension was built for, each backend
available or why not, and what backend="auto" picks for the five ResNet-18 stage
shapes (from measured.json, or the fallback order). `--json` prints the same as JSON.
Only this command queries CUDA; `import resnet_fused` never does.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys

import torch

from . import __version__, backends
from .backends import preference

# The five ResNet-18 stage shapes at 224x224 (input channels, output channels, input
# H = W, stride), the shapes bench/run.py measures; s3d is the strided projection.
STAGES = {"s2": (64, 64, 56, 1), "s3d": (64, 128, 56, 2), "s3": (128, 128, 28, 1),
          "s4": (256, 256, 14, 1), "s5": (512, 512, 7, 1)}
# ResNet-50's bottleneck stages at 224x224: (cin, width, cout, input hw, stride).
BOTTLENECK_STAGES = {"r50 l1.0": (64, 64, 256, 56, 1), "r50 l1": (256, 64, 256, 56, 1),
                     "r50 l2.0": (256, 128, 512, 56, 2), "r50 l2": (512, 128, 512, 28, 1),
                     "r50 l3.0": (512, 256, 1024, 28, 2), "r50 l3": (1024, 256, 1024, 14, 1),
                     "r50 l4.0": (1024, 512, 2048, 14, 2), "r50 l4": (2048, 512, 2048, 7, 1)}
AUTO_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _triton_version() -> str:
    try:
        import triton
    except Exception as e:  # noqa: BLE001  (missing or broken: say which)
        return f"not importable ({type(e).__name__}: {e})"
    return triton.__version__


def _driver_version() -> str:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "unknown (no nvidia-smi on PATH)"
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown (nvidia-smi: {e})"
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else \
        f"unknown (nvidia-smi: {out.stderr.strip()[:200] or 'exit ' + str(out.returncode)})"


def _extension() -> dict:
    from .backends.native import load_extension

    ext, err = load_extension()
    if ext is None:
        return {"built": False, "error": err}
    archs = tuple(getattr(ext, "cuda_archs", ()))
    return {"built": True, "path": ext.__file__,
            "built_with_cuda": bool(getattr(ext, "built_with_cuda", False)),
            "cuda_archs": [f"sm_{a}" for a in archs]}


def _gpus() -> list:
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                    "memory_gib": round(p.total_memory / 2**30, 1),
                    "multiprocessors": p.multi_processor_count})
    return out


def _backends(devices: list) -> dict:
    table = {}
    for dev in devices:
        table[dev] = {name: backends.unavailable_reason(name, torch.device(dev)) or "available"
                      for name in backends.NAMES}
    return table


def _auto(device: str) -> list:
    """What auto picks per stage shape, mode and dtype on `device`, and from where."""
    dev = torch.device(device)
    rows = []
    keys = {stage: preference.shape_key((1, cin, hw, hw), cout, stride)
            for stage, (cin, cout, hw, stride) in STAGES.items()}
    keys.update({stage: preference.bottleneck_key((1, cin, hw, hw), width, cout, stride)
                 for stage, (cin, width, cout, hw, stride) in BOTTLENECK_STAGES.items()})
    for stage, key in keys.items():
        for mode in ("eval", "train"):
            for dtype in AUTO_DTYPES:
                dname = str(dtype).replace("torch.", "")
                pick = backends.choose(dev, dtype, mode == "train", key).name
                measured = dev.type == "cuda" and preference.measured_winner(
                    dev.index, dname, mode == "train", key) is not None
                source = ("measured.json" if measured else
                          "CPU order" if dev.type == "cpu" else "fallback order")
                rows.append({"stage": stage, "shape": key, "mode": mode, "dtype": dname,
                             "backend": pick, "from": source})
    return rows


def collect() -> dict:
    """Everything the report prints, as a dict."""
    cuda = torch.cuda.is_available()
    devices = ["cpu"] + ([f"cuda:{i}" for i in range(torch.cuda.device_count())] if cuda else [])
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "resnet_fused": {"version": __version__, "path": os.path.dirname(__file__)},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": cudnn,
        "triton": _triton_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "cuda_available": cuda,
        "driver": _driver_version() if cuda or shutil.which("nvidia-smi") else
        "none (no nvidia-smi on PATH)",
        "gpus": _gpus() if cuda else [],
        "extension": _extension(),
        "measured_json": (preference.MEASURED_PATH if os.path.exists(preference.MEASURED_PATH)
                          else None),
        "backends": _backends(devices),
        "auto": {dev: _auto(dev) for dev in devices},
    }


def render(info: dict) -> str:
    ext = info["extension"]
    lines = [
        f"resnet_fused {info['resnet_fused']['version']} ({info['resnet_fused']['path']})",
        f"python       {info['python']} on {info['platform']}",
        f"torch        {info['torch']} (CUDA {info['torch_cuda'] or 'none'}, "
        f"cuDNN {info['cudnn'] or 'none'})",
        f"triton       {info['triton']}"
        + (f" (TRITON_INTERPRET={info['triton_interpret']})" if info["triton_interpret"] else ""),
        f"driver       {info['driver']}",
    ]
    if info["gpus"]:
        for g in info["gpus"]:
            lines.append(f"gpu {g['index']}        {g['name']}, compute capability "
                         f"{g['capability']}, {g['memory_gib']} GiB, {g['multiprocessors']} SMs")
    else:
        lines.append("gpu          none (torch.cuda.is_available() is False)")
    if ext["built"]:
        archs = ", ".join(ext["cuda_archs"]) or "none"
        lines.append(f"extension    {ext['path']}: CUDA kernels "
                     f"{'yes' if ext['built_with_cuda'] else 'no'}, archs {archs}")
    else:
        lines.append(f"extension    not built ({ext['error']})")
    lines.append(f"measured     {info['measured_json'] or 'no measured.json: auto uses the fallback order'}")
    lines.append("backends")
    for dev, table in info["backends"].items():
        for name, state in table.items():
            lines.append(f"  {dev:7s} {name:7s} {state}")
    for dev, rows in info["auto"].items():
        lines.append(f"auto on {dev} (stage shape cin-cout-h-w-stride: eval / train)")
        by_stage = {}
        for r in rows:
            by_stage.setdefault((r["stage"], r["shape"]), {}).setdefault(r["mode"], []).append(
                f"{r['dtype']}={r['backend']}")
        sources = sorted({r["from"] for r in rows})
        for (stage, shape), modes in by_stage.items():
            lines.append(f"  {stage:4s} {shape:15s} eval: {' '.join(modes['eval'])}; "
                         f"train: {' '.join(modes['train'])}")
        lines.append(f"  (from {', '.join(sources)})")
    if not info["gpus"]:
        lines.append("auto on cuda: no GPU here; on one it takes measured.json's winner for "
                     "the card, shape, mode and dtype, else the first available of "
                     + ", ".join(preference.CUDA_DEFAULT["train"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m resnet_fused", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=1) if args.json else render(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
