#!/usr/bin/env python
"""What Triton's interpreter (TRITON_INTERPRET=1) costs on this CPU: per launch, per
program, per tl operation, and where the time of check_model's Triton runs goes (launches,
programs, seconds per kernel). Measurements behind bench/NOTES.md, "check_model through
the interpreter".

    python bench/interp_cost.py            # the micro costs, then one ResNet-18 profile
    python bench/interp_cost.py --micro    # the micro costs only
"""
from __future__ import annotations

import os
import sys
import time
from collections import defaultdict

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _empty(x_ptr):
    pass


@triton.jit
def _ops(x_ptr, N_OPS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.load(x_ptr + offs)
    for _ in range(N_OPS):
        acc = acc * 1.0001 + 1.0
    tl.store(x_ptr + offs, acc)


@triton.jit
def _dot(x_ptr, ITERS: tl.constexpr):
    r = tl.arange(0, 32)
    a = tl.load(x_ptr + r[:, None] * 32 + r[None, :])
    acc = tl.zeros((32, 32), dtype=tl.float32)
    for _ in range(ITERS):
        acc += tl.dot(a, a)
    tl.store(x_ptr + r[:, None] * 32 + r[None, :], acc)


def _time(fn, reps=5):
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def micro() -> dict:
    x = torch.zeros(32 * 32)
    t1 = _time(lambda: _empty[(1,)](x))
    t1000 = _time(lambda: _empty[(1000,)](x))
    per_program = (t1000 - t1) / 999
    o0 = _time(lambda: _ops[(100,)](x, N_OPS=0, BLOCK=32))
    o20 = _time(lambda: _ops[(100,)](x, N_OPS=20, BLOCK=32))
    per_op = (o20 - o0) / (100 * 40)  # 2 tl ops (mul, add) a loop step
    o20b = _time(lambda: _ops[(100,)](x, N_OPS=20, BLOCK=1024))
    per_op_1024 = (o20b - _time(lambda: _ops[(100,)](x, N_OPS=0, BLOCK=1024))) / (100 * 40)
    d0 = _time(lambda: _dot[(20,)](x, ITERS=0))
    d10 = _time(lambda: _dot[(20,)](x, ITERS=10))
    per_dot = (d10 - d0) / 200
    out = {"launch_us": t1 * 1e6, "program_us": per_program * 1e6,
           "elementwise_op_us_32": per_op * 1e6, "elementwise_op_us_1024": per_op_1024 * 1e6,
           "dot_32x32x32_us": per_dot * 1e6}
    for k, v in out.items():
        print(f"  {k:24s} {v:9.1f}")
    return out


class LaunchProfile:
    """Wraps the backend's launch(): launches, programs and seconds per kernel, wall and
    CPU (the process's: on a shared machine the CPU seconds are the figure, the wall
    seconds move with the other jobs' load)."""

    def __init__(self):
        self.stats = defaultdict(lambda: [0, 0, 0.0, 0.0])

    def __enter__(self):
        from resnet_fused.backends.triton import launcher
        mods = [m for name, m in sys.modules.items()
                if name.startswith("resnet_fused.backends.triton") and hasattr(m, "launch")]
        self._saved = [(m, m.launch) for m in mods]
        orig = launcher.launch
        stats = self.stats

        def launch(kernel, grid, *args, **kwargs):
            t, cpu = time.perf_counter(), time.process_time()
            progs = [0]
            g = grid

            def counting(meta):
                r = g(meta) if callable(g) else g
                n = 1
                for d in r:
                    n *= d
                progs[0] = n
                return r
            out = orig(kernel, counting, *args, **kwargs)
            name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None),
                                                               "__name__", str(kernel))
            s = stats[name]
            s[0] += 1
            s[1] += progs[0]
            s[2] += time.perf_counter() - t
            s[3] += time.process_time() - cpu
            return out
        for m, _ in self._saved:
            m.launch = launch
        return self

    def __exit__(self, *exc):
        for m, f in self._saved:
            m.launch = f

    def table(self) -> str:
        rows = sorted(self.stats.items(), key=lambda kv: -kv[1][3])
        lines = [f"  {'kernel':28s} {'launches':>8s} {'programs':>9s} {'s wall':>8s} "
                 f"{'s CPU':>8s} {'ms CPU/prog':>11s}"]
        for k, (n, p, s, c) in rows:
            lines.append(f"  {k[:28]:28s} {n:8d} {p:9d} {s:8.1f} {c:8.1f} "
                         f"{1e3 * c / max(p, 1):11.2f}")
        lines.append(f"  {'total':28s} {sum(v[0] for _, v in rows):8d} "
                     f"{sum(v[1] for _, v in rows):9d} {sum(v[2] for _, v in rows):8.1f} "
                     f"{sum(v[3] for _, v in rows):8.1f}")
        return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(1)
    print("Triton interpreter micro costs (us):")
    micro()
    if "--micro" in argv:
        return 0
    import torchvision
    from resnet_fused.testing import check_model
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    for mode in ("eval", "train"):
        with LaunchProfile() as prof:
            t = time.perf_counter()
            kw = {"steps": 1} if mode == "train" else {}
            r = check_model(net, x, backends=["triton"], modes=(mode,), **kw)
            wall = time.perf_counter() - t
        print(f"ResNet-18 2x3x64x64 check_model triton {mode}: {wall:.1f} s, "
              f"ok={r.ok}; kernels:")
        print(prof.table())
        for n in r.notes:
            print("  note:", n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
