#!/usr/bin/env python
"""What the fused residual block gains on this machine, and whether it is right.

    python bench/run.py            # everything available here (GPU: a few minutes)
    python bench/run.py --quick    # fewer repeats, no batch sweep on CPU
    python bench/run.py --help

Sections, in order (timing first, most telling first, so a --budget-s cut loses the least):
  1. block     the five ResNet-18 stage shapes (batch 128), eval and training
               forward+backward; providers: eager as written (fp32 NCHW), eager in the
               bench dtype (channels_last), cuDNN fused ops with folded BN (eval),
               FusedResidual per backend, torch.compile (in a second pass over the shapes).
  1b. bottleneck  the ResNet-50 v1.5 stage blocks (torchvision's Bottleneck; each
               stage's downsampling and identity block, batch 256), the same providers.
  1c. gated    SE-ResNet-50 and ResNet-50-D stage blocks (timm's Bottleneck with an SE
               gate, or the avg-pool shortcut), the same providers but cuDNN's.
  2. overhead  host time per call at a tiny block, where kernels cost next to nothing:
               one op, the plain block, each backend's ops called directly, FusedResidual,
               and the module's own cost (bench/overhead.py; us per call, CPU too).
  3. net       whole networks, eval and training step: torchvision's ResNet-50 (224x224,
               batch 256), timm's seresnet50 and resnet50d (same) and the D2L ResNet-18 (224x224, batch 128), in img/s.
  4. sweep     batch 1, 8, 32, 256 on 128ch 28x28.
  5. kernels   each fused op of each backend (ms, GB/s or TFLOP/s).
  6. numerics  every FusedResidual backend, dtype and mode against float64 on two small
               blocks, next to the plain block's own error in that dtype; PASS/FAIL by
               tests/tolerance.py. The timing sections leave it a quarter of --budget-s.
Rows go to results.csv / results.json (one schema), results.md and speedup.png in the
results folder (default bench/out/<gpu>_<date>/), written as the run goes: each row is
appended to results.csv when measured, results.csv/.json are rewritten at the end of each
shape and numerics case, results.md at the end of each section, so a killed run leaves
what it measured. --hard-timeout-s (default budget + max(30 s, budget/4)) writes them and
exits with rc 3 even when a kernel or a compile hangs. The summary is printed last.
Without CUDA the same runs at small shapes on the CPU: it checks numerics and that every
path runs; its timings say nothing about a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import os
import io
import sys
import threading
import time
import traceback
from typing import Callable, NamedTuple, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
if ROOT not in sys.path:
    sys.path.insert(1, ROOT)  # run from a checkout without `pip install -e .`

import triton_interpret  # noqa: E402

# Before torch: importing it (or resnet_fused) can import triton.language, which binds
# Triton's own helpers to the interpreter only if TRITON_INTERPRET is on by then
# (bench/triton_interpret.py). configure() corrects a wrong guess.
_INTERP_SET_EARLY = __name__ == "__main__" and triton_interpret.early(sys.argv[1:])

import torch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when present, else CPU (small shapes)")
    p.add_argument("--quick", action="store_true",
                   help="fewer repeats; CPU: fewer shapes, no sweep, no compile")
    p.add_argument("--shapes", help="comma list of stage shapes: s2,s3d,s3,s4,s5 (default all)")
    p.add_argument("--r50-shapes", help="comma list of ResNet-50 bottleneck shapes: "
                   "l1d,l1,l2d,l2,l3d,l3,l4d,l4 (default all)")
    p.add_argument("--modes", default="eval,train", help="eval,train (default both)")
    p.add_argument("--backends", help="FusedResidual backends, comma list among "
                   "torch,native,triton,eager (default: every available one)")
    p.add_argument("--providers", default="eager_fp32,eager,compile,cudnn_fused,fused",
                   help="baselines and fused providers to time (default all)")
    p.add_argument("--dtype", help="dtype of the timed providers other than eager_fp32: "
                   "bf16 (CUDA default), fp16, fp32 (CPU default)")
    p.add_argument("--numerics-dtypes", help="dtypes of the numerics report "
                   "(default fp32,fp16,bf16)")
    p.add_argument("--batch", type=int, help="batch of the stage shapes (default 128; CPU 4)")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode: default, max-autotune-no-cudagraphs, or none "
                   "to leave compile out")
    p.add_argument("--peak-tflops", type=float,
                   help="dense bf16/fp16 rate of the card for the compute floor "
                   "(default: measured at start on CUDA)")
    p.add_argument("--no-measure-peak", action="store_true",
                   help="take the peak from the built-in table instead of measuring it")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="stop starting new timings and numerics cases after this many seconds "
                   "(0: no limit); the timing sections leave a share of it to the numerics")
    p.add_argument("--hard-timeout-s", type=float, default=None,
                   help="after this many seconds write what was measured and exit with rc 3, "
                   "whatever is running (default: budget + max(30 s, budget/4); 0: never)")
    p.add_argument("--out", help="results folder (default bench/out/<gpu>_<date>/)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU only: torch threads (default 1: steadier timings on a shared "
                   "machine; GPU runs leave the default)")
    p.add_argument("--no-numerics", action="store_true")
    p.add_argument("--no-timing", action="store_true", help="numerics only")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--no-kernels", action="store_true")
    p.add_argument("--no-net", action="store_true")
    p.add_argument("--no-bottleneck", action="store_true",
                   help="leave out the ResNet-50 bottleneck blocks (section and network)")
    p.add_argument("--no-gated", action="store_true",
                   help="leave out the SE-ResNet-50 / ResNet-50-D blocks and networks "
                   "(also left out by --no-bottleneck)")
    p.add_argument("--gated-shapes", help="comma list of SE-ResNet-50 / ResNet-50-D "
                   "block shapes: se1,se2d,se3,se4,d2d,d3d (default all)")
    p.add_argument("--no-overhead", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


# Set by configure() when main() runs; nothing is parsed or measured at import, so the
# functions below can be driven in-process (tests/test_bench_run.py).
ARGS = None
DEVICE = None
ON_GPU = False
R = None
TRITON_INTERP_SET_HERE = False
FusedResidual = fuse_model = resnet18 = rf_backends = None

import benchlib as bl  # noqa: E402
import make_tables  # noqa: E402
import overhead  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "tests"))
import tolerance  # noqa: E402  (the numerics rule of README.md, Design, shared with the tests)


def configure(argv=None, may_reexec: bool = False):
    """Parse argv and set the module state (device, Triton interpreter, package).
    may_reexec: run as a script, so a TRITON_INTERPRET that does not fit the device can
    be fixed by starting the script again (triton_interpret.settle)."""
    global ARGS, DEVICE, ON_GPU, TRITON_INTERP_SET_HERE
    global FusedResidual, fuse_model, resnet18, rf_backends
    ARGS = parse_args(argv)
    if ARGS.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to PyTorch "
                         f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    DEVICE = torch.device("cuda" if (ARGS.device == "cuda" or (ARGS.device == "auto" and
                                                             torch.cuda.is_available())) else "cpu")
    ON_GPU = DEVICE.type == "cuda"
    # Without a GPU, Triton kernels can only run in its interpreter, which must be on
    # before triton.language is imported (bench/triton_interpret.py).
    TRITON_INTERP_SET_HERE = triton_interpret.settle(
        ON_GPU, _INTERP_SET_EARLY or TRITON_INTERP_SET_HERE, may_reexec)
    try:
        import resnet_fused  # noqa: F401
        from resnet_fused import FusedResidual as _fr, fuse_model as _fm, resnet18 as _r18
        from resnet_fused import backends as _be
    except Exception as e:  # noqa: BLE001
        raise SystemExit(f"cannot import resnet_fused ({type(e).__name__}: {e}); install it with "
                         "`pip install --no-build-isolation -e .` from the repository root")
    FusedResidual, fuse_model, resnet18, rf_backends = _fr, _fm, _r18, _be
    return ARGS


# Op namespace of each backend (resnet_fused/schemas.py).
NAMESPACE = {"native": "resnet_fused", "torch": "resnet_fused_torch",
             "triton": "resnet_fused_triton"}


# ============================================================================ bookkeeping
def _atomic_write(path: str, text: str):
    """Replace path in one step: a reader (or a kill) never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def _csv_line(r: dict) -> str:
    buf = io.StringIO()
    csv.DictWriter(buf, fieldnames=bl.COLUMNS).writerow(
        {k: bl.fmt(v, 6) if isinstance(v, float) else v for k, v in r.items()})
    return buf.getvalue()


