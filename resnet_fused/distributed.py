"""Synchronized BatchNorm inside the fused block (README.md, "Multi-GPU").

A FusedResidual whose BatchNorm children are nn.SyncBatchNorm (converted before or
after fuse_model) normalises, in training, over the union of the batches of the BN's
process group (`bn.process_group`, None = the default group), as nn.SyncBatchNorm does:

  forward   local per-channel statistics -> ONE all-reduce of 2C+1 values
            (count, sum, sum of squares, see combine_stats) -> finalize with the
            global count (running variance unbiased over the global count)
  backward  the two per-channel reductions (sum g, sum g*xhat) -> ONE all-reduce of
            2C values -> the apply pass with the global sums and count

so every rank's output and input gradient equal the single-process ones on the
concatenated batch, ranks holding different batch sizes included. BN weight/bias
gradients stay local, as nn.SyncBatchNorm's: DDP all-reduces them with the others.

The collectives are torch.distributed's functional ones: torch.compile traces them
(nn.SyncBatchNorm breaks the graph), and nothing is read back to the host (the global
count stays a device tensor), so a training step can be captured in a CUDA graph.
Eval, frozen BN (a BN in eval mode) and world size 1 never communicate.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from .backends.torch_ops import backward_apply, backward_reduce, finalize
from .ops import like_format, momentum_arg, stats_dtype
from .spec import BlockSpec, resolve

def _functional():
    import torch.distributed._functional_collectives as fc
    return fc


def all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    """Sum of t over the group (a functional collective: traceable, asynchronous until
    the result is used)."""
    return _functional().all_reduce(t, "sum", group)


# --------------------------------------------------------------------------- groups
def _device_backends(group) -> dict:
    """{device type: communication backend} of a process group ("cpu:gloo,cuda:nccl")."""
    config = str(dist.get_backend_config(group))
    pairs = [p.split(":", 1) for p in config.split(",") if ":" in p]
    return {dev.strip(): name.strip() for dev, name in pairs}


def check_reducible(group, device: torch.device, name: str) -> None:
    """ValueError when the group's backend cannot all-reduce tensors on `device`."""
    backends = _device_backends(group)
    if backends and device.type not in backends:
        have = ", ".join(f"{d} tensors with {b}" for d, b in backends.items())
        raise ValueError(
            f"FusedResidual: {name} is a SyncBatchNorm whose process group reduces "
            f"{have}, but the block runs on {device.type}; use a process group that can "
            f"reduce {device.type} tensors (init_process_group(backend='gloo') for CPU, "
            f"'nccl' for CUDA GPUs)")


def sync_group(bn: Optional[nn.Module], name: str, device: torch.device):
    """The process group a training BN normalises over, or None for local statistics
    (not a SyncBatchNorm, not training, or a group of one process). Raises when the
    BN asks for synchronisation that cannot happen."""
    if not isinstance(bn, nn.SyncBatchNorm) or not bn.training:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"FusedResidual: {name} is an nn.SyncBatchNorm in training mode but the "
            "default process group is not initialised; call "
            "torch.distributed.init_process_group() first (torchrun sets up its "
            "environment), or convert the BNs back to nn.BatchNorm2d for one process")
    group = bn.process_group if bn.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    if world < 1:
        raise RuntimeError(f"FusedResidual: this rank is not a member of {name}'s "
                           "SyncBatchNorm process group")
    if world == 1:
        return None
    if not torch.compiler.is_compiling():  # a host-side query; checked once, eagerly
        check_reducible(group, device, name)
    return group


def block_groups(bns: tuple, device: torch.device, spec: Optional[BlockSpec] = None
                 ) -> Optional[tuple]:
    """One group per BN of `bns` (spec.Parts.bns(): the main path's, then the
    shortcut's) for a training block with at least one synchronized BN, else None.
    Runs on every training call: a block without SyncBatchNorm children returns
    after a few type checks. spec: the block's, to name its BNs in errors."""
    if not any(isinstance(b, nn.SyncBatchNorm) for b in bns):
        return None
    if spec is not None:
        sts = spec.stages + ((spec.shortcut,) if spec.shortcut is not None else ())
        names = tuple(st.bn for st in sts if st.bn is not None)
    else:
        names = tuple(f"BN {i + 1} of the block" for i in range(len(bns)))
    groups = tuple(sync_group(b, n, device) for b, n in zip(bns, names))
    return groups if any(g is not None for g in groups) else None


