"""The package's numerics rule (README.md, Numerics), used by its own tests, by
bench/run.py and by `resnet_fused.testing.check_model` on a user's model.

A fused result passes when its error against the float64 reference is at most
`factor` times the error of the plain PyTorch computation run in the same dtype
and layout, plus a small floor (2x for outputs, 3x for gradients), measured both
as relative L2 and as max-abs error (scaled by the reference's max-abs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Floors: an error this small passes whatever the plain path's error was (the plain
# path can be exact by luck on a tiny tensor, which would make 2x of it zero).
FLOOR = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 5e-4,
    torch.bfloat16: 4e-3,
}
# The max-abs bound's floor is this many times FLOOR: a single element's error is
# noisier than the L2 norm over all of them.
MAX_ABS_FLOOR_FACTOR = 4


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    a = a.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def max_abs(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.detach().to(torch.float64) - ref.detach().to(torch.float64)).abs().max().item()


def errors(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative L2, max-abs scaled by ref's max-abs) of a against ref."""
    scale = ref.detach().abs().max().to(torch.float64).clamp_min(1e-30).item()
    return rel_l2(a, ref), max_abs(a, ref) / scale


@dataclass
class Comparison:
    """One quantity judged by the rule: the fused and plain errors against float64,
    the bounds they imply, and the verdict. `problem` names a failure that is not a
    number (shape mismatch, non-finite values)."""

    name: str
    fused_l2: float = float("nan")
    fused_max: float = float("nan")
    plain_l2: float = float("nan")
    plain_max: float = float("nan")
    bound_l2: float = float("nan")
    bound_max: float = float("nan")
    ok: bool = False
    problem: str = ""

    @property
    def ratio(self) -> float:
        """Fused error over its bound (the worse of L2 and max-abs): <= 1 passes."""
        if self.problem:
            return float("inf")
        return max(self.fused_l2 / self.bound_l2, self.fused_max / self.bound_max)

    def message(self) -> str:
        if self.problem:
            return f"{self.name}: {self.problem}"
        if self.fused_l2 > self.bound_l2:
            return (f"{self.name}: relative L2 error {self.fused_l2:.3e} > bound "
                    f"{self.bound_l2:.3e} (plain {self.plain_l2:.3e})")
        if self.fused_max > self.bound_max:
            return (f"{self.name}: max-abs error {self.fused_max:.3e} > bound "
                    f"{self.bound_max:.3e} (plain {self.plain_max:.3e})")
        return f"{self.name}: ok ({self.ratio:.2f} of the bound)"


def compare(name, fused, plain, ref, factor=2.0, dtype=None, plain_errors=None) -> Comparison:
    """Judge fused against ref by the rule (no exception): fused's error to ref must be
    <= factor * plain's error to ref + floor, in relative L2 and in max-abs.

    fused: the result under test; plain: the plain PyTorch result in the same dtype and
    layout; ref: the float64 reference. dtype picks the floor (defaults to fused's).
    plain_errors: other samples of the plain computation's (relative L2, max-abs) error
    (the same computation on equally valid inputs, check_model's probes); the plain
    error is then the worst of them and of plain's own."""
    if tuple(fused.shape) != tuple(ref.shape):
        return Comparison(name, problem=f"shape {tuple(fused.shape)} != {tuple(ref.shape)}")
    if not torch.isfinite(fused).all():
        return Comparison(name, problem="non-finite values")
    floor = FLOOR[dtype or fused.dtype]
    f_l2, f_max = errors(fused, ref)
    p_l2, p_max = errors(plain, ref)
    for l2, mx in plain_errors or ():
        p_l2, p_max = max(p_l2, l2), max(p_max, mx)
    b_l2 = factor * p_l2 + floor
    b_max = factor * p_max + MAX_ABS_FLOOR_FACTOR * floor
    return Comparison(name, f_l2, f_max, p_l2, p_max, b_l2, b_max,
                      ok=f_l2 <= b_l2 and f_max <= b_max)


def compare_near_zero(name, fused, plain, scale, factor=3.0, dtype=None) -> Comparison:
    """For a quantity that is exactly zero in exact arithmetic (e.g. the gradient of a
    conv bias that feeds a training-mode BatchNorm): both paths produce rounding noise,
    so relative error is meaningless. fused's norm must be at most factor x the plain
    path's noise plus the floor times `scale` (the norm of a related nonzero quantity).
    The errors are reported as norms relative to `scale`."""
    if not torch.isfinite(fused).all():
        return Comparison(name, problem="non-finite values")
    floor = FLOOR[dtype or fused.dtype]
    s = max(float(scale), 1e-30)
    f = fused.detach().double().norm().item() / s
    p = plain.detach().double().norm().item() / s
    bound = factor * p + floor
    # One number here (a norm), so the max-abs columns repeat it.
    return Comparison(name, f, f, p, p, bound, bound, ok=f <= bound)


def assert_within(name, fused, plain, ref, factor=2.0, dtype=None):
    """Assert fused's error to ref is <= factor * plain's error to ref + floor
    (see compare)."""
    c = compare(name, fused, plain, ref, factor, dtype)
    assert c.ok, c.message()


def assert_near_zero(name, fused, plain, scale, factor=3.0, dtype=None):
    """Assert the compare_near_zero rule."""
    c = compare_near_zero(name, fused, plain, scale, factor, dtype)
    assert c.ok, c.message() + " (should be ~0)"


__all__ = ["FLOOR", "Comparison", "compare", "compare_near_zero", "assert_within",
           "assert_near_zero", "errors", "max_abs", "rel_l2"]
