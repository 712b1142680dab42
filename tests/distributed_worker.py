"""What each rank runs in tests/test_distributed.py (spawned by distharness.run_ranks).

check_cases(rank, world, sizes, cases, report): for every case, the block converted to
SyncBatchNorm (in the case's order, over the default group or the case's subgroups)
under DDP, rank r holding sizes[r] samples, against one process on the concatenation of
its group's batches: the plain block in float64 (the reference) and in the case's dtype
(the framework's own error, the tolerance rule of tests/tolerance.py); on CUDA also
against torch's nn.SyncBatchNorm on the same ranks. Per rank and per step (3 steps):
the output, the input gradient, every parameter gradient after DDP's all-reduce, and the
running statistics at the end. Then eval and an all-frozen-BN forward, with every
collective made to raise.
"""
from __future__ import annotations

import copy
import json
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from blockcheck import _zero_grad_params, randomize_bn
from resnet_fused import FusedResidual, Residual, backends, distributed, fuse_model
from test_module import BasicBlockLike
from tolerance import assert_near_zero, assert_within

BLOCKS = {
    "identity": (lambda: Residual(8, 8), 8),
    "proj1x1_s2": (lambda: Residual(4, 8, use_1x1conv=True, strides=2), 4),
    "basic_downsample": (lambda: BasicBlockLike(4, 8, stride=2), 4),
    "se_avg_down": (lambda: _se_avg_down(), 8),   # a gated branch, a pooled shortcut
}


def _se_avg_down() -> nn.Module:
    """timm's SE bottleneck with ResNet-D's shortcut (seresnext*d's downsampling block)."""
    from timm.layers import SEModule
    from timm.models.resnet import Bottleneck
    ds = nn.Sequential(nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
                       nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
    return Bottleneck(8, 4, stride=2, downsample=ds, attn_layer=SEModule)
DTYPES = {"float64": torch.float64, "float32": torch.float32}
STEPS = 3
HW = 5


def _convert(plain: nn.Module, order: str, backend: str, group) -> nn.Module:
    sync = nn.SyncBatchNorm.convert_sync_batchnorm
    if order == "sync_then_fuse":
        return fuse_model(sync(plain, group), backend=backend)
    return sync(fuse_model(plain, backend=backend), group)


def _batch(step, n, c, hw):
    gen = torch.Generator().manual_seed(100 + step)  # the same batch on every rank
    return torch.randn((n, c, hw, hw), generator=gen, dtype=torch.float64)


def _partition(rank: int, world: int, case: dict):
    """(this rank's process group, None = the default one; the [first, last+1) rank
    range of every group). case["groups"]: contiguous rank lists, e.g. [[0, 1], [2]]."""
    groups = case.get("groups")
    if groups is None:
        return None, [(0, world)]
    mine = None
    for members in groups:  # every rank creates every group, in the same order
        g = dist.new_group(members)
        if rank in members:
            mine = g
    return mine, [(m[0], m[-1] + 1) for m in groups]


def _plain_sync_ddp(plain64, dtype, device, group, fmt):
    """The plain block with torch's nn.SyncBatchNorm under DDP (CUDA only)."""
    m = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain64).to(dtype), group)
    m = m.to(device=device, memory_format=fmt).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return DDP(m, broadcast_buffers=False)