# --------------------------------------------------------------------------- forward
def combine_stats(mean: torch.Tensor, var: torch.Tensor, count: int, group):
    """Global (mean, biased variance, count) from each rank's (mean, variance, count).

    One all-reduce of [n, n*mean, n*(var + mean^2)] (2C+1 values) in float64. Each
    rank's moments come from the Welford/shifted statistics kernels, accurate in fp32
    at any mean; combining them as sums is what an all-reduce can do, and the global
    variance sum(x^2)/N - mean^2 then cancels: it loses log10(mean^2/var) digits. In
    fp32 (7 digits) a channel with |mean| = 1000 * std would keep ~1 digit; in float64
    (16 digits) it keeps 10. (count, mean, M2) triples cannot be summed, and an
    all-gather of them grows with the world size.
    The count is a device tensor from here on: no host synchronisation.
    """
    m = mean.to(torch.float64)
    packed = torch.cat([m.new_full((1,), float(count)), count * m,
                        count * (var.to(torch.float64) + m * m)])
    total = all_reduce_sum(packed, group)
    c = mean.shape[0]
    n = total[0]
    gmean = total[1:c + 1] / n
    gvar = (total[c + 1:] / n - gmean * gmean).clamp_min(0)
    return gmean.to(mean.dtype), gvar.to(mean.dtype), n