class Results:
    """The results folder, kept current while the run goes, so that a run killed at any
    point leaves what it measured: each row is appended to results.csv as it is made;
    results.csv and results.json are rewritten whole (atomically) at checkpoints, when
    later columns such as the speedups are known (end of a shape, of a numerics case, of
    a section); results.md at the end of each section. speedup.png only at the end."""

    def __init__(self, folder: str):
        self.folder = folder
        self.lock = threading.RLock()  # the watchdog thread writes too
        self.csv = os.path.join(folder, "results.csv")
        self.json = os.path.join(folder, "results.json")
        self.md = os.path.join(folder, "results.md")

    def start(self):
        os.makedirs(self.folder, exist_ok=True)
        for p in (self.json, self.md, os.path.join(self.folder, "speedup.png")):
            if os.path.exists(p):
                os.remove(p)  # a stale file from an earlier run must not pass for this one's
        with self.lock:
            _atomic_write(self.csv, ",".join(bl.COLUMNS) + "\r\n")

    def append(self, r: dict):
        with self.lock:
            with open(self.csv, "a", newline="") as f:
                f.write(_csv_line(r))

    def checkpoint(self, run: "Run", md: bool = False) -> list[str]:
        with self.lock:
            _atomic_write(self.csv, ",".join(bl.COLUMNS) + "\r\n"
                          + "".join(_csv_line(r) for r in run.rows))
            _atomic_write(self.json, json.dumps(
                {"env": run.env, "skipped": run.skips, "errors": run.errors, "rows": run.rows},
                indent=1, default=str))
            paths = [self.csv, self.json]
            if md:
                _atomic_write(self.md, make_tables.markdown(run.rows, run.env, run.skips))
                paths.append(self.md)
            return paths


class Watchdog:
    """Calls on_fire from a thread after `seconds` unless cancelled: the run's own hard
    timeout, which holds even while the main thread is stuck in a kernel, a compile or
    an autotuning loop (a signal handler would wait for it)."""

    def __init__(self, seconds: float, on_fire):
        self.seconds, self.on_fire = seconds, on_fire
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._wait, name="bench-watchdog", daemon=True)

    def _wait(self):
        if not self._stop.wait(self.seconds):
            self.on_fire()

    def start(self):
        if self.seconds and self.seconds > 0:
            self._thread.start()
        return self

    def cancel(self):
        self._stop.set()


class Run:
    def __init__(self, budget_s: float = 0.0, numerics_share: float = 0.0):
        self.t0 = time.time()
        self.rows: list[dict] = []
        self.skips: list[str] = []
        self.errors: list[str] = []
        self.env = bl.environment(DEVICE)
        self.base = {k: self.env.get(k, "") for k in
                     ("device", "gpu", "torch", "triton", "package_version", "timestamp")}
        self.peak = None
        self.bw = None
        self.results = None  # Results, once the folder is known
        # Timing runs first and stops at timing_deadline, leaving the rest of the budget
        # to the numerics that follow it.
        self.budget_s = max(0.0, budget_s)
        self.numerics_reserve = self.budget_s * numerics_share
        self.stopped = ""  # why the run was cut short (interrupt, hard timeout)
        self._timings: dict = {}  # id(row) -> its bl.Timing (timed_row)

    def elapsed(self) -> str:
        s = int(time.time() - self.t0)
        return f"{s // 60:2d}:{s % 60:02d}"

    def over_budget(self, part: str = "timing") -> bool:
        if self.budget_s <= 0:
            return False
        spent = time.time() - self.t0
        if part == "timing":
            return spent > self.budget_s - self.numerics_reserve
        return spent > self.budget_s

    def say(self, msg: str):
        print(f"[{self.elapsed()}] {msg}", flush=True)

    def skip(self, what: str, why: str):
        line = f"skip {what}: {why}"
        if line not in self.skips:
            self.skips.append(line)
            self.say(line)

    def row(self, **kw) -> dict:
        r = dict.fromkeys(bl.COLUMNS, "")
        r.update(self.base)
        r["peak_tflops"] = self.peak if self.peak is not None else ""
        r.update({k: v for k, v in kw.items() if v is not None})
        unknown = set(r) - set(bl.COLUMNS)
        assert not unknown, f"row has columns outside the schema: {unknown}"
        self.rows.append(r)
        if self.results is not None:
            self.results.append(r)
        return r

    def timed_row(self, t: "bl.Timing", **kw) -> dict:
        """A row of timing t (its p-columns); the Timing is kept for the speedups."""
        r = self.row(**kw, p50=t.p50, p20=t.p20, p80=t.p80)
        self._timings[id(r)] = t
        return r

    def timing_of(self, r: dict) -> "bl.Timing":
        """The Timing of a row: the one timed_row kept, else its p-columns alone."""
        t = self._timings.get(id(r))
        return t if t is not None else bl.Timing(r["p50"], r["p20"], r["p80"])

    def checkpoint(self, md: bool = False):
        if self.results is not None:
            self.results.checkpoint(self, md=md)


BUDGET_SKIP = "time budget (--budget-s) spent"


def err_text(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}"


def bench_dtype() -> torch.dtype:
    if ARGS.dtype:
        if ARGS.dtype not in bl.DTYPES:
            raise SystemExit(f"--dtype: unknown dtype {ARGS.dtype!r}; use bf16, fp16 or fp32")
        return bl.DTYPES[ARGS.dtype]
    return torch.bfloat16 if ON_GPU else torch.float32


def layout_cl(dtype: torch.dtype) -> bool:
    """channels_last for the timed providers on the GPU (what cuDNN and our kernels are
    fast in); NCHW for the as-written fp32 block and on the CPU."""
    return ON_GPU


def fused_backends() -> list[str]:
    """Backends to run, in registry order; prints why each left-out one is left out."""
    wanted = list(rf_backends.NAMES)
    if ARGS.backends:
        wanted = [b.strip() for b in ARGS.backends.split(",") if b.strip()]
        for b in wanted:
            if b not in rf_backends.NAMES:
                raise SystemExit(f"--backends: unknown backend {b!r}; choose from "
                                 f"{', '.join(rf_backends.NAMES)}")
    out = []
    for b in wanted:
        reason = rf_backends.unavailable_reason(b, DEVICE)
        if reason is not None:
            R.skip(f"fused_{b}", reason)
            continue
        out.append(b)
    return out


def dtype_reason(backend: str, dtype: torch.dtype):
    """Why `backend` cannot run `dtype` here, or None."""
    if backend == "triton" and not ON_GPU and dtype == torch.bfloat16:
        return "Triton's CPU interpreter computes bfloat16 wrongly; checked on GPU only"
    be = rf_backends.get(backend, DEVICE)
    return be.unsupported_dtype_reason(dtype, DEVICE)


