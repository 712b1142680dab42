"""check_model: does the fused model compute what the user's model computes?

For each backend, dtype and mode it runs three copies of the model on the same
weights and input: the plain model in float64 (the reference), the plain model in
the dtype under test (PyTorch's own error in that precision) and the fused model in
that dtype, and judges every output, the input gradient, every parameter gradient
and every buffer (running statistics) by the package's rule (tolerance.py).

Where a backend is slow on the device (Triton through its interpreter and the C++ twins,
on CPU: SLOW_ON_CPU) the whole network would take tens of minutes, so its kernels are
checked per block geometry instead (geometry.py): every distinct kind of fused block
once, as a block against float64 at a reduced input that still runs the kernels' masked
edges, and the whole model is compared on the torch backend, which checks the
conversion (every parameter, buffer and gradient of the network by name) at the cost of
a plain run. The report says which block stood for which.
"""
from __future__ import annotations

import copy
import warnings
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from .. import backends as _backends
from ..conversion import fuse_model, left_unconverted
from ..module import FusedResidual
from ..reference import plain_block_forward
from .geometry import group_blocks
from .report import ModelReport, Row
from .tolerance import Comparison, compare, compare_near_zero, errors

MODES = ("eval", "train")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# A float64 reference gradient this small relative to its module's largest gradient is
# zero in exact arithmetic (a conv bias feeding a training BatchNorm): it is judged as
# rounding noise (compare_near_zero), not by relative error.
_ZERO_GRAD = 1e-9
# Backends checked per block geometry on a CPU (by_geometry=None): the interpreter runs a
# Triton program in Python (35-50 us a tl operation, bench/NOTES.md, "check_model through
# the interpreter"), and the native backend's C++ CPU twins run below PyTorch's own
# kernels. The whole model is then compared on CONVERSION_BACKEND.
SLOW_ON_CPU = ("triton", "native")
CONVERSION_BACKEND = "torch"


class _PlainBlock(nn.Module):
    """A FusedResidual's own submodules (same names, same tensors) computed by the plain
    block: the reference for a model that arrives already converted."""

    def __init__(self, fused: FusedResidual):
        super().__init__()
        for name, m in fused._modules.items():
            self._modules[name] = m
        self._spec = fused._spec  # plain_block_forward computes it by this spec
        self.training = fused.training

    def forward(self, x):
        return plain_block_forward(self, x)


def unfused(model: nn.Module) -> nn.Module:
    """A deep copy of `model` with every FusedResidual computed the plain way."""
    model = copy.deepcopy(model)
    if isinstance(model, FusedResidual):
        return _PlainBlock(model)
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):
            if isinstance(child, FusedResidual):
                module._modules[name] = _PlainBlock(child)
    return model


def _count_fused(model: nn.Module) -> int:
    return sum(isinstance(m, FusedResidual) for m in model.modules())


def _unconverted(model: nn.Module) -> list[str]:
    """Names of the residual blocks fuse_model would try that are not FusedResidual."""
    return left_unconverted(model, skip=(_PlainBlock,))


def _prepare(model, fused):
    """(plain source, fused source, notes, conversion problems)."""
    notes, problems = [], []
    if fused is None:
        if _count_fused(model):
            notes.append("the model is already converted: the reference computes its "
                         "blocks the plain way (this checks the kernels, not the "
                         "conversion; pass the original model and fused= for that)")
            return unfused(model), model, notes, problems
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fused = fuse_model(model)
        for w in caught:
            problems.append(str(w.message))
        notes.append("converted with resnet_fused.fuse_model")
        return model, fused, notes, problems
    if not isinstance(fused, nn.Module):
        raise TypeError(f"check_model: fused must be an nn.Module, got {type(fused).__name__}")
    plain = unfused(model) if _count_fused(model) else model
    for name in _unconverted(fused):
        problems.append(f"{name} looks like a residual block but was not converted")
    return plain, fused, notes, problems


def _set_backend(model: nn.Module, backend: str) -> None:
    for m in model.modules():
        if isinstance(m, FusedResidual):
            m.backend = _backends.check_name(backend)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _as_tensor(out, who: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"check_model: the {who} model returned {type(out).__name__}; "
                        "it compares models that return one tensor")
    return out