def finalize_global(mean, var, count: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    """invstd of the global statistics; updates bn's running statistics as
    nn.SyncBatchNorm does (unbiased variance over the global count)."""
    momentum = momentum_arg(bn)
    invstd, _, _ = finalize(mean, var, bn.weight.detach(), bn.bias.detach(),
                            bn.running_mean, bn.running_var, bn.num_batches_tracked,
                            momentum, float(bn.eps), count)
    return invstd


def global_stats(backend, c: torch.Tensor, bn: nn.Module, group):
    """(mean, invstd, count) of c over the group, running statistics updated."""
    mean, var = backend.ops.channel_stats(c.detach())
    mean, var, n = combine_stats(mean, var, c.numel() // c.shape[1], group)
    return mean, finalize_global(mean, var, n, bn), n


# --------------------------------------------------------------------------- autograd
class _SyncBnAct(torch.autograd.Function):
    """relu(bn(c) [+ residual]) with the global statistics; backward all-reduces the
    two per-channel reductions between the backend's reduction and apply passes."""

    @staticmethod
    def forward(ctx, c, weight, bias, residual, mean, invstd, count, backend, group):
        out, mask = backend.ops.bn_act(c, mean, invstd, weight, bias, residual)
        ctx.save_for_backward(c, mean, invstd, weight, mask, count)
        ctx.backend, ctx.group = backend, group
        ctx.has_residual = residual is not None
        ctx.param_dtypes = (weight.dtype, bias.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        c, mean, invstd, weight, mask, count = ctx.saved_tensors
        need_res = ctx.has_residual and ctx.needs_input_grad[3]
        grad_out = like_format(grad_out.to(c.dtype), c)
        sum_g, sum_gx = ctx.backend.bn_backward_reduce(grad_out, mask, c, mean, invstd)
        total = all_reduce_sum(torch.stack([sum_g, sum_gx]), ctx.group)
        grad_c, grad_res = ctx.backend.bn_backward_apply(
            grad_out, mask, c, mean, invstd, weight, total[0] / count, total[1] / count,
            need_res)
        return (grad_c, sum_gx.to(ctx.param_dtypes[0]), sum_g.to(ctx.param_dtypes[1]),
                grad_res if need_res else None, None, None, None, None, None)


def bn_act_sync(backend, c: torch.Tensor, bn: nn.Module, residual: Optional[torch.Tensor],
                group) -> torch.Tensor:
    """Training relu(bn(c) [+ residual]) with bn synchronized over `group`, on a
    composite backend (its channel_stats and bn_act ops, bn_backward_reduce/apply)."""
    mean, invstd, n = global_stats(backend, c, bn, group)
    if residual is not None:
        residual = like_format(residual, c)
    return _SyncBnAct.apply(c, bn.weight, bn.bias, residual, mean, invstd, n, backend, group)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype, never through a no-op .to() (nor .contiguous()): when the forward of
    an autograd.Function returns such an alias of its result, torch 2.11's
    torch.compile (fullgraph, AOTAutograd) computes wrong input gradients (2.14 is
    right; tests/test_distributed.py's compiled basic_downsample case shows it)."""
    return t if t.dtype == dtype else t.to(dtype)


class _SyncBn(torch.autograd.Function):
    """bn(x) with given global statistics (no ReLU): the BN of a torchvision
    projection shortcut."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count, group):
        acc = mean.dtype
        scale = _cast(weight, acc) * invstd
        shift = _cast(bias, acc) - mean * scale
        y = _cast(x, acc) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        ctx.save_for_backward(x, mean, invstd, weight, count)
        ctx.group = group
        ctx.param_dtypes = (weight.dtype, bias.dtype)
        return _cast(y, x.dtype)  # elementwise on x: x's memory format

    @staticmethod
    def backward(ctx, grad_out):
        x, mean, invstd, weight, count = ctx.saved_tensors
        grad_out = like_format(grad_out.to(x.dtype), x)
        sum_g, sum_gx = backward_reduce(grad_out, None, x, mean, invstd)
        total = all_reduce_sum(torch.stack([sum_g, sum_gx]), ctx.group)
        grad_x, _ = backward_apply(grad_out, None, x, mean, invstd, weight,
                                   total[0] / count, total[1] / count, False)
        return (grad_x, sum_gx.to(ctx.param_dtypes[0]), sum_g.to(ctx.param_dtypes[1]),
                None, None, None, None)


def batch_norm_sync(x: torch.Tensor, bn: nn.Module, group) -> torch.Tensor:
    """Training bn(x) synchronized over `group`, in ATen ops."""
    xd = x.detach()
    var, mean = torch.var_mean(xd.to(stats_dtype(xd)), dim=(0, 2, 3), correction=0)
    mean, var, n = combine_stats(mean, var, x.numel() // x.shape[1], group)
    invstd = finalize_global(mean, var, n, bn)
    return _SyncBn.apply(x, bn.weight, bn.bias, mean, invstd, n, group)


def batch_norm_local(x: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    """Training bn(x) with local statistics, computed as nn.BatchNorm2d's forward does
    (the counter, then ATen's batch_norm with the module's momentum), without the
    module call: its hooks are refused at conversion (matching.py), so calling the
    module only adds host work to every step. Also for an nn.SyncBatchNorm with nothing
    to synchronise (world size 1), whose own forward refuses CPU tensors whenever a
    process group exists. momentum=None: _batch_norm_cumulative."""
    if bn.momentum is None:
        return _batch_norm_cumulative(x, bn)
    bn.num_batches_tracked.add_(1)
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, True,
                        bn.momentum, bn.eps)


def _batch_norm_cumulative(x: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    """Training bn(x) with momentum=None (the cumulative moving average).
    nn.BatchNorm2d computes its factor as 1 / float(num_batches_tracked), a host
    synchronisation per BN (a stall on a GPU, refused while a CUDA graph captures);
    here the running statistics are updated by the torch backend's finalize, which
    reads the factor on the device, and the output and its gradient are ATen's
    batch_norm with batch statistics. The price is one more read of x (the
    statistics), in this case only."""
    xd = x.detach()
    var, mean = torch.var_mean(xd.to(stats_dtype(xd)), dim=(0, 2, 3), correction=0)
    finalize(mean, var, bn.weight.detach(), bn.bias.detach(), bn.running_mean,
             bn.running_var, bn.num_batches_tracked, -1.0, float(bn.eps),
             x.numel() // x.shape[1])
    return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)


# --------------------------------------------------------------------------- DDP on CPU
class DistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    """torch's DistributedDataParallel, which also takes a CPU model whose
    nn.SyncBatchNorm modules all sit inside FusedResidual blocks.

    DDP refuses any nn.SyncBatchNorm in a CPU module because torch's own SyncBatchNorm
    has CUDA kernels only; the fused block synchronises them on CPU too (gloo), which
    is how CI tests multi-process training. A SyncBatchNorm outside a fused block on
    CPU is still refused, with DDP's message. On GPUs this is DDP itself."""

    def _passing_sync_batchnorm_handle(self, module):
        # A fused block is recognised by the BlockSpec it holds; importing module.py
        # here would make an import circle (module.py imports this file).
        inside = {id(bn) for block in module.modules()
                  if isinstance(block.__dict__.get("_spec"), BlockSpec)
                  for bn in resolve(block, block._spec).bns()}
        outside = [m for m in module.modules()
                   if isinstance(m, nn.SyncBatchNorm) and id(m) not in inside]
        if outside or self.device_type != "cpu":
            super()._passing_sync_batchnorm_handle(module)