def modes() -> list[str]:
    ms = [m.strip() for m in ARGS.modes.split(",") if m.strip()]
    for m in ms:
        if m not in ("eval", "train"):
            raise SystemExit(f"--modes: unknown mode {m!r}; use eval and/or train")
    return ms


def providers() -> list[str]:
    known = ("eager_fp32", "eager", "compile", "cudnn_fused", "fused")
    ps = [p.strip() for p in ARGS.providers.split(",") if p.strip()]
    for p in ps:
        if p not in known:
            raise SystemExit(f"--providers: unknown provider {p!r}; choose from {', '.join(known)}")
    return ps


@contextlib.contextmanager
def freezing(on: bool):
    import torch._inductor.config as icfg
    old = icfg.freezing
    icfg.freezing = on
    try:
        yield
    finally:
        icfg.freezing = old


# ============================================================================ 1. numerics
def _run_block(m, x64, gy64, dtype, cl, train):
    """Output (and gradients, running statistics after the step) of block m in dtype."""
    m.train(train)
    x = bl.to_layout(x64.detach().clone(), DEVICE, dtype, cl)
    res = {}
    if train:
        x.requires_grad_(True)
        out = m(x)
        out.backward(bl.to_layout(gy64.clone(), DEVICE, dtype, cl))
        res["out"] = out.detach()
        res["grad_input"] = x.grad.detach()
        res["grads"] = {n: p.grad.detach() for n, p in m.named_parameters() if p.grad is not None}
        res["stats"] = {n: b.detach() for n, b in m.named_buffers()
                        if n.endswith(("running_mean", "running_var"))}
    else:
        with torch.no_grad():
            res["out"] = m(x).detach()
    return res


def _judge(name, fused, plain, ref, factor, dtype) -> dict:
    """Errors (tolerance.errors) and the verdict of tolerance.assert_within."""
    f_l2, f_max = tolerance.errors(fused, ref)
    p_l2, p_max = tolerance.errors(plain, ref)
    try:
        tolerance.assert_within(name, fused, plain, ref, factor=factor, dtype=dtype)
        ok, msg = True, ""
    except AssertionError as e:
        ok, msg = False, str(e)
    return dict(f_l2=f_l2, f_max=f_max, p_l2=p_l2, p_max=p_max, ok=ok, msg=msg)


def _worst(judged: dict, ref_norms: dict):
    """The tensor that fails, or else the one with the largest error over the plain one.
    Tensors whose true value is ~0 (the bias of a convolution followed by training BN has
    a zero gradient) have huge relative errors in both paths; they are shown only if they
    fail."""
    top = max(ref_norms.values(), default=0.0)

    def badness(kv):
        n, j = kv
        degenerate = ref_norms.get(n, top) <= 1e-6 * top
        return (not j["ok"], not degenerate, j["f_l2"] / max(j["p_l2"], 1e-30))
    return max(judged.items(), key=badness)


def _numerics_cases(backends: list[str]):
    """(dtypes, cases): each case (seed, shape, backends, mode, dtype), in run order."""
    if ON_GPU:
        plan = [(s, backends) for s in bl.GPU_NUMERICS]
    else:
        others = [b for b in backends if b != "triton"]
        plan = [(s, others) for s in bl.CPU_NUMERICS if others]
        if "triton" in backends:
            plan += [(s, ["triton"]) for s in bl.CPU_NUMERICS_TRITON]
    # The bench dtype first: a budget cut then loses the dtypes that are timed least.
    spec = ARGS.numerics_dtypes or ("bf16,fp32,fp16" if ON_GPU else "fp32,fp16,bf16")
    dtypes = []
    for d in spec.split(","):
        d = d.strip()
        if d not in bl.DTYPES:
            raise SystemExit(f"--numerics-dtypes: unknown dtype {d!r}")
        dtypes.append(bl.DTYPES[d])
    # Each case keeps its seed (its index in shape, mode, dtype order) whatever the order
    # it runs in: dtype first, so that a budget cut loses whole dtypes.
    seeded = [(k, s, bs, m, d) for k, (s, bs, m, d) in
              enumerate(((s, bs, m, d) for s, bs in plan for m in modes() for d in dtypes), 1)]
    todo = sorted(seeded, key=lambda c: (dtypes.index(c[4]), modes().index(c[3]), c[0]))
    return dtypes, todo


def _judge_block(fused: dict, plain: dict, ref: dict, train: bool, dt) -> dict:
    """{quantity: judged} of one fused run: the output, and in training the input
    gradient, the worst parameter gradient and the worst running statistic."""
    judged = {"out": _judge("out", fused["out"], plain["out"], ref["out"], 2.0, dt)}
    if not train:
        return judged
    judged["grad_input"] = _judge("grad_input", fused["grad_input"],
                                  plain["grad_input"], ref["grad_input"], 3.0, dt)
    for kind, factor in (("grads", 3.0), ("stats", 2.0)):
        per = {}
        for n, r in ref[kind].items():
            if n not in fused[kind] or n not in plain[kind]:
                per[n] = dict(f_l2=float("inf"), f_max=float("inf"), p_l2=0.0,
                              p_max=0.0, ok=False,
                              msg=f"{n}: missing in the fused block's {kind}")
                continue
            per[n] = _judge(n, fused[kind][n], plain[kind][n], r, factor, dt)
        if per:
            norms = {n: r.double().norm().item() for n, r in ref[kind].items()}
            n, j = _worst(per, norms)
            j = dict(j, which=n, all_ok=all(v["ok"] for v in per.values()))
            judged["grad_params" if kind == "grads" else "running_stats"] = j
    return judged


def _numerics_rows(common: dict, judged: dict) -> list[str]:
    """Two rows (relative L2, max-abs) per judged quantity; the console verdicts."""
    verdicts = []
    for q, j in judged.items():
        ok = j.get("all_ok", j["ok"])
        status = "PASS" if ok else "FAIL"
        note = (f"worst: {j['which']}; " if "which" in j else "") + j["msg"]
        R.row(**common, quantity=q, metric="rel_l2", unit="", p50=j["f_l2"],
              plain=j["p_l2"], status=status, note=note.strip("; "))
        R.row(**common, quantity=q, metric="max_abs_rel", unit="", p50=j["f_max"],
              plain=j["p_max"], status=status, note=note.strip("; "))
        verdicts.append(f"{q} {j['f_l2']:.2e}/{j['p_l2']:.2e} {status}")
    return verdicts


