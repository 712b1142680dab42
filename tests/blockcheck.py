"""Compare a FusedResidual with the plain block, by the package's tolerance rule
(README.md, "Numerics policy").

Shared by the module tests and every backend's block tests:

    check_block(make_plain, backend="torch", dtype=torch.float32, train=True)

builds the plain block (make_plain() -> nn.Module in float64), a float64 reference
copy, a plain copy in `dtype` (the framework's own error in that precision) and
the FusedResidual converted from another copy; runs `steps` forward/backward
steps on fresh random inputs and checks outputs (2x), every gradient (3x: input and
each parameter, by name) and the running statistics after the last step.
"""
from __future__ import annotations

import copy

import torch

from resnet_fused import FusedResidual
from resnet_fused.blocks import bn_training, is_frozen_bn
from resnet_fused.spec import get_path
from tolerance import assert_near_zero, assert_within


def make_input(shape, dtype, channels_last, device="cpu", requires_grad=True):
    x = torch.randn(shape, dtype=torch.float64, device=device)
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


def randomize_bn(block: torch.nn.Module) -> None:
    """Non-trivial BN parameters and running statistics (never the init's 1/0), frozen
    BNs (torchvision's FrozenBatchNorm2d: buffers) included."""
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, torch.nn.BatchNorm2d) or is_frozen_bn(m):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)


def _zero_grad_params(fused) -> set:
    """Names of the conv biases that feed a training BatchNorm (their true gradient is
    0 there: BN subtracts the batch mean), read off the block's spec."""
    spec = fused._spec
    sts = spec.stages + ((spec.shortcut,) if spec.shortcut is not None else ())
    names = {f"{st.conv}.bias" for st in sts
             if st.bn is not None and bn_training(get_path(fused, st.bn))}
    return {n for n, _ in fused.named_parameters() if n in names}


def check_block(make_plain, *, backend="torch", dtype=torch.float32, train=True,
                channels_last=False, shape=(2, 8, 9, 9), steps=1, device="cpu",
                grads=True, bn_eval=False, reseed=False):
    """bn_eval: every nn.BatchNorm2d in eval after the blocks are set to `train`
    (frozen-BN fine-tuning); a block whose BNs all run on their running statistics
    must then leave every buffer exactly as it was.
    reseed: the same RNG seed before each of the three forwards of a step (a block
    with a sample gate draws its mask there: the three must draw the same one)."""
    torch.manual_seed(1234)
    plain64 = make_plain().to(device=device, dtype=torch.float64)
    randomize_bn(plain64)
    plain_lp = copy.deepcopy(plain64).to(dtype)
    fused = FusedResidual.from_residual(copy.deepcopy(plain64).to(dtype), backend=backend)
    for m in (plain64, plain_lp, fused):
        m.train(train)
        if bn_eval:
            for bn in m.modules():
                if isinstance(bn, torch.nn.BatchNorm2d):
                    bn.eval()
    frozen = not any(bn_training(bn) for bn in fused.parts().bns())
    before = {n: b.clone() for n, b in fused.named_buffers()}
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for step in range(steps):
        x = make_input(shape, dtype, channels_last, device, requires_grad=grads)
        x64 = x.detach().to(torch.float64).requires_grad_(grads)
        x_lp = x.detach().clone().requires_grad_(grads)
        outs = []
        for m, inp in ((fused, x), (plain_lp, x_lp), (plain64, x64)):
            if reseed:
                torch.manual_seed(4321 + step)
            outs.append(m(inp))
        out_f, out_p, out_r = outs
        assert out_f.dtype == out_p.dtype, f"output dtype {out_f.dtype} != plain {out_p.dtype}"
        assert out_f.is_contiguous(memory_format=fmt), "output lost the input's memory format"
        assert_within(f"output (step {step})", out_f, out_p, out_r, factor=2, dtype=dtype)
        if grads:
            g = torch.randn(out_r.shape, dtype=torch.float64, device=device)
            for out in outs:
                out.backward(g.to(out.dtype))
            assert_within("grad x", x.grad, x_lp.grad, x64.grad, factor=3, dtype=dtype)
            named = dict(plain64.named_parameters())
            named_lp = dict(plain_lp.named_parameters())
            zero = _zero_grad_params(fused) if train else set()
            for name, p in fused.named_parameters():
                assert p.grad is not None, f"no gradient for {name}"
                if name in zero:  # bias before a training BN: exactly 0 in exact arithmetic
                    w = name.rsplit(".", 1)[0] + ".weight"
                    assert_near_zero(f"grad {name}", p.grad, named_lp[name].grad,
                                     named[w].grad.norm().item(), dtype=dtype)
                    continue
                assert_within(f"grad {name}", p.grad, named_lp[name].grad, named[name].grad,
                              factor=3, dtype=dtype)
            for m in (fused, plain_lp, plain64):
                m.zero_grad(set_to_none=True)
    if frozen:  # running statistics (and counters) untouched
        for name, b in fused.named_buffers():
            assert torch.equal(b, before[name]), f"buffer {name} changed"
    ref_buffers = dict(plain64.named_buffers())
    lp_buffers = dict(plain_lp.named_buffers())
    for name, b in fused.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert b.item() == ref_buffers[name].item(), f"{name}: {b.item()}"
        else:
            assert_within(f"buffer {name}", b, lp_buffers[name], ref_buffers[name], factor=2,
                          dtype=dtype)
    return fused
