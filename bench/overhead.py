"""Host overhead per call: what FusedResidual itself costs over its kernels.

At a tiny block (batch 2, 8 channels, 4x4) the kernels cost next to nothing, so a
call's time is the host's: Python, dispatch, launches. Per mode (eval under no_grad;
train = the training forward with autograd recording) it times, interleaved:

  plain        the D2L block as written (7 ATen ops in eval)
  ops_<b>      backend b called directly: forward_eval on folded weights, or
               forward_train (its ops and nothing else)
  fused_<b>    FusedResidual(backend=b), called as a module
and from the same repeats:
  one_op       the plain block followed by one torch.add on the input, minus the
               plain block: one tensor-op dispatch where a block runs (a dispatch
               between kernels costs more than in a tight loop of itself)
  module_<b>   fused_<b> minus ops_<b>: the module's own cost (validation, plan
               lookup, fold-cache check, Module.__call__)
Differences are taken per repeat, between neighbouring measurements. Between kernels
every host step costs more than in a loop of itself (cold caches), and the
differences carry the kernels' noise, so two figures with the kernels out follow:
  one_op_alone      torch.add timed by itself
  module_alone_<b>  FusedResidual with backend b's forward_eval / forward_train
                    replaced by `return x` while timed: the module's work alone

Host time: each repeat issues `calls` calls back to back between two device
synchronisations and divides the CPU time the calling thread spent issuing them (a
GPU's kernels run behind the host at this size; on the CPU, with one torch thread,
they run on that thread and are counted). Thread CPU time, not wall time: on a shared
machine a descheduled moment is not the block's cost. Rows are in microseconds per
call, p50/p20/p80 over the repeats.
bench/run.py runs this as its "overhead" section (CPU too); alone:

    python bench/overhead.py [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # run from a checkout without `pip install -e .`

from benchlib import quantile_ms, sync  # noqa: E402  (bench/ is on the path: run.py's or this script's)

BATCH, CHANNELS, HW = 2, 8, 4
SHAPE = f"{CHANNELS}-{CHANNELS}-{HW}-{HW}-1"


def time_interleaved(fns: dict, device: torch.device, repeats: int, calls: int) -> dict:
    """{name: [us per call, one per repeat]}: each repeat times every fn in turn (the
    order reversed every other repeat), so a slow moment of a shared machine falls on
    all of them alike."""
    for fn in fns.values():  # warm-up: lazy initialisation, first plans and folds
        for _ in range(3):
            fn()
    out = {name: [] for name in fns}
    items = list(fns.items())
    gc_was_on = gc.isenabled()
    gc.disable()  # as timeit: a collection landing in one provider's turn is noise
    try:
        for r in range(repeats):
            for name, fn in items if r % 2 == 0 else items[::-1]:
                sync(device)
                t0 = time.thread_time_ns()
                for _ in range(calls):
                    fn()
                out[name].append((time.thread_time_ns() - t0) / calls / 1e3)
                sync(device)
    finally:
        if gc_was_on:
            gc.enable()
    return out


def providers(mode: str, backends: list, device: torch.device, dtype: torch.dtype,
              channels_last: bool) -> dict:
    """{provider: zero-argument callable} for one mode at the tiny block (one_op: the
    add alone, for _alone)."""
    from resnet_fused import FusedResidual, Residual
    from resnet_fused import backends as registry
    from resnet_fused.fold import folded
    from resnet_fused.ops import memory_format_of

    train = mode == "train"
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    plain = Residual(CHANNELS, CHANNELS).to(device=device, dtype=dtype, memory_format=fmt)
    plain.train(train)
    x = torch.randn(BATCH, CHANNELS, HW, HW, device=device, dtype=dtype)
    x = x.contiguous(memory_format=fmt)
    fns = {"plain": lambda: plain(x), "plain_add": lambda: (plain(x), torch.add(x, x)),
           "one_op": lambda: torch.add(x, x)}
    for b in backends:
        fused = FusedResidual.from_residual(copy.deepcopy(plain), backend=b).train(train)
        backend = registry.get(b, device)
        parts = fused.parts()
        if train:
            fns[f"ops_{b}"] = lambda p=parts, be=backend: be.forward_train(p, x)
        else:
            fb = folded(fused, parts, x.dtype, memory_format_of(x))
            fns[f"ops_{b}"] = lambda p=parts, be=backend, fb=fb: be.forward_eval(p, fb, x)
        fns[f"fused_{b}"] = lambda f=fused: f(x)
    return fns


def _alone(fns: dict, backends: list, device, repeats: int, calls: int) -> dict:
    """one_op_alone and module_alone_<b> samples: fused_<b> timed with its backend's
    kernels stubbed out (instance attributes over the class's methods, removed after)."""
    from resnet_fused import backends as registry

    stubbed = [registry.get(b, device) for b in backends]
    for be in stubbed:
        be.forward_eval = lambda parts, folded, x: x
        be.forward_train = lambda parts, x, groups=None: x
    try:
        alone = {"one_op_alone": fns["one_op"]}
        alone.update({f"module_alone_{b}": fns[f"fused_{b}"] for b in backends})
        return time_interleaved(alone, device, repeats, calls * 20)
    finally:
        for be in stubbed:
            del be.forward_eval, be.forward_train


def measure(mode: str, backends: list, device: torch.device, dtype: torch.dtype,
            channels_last: bool = False, quick: bool = False) -> dict:
    """{provider: (p50, p20, p80) us per call} for one mode, module_<b> included."""
    repeats, calls = (9, 10) if quick else (41, 20)
    fns = providers(mode, backends, device, dtype, channels_last)
    one_op = fns.pop("one_op")
    with torch.enable_grad() if mode == "train" else torch.no_grad():
        samples = time_interleaved(fns, device, repeats, calls)
        samples.update(_alone({**fns, "one_op": one_op}, backends, device, repeats, calls))
    def minus(a, b):
        return [x - y for x, y in zip(samples[a], samples[b])]
    derived = {"one_op": minus("plain_add", "plain")}
    derived.update({f"module_{b}": minus(f"fused_{b}", f"ops_{b}") for b in backends})
    del samples["plain_add"]
    return {name: quantile_ms(s) for name, s in {**derived, **samples}.items()}


def table(results: dict) -> str:
    """Rows of {mode: {provider: (p50, p20, p80)}} as text."""
    lines = [f"host overhead per call (us; block {SHAPE}, batch {BATCH}): p50 [p20, p80]"]
    for mode, res in results.items():
        for name, (p50, p20, p80) in res.items():
            lines.append(f"  {mode:<5} {name:<20} {p50:8.1f}  [{p20:.1f}, {p80:.1f}]")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--backends", default="torch,native",
                   help="FusedResidual backends (default torch,native)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="CPU: torch threads")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cpu":
        torch.set_num_threads(a.threads)
    from resnet_fused import backends as registry

    names = [b for b in a.backends.split(",") if b
             and registry.unavailable_reason(b, device) is None]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = {mode: measure(mode, names, device, dtype, device.type == "cuda", a.quick)
               for mode in ("eval", "train")}
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