def numerics_section(backends: list[str]):
    dtypes, todo = _numerics_cases(backends)
    R.say(f"== numerics: {', '.join('fused_' + b for b in backends)} vs float64, dtypes "
          f"{', '.join(bl.dtype_name(d) for d in dtypes)}, modes {', '.join(modes())}")
    for i, (seed, s, shape_backends, mode, dt) in enumerate(todo, 1):
        if R.over_budget("numerics"):
            R.skip("numerics", f"{len(todo) - i + 1} of {len(todo)} cases not run: {BUDGET_SKIP}")
            break
        train = mode == "train"
        cl = ON_GPU and dt != torch.float32
        base = bl.make_block(s, seed=100 + seed)
        g = torch.Generator().manual_seed(200 + seed)
        x64 = torch.randn(s.batch, s.cin, s.hw, s.hw, generator=g, dtype=torch.float64)
        gy64 = torch.randn(s.batch, s.cout, s.hw_out, s.hw_out, generator=g, dtype=torch.float64)
        x64, gy64 = x64.to(DEVICE), gy64.to(DEVICE)
        ref = _run_block(copy.deepcopy(base).to(DEVICE, torch.float64), x64, gy64,
                         torch.float64, False, train)
        try:
            plain = _run_block(bl.to_layout(copy.deepcopy(base), DEVICE, dt, cl), x64, gy64,
                               dt, cl, train)
        except Exception as e:  # noqa: BLE001 - e.g. a dtype the CPU's ATen lacks
            R.skip(f"numerics {bl.dtype_name(dt)} {mode} {s.key}",
                   f"the plain block itself fails in this dtype here ({err_text(e)})")
            continue
        for b in shape_backends:
            what = f"fused_{b} {bl.dtype_name(dt)} {mode} {s.key} n={s.batch}"
            reason = dtype_reason(b, dt)
            if reason:
                R.skip(f"numerics fused_{b} {bl.dtype_name(dt)}", reason)
                continue
            common = dict(section="numerics", kernel="residual_block", provider=f"fused_{b}",
                          mode=mode, x_name="dtype", x_value=bl.dtype_name(dt),
                          dtype=bl.dtype_name(dt), layout="NHWC" if cl else "NCHW",
                          shape=s.key, batch=s.batch)
            try:
                fm = FusedResidual.from_residual(
                    bl.to_layout(copy.deepcopy(base), DEVICE, dt, cl), backend=b)
                fused = _run_block(fm, x64, gy64, dt, cl, train)
            except Exception as e:  # noqa: BLE001
                R.errors.append(f"numerics {what}: {err_text(e)}")
                R.say(f"  ! {what}: {err_text(e)}")
                R.row(**common, quantity="out", metric="rel_l2", status="ERROR",
                      note=err_text(e))
                continue
            verdicts = _numerics_rows(common, _judge_block(fused, plain, ref, train, dt))
            R.say(f"  [{i}/{len(todo)}] {what}: " + ", ".join(verdicts))
        R.checkpoint()


# ============================================================================ 2-3. block timing
def _inputs(s, dtype, cl, train, n_sets):
    # Drawn on the device itself: a CPU draw of a few hundred MB costs seconds a shape.
    g = torch.Generator(device=DEVICE).manual_seed(1234)
    xs, gys = [], []
    for _ in range(n_sets):
        x = torch.randn(s.batch, s.cin, s.hw, s.hw, generator=g, device=DEVICE)
        x = bl.to_layout(x, DEVICE, dtype, cl)
        if train:
            x.requires_grad_(True)
        xs.append(x)
        gy = torch.randn(s.batch, s.cout, s.hw_out, s.hw_out, generator=g, device=DEVICE)
        gys.append(bl.to_layout(gy, DEVICE, dtype, cl))
    return xs, gys


def _build(provider, base, dtype, cl, train):
    """(callable module-or-function, its parameters) for a provider, or raises."""
    if provider == "compile":
        m = bl.to_layout(copy.deepcopy(base), DEVICE, dtype, cl).train(train)
        torch._dynamo.reset()
        return torch.compile(m, mode=None if ARGS.compile_mode == "default" else ARGS.compile_mode), \
            list(m.parameters())
    if provider == "cudnn_fused":
        m = bl.to_layout(copy.deepcopy(base), DEVICE, dtype, cl).eval()
        return bl.cudnn_fused_eval(m, dtype, cl), []
    if provider.startswith("fused_"):
        m = FusedResidual.from_residual(bl.to_layout(copy.deepcopy(base), DEVICE, dtype, cl),
                                        backend=provider[len("fused_"):]).train(train)
        return m, list(m.parameters())
    m = bl.to_layout(copy.deepcopy(base), DEVICE, dtype, cl).train(train)
    return m, list(m.parameters())


def _provider_list(mode, backends, dtype, section="block"):
    """(provider, dtype, channels_last) to time for a mode, with skip reasons printed."""
    ps = providers()
    out = []
    if "eager_fp32" in ps:
        out.append(("eager_fp32", torch.float32, False))
    cl = layout_cl(dtype)
    if "eager" in ps:
        if dtype == torch.float32 and not cl and "eager_fp32" in ps:
            pass  # the same computation as eager_fp32; timed once
        else:
            out.append(("eager", dtype, cl))
    # A block-level baseline; bl.cudnn_fused_eval computes the plain bottleneck only.
    if "cudnn_fused" in ps and mode == "eval" and section not in ("net", "gated"):
        if not ON_GPU:
            R.skip("cudnn_fused", "cuDNN's fused conv+bias+add+ReLU ops need CUDA")
        else:
            out.append(("cudnn_fused", dtype, cl))
    if "fused" in ps:
        for b in backends:
            if b == "triton" and not ON_GPU:
                R.skip("timing fused_triton", "Triton runs in its interpreter on the CPU: "
                       "checked for numerics, not timed")
                continue
            reason = dtype_reason(b, dtype)
            if reason:
                R.skip(f"timing fused_{b} {bl.dtype_name(dtype)}", reason)
                continue
            out.append((f"fused_{b}", dtype, cl))
    # compile last: its 20-60 s build per graph is what a --budget-s cut should lose.
    if "compile" in ps:
        if ARGS.compile_mode == "none":
            R.skip("compile", "--compile-mode none")
        elif not ON_GPU and ARGS.quick:
            R.skip("compile", "left out of --quick on CPU (Inductor's C++ build takes minutes on "
                   "two cores)")
        elif not ON_GPU and (mode == "train" or section != "block"):
            R.skip(f"compile {section} {mode}", "on CPU only the eval block shapes are compiled "
                   "(Inductor's C++ builds take 30-50 s a graph on two cores)")
        elif ON_GPU and ARGS.quick and section == "sweep":
            R.skip("compile sweep", "left out of the batch sweep in --quick")
        else:
            out.append(("compile", dtype, cl))
    return out


def _check_output(out, ref_out: dict, limit: float, what: str, note: list) -> float:
    """Relative L2 of out to the first provider's output (eager as written, when timed;
    kept in ref_out), noted and counted as an error over `limit`. Raises on a
    non-finite output."""
    out = out.detach().float()
    if not torch.isfinite(out).all():
        raise RuntimeError("non-finite output")
    check = tolerance.rel_l2(out, ref_out.setdefault("ref", out))
    if check > limit:
        note.append(f"MISMATCH: output differs from eager by {check:.2e}")
        R.errors.append(f"{what}: output differs from eager by {check:.2e}")
    return check


class Prepared(NamedTuple):
    """A provider built, run once and checked, ready to time."""
    fn: Callable[[], object]
    grads: Optional[list]   # tensors whose .grad is reset before each timed call
    compiled: bool
    check: float            # relative L2 of its first output to the shape's reference
    note: list


def _time_prepared(prepared: list, min_rounds: int = 3) -> list:
    """A bl.Timing per Prepared. CPU: interleaved rounds over all of them
    (bl.time_interleaved), so a slow phase of a shared machine falls on the plain block
    and the fused ones alike; what the CPU rows compare is measured side by side, not
    one provider's half-second after another's, and their speedups are paired per
    round (bl.paired_speedup, in _speedups). CUDA: one after another under
    do_bench (device events, L2 flushed between calls). A compiled provider (its own
    pass, Inductor's freezing on in eval) is timed alone. min_rounds: the fewest
    interleaved rounds (a network's step takes longer than the budget's share)."""
    if ON_GPU or any(p.compiled for p in prepared):
        out = []
        for p in prepared:
            with freezing(p.compiled):
                out.append(bl.Timing(*bl.time_fn(p.fn, DEVICE, quick=ARGS.quick,
                                                 grad_to_none=p.grads)))
        return out
    return bl.time_interleaved([(p.fn, p.grads) for p in prepared], quick=ARGS.quick,
                               min_rounds=min_rounds)


