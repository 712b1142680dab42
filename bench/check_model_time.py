#!/usr/bin/env python
"""How long resnet_fused.testing.check_model takes on torchvision's ResNets through
Triton's interpreter on this CPU (issue 28's goals: ResNet-50 at 2x3x64x64, fp32, eval
and train, within 5 minutes on 2 cores; ResNet-18 within 2). A benchmark, not a test:
timings on a shared machine are noisy, so run the rows you compare back to back; the
process's CPU time (one thread: torch.set_num_threads(1), the interpreter is Python) is
what another process's load moves least, and is printed with the wall time.

    python bench/check_model_time.py                       # resnet18 and resnet50, per geometry
    python bench/check_model_time.py --models resnet18 --whole   # the whole model instead
    python bench/check_model_time.py --profile             # + launches/programs per kernel

Prints one line per model (seconds, verdict, geometries) and, with --profile, the
interpreter's launches, programs and seconds per kernel (interp_cost.LaunchProfile).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402


def randomize_bn(net):
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--modes", nargs="+", default=["eval", "train"])
    ap.add_argument("--steps", type=int, default=3, help="check_model's steps (default 3)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--whole", action="store_true", help="by_geometry=False")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    import torchvision
    from interp_cost import LaunchProfile
    from resnet_fused.testing import check_model
    torch.set_num_threads(1)
    for name in args.models:
        torch.manual_seed(0)
        net = getattr(torchvision.models, name)(num_classes=10)
        randomize_bn(net)
        x = torch.randn(args.batch, 3, args.size, args.size,
                        generator=torch.Generator().manual_seed(2))
        prof = LaunchProfile()
        t, cpu = time.perf_counter(), time.process_time()
        with prof if args.profile else _null():
            r = check_model(net, x, backends=[args.backend], modes=tuple(args.modes),
                            steps=args.steps, by_geometry=False if args.whole else None)
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
        worst = max((row.comparison.ratio for row in r.rows), default=float("nan"))
        print(f"{name} {args.batch}x3x{args.size}x{args.size} {args.backend} "
              f"{'+'.join(args.modes)} steps={args.steps} "
              f"{'whole model' if args.whole else 'per geometry'}: {cpu:.1f} s CPU "
              f"({wall:.1f} s wall), "
              f"{'PASS' if r.ok else 'FAIL'}, worst of bound {worst:.2f}, "
              f"{len(r.geometries)} geometries", flush=True)
        for g in r.geometries:
            print("   ", g)
        if not r.ok:
            print(r.table())
        if args.profile:
            print(prof.table(), flush=True)
    return 0


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(main())