class _Run:
    """The three copies of the model for one backend and dtype."""

    def __init__(self, plain, fused, backend, dtype, device, channels_last):
        fmt = {"memory_format": torch.channels_last} if channels_last else {}
        self.ref = copy.deepcopy(plain).to(device=device, dtype=torch.float64, **fmt)
        self.plain = copy.deepcopy(plain).to(device=device, dtype=dtype, **fmt)
        self.fused = copy.deepcopy(fused).to(device=device, dtype=dtype, **fmt)
        _set_backend(self.fused, backend)
        self.dtype = dtype
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format

    def models(self):
        return (("fused", self.fused), ("plain", self.plain), ("ref", self.ref))

    def inputs(self, x: torch.Tensor, grad: bool):
        x = x.detach().to(self.dtype).contiguous(memory_format=self.fmt)
        # The reference sees the input as rounded to the dtype under test.
        return {"fused": x.clone().requires_grad_(grad), "plain": x.clone().requires_grad_(grad),
                "ref": x.to(torch.float64).requires_grad_(grad)}


def _forward_all(run: _Run, xs: dict, seed: int, models=None) -> dict:
    """Each model's output (models: (who, module) pairs, default run.models()); the RNG
    is reset before each so dropout-like layers draw the same numbers in every copy
    (where their kernels draw the same way)."""
    outs = {}
    devices = [xs["ref"].device] if xs["ref"].device.type == "cuda" else []
    for who, m in models or run.models():
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            outs[who] = _as_tensor(m(xs[who]), who)
    return outs


def _keep_worst(worst: dict, c: Comparison) -> None:
    key = c.name.split(" (step")[0]
    if key not in worst or c.ratio > worst[key].ratio:
        worst[key] = c