def _auto_pick(m, x, train: bool) -> str:
    """The backend FusedResidual(backend="auto") computes this block and input with."""
    from resnet_fused.backends.preference import block_shape_key
    parts = m.parts()
    return rf_backends.choose(x.device, x.dtype, train, block_shape_key(x.shape, parts),
                              parts).name


def _time_ready(ready: list, what: str, min_rounds: int = 3) -> list:
    """Time the built providers of one shape and mode (ready: (provider, dtype, row
    fields, Prepared)): [((provider, dtype, fields, Prepared), bl.Timing)]. A
    failure while timing is an error row for each of them; a compiled graph is dropped
    after its timing. min_rounds: _time_prepared's."""
    if not ready:
        return []
    try:
        times = _time_prepared([r[3] for r in ready], min_rounds)
    except Exception as e:  # noqa: BLE001 - report and go on with the next shape
        for prov, _, common, _ in ready:
            _error_row(f"{what} {prov}", common, e)
        return []
    finally:
        if any(r[3].compiled for r in ready):
            torch._dynamo.reset()
    return list(zip(ready, times))


def _prepare_provider(prov, base, dt, cl, train, xs, gys, ref_out: dict, what: str):
    """Build one provider and check its first output against the shape's reference
    (the first provider's): a Prepared. Raises what building or running raised."""
    note = []
    t_build = time.time()
    m, params = _build(prov, base, dt, cl, train)
    rot = bl.Rotating(range(len(xs)))
    if train:
        def fn(m=m):
            j = rot.next()
            m(xs[j]).backward(gys[j])
        with freezing(False):
            out = m(xs[0])
            out.backward(gys[0])
    else:
        def fn(m=m):
            with torch.no_grad():
                m(xs[rot.next()])
        with freezing(prov == "compile"), torch.no_grad():
            out = m(xs[0])
    bl.sync(DEVICE)
    if prov == "compile":
        note.append(f"compile {time.time() - t_build:.1f} s")
    if prov.startswith("fused_") and _auto_pick(m, xs[0], train) == prov[len("fused_"):]:
        note.append("auto's choice")
    # A fast provider must compute the same block (bf16 vs fp32 differs by ~3e-3).
    check = _check_output(out, ref_out, 5e-2, what, note)
    return Prepared(fn, (params + xs) if train else None, prov == "compile", check, note)


def time_block(s, mode, backends, dtype, section, x_name, x_value, label, part="all",
               refs=None):
    """Time the providers of one shape and mode; rows carry speedups and rates.

    part: "all", "main" (every provider but compile) or "compile" (compile alone): a
    section times every shape without compile first, then compiles, so that compile's
    20-60 s per graph is what a budget cut loses. refs keeps each (shape, mode)'s
    reference output across the two passes."""
    train = mode == "train"
    base = bl.make_block(s, seed=7)
    plist = _provider_list(mode, backends, dtype, section)
    if part == "main":
        plist = [p for p in plist if p[0] != "compile"]
    elif part == "compile":
        plist = [p for p in plist if p[0] == "compile"]
    if not plist:
        return
    flops = bl.block_flops(s, training=train)
    nbytes = s.batch * s.cin * s.hw * s.hw * 4
    n_sets = bl.n_input_sets(nbytes, DEVICE)
    inputs = {}
    ref_out = refs.setdefault((section, mode, str(x_value)), {}) if refs is not None else {}
    ready = []  # (provider, dtype, common row fields, Prepared)
    for prov, dt, cl in plist:
        if R.over_budget():
            R.skip(f"{label} {mode} {prov}", BUDGET_SKIP)
            continue
        key = (dt, cl)
        if key not in inputs:
            inputs[key] = _inputs(s, dt, cl, train, n_sets)
        xs, gys = inputs[key]
        common = dict(section=section, kernel="residual_block", provider=prov, mode=mode,
                      metric="time", unit="ms", x_name=x_name, x_value=x_value,
                      dtype=bl.dtype_name(dt), layout="NHWC" if cl else "NCHW", shape=s.key,
                      batch=s.batch)
        what = f"{label} {mode} {prov}"
        reason = _declined(prov, base, train)
        if reason is not None:
            R.skip(what, reason)
            continue
        try:
            ready.append((prov, dt, common, _prepare_provider(prov, base, dt, cl, train, xs,
                                                              gys, ref_out, what)))
        except Exception as e:  # noqa: BLE001 - report and go on with the other providers
            _error_row(what, common, e)
            if prov == "compile":
                torch._dynamo.reset()
    for (prov, dt, common, p), t in _time_ready(ready, f"{label} {mode}"):
        p50, p20, p80 = t.p50, t.p20, t.p80
        tflops = flops / p50 / 1e9
        peak = bl.peak_for_dtype(R.peak, dt)
        R.timed_row(t, **common, tflops=tflops, of_peak=(tflops / peak) if peak else None,
                    floor_ms=(flops / peak / 1e9) if peak else None,
                    check_rel=p.check, status="OK", note="; ".join(p.note))
        R.say(f"  {label:<22} {mode:<5} {prov:<13} {bl.dtype_name(dt)} "
              f"{p50:9.4f} ms  [{p20:.4f}, {p80:.4f}]  {tflops:7.2f} TFLOP/s"
              + (f"  ({'; '.join(p.note)})" if p.note else ""))
    _group_speedups(section, mode, x_value)
    if ON_GPU:
        torch.cuda.empty_cache()
    R.checkpoint()


def _declined(prov: str, model, train: bool) -> Optional[str]:
    """Why a fused provider's backend declines a block of `model` (a plain block or
    network, converted here as the provider would be), or None: such a provider is
    listed as skipped with the backend's reason (triton has none for gates inside the
    chain, nor for training a channel gate beside a pooled shortcut), not as an error."""
    if not prov.startswith("fused_"):
        return None
    backend = rf_backends.get(prov[len("fused_"):], DEVICE)
    fused = fuse_model(copy.deepcopy(model), backend="torch")
    for m in fused.modules():
        if isinstance(m, FusedResidual):
            reason = backend.unsupported_block_reason(m.parts(), train)
            if reason is not None:
                return reason
    return None


def _error_row(what: str, common: dict, e: BaseException):
    R.say(f"  ! {what}: {err_text(e)}")
    R.errors.append(f"{what}: {err_text(e)}")
    R.row(**common, status="ERROR", note=err_text(e))
    if os.environ.get("BENCH_TRACEBACK"):
        traceback.print_exception(e)
    if ON_GPU:
        torch.cuda.empty_cache()


def _group_speedups(section, mode, x_value):
    """Speedups of every timed row of one (section, mode, x) over its baselines, which
    may have been timed in another pass."""
    _speedups({r["provider"]: r for r in R.rows
               if r["section"] == section and r["mode"] == mode and r["metric"] == "time"
               and r["status"] == "OK" and str(r["x_value"]) == str(x_value)})


def _speedups(rows: dict):
    """Each row's speedup over the baselines among `rows` ({provider: row}): paired per
    round where both were timed in the same interleaved rounds (CPU), else the ratio of
    their medians (bl.paired_speedup)."""
    eager = rows.get("eager", rows.get("eager_fp32"))
    fp32 = rows.get("eager_fp32")
    comp = rows.get("compile")

    def speedup(base, r):
        return bl.paired_speedup(R.timing_of(base), R.timing_of(r))
    for r in rows.values():
        if eager:
            r["speedup_vs_eager"] = speedup(eager, r)
        if fp32:
            r["speedup_vs_fp32"] = speedup(fp32, r)
        if comp:
            r["speedup_vs_compile"] = speedup(comp, r)


