"""The numerics rule of DESIGN.md, shared by every test.

A fused result passes when its error against the float64 reference is at most
`factor` times the error of the plain PyTorch computation run in the same dtype
and layout, plus a small floor (2x for outputs, 3x for gradients), measured both
as relative L2 and as max-abs error.
"""
import torch

# Floors: an error this small passes whatever the plain path's error was (the plain
# path can be exact by luck on a tiny tensor, which would make 2x of it zero).
FLOOR = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 5e-4,
    torch.bfloat16: 4e-3,
}


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


def assert_within(name, fused, plain, ref, factor=2.0, dtype=None):
    """Assert fused's error to ref is <= factor * plain's error to ref + floor.

    fused: the result under test; plain: the plain PyTorch result in the same dtype
    and layout; ref: the float64 reference. dtype picks the floor (defaults to
    fused's dtype).
    """
    assert fused.shape == ref.shape, f"{name}: shape {tuple(fused.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(fused).all(), f"{name}: non-finite values"
    floor = FLOOR[dtype or fused.dtype]
    f_l2, f_max = errors(fused, ref)
    p_l2, p_max = errors(plain, ref)
    assert f_l2 <= factor * p_l2 + floor, (
        f"{name}: relative L2 error {f_l2:.3e} > {factor} x plain {p_l2:.3e} + {floor:.0e}")
    assert f_max <= factor * p_max + 4 * floor, (
        f"{name}: max-abs error {f_max:.3e} > {factor} x plain {p_max:.3e} + {4 * floor:.0e}")


def assert_near_zero(name, fused, plain, scale, factor=3.0, dtype=None):
    """For a quantity that is exactly zero in exact arithmetic (e.g. the gradient of a
    conv bias that feeds a training-mode BatchNorm): both paths produce rounding noise,
    so relative error is meaningless. Assert fused's norm is at most factor x the plain
    path's noise plus the floor times `scale` (the norm of a related nonzero quantity)."""
    assert torch.isfinite(fused).all(), f"{name}: non-finite values"
    floor = FLOOR[dtype or fused.dtype]
    f = fused.detach().double().norm().item()
    p = plain.detach().double().norm().item()
    assert f <= factor * p + floor * scale, (
        f"{name}: should be ~0, norm {f:.3e} > {factor} x plain {p:.3e} + {floor:.0e} x {scale:.3e}")