def _owner(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _compare_grads(run: _Run, step: int, worst: dict, probes: Optional[dict] = None) -> None:
    ref = dict(run.ref.named_parameters())
    plain = dict(run.plain.named_parameters())
    fused = dict(run.fused.named_parameters())
    for name in ref.keys() - fused.keys():
        _keep_worst(worst, Comparison(f"grad {name}", problem="parameter missing in the "
                                      "fused model"))
    for name in fused.keys() - ref.keys():
        _keep_worst(worst, Comparison(f"grad {name}", problem="parameter not in the "
                                      "plain model"))
    scale = {}
    for name, p in ref.items():
        if p.grad is not None:
            n = p.grad.norm().item()
            scale[_owner(name)] = max(scale.get(_owner(name), 0.0), n)
    largest = max(scale.values(), default=0.0)
    for name in sorted(ref.keys() & fused.keys()):
        label = f"grad {name} (step {step})"
        r, p, f = ref[name].grad, plain[name].grad, fused[name].grad
        if r is None:
            if f is not None and f.abs().max().item() != 0:
                _keep_worst(worst, Comparison(label, problem="has a gradient in the fused "
                                              "model only"))
            continue
        if f is None:
            _keep_worst(worst, Comparison(label, problem="no gradient in the fused model"))
            continue
        s = scale.get(_owner(name)) or largest
        if r.norm().item() <= _ZERO_GRAD * s:
            _keep_worst(worst, compare_near_zero(label, f, p, s, dtype=run.dtype))
        else:
            _keep_worst(worst, compare(label, f, p, r, factor=3, dtype=run.dtype,
                                       plain_errors=(probes or {}).get(f"grad {name}")))


def _compare_buffers(run: _Run) -> list:
    ref = dict(run.ref.named_buffers())
    plain = dict(run.plain.named_buffers())
    rows = []
    fused = dict(run.fused.named_buffers())
    for name in sorted(ref.keys() | fused.keys()):
        label = f"buffer {name}"
        if name not in fused or name not in ref:
            side = "fused" if name not in fused else "plain"
            rows.append(Comparison(label, problem=f"buffer missing in the {side} model"))
        elif not ref[name].is_floating_point():
            same = torch.equal(fused[name].cpu(), ref[name].cpu())
            rows.append(Comparison(label, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, ok=same,
                                   problem="" if same else
                                   f"{fused[name].tolist()} != {ref[name].tolist()}"))
        else:
            rows.append(compare(label, fused[name], plain[name], ref[name], factor=2,
                                dtype=run.dtype))
    return rows


def _check_eval(run: _Run, x: torch.Tensor, seed: int) -> list:
    for _, m in run.models():
        m.eval()
    with torch.no_grad():
        outs = _forward_all(run, run.inputs(x, grad=False), seed)
    return [_output_row(run, outs, "output")]


def _output_row(run: _Run, outs: dict, label: str, plain_errors=None) -> Comparison:
    if outs["fused"].dtype != outs["plain"].dtype:
        return Comparison(label, problem=f"dtype {outs['fused'].dtype} != plain "
                          f"{outs['plain'].dtype}")
    return compare(label, outs["fused"], outs["plain"], outs["ref"], factor=2,
                   dtype=run.dtype, plain_errors=plain_errors)



# Training gradients of a deep network can hinge on the last bits of its input: a ReLU
# decision near its kink or a BatchNorm over few values per channel turns a rounding
# difference into a different gradient (ResNet-50 at 4x3x64x64: the plain model's own
# error in layer4's parameter gradients ranges from 5e-5 to 2e-2 over inputs perturbed
# by 1e-6). One sample of the plain error is then luck, and 3x of a lucky one fails a
# fused model whose only difference is its rounding. So in training the plain error is
# the worst of the plain model at the example and at PROBES copies perturbed by a few
# units in the last place (PROBE_ULPS), each against float64 at the same perturbed input.
#
# The fused error is one sample of the same kind of noise, and where a rounding decides
# a discrete choice (a ReLU mask bit, a max-pool winner) that noise is not a spread but
# a jump, present at some inputs and absent at others (ResNet-50 at 2x3x64x64: one
# BN bias gradient's max-abs error is 2e-4 at some inputs and 1.2e-1 at others, for the
# plain model and the fused one alike, while the fused torch backend in float64 agrees
# with float64 to 7e-13; bench/NOTES.md, "ResNet-50's torch-backend training rows").
# Five plain samples miss a jump that the fused sample hits often enough to fail a
# correct model. So a fused quantity over its bound at the example is judged again at
# the probe inputs, against the same bound: it passes if it is within the bound at one
# of them. A defect (a weight, a scale, a formula) errs at every input and still fails.
PROBES = 4
PROBE_ULPS = 4


def _probe_inputs(run: _Run, xin: torch.Tensor, gen: torch.Generator) -> list:
    """PROBES copies of xin (float64), each element scaled by 1 + PROBE_ULPS ulps x N(0,1)."""
    eps = PROBE_ULPS * torch.finfo(run.dtype).eps
    return [xin.double() * (1 + eps * torch.randn(xin.shape, generator=gen,
                                                  dtype=torch.float64).to(xin.device))
            for _ in range(PROBES)]


def _errors_at(run: _Run, who: str, xin: torch.Tensor, g: torch.Tensor, seed: int) -> dict:
    """{quantity: (l2, max)} of model `who` ("plain" or "fused") against float64, both
    run on copies (the models checked are not touched) at input xin with output
    gradient g; the quantities named as _check_train names them (without the step)."""
    model = copy.deepcopy(run.plain if who == "plain" else run.fused)
    ref = copy.deepcopy(run.ref)
    for m in (model, ref):
        m.zero_grad(set_to_none=True)
    xs = run.inputs(xin, grad=True)
    outs = _forward_all(run, xs, seed, ((who, model), ("ref", ref)))
    for y in outs.values():
        y.backward(g.to(device=y.device, dtype=y.dtype))
    out = {"output": errors(outs[who], outs["ref"]),
           "grad input": errors(xs[who].grad, xs["ref"].grad)}
    ref_p = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        r = ref_p.get(name)
        if p.grad is not None and r is not None and r.grad is not None:
            out[f"grad {name}"] = errors(p.grad, r.grad)
    return out


def _probe_errors(run: _Run, inputs: list, g: torch.Tensor, seed: int) -> dict:
    """{quantity: [(l2, max) of the plain model against float64]} over the probe inputs."""
    out: dict = {}
    for xin in inputs:
        for q, e in _errors_at(run, "plain", xin, g, seed).items():
            out.setdefault(q, []).append(e)
    return out


def _recheck_at_probes(run: _Run, rows: dict, inputs: list, g: torch.Tensor,
                       seed: int) -> None:
    """Judge again, at the probe inputs, each row of `rows` (name -> Comparison, one
    step's) whose fused error was over its bound at the example: the row becomes the
    first probe's comparison within the same bound, renamed to say so. Fused runs only
    when something failed."""
    failed = {name for name, c in rows.items() if not c.ok and not c.problem}
    for k, xin in enumerate(inputs, 1):
        if not failed:
            return
        errs = _errors_at(run, "fused", xin, g, seed)
        for name in sorted(failed):   # keys: the quantity without its step
            c = rows[name]
            e = errs.get(name)
            if e is not None and e[0] <= c.bound_l2 and e[1] <= c.bound_max:
                rows[name] = Comparison(
                    f"{c.name} at probe {k} (example: {c.ratio:.2f} of the bound)", e[0],
                    e[1], c.plain_l2, c.plain_max, c.bound_l2, c.bound_max, ok=True)
                failed.discard(name)


def _check_train(run: _Run, x: torch.Tensor, steps: int, seed: int) -> list:
    for _, m in run.models():
        m.train()
    gen = torch.Generator().manual_seed(seed)
    worst: dict = {}
    for step in range(steps):
        xin = x
        if step:  # later steps: the example perturbed, so the running statistics move
            noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
            xin = x.double() + 0.5 * x.double().std() * noise.to(x.device)
        xs = run.inputs(xin, grad=True)
        outs = _forward_all(run, xs, seed + step)
        g = torch.randn(outs["ref"].shape, generator=gen, dtype=torch.float64)
        # Before the backward, so the copies carry no gradient yet. A training forward
        # normalises with batch statistics, so the running statistics this step's
        # forward updated do not change what the probes compute.
        inputs = _probe_inputs(run, xin, gen)
        probes = _probe_errors(run, inputs, g, seed + step)
        rows: dict = {}
        _keep_worst(rows, _output_row(run, outs, f"output (step {step})",
                                      probes.get("output")))
        for who, out in outs.items():
            out.backward(g.to(device=out.device, dtype=out.dtype))
        _keep_worst(rows, compare(f"grad input (step {step})", xs["fused"].grad,
                                  xs["plain"].grad, xs["ref"].grad, factor=3,
                                  dtype=run.dtype, plain_errors=probes.get("grad input")))
        _compare_grads(run, step, rows, probes)
        for _, m in run.models():
            m.zero_grad(set_to_none=True)
        _recheck_at_probes(run, rows, inputs, g, seed + step)
        for c in rows.values():
            _keep_worst(worst, c)
    return list(worst.values()) + _compare_buffers(run)


def _validate(model, example_input, modes, steps, dtypes):
    if not isinstance(model, nn.Module):
        raise TypeError(f"check_model: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor) or not example_input.is_floating_point():
        raise TypeError("check_model: example_input must be a floating-point tensor, got "
                        f"{getattr(example_input, 'dtype', type(example_input).__name__)}")
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"check_model: modes must be a non-empty subset of {MODES}, got "
                         f"{tuple(modes)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"check_model: steps must be an int >= 1, got {steps!r}")
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ValueError(f"check_model: dtypes must be among {DTYPES}, got {bad}")


def check_model(model: nn.Module, example_input: torch.Tensor, *,
                fused: Optional[nn.Module] = None,
                backends: Optional[Iterable[str]] = None,
                dtypes: Optional[Sequence[torch.dtype]] = None,
                modes: Sequence[str] = MODES, steps: int = 3, channels_last: bool = False,
                require_all_converted: bool = True, seed: int = 0,
                by_geometry: Optional[bool] = None) -> ModelReport:
    """Compare the fused version of `model` with `model` itself, by the package's rule.

    model:          the user's model, plain (converted here with fuse_model) or already
                    converted (its blocks are then computed the plain way as reference).
    example_input:  a batch the model takes; its device is the device checked (CPU in
                    most CI: native C++ kernels, Triton through TRITON_INTERPRET=1).
    fused:          the user's own converted model, to check a conversion done elsewhere
                    against `model` (parameters and buffers are matched by name).
    backends:       default: every backend available on the device.
    dtypes:         default: float32 on CPU; float32, float16, bfloat16 on CUDA.
    modes:          "eval" (inference under no_grad: the folded kernels) and "train"
                    (`steps` forward/backward steps on the example and perturbed copies:
                    outputs, input gradient, every parameter gradient, then every buffer).
    require_all_converted: a residual block left unconverted is a failure.
    by_geometry:    check a backend's kernels on one block of each distinct geometry
                    (reduced input, against float64) instead of on the whole model, and
                    compare the whole model on the torch backend (the conversion).
                    None (default): for SLOW_ON_CPU backends on a CPU; True: for every
                    backend but torch; False: the whole model on every backend.

    Models must return one tensor. Randomness (dropout) is reseeded before each copy's
    forward, which makes it agree only where its kernels draw the same way in each dtype;
    put such layers in eval mode if they do not. The models are deep-copied; `model` and
    `fused` are not changed.
    """
    device = example_input.device if isinstance(example_input, torch.Tensor) else None
    if dtypes is None:
        dtypes = (torch.float32,) if device is None or device.type == "cpu" else DTYPES
    _validate(model, example_input, modes, steps, dtypes)
    plain, fused_src, notes, problems = _prepare(model, fused)
    report = ModelReport(notes=notes, problems=problems)
    nfused = _count_fused(fused_src)
    report.notes.append(f"{nfused} residual block(s) fused")
    if nfused == 0:
        report.problems.append("no residual block was converted: nothing fused to check")
    if not require_all_converted:
        report.notes.extend(f"(allowed) {p}" for p in report.problems)
        report.problems = [p for p in report.problems if p.startswith("no residual block")]
    names = list(backends) if backends is not None else _backends.available(device)
    per_block = {n for n in names if _per_block(n, device, by_geometry)}
    geometries = []
    if per_block:
        geometries, gproblems = group_blocks(plain, fused_src, FusedResidual, example_input)
        report.problems.extend(gproblems)
        report.geometries = [g.describe() for g in geometries]
        report.notes.append(
            f"{', '.join(sorted(per_block))}: each of {len(geometries)} distinct block "
            f"geometr{'y' if len(geometries) == 1 else 'ies'} checked once as a block "
            "against float64 at a reduced input (rows 'of <block>'); the whole model on "
            f"the {CONVERSION_BACKEND} backend (the conversion)")
        if CONVERSION_BACKEND not in names:
            names.append(CONVERSION_BACKEND)
    for name in names:
        reason = _backends.unavailable_reason(name, device) if name in _backends.NAMES \
            else f"unknown backend (choose among {', '.join(_backends.NAMES)})"
        for dtype in dtypes:
            for mode in modes:
                where = (name, _dtype_name(dtype), mode)
                why = reason or _backends.get(name, device).unsupported_dtype_reason(
                    dtype, device) or _declined(fused_src, name, device, mode)
                if why:
                    report.skipped.append((*where, why))
                    continue
                if name in per_block:
                    rows = [c for g in geometries for c in _check_block(
                        g, plain, fused_src, name, dtype, mode, device, steps,
                        channels_last, seed)]
                else:
                    rows = _check_one(plain, fused_src, name, dtype, mode, device,
                                      example_input, steps, channels_last, seed)
                report.rows.extend(Row(*where, c) for c in rows)
    if not report.rows and not report.problems:
        report.problems.append("no backend/dtype/mode combination could run; see skipped")
    return report


def _declined(fused: nn.Module, name: str, device, mode: str) -> Optional[str]:
    """Why backend `name` declines a block of `fused` in this mode (a gated block on a
    backend without gate kernels, a grouped convolution on triton...), or None: such a
    combination is not computed by that backend at all, so it is skipped, not failed."""
    backend = _backends.get(name, device)
    for path, m in fused.named_modules():
        if isinstance(m, FusedResidual):
            why = backend.unsupported_block_reason(m.parts(), mode == "train")
            if why:
                return f"{path or 'the model'}: {why}"
    return None


def _check_one(plain, fused, backend, dtype, mode, device, x, steps, channels_last, seed):
    try:
        run = _Run(plain, fused, backend, dtype, device, channels_last)
        if mode == "eval":
            return _check_eval(run, x, seed)
        return _check_train(run, x, steps, seed)
    except Exception as e:  # the fused model (or a copy of the plain one) failed to run
        return [Comparison("run", problem=f"raised {type(e).__name__}: {e}")]


def _per_block(name, device, by_geometry) -> bool:
    if name == CONVERSION_BACKEND or by_geometry is False:
        return False
    if by_geometry:
        return True
    return (device is None or device.type == "cpu") and name in SLOW_ON_CPU


def _in_model(name: str, block: str) -> str:
    """A block-level comparison's name as the model names it: "grad conv1.weight" of
    layer1.0 -> "grad layer1.0.conv1.weight", "output" -> "output of layer1.0"."""
    for kind in ("grad ", "buffer "):
        if name.startswith(kind) and not name.startswith("grad input"):
            return f"{kind}{block}.{name[len(kind):]}"
    head, _, step = name.partition(" (step")
    return f"{head} of {block}" + (f" (step{step}" if step else "")


def _check_block(geometry, plain, fused, backend, dtype, mode, device, steps,
                 channels_last, seed) -> list:
    """One geometry's representative block, fused against its plain counterpart in the
    plain model (the same name), on its reduced input."""
    name = geometry.representative
    plain_block = dict(plain.named_modules()).get(name)
    fused_block = dict(fused.named_modules())[name]
    x = geometry.input.to(device)
    rows = _check_one(plain_block, fused_block, backend, dtype, mode, device, x, steps,
                      channels_last, seed)
    for c in rows:
        c.name = _in_model(c.name, name)
    return rows


def assert_model_matches(model: nn.Module, example_input: torch.Tensor,
                         **kwargs) -> ModelReport:
    """check_model, raising AssertionError with the report's table when anything fails.
    Returns the report when everything passed."""
    report = check_model(model, example_input, **kwargs)
    report.assert_ok()
    return report
