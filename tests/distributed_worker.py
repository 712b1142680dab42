"""What each rank runs in tests/test_distributed.py (spawned by distharness.run_ranks).

check_cases(rank, world, sizes, cases, report): for every case, the block converted to
SyncBatchNorm (in the case's order) under DDP, rank r holding sizes[r] samples, against
one process on the concatenated batch: the plain block in float64 (the reference) and
in the case's dtype (the framework's own error, the tolerance rule of
tests/tolerance.py). Per rank and per step (3 steps): the output, the input gradient,
every parameter gradient after DDP's all-reduce, and the running statistics at the end.
Then eval and an all-frozen-BN forward, with every collective made to raise.
"""
from __future__ import annotations

import copy
import json
import warnings

import torch
from torch import nn

from blockcheck import _zero_grad_params, randomize_bn
from resnet_fused import FusedResidual, Residual, backends, distributed, fuse_model
from test_module import BasicBlockLike
from tolerance import assert_near_zero, assert_within

BLOCKS = {
    "identity": (lambda: Residual(8, 8), 8),
    "proj1x1_s2": (lambda: Residual(4, 8, use_1x1conv=True, strides=2), 4),
    "basic_downsample": (lambda: BasicBlockLike(4, 8, stride=2), 4),
}
DTYPES = {"float64": torch.float64, "float32": torch.float32}
STEPS = 3
HW = 5


def _convert(plain: nn.Module, order: str, backend: str) -> nn.Module:
    if order == "sync_then_fuse":
        return fuse_model(nn.SyncBatchNorm.convert_sync_batchnorm(plain), backend=backend)
    return nn.SyncBatchNorm.convert_sync_batchnorm(fuse_model(plain, backend=backend))


def _batch(step, n, c, hw, dtype):
    gen = torch.Generator().manual_seed(100 + step)  # the same batch on every rank
    return torch.randn((n, c, hw, hw), generator=gen, dtype=torch.float64)


def run_case(rank: int, world: int, sizes, case: dict) -> None:
    make, cin = BLOCKS[case["block"]]
    dtype = DTYPES[case["dtype"]]
    fmt = torch.channels_last if case.get("channels_last") else torch.contiguous_format
    torch.manual_seed(1234)
    plain64 = make().double()
    randomize_bn(plain64)
    if case.get("momentum_none"):
        for m in plain64.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
    plain_lp = copy.deepcopy(plain64).to(dtype)
    fused = _convert(copy.deepcopy(plain64).to(dtype), case["order"], case["backend"])
    assert isinstance(fused, FusedResidual), type(fused)
    bns = [m for m in fused.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(type(m) is nn.SyncBatchNorm for m in bns), bns
    # Each rank's own running statistics are checked: no broadcast from rank 0.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # broadcast_buffers, torch 2.14
        # compile: the block traced whole (fullgraph) by Dynamo and AOTAutograd, the
        # functional collectives of forward and backward included.
        model = (torch.compile(fused, fullgraph=True, backend="aot_eager")
                 if case.get("compile") else fused)
        ddp = distributed.DistributedDataParallel(model, broadcast_buffers=False)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    name = f"{case} rank {rank}/{world}"
    for m in (plain64, plain_lp, ddp):
        m.train()
    for step in range(STEPS):
        x_all = _batch(step, sum(sizes), cin, HW, dtype)
        x64 = x_all.clone().requires_grad_()
        x_lp = x_all.to(dtype, copy=True).contiguous(memory_format=fmt).requires_grad_()
        out64, out_lp = plain64(x64), plain_lp(x_lp)
        g_all = torch.randn(out64.shape, generator=torch.Generator().manual_seed(step),
                            dtype=torch.float64)
        (out64 * g_all).sum().backward()
        (out_lp * g_all.to(dtype)).sum().backward()
        x = x_all[lo:hi].to(dtype, copy=True).contiguous(memory_format=fmt).requires_grad_()
        out = ddp(x)
        assert out.is_contiguous(memory_format=fmt), f"{name}: output lost its layout"
        (out * g_all[lo:hi].to(dtype)).sum().backward()
        assert_within(f"{name} step {step}: output", out, out_lp[lo:hi], out64[lo:hi],
                      dtype=dtype)
        assert_within(f"{name} step {step}: grad x", x.grad, x_lp.grad[lo:hi],
                      x64.grad[lo:hi], factor=3, dtype=dtype)
        # DDP averages the ranks' gradients: the gradient of the summed loss / world.
        ref, ref_lp = dict(plain64.named_parameters()), dict(plain_lp.named_parameters())
        zero = _zero_grad_params(fused)
        for pname, p in fused.named_parameters():
            got = p.grad * world
            if pname in zero:
                w = pname.rsplit(".", 1)[0] + ".weight"
                assert_near_zero(f"{name} step {step}: grad {pname}", got,
                                 ref_lp[pname].grad, ref[w].grad.norm().item(), dtype=dtype)
                continue
            assert_within(f"{name} step {step}: grad {pname}", got, ref_lp[pname].grad,
                          ref[pname].grad, factor=3, dtype=dtype)
        for m in (plain64, plain_lp, fused):
            m.zero_grad(set_to_none=True)
    ref_buf, lp_buf = dict(plain64.named_buffers()), dict(plain_lp.named_buffers())
    for bname, b in fused.named_buffers():
        if bname.endswith("num_batches_tracked"):
            assert b.item() == ref_buf[bname].item() == STEPS, f"{name}: {bname} {b.item()}"
        else:
            assert_within(f"{name}: {bname} after {STEPS} steps", b, lp_buf[bname],
                          ref_buf[bname], dtype=dtype)
    _check_no_communication(fused, plain64, plain_lp, x_all[lo:hi], dtype, fmt, name)


def _check_no_communication(fused, plain64, plain_lp, x, dtype, fmt, name) -> None:
    """Eval (folded, and unfolded under autograd) and all-frozen BNs: the same numbers
    as the plain block in eval, and no collective issued."""
    real = distributed.all_reduce_sum

    def refuse(*_a, **_k):
        raise AssertionError(f"{name}: a collective in eval / frozen BN")

    distributed.all_reduce_sum = refuse
    try:
        plain64.eval(), plain_lp.eval()
        xl = x.to(dtype).contiguous(memory_format=fmt)
        with torch.no_grad():
            ref, ref_lp = plain64(x), plain_lp(xl)
            fused.eval()
            assert_within(f"{name}: eval", fused(xl), ref_lp, ref, dtype=dtype)
        fused.train()
        for m in fused.modules():
            if isinstance(m, nn.SyncBatchNorm):
                m.eval()  # frozen BN fine-tuning
        out = fused(xl.clone().requires_grad_())
        out.sum().backward()
        assert_within(f"{name}: frozen BN", out.detach(), ref_lp, ref, dtype=dtype)
    finally:
        distributed.all_reduce_sum = real


def check_cases(rank: int, world: int, sizes, cases, report: str) -> None:
    ran = []
    for case in cases:
        reason = backends.unavailable_reason(case["backend"], torch.device("cpu"))
        if reason is not None:
            ran.append({"case": case, "skipped": reason})
            continue
        run_case(rank, world, sizes, case)
        ran.append({"case": case})
    if rank == 0:
        with open(report, "w") as f:
            json.dump(ran, f)


def raise_on_last_rank(rank: int, world: int) -> None:
    """Rank world-1 raises while the others wait in a collective."""
    if rank == world - 1:
        raise ValueError(f"rank {rank} fails on purpose")
    torch.distributed.barrier()