def _stage_shapes(gpu_stages, cpu_stages, spec, aliases, flag, gpu_quick=None):
    stages = gpu_stages if ON_GPU else cpu_stages
    if not ON_GPU and ARGS.quick and not spec:
        stages = stages[:2]  # one projection and one identity block
    if ON_GPU and ARGS.quick and not spec and gpu_quick:
        stages = [s for s in stages if s.name in gpu_quick]
    shapes = bl.select_shapes(stages, spec, aliases, flag)
    return [s.with_batch(ARGS.batch) for s in shapes] if ARGS.batch else shapes


def _time_stages(shapes, backends, dtype, section, what, by_name=False):
    """by_name: the rows' x is the shape's name (x_name "block"), where two blocks of one
    shape key differ in what they compute (an SE block and a ResNet-D block)."""
    R.say(f"== {section}: {what}, {len(shapes)} shapes x {', '.join(modes())}, "
          f"{bl.dtype_name(dtype)}{' channels_last' if layout_cl(dtype) else ''}")
    refs = {}
    for part in ("main", "compile"):
        for mode in modes():
            for s in shapes:
                time_block(s, mode, backends, dtype, section, "block" if by_name else "shape",
                           s.name if by_name else s.key, f"{s.name} n={s.batch}",
                           part=part, refs=refs)


def block_section(backends, dtype):
    shapes = _stage_shapes(bl.GPU_STAGES, bl.CPU_STAGES, ARGS.shapes, bl.SHAPE_ALIASES,
                           "--shapes")
    _time_stages(shapes, backends, dtype, "block", "ResNet-18 basic blocks")


def bottleneck_section(backends, dtype):
    """The ResNet-50 v1.5 stage blocks (each stage's downsampling and identity block),
    torchvision's Bottleneck, against the same providers as the basic blocks."""
    shapes = _stage_shapes(bl.R50_GPU_STAGES, bl.R50_CPU_STAGES, ARGS.r50_shapes,
                           bl.R50_SHAPE_ALIASES, "--r50-shapes", bl.R50_GPU_QUICK)
    _time_stages(shapes, backends, dtype, "bottleneck", "ResNet-50 bottleneck blocks")


def gated_section(backends, dtype):
    """SE-ResNet-50 and ResNet-50-D stage blocks (timm's Bottleneck with an SEModule
    gate, or with the avg-pool shortcut): the gate's pool and multiply, and the window
    average, are what the fused block has to absorb (README.md, Design, "Gates and
    pooled shortcuts")."""
    shapes = _stage_shapes(bl.GATED_GPU_STAGES, bl.GATED_CPU_STAGES, ARGS.gated_shapes,
                           bl.GATED_SHAPE_ALIASES, "--gated-shapes", bl.GATED_GPU_QUICK)
    _time_stages(shapes, backends, dtype, "gated", "SE-ResNet-50 / ResNet-50-D blocks",
                 by_name=True)


def sweep_section(backends, dtype):
    stages = bl.GPU_STAGES if ON_GPU else bl.CPU_STAGES
    name = bl.GPU_SWEEP_SHAPE if ON_GPU else bl.CPU_SWEEP_SHAPE
    batches = bl.GPU_SWEEP_BATCHES if ON_GPU else bl.CPU_SWEEP_BATCHES
    s0 = next(s for s in stages if s.name == name)
    R.say(f"== batch sweep: {s0.name} ({s0.key}), batch {', '.join(map(str, batches))}")
    refs = {}
    for part in ("main", "compile"):
        for mode in modes():
            for n in batches:
                s = s0.with_batch(n)
                time_block(s, mode, backends, dtype, "sweep", "batch", n, f"{s.name} n={n}",
                           part=part, refs=refs)


# ============================================================================ host overhead
def overhead_section(backends, dtype):
    """Host time per call at a tiny block (bench/overhead.py), per mode: what the module
    adds over its kernels, in microseconds and in units of one tensor op."""
    names = []
    for b in backends:
        if b == "triton" and not ON_GPU:
            R.skip("overhead fused_triton", "Triton runs in its interpreter on the CPU: "
                   "its kernels are not 'next to nothing' there")
        elif dtype_reason(b, dtype):
            R.skip(f"overhead fused_{b} {bl.dtype_name(dtype)}", dtype_reason(b, dtype))
        else:
            names.append(b)
    cl = layout_cl(dtype)
    R.say(f"== overhead: host us per call, block {overhead.SHAPE} batch {overhead.BATCH}, "
          f"{bl.dtype_name(dtype)}; backends {', '.join(names) or 'none'}")
    for mode in modes():
        if R.over_budget():
            R.skip(f"overhead {mode}", BUDGET_SKIP)
            continue
        common = dict(section="overhead", kernel="host_per_call", mode=mode,
                      metric="host_time", unit="us", x_name="shape", x_value=overhead.SHAPE,
                      dtype=bl.dtype_name(dtype), layout="NHWC" if cl else "NCHW",
                      shape=overhead.SHAPE, batch=overhead.BATCH)
        try:
            res = overhead.measure(mode, names, DEVICE, dtype, cl, ARGS.quick)
        except Exception as e:  # noqa: BLE001 - report and go on
            R.say(f"  ! overhead {mode}: {err_text(e)}")
            R.errors.append(f"overhead {mode}: {err_text(e)}")
            R.row(**common, provider="all", status="ERROR", note=err_text(e))
            continue
        for prov, (p50, p20, p80) in res.items():
            # In units of one tensor op measured the same way (in a block, or alone).
            one = res["one_op_alone" if "alone" in prov else "one_op"][0]
            ops = f"{p50 / one:.1f} one-op dispatches" if one > 0 else ""
            R.row(**common, provider=prov, p50=p50, p20=p20, p80=p80, status="OK", note=ops)
            R.say(f"  {mode:<5} {prov:<20} {p50:8.1f} us  [{p20:.1f}, {p80:.1f}]"
                  + (f"  = {ops}" if prov.startswith("module_") and ops else ""))


# ============================================================================ 4. kernels
def kernels_section(backends, dtype):
    """Each op of each backend's namespace at the stage shapes (eval convs, BN kernels)."""
    stages = bl.GPU_STAGES if ON_GPU else bl.CPU_STAGES[:1]
    shapes = bl.select_shapes(stages, ARGS.shapes if ON_GPU else None)
    if ARGS.quick and ON_GPU:
        shapes = shapes[:3]
    R.say(f"== kernels: ops of {', '.join(backends)} at {len(shapes)} shapes")
    cl = layout_cl(dtype)
    for b in backends:
        if b == "triton" and not ON_GPU:
            R.skip("kernels triton", "Triton runs in its interpreter on the CPU: not timed")
            continue
        if dtype_reason(b, dtype):
            continue
        if b not in NAMESPACE:
            R.skip(f"kernels {b}", "no ops of its own (eager: PyTorch's kernels in training, "
                   "the torch backend's ops in eval)")
            continue
        rf_backends.get(b, DEVICE)  # importing the backend registers its ops
        ns = getattr(torch.ops, NAMESPACE[b])
        for s in shapes:
            if R.over_budget():
                R.skip(f"kernels {b}", BUDGET_SKIP)
                return
            try:
                ops = bl.op_cases(ns, s, dtype, cl, DEVICE)
            except Exception as e:  # noqa: BLE001
                R.say(f"  ! {b} ops at {s.key}: {err_text(e)}")
                R.errors.append(f"kernels {b} {s.key}: {err_text(e)}")
                continue
            for name, fn, nbytes, flops in ops:
                common = dict(section="kernels", kernel=name, provider=f"fused_{b}", mode="op",
                              metric="time", unit="ms", x_name="shape", x_value=s.key,
                              dtype=bl.dtype_name(dtype), layout="NHWC" if cl else "NCHW",
                              shape=s.key, batch=s.batch)
                try:
                    out = fn()
                    first = out[0] if isinstance(out, (tuple, list)) else out
                    if first.is_floating_point() and not torch.isfinite(first.float()).all():
                        raise RuntimeError("non-finite output")
                    p50, p20, p80 = bl.time_fn(fn, DEVICE, quick=ARGS.quick)
                except Exception as e:  # noqa: BLE001
                    R.say(f"  ! {b}.{name} {s.key}: {err_text(e)}")
                    R.errors.append(f"kernel {b}.{name} {s.key}: {err_text(e)}")
                    R.row(**common, status="ERROR", note=err_text(e))
                    continue
                extra = {}
                rate = ""
                if nbytes:
                    gbps = nbytes / p50 / 1e6
                    extra.update(gbps=gbps, of_bw=(gbps / R.bw) if R.bw else None)
                    rate = f"{gbps:8.1f} GB/s"
                if flops:
                    tf = flops / p50 / 1e9
                    peak = bl.peak_for_dtype(R.peak, dtype)
                    extra.update(tflops=tf, of_peak=(tf / peak) if peak else None)
                    rate = f"{tf:8.2f} TFLOP/s"
                R.row(**common, p50=p50, p20=p20, p80=p80, status="OK", **extra)
                R.say(f"  {b:<7} {name:<24} {s.key:<16} {p50:9.4f} ms  {rate}")
            R.checkpoint()


