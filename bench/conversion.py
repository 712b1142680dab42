#!/usr/bin/env python
"""What conversion costs on the host: fuse_model on whole ResNets (CPU, no kernels run).

    python bench/conversion.py                 # ResNet-18/50/152 (torchvision), p50/p20/p80
    python bench/conversion.py --repeats 3 --models resnet152

fuse_model deep-copies the model, then traces each candidate block's forward once with
torch.fx and matches it (resnet_fused/matching.py). The rows split the two: `copy` is
copy.deepcopy alone, `fuse_model` the whole call, `inplace` fuse_model(inplace=True) on
a fresh copy (tracing and matching only). The repeats are interleaved across the three.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(1, os.path.dirname(HERE))  # run from a checkout without `pip install -e .`

import torch  # noqa: E402

from resnet_fused import FusedResidual, fuse_model  # noqa: E402


def _model(name: str) -> torch.nn.Module:
    if name == "d2l_resnet18":
        from resnet_fused import resnet18
        return resnet18(in_channels=3)
    try:
        import torchvision
    except ImportError:
        raise SystemExit(f"{name} needs torchvision (pip install torchvision matching "
                         "your torch); d2l_resnet18 runs without it") from None
    return getattr(torchvision.models, name)()


def _quantiles(ms: list) -> tuple:
    qs = statistics.quantiles(ms, n=10) if len(ms) > 1 else [ms[0]] * 9
    return statistics.median(ms), qs[1], qs[7]   # p50, p20, p80


def measure(name: str, repeats: int) -> list:
    """Rows (model, what, blocks converted, p50, p20, p80 in ms)."""
    model = _model(name)
    times = {"copy": [], "fuse_model": [], "inplace": []}
    blocks = 0
    for _ in range(repeats):
        t = time.perf_counter()
        fresh = copy.deepcopy(model)
        times["copy"].append(time.perf_counter() - t)
        t = time.perf_counter()
        fuse_model(model, backend="torch")
        times["fuse_model"].append(time.perf_counter() - t)
        t = time.perf_counter()
        fused = fuse_model(fresh, backend="torch", inplace=True)
        times["inplace"].append(time.perf_counter() - t)
        blocks = sum(isinstance(m, FusedResidual) for m in fused.modules())
    return [(name, what, blocks, *_quantiles([1e3 * s for s in ts]))
            for what, ts in times.items()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet18,resnet50,resnet152",
                   help="comma list: torchvision model names, or d2l_resnet18")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':<14} {'what':<11} {'blocks':>6} {'p50 ms':>8} {'p20 ms':>8} {'p80 ms':>8}")
    for name in args.models.split(","):
        for row in measure(name, args.repeats):
            print(f"{row[0]:<14} {row[1]:<11} {row[2]:>6} {row[3]:>8.1f} {row[4]:>8.1f} "
                  f"{row[5]:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
