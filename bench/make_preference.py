#!/usr/bin/env python
"""Benchmark results -> resnet_fused/backends/measured.json: the fastest FusedResidual
backend per (GPU, mode, dtype, block shape), which backends/preference.py reads for
backend="auto".

    python bench/make_preference.py bench/results/nvidia-h200/results.json
    python bench/make_preference.py bench/results/*/results.json --out measured.json

Only CUDA results count (CPU timings say nothing about a GPU). Entries for the same
(gpu, mode, dtype, shape) are replaced; entries of other GPUs already in the output file
are kept, so results of several cards merge into one file.

Format (version 1):
{
  "format": 1,
  "generated": "2026-11-26T10:00:00Z",
  "entries": [
    {"gpu": "NVIDIA H200",        # torch.cuda.get_device_name(); match: entry gpu in name
     "mode": "eval",              # "eval" or "train"
     "dtype": "bfloat16",         # str(torch dtype) without "torch."
     "shape": "64-64-56-56-1",    # cin-cout-h-w-stride (input H, W)
     "batch": 128,                # batch the winner was measured at
     "backend": "native",         # the fastest fused backend
     "ms": {"native": 0.14, "triton": 0.16, "torch": 0.31},   # p50 of each backend
     "torch": "2.11.0+cu130", "triton": "3.6.0", "timestamp": "..."}
  ]
}
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(ROOT, "resnet_fused", "backends", "measured.json")
DTYPE_LONG = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def winners(rows: list[dict], batch: int | None = None) -> list[dict]:
    """Fastest fused backend per (gpu, mode, dtype, shape) among OK block-timing rows of
    CUDA runs; rows whose output check flagged a mismatch do not compete."""
    groups: dict = {}
    for r in rows:
        if (r.get("device") != "cuda" or r.get("section") not in ("block", "bottleneck", "sweep")
                or r.get("metric") != "time" or r.get("status") != "OK"
                or not str(r.get("provider", "")).startswith("fused_")
                or "MISMATCH" in str(r.get("note", ""))):
            continue
        if r.get("section") == "sweep" and batch is None:
            continue  # the stage shapes at their own batch decide, unless a batch is asked
        if batch is not None and int(r["batch"]) != batch:
            continue
        key = (r["gpu"], r["mode"], DTYPE_LONG.get(r["dtype"], r["dtype"]), r["shape"],
               int(r["batch"]))
        groups.setdefault(key, {})[r["provider"][len("fused_"):]] = r
    out = []
    for (gpu, mode, dtype, shape, n), by_backend in sorted(groups.items()):
        ms = {b: float(r["p50"]) for b, r in by_backend.items()}
        best = min(ms, key=ms.get)
        r = by_backend[best]
        out.append({"gpu": gpu, "mode": mode, "dtype": dtype, "shape": shape, "batch": n,
                    "backend": best, "ms": {b: round(v, 5) for b, v in sorted(ms.items())},
                    "torch": r.get("torch", ""), "triton": r.get("triton", ""),
                    "timestamp": r.get("timestamp", "")})
    return out


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    def key(e):
        return (e["gpu"], e["mode"], e["dtype"], e["shape"])
    merged = {key(e): e for e in old}
    merged.update({key(e): e for e in new})
    return [merged[k] for k in sorted(merged)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="results.json files (or folders holding one)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"default {os.path.relpath(DEFAULT_OUT)}")
    p.add_argument("--batch", type=int, help="decide at this batch (default: the stage shapes' own)")
    p.add_argument("--replace", action="store_true",
                   help="drop the entries already in --out instead of merging")
    a = p.parse_args(argv)
    rows = []
    for path in a.inputs:
        if os.path.isdir(path):
            path = os.path.join(path, "results.json")
        with open(path) as f:
            rows += json.load(f)["rows"]
    new = winners(rows, a.batch)
    if not new:
        print("no CUDA timing rows of fused backends in the inputs; nothing written "
              "(CPU results do not decide GPU preferences)", file=sys.stderr)
        return 1
    old = []
    if os.path.exists(a.out) and not a.replace:
        with open(a.out) as f:
            old = json.load(f).get("entries", [])
    doc = {"format": 1,
           "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "entries": merge(old, new)}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    for e in new:
        print(f"{e['gpu']:<24} {e['mode']:<5} {e['dtype']:<9} {e['shape']:<16} -> {e['backend']:<7}"
              + "  " + ", ".join(f"{b} {v:.4f}" for b, v in e["ms"].items()))
    print(f"wrote {len(doc['entries'])} entries to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