# ============================================================================ 5. net
def _build_net(prov, base, dt, cl, train):
    """The network of one provider: base as written, converted by fuse_model, or compiled."""
    m = bl.to_layout(copy.deepcopy(base), DEVICE, dt, cl)
    if prov.startswith("fused_"):
        m = fuse_model(m, backend=prov[len("fused_"):])
        m = bl.to_layout(m, DEVICE, dt, cl)
    m.train(train)
    if prov == "compile":
        torch._dynamo.reset()
        m = torch.compile(m, mode=None if ARGS.compile_mode == "default" else ARGS.compile_mode)
    return m


def _net_inputs(n, ch, hw, dt, cl, train):
    g = torch.Generator().manual_seed(3)
    xs = [bl.to_layout(torch.randn(n, ch, hw, hw, generator=g), DEVICE, dt, cl)
          for _ in range(bl.n_input_sets(n * ch * hw * hw * 4, DEVICE))]
    return [x.requires_grad_(True) for x in xs] if train else xs


# CPU: the fewest interleaved rounds of a network's rows (a step there takes longer than
# the budget gives each provider, so the 3 rounds of a block's floor would be all it
# got): its paired speedup is then a median of 9 ratios, not 3, which is what holds its
# spread on a shared 2-core machine below the 2-3% the rows compare. --quick: 3.
NET_MIN_ROUNDS = 9


def _nets():
    """(name, model, input channels, batch, size): with torchvision its ResNet-50 (3
    channels, batch 256; first, the network most users train) and the D2L ResNet-18 (1
    channel, batch 128), BN randomised."""
    hw = 224 if ON_GPU else 64
    torch.manual_seed(11)
    out = [("resnet18", bl.randomize_bn(resnet18(in_channels=1, num_classes=10), seed=11),
            1, ARGS.batch or (128 if ON_GPU else 2), hw)]
    if ARGS.no_bottleneck:
        return out
    try:
        import torchvision
    except ImportError as e:
        R.skip("net resnet50", f"needs torchvision ({e})")
        return out
    torch.manual_seed(12)
    r50 = bl.randomize_bn(torchvision.models.resnet50(), seed=12)
    batch = ARGS.batch or (256 if ON_GPU else 2)
    gated = []
    if not ARGS.no_gated:
        try:
            import timm
        except ImportError as e:
            R.skip("net seresnet50, resnet50d", f"needs timm ({e})")
        else:   # beside ResNet-50: what a gate and a pooled shortcut cost a network
            for i, name in enumerate(("seresnet50", "resnet50d")):
                torch.manual_seed(13 + i)
                gated.append((name, bl.randomize_bn(timm.create_model(name), seed=13 + i),
                              3, batch, hw))
    return [("resnet50", r50, 3, batch, hw)] + gated + out


def _prepare_net(prov, base, dt, pcl, train, n, ch, hw, ref_out, what):
    """Build one network provider and check its first output: a Prepared."""
    note = []
    t_build = time.time()
    m = _build_net(prov, base, dt, pcl, train)
    xs = _net_inputs(n, ch, hw, dt, pcl, train)
    rot = bl.Rotating(xs)
    params = list(m.parameters())
    if train:
        def fn(m=m):
            m(rot.next()).float().sum().backward()
        out = m(xs[0])
        out.float().sum().backward()
    else:
        def fn(m=m):
            with torch.no_grad():
                m(rot.next())
        with freezing(prov == "compile"), torch.no_grad():
            out = m(xs[0])
    bl.sync(DEVICE)
    if prov == "compile":
        note.append(f"compile {time.time() - t_build:.1f} s")
    check = _check_output(out, ref_out, 1e-1, what, note)
    return Prepared(fn, (params + xs) if train else None, prov == "compile", check, note)


def net_section(backends, dtype):
    for name, base, ch, n, hw in _nets():
        R.say(f"== net: {name}, batch {n}, {ch}x{hw}x{hw}")
        for mode in modes():
            train = mode == "train"
            flops = bl.model_flops(base, (n, ch, hw, hw), training=train)
            rows, ref_out = {}, {}
            # Compiled networks are timed one at a time and dropped (a graph each);
            # the others are built first and timed interleaved on CPU (_time_prepared).
            plist = _provider_list(mode, backends, dtype, "net")
            groups = [[p for p in plist if p[0] != "compile"]] + \
                [[p] for p in plist if p[0] == "compile"]
            for group in groups:
                ready = []
                for prov, dt, pcl in group:
                    what = f"net {name} {mode} {prov}"
                    if R.over_budget():
                        R.skip(what, BUDGET_SKIP)
                        continue
                    common = dict(section="net", kernel=name, provider=prov, mode=mode,
                                  metric="time", unit="ms", x_name="batch", x_value=n,
                                  dtype=bl.dtype_name(dt), layout="NHWC" if pcl else "NCHW",
                                  shape=f"{ch}x{hw}x{hw}", batch=n)
                    reason = _declined(prov, base, train)
                    if reason is not None:
                        R.skip(what, reason)
                        continue
                    try:
                        ready.append((prov, dt, common, _prepare_net(
                            prov, base, dt, pcl, train, n, ch, hw, ref_out, what)))
                    except Exception as e:  # noqa: BLE001
                        _error_row(what, common, e)
                if any(p[0] == "compile" for p in group) and not ready:
                    torch._dynamo.reset()  # a compile that failed to build
                for (prov, dt, common, p), t in _time_ready(
                        ready, f"net {name} {mode}",
                        3 if ARGS.quick else NET_MIN_ROUNDS):
                    p50 = t.p50
                    tflops = flops / p50 / 1e9
                    peak = bl.peak_for_dtype(R.peak, dt)
                    rows[prov] = R.timed_row(t, **common, img_s=n / p50 * 1e3,
                                             tflops=tflops,
                                             of_peak=(tflops / peak) if peak else None,
                                             check_rel=p.check, status="OK",
                                             note="; ".join(p.note))
                    R.say(f"  {name} {mode:<5} {prov:<13} {bl.dtype_name(dt)} {p50:9.3f} ms  "
                          f"{n / p50 * 1e3:10.0f} img/s"
                          + (f"  ({'; '.join(p.note)})" if p.note else ""))
            _speedups(rows)
            if ON_GPU:
                torch.cuda.empty_cache()
            R.checkpoint()