def run_case(rank: int, world: int, sizes, case: dict) -> None:
    make, cin = BLOCKS[case["block"]]
    dtype = DTYPES[case["dtype"]]
    device = torch.device(case.get("device", "cpu"))
    if device.type == "cuda":  # full fp32, as the CPU references
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    fmt = torch.channels_last if case.get("channels_last") else torch.contiguous_format
    torch.manual_seed(1234)
    plain64 = make().double()
    randomize_bn(plain64)
    if case.get("momentum_none"):
        for m in plain64.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
    group, ranges = _partition(rank, world, case)
    # One reference pair per process group, on the concatenation of its ranks' batches:
    # float64 and the plain block in the case's dtype (the framework's own error).
    refs = [(copy.deepcopy(plain64), copy.deepcopy(plain64).to(dtype)) for _ in ranges]
    mine = next(i for i, (a, b) in enumerate(ranges) if a <= rank < b)
    fused = _convert(copy.deepcopy(plain64).to(dtype), case["order"], case["backend"], group)
    fused = fused.to(device=device, memory_format=fmt)
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
    # On CUDA also torch's own SyncBatchNorm on the same ranks (it has no CPU kernels).
    torch_sync = (_plain_sync_ddp(plain64, dtype, device, group, fmt)
                  if device.type == "cuda" else None)
    offset = [sum(sizes[:r]) for r in range(world + 1)]
    lo, hi = offset[rank], offset[rank + 1]
    name = f"{case} rank {rank}/{world}"
    for m in [ddp] + [m for pair in refs for m in pair]:
        m.train()
    for step in range(STEPS):
        x_all = _batch(step, offset[-1], cin, HW)
        g_all = None
        for i, ((a, b), (p64, p_lp)) in enumerate(zip(ranges, refs)):
            glo, ghi = offset[a], offset[b]
            x64 = x_all[glo:ghi].clone().requires_grad_()
            x_lp = x_all[glo:ghi].to(dtype, copy=True).contiguous(
                memory_format=fmt).requires_grad_()
            out64, out_lp = p64(x64), p_lp(x_lp)
            if g_all is None:
                g_all = torch.randn((offset[-1],) + out64.shape[1:], dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(step))
            (out64 * g_all[glo:ghi]).sum().backward()
            (out_lp * g_all[glo:ghi].to(dtype)).sum().backward()
            if i == mine:
                mine_out = (out64[lo - glo:hi - glo], out_lp[lo - glo:hi - glo])
                mine_gx = (x64.grad[lo - glo:hi - glo], x_lp.grad[lo - glo:hi - glo])
        x = x_all[lo:hi].to(device, dtype, copy=True).contiguous(
            memory_format=fmt).requires_grad_()
        g = g_all[lo:hi].to(device, dtype)
        out = ddp(x)
        assert out.is_contiguous(memory_format=fmt), f"{name}: output lost its layout"
        (out * g).sum().backward()
        assert_within(f"{name} step {step}: output", out.cpu(), mine_out[1], mine_out[0],
                      dtype=dtype)
        assert_within(f"{name} step {step}: grad x", x.grad.cpu(), mine_gx[1], mine_gx[0],
                      factor=3, dtype=dtype)
        if torch_sync is not None:  # against nn.SyncBatchNorm's own error
            xs = x.detach().clone().requires_grad_()
            out_s = torch_sync(xs)
            (out_s * g).sum().backward()
            assert_within(f"{name} step {step}: output vs nn.SyncBatchNorm", out.cpu(),
                          out_s.cpu(), mine_out[0], dtype=dtype)
            assert_within(f"{name} step {step}: grad x vs nn.SyncBatchNorm", x.grad.cpu(),
                          xs.grad.cpu(), mine_gx[0], factor=3, dtype=dtype)
            torch_sync.zero_grad(set_to_none=True)
        # DDP averages over all ranks: the sum of every group's gradient / world.
        ref = {n: sum(dict(p64.named_parameters())[n].grad for p64, _ in refs)
               for n, _ in plain64.named_parameters()}
        ref_lp = {n: sum(dict(p_lp.named_parameters())[n].grad for _, p_lp in refs)
                  for n, _ in plain64.named_parameters()}
        zero = _zero_grad_params(fused)
        for pname, p in fused.named_parameters():
            got = p.grad.cpu() * world
            if pname in zero:
                w = pname.rsplit(".", 1)[0] + ".weight"
                assert_near_zero(f"{name} step {step}: grad {pname}", got, ref_lp[pname],
                                 ref[w].norm().item(), dtype=dtype)
                continue
            assert_within(f"{name} step {step}: grad {pname}", got, ref_lp[pname],
                          ref[pname], factor=3, dtype=dtype)
        for m in [fused] + [m for pair in refs for m in pair]:
            m.zero_grad(set_to_none=True)
    p64, p_lp = refs[mine]
    ref_buf, lp_buf = dict(p64.named_buffers()), dict(p_lp.named_buffers())
    for bname, b in fused.named_buffers():
        if bname.endswith("num_batches_tracked"):
            assert b.item() == ref_buf[bname].item() == STEPS, f"{name}: {bname} {b.item()}"
        else:
            assert_within(f"{name}: {bname} after {STEPS} steps", b.cpu(), lp_buf[bname],
                          ref_buf[bname], dtype=dtype)
    _check_no_communication(fused, p64, p_lp, x_all[lo:hi], dtype, fmt, device, name)


def _check_no_communication(fused, plain64, plain_lp, x, dtype, fmt, device, name) -> None:
    """Eval (folded, and unfolded under autograd) and all-frozen BNs: the same numbers
    as the plain block in eval, and no collective issued."""
    real = distributed.all_reduce_sum

    def refuse(*_a, **_k):
        raise AssertionError(f"{name}: a collective in eval / frozen BN")

    distributed.all_reduce_sum = refuse
    try:
        plain64.eval(), plain_lp.eval()
        xl = x.to(dtype).contiguous(memory_format=fmt)
        xd = xl.to(device)
        with torch.no_grad():
            ref, ref_lp = plain64(x), plain_lp(xl)
            fused.eval()
            assert_within(f"{name}: eval", fused(xd).cpu(), ref_lp, ref, dtype=dtype)
        fused.train()
        for m in fused.modules():
            if isinstance(m, nn.SyncBatchNorm):
                m.eval()  # frozen BN fine-tuning
        out = fused(xd.clone().requires_grad_())
        out.sum().backward()
        assert_within(f"{name}: frozen BN", out.detach().cpu(), ref_lp, ref, dtype=dtype)
    finally:
        distributed.all_reduce_sum = real


def check_cases(rank: int, world: int, sizes, cases, report: str) -> None:
    ran = []
    for case in cases:
        reason = backends.unavailable_reason(case["backend"],
                                             torch.device(case.get("device", "cpu")))
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