# ============================================================================ output
def out_dir() -> str:
    if ARGS.out:
        return ARGS.out
    slug = bl.gpu_slug(R.env["gpu"]) if ON_GPU else "cpu"
    return os.path.join(HERE, "out", f"{slug}_{R.env['timestamp'][:10]}")


def finish(plot: bool = True) -> list[str]:
    """Write every results file from the rows so far (also after an interrupt or from the
    watchdog); returns their paths."""
    R.env.update(elapsed_s=round(time.time() - R.t0, 1), stopped=R.stopped)
    paths = R.results.checkpoint(R, md=True)
    if plot:
        p = os.path.join(R.results.folder, "speedup.png")
        try:
            if make_tables.plot_speedup(R.rows, R.env, p):
                paths.append(p)
        except Exception as e:  # noqa: BLE001 - a missing matplotlib must not lose the rows
            R.skip("speedup.png", f"plot failed ({err_text(e)})")
            R.results.checkpoint(R, md=True)
    return paths


# The watchdog's way out; a test replaces it (os._exit ends the process at once: the
# main thread may be stuck in device code that no exception can interrupt).
_EXIT = os._exit
HARD_EXIT_RC = 3


def _hard_stop():
    R.stopped = f"hard timeout after {ARGS.hard_timeout_s:.0f} s"
    try:
        R.say(f"HARD TIMEOUT ({ARGS.hard_timeout_s:.0f} s): writing what was measured, "
              f"exiting with rc {HARD_EXIT_RC}")
        summary(finish(plot=False))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        _EXIT(HARD_EXIT_RC)


def banner():
    e = R.env
    if ON_GPU:
        R.say(f"{e['gpu']} (sm {e['capability']}, {e['sms']} SMs, {e['mem_gib']} GiB), torch "
              f"{e['torch']}, CUDA {e['cuda']}, cuDNN {e['cudnn']}, triton {e['triton']}, "
              f"resnet_fused {e['package_version']}")
    else:
        R.say(f"CPU ({e['cpu_threads']} threads), torch {e['torch']}, triton {e['triton']}, "
              f"resnet_fused {e['package_version']}")
        R.say("CPU: GPU figures need CUDA. Small shapes; this run checks numerics and that "
              "every path runs, its timings say nothing about a GPU.")
        if TRITON_INTERP_SET_HERE:
            R.say("TRITON_INTERPRET=1 set: Triton kernels run in the interpreter (numerics only)")


def setup_peak():
    if not ON_GPU:
        return
    if ARGS.peak_tflops:
        R.peak, src = ARGS.peak_tflops, "--peak-tflops"
    elif not ARGS.no_measure_peak and not R.over_budget():
        try:
            c = bl.measure_ceilings(DEVICE)
            R.peak, R.bw, src = c["bf16_tflops"], c["copy_gbps"], "measured: bf16 matmul 8192^3"
            R.row(section="env", kernel="ceiling", provider="cublas", metric="rate",
                  unit="TFLOP/s", p50=c["bf16_tflops"], dtype="bf16", note=src)
            R.row(section="env", kernel="ceiling", provider="copy", metric="bandwidth",
                  unit="GB/s", p50=c["copy_gbps"], note="2 GiB device copy, read + write")
        except Exception as e:  # noqa: BLE001
            R.peak, src = bl.peak_from_table(R.env["gpu"])
            src = f"table ({src}); measuring failed: {err_text(e)}"
    else:
        R.peak, src = bl.peak_from_table(R.env["gpu"])
    R.env.update(peak_tflops=R.peak, peak_source=src, copy_gbps=R.bw)
    R.say(f"compute floor: {R.peak} TFLOP/s dense bf16/fp16 ({src})"
          + (f"; copy {R.bw:.0f} GB/s" if R.bw else ""))


def summary(paths):
    print()
    print(make_tables.summary_text(R.rows, R.env, R.skips, R.errors))
    if R.stopped:
        print(f"CUT SHORT: {R.stopped}; the rows above are what was measured before")
    print(f"results: {os.path.dirname(paths[0]) if paths else '(none written)'}  "
          f"({', '.join(os.path.basename(p) for p in paths)})")
    print(f"total {time.time() - R.t0:.0f} s")


# Share of --budget-s the timing sections leave to the numerics after them.
NUMERICS_SHARE = 0.25


def hard_timeout_s(args) -> float:
    """--hard-timeout-s, or by default the budget plus room for the timing or numerics case
    in flight and the writing of the outputs; 0 (none) without a budget."""
    if args.hard_timeout_s is not None:
        return max(0.0, args.hard_timeout_s)
    if args.budget_s > 0:
        return args.budget_s + max(30.0, args.budget_s / 4)
    return 0.0


def run_sections():
    banner()
    setup_peak()
    backends = fused_backends()
    dtype = bench_dtype()
    R.env["bench_dtype"] = bl.dtype_name(dtype)
    R.env["quick"] = ARGS.quick
    R.env["budget_s"] = ARGS.budget_s
    if not ARGS.no_timing:
        # Timing first, most telling first, so that a --budget-s cut loses the least; the
        # sections stop at the budget less the numerics' share.
        block_section(backends, dtype)
        R.checkpoint(md=True)
        if not ARGS.no_bottleneck:
            bottleneck_section(backends, dtype)
            R.checkpoint(md=True)
        if not (ARGS.no_bottleneck or ARGS.no_gated):
            gated_section(backends, dtype)
            R.checkpoint(md=True)
        if not ARGS.no_overhead:
            overhead_section(backends, dtype)
            R.checkpoint(md=True)
        if not ARGS.no_net:
            net_section(backends, dtype)
            R.checkpoint(md=True)
        if not ARGS.no_sweep and not (ARGS.quick and not ON_GPU):
            sweep_section(backends, dtype)
            R.checkpoint(md=True)
        if not ARGS.no_kernels and "fused" in providers():
            kernels_section(backends, dtype)
            R.checkpoint(md=True)
    if not ARGS.no_numerics:
        if backends:
            numerics_section(backends)
        else:
            R.skip("numerics", "no FusedResidual backend is available here")


def main(argv=None, may_reexec: bool = False) -> int:
    """The whole run: rc 0, 1 when a row failed or errored, 3 on the hard timeout (from
    the watchdog), 130 when interrupted (SIGINT, e.g. `timeout -s INT`). may_reexec: see
    configure()."""
    global R
    configure(argv, may_reexec)
    threads = torch.get_num_threads()
    if not ON_GPU and ARGS.threads > 0:
        torch.set_num_threads(ARGS.threads)
    allocator = "" if ON_GPU else bl.steady_host_allocator()
    share = NUMERICS_SHARE if not (ARGS.no_numerics or ARGS.no_timing) else 0.0
    R = Run(ARGS.budget_s, numerics_share=share)
    R.results = Results(out_dir())
    R.results.start()
    ARGS.hard_timeout_s = hard_timeout_s(ARGS)
    R.env["hard_timeout_s"] = ARGS.hard_timeout_s
    if allocator:
        R.env["host_allocator"] = allocator
    dog = Watchdog(ARGS.hard_timeout_s, _hard_stop).start()
    try:
        run_sections()
    except KeyboardInterrupt:
        R.stopped = "interrupted (SIGINT)"
        R.say("interrupted: writing what was measured")
    finally:
        dog.cancel()
        torch.set_num_threads(threads)
    paths = finish(plot=not ARGS.no_plot and not R.stopped)
    summary(paths)
    if R.stopped:
        return 130
    fails = [r for r in R.rows if r["status"] in ("FAIL", "ERROR")]
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main(may_reexec=True))
