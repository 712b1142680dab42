#!/usr/bin/env python
"""Train the D2L ResNet-18 with synchronized BatchNorm in the fused blocks, under DDP.

    torchrun --nproc-per-node 8 bench/train_ddp.py                  # one node, 8 GPUs
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d \\
             --rdzv-endpoint HOST:29400 bench/train_ddp.py           # four nodes
    python -m torch.distributed.run --nproc-per-node 2 --standalone \\
             bench/train_ddp.py --steps 5 --batch 4 --image-size 32  # CPU, gloo (CI)

The model: resnet18() converted with nn.SyncBatchNorm.convert_sync_batchnorm and then
fuse_model (every residual block a FusedResidual whose BNs normalise over all ranks),
wrapped in DDP; NCCL on GPUs (one per local rank), gloo on CPU. Synthetic data
(random images and labels, a fixed set per rank), SGD. Prints a progress line per step
from rank 0, then img/s per rank and overall (the sum) over the timed steps.

--mode local trains the same model with plain BatchNorm2d (no synchronisation), and
--mode both runs sync then local and prints the synchronisation's cost per step.

On CPU the stem's BatchNorm (the one BN outside the residual blocks) keeps local
statistics: torch's own nn.SyncBatchNorm has CUDA kernels only; the fused blocks
synchronise on CPU too. The script says so when it happens.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # run from a checkout without `pip install -e .`

from resnet_fused import FusedResidual, fuse_model, resnet18  # noqa: E402
from resnet_fused.distributed import DistributedDataParallel  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50, help="timed training steps")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first (default: 5 on GPU, 1 on CPU)")
    p.add_argument("--batch", type=int, default=None,
                   help="images per rank (default: 64 on GPU, 4 on CPU)")
    p.add_argument("--image-size", type=int, default=None,
                   help="square image side (default: 224 on GPU, 32 on CPU)")
    p.add_argument("--in-channels", type=int, default=1, help="D2L's Fashion-MNIST: 1")
    p.add_argument("--backend", default="auto", help="FusedResidual backend")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="autocast dtype (default: bfloat16 on GPU, float32 = none on CPU)")
    p.add_argument("--mode", choices=("sync", "local", "both"), default="sync",
                   help="synchronized BN, plain BN, or both (prints the difference)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC activations (default: on GPU)")
    return p.parse_args(argv)


def setup():
    """(rank, world, local_rank, device) of this process, the process group initialised
    from torchrun's environment: NCCL with one GPU per local rank, else gloo on CPU."""
    if "RANK" not in os.environ:
        sys.exit("launch with torchrun (python -m torch.distributed.run --nproc-per-node N "
                 "--standalone bench/train_ddp.py): RANK/WORLD_SIZE are not set")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            sys.exit(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible): "
                     "use --nproc-per-node <= the number of GPUs")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), local, device


def build_model(args, device, sync: bool, rank: int) -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank (DDP broadcasts anyway)
    model = resnet18(in_channels=args.in_channels, num_classes=10)
    if sync and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = fuse_model(model, backend=args.backend, inplace=True)
    if sync and device.type != "cuda":
        for block in model.modules():
            if isinstance(block, FusedResidual):
                nn.SyncBatchNorm.convert_sync_batchnorm(block)  # its BN children
        if rank == 0:
            print("note: on CPU the stem BatchNorm keeps local statistics (torch's "
                  "nn.SyncBatchNorm is CUDA-only); the 8 fused blocks synchronise")
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=fmt)
    kwargs = dict(device_ids=[device.index]) if device.type == "cuda" else {}
    return DistributedDataParallel(model, **kwargs)


def synthetic_data(args, device, rank: int, n_sets: int = 4):
    gen = torch.Generator(device="cpu").manual_seed(1000 + rank)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    shape = (args.batch, args.in_channels, args.image_size, args.image_size)
    return [(torch.randn(shape, generator=gen).to(device).contiguous(memory_format=fmt),
             torch.randint(0, 10, (args.batch,), generator=gen).to(device))
            for _ in range(n_sets)]


def run(args, device, rank: int, world: int, sync: bool) -> float:
    """Train; returns this rank's seconds per timed step."""
    model = build_model(args, device, sync, rank)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    data = synthetic_data(args, device, rank)
    dtype = DTYPES[args.dtype]
    amp = dtype != torch.float32

    def step(i):
        x, y = data[i % len(data)]
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = loss_fn(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    label = "sync BN" if sync else "local BN"
    end = "" if sys.stdout.isatty() else "\n"  # one line updated in place on a terminal
    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(i)
        if rank == 0:  # progress: reading the loss waits for the step (rank 0 only)
            dt = time.perf_counter() - t0
            print(f"\r[{label}] step {i + 1}/{args.steps}  loss {loss.item():.4f}  "
                  f"{(i + 1) * args.batch * world / dt:,.1f} img/s overall", end=end,
                  flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    if rank == 0 and end == "":
        print()
    return elapsed / args.steps


def report(args, rank: int, world: int, sec_per_step: float, label: str) -> float:
    """Prints img/s per rank and overall; returns the slowest rank's s/step."""
    mine = torch.tensor([sec_per_step], dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather_object(every, mine)
    times = [float(t) for t in every]
    if rank == 0:
        per_rank = [args.batch / t for t in times]
        print(f"[{label}] {world} ranks x {args.batch} images of "
              f"{args.in_channels}x{args.image_size}x{args.image_size}, {args.steps} steps")
        for r, ips in enumerate(per_rank):
            print(f"  rank {r}: {ips:,.1f} img/s  ({times[r] * 1e3:.1f} ms/step)")
        # Every rank waits for the slowest at each collective: overall = world x batch
        # over the slowest rank's step time.
        print(f"  overall: {world * args.batch / max(times):,.1f} img/s")
    return max(times)


def main(argv=None):
    args = parse_args(argv)
    rank, world, _, device = setup()
    gpu = device.type == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    args.batch = args.batch or (64 if gpu else 4)
    args.image_size = args.image_size or (224 if gpu else 32)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    if args.channels_last is None:
        args.channels_last = gpu
    if rank == 0:
        print(f"train_ddp: {world} ranks on {device.type} ({dist.get_backend()}), backend "
              f"{args.backend}, {args.dtype}, batch {args.batch}/rank, "
              f"{args.image_size}x{args.image_size}, mode {args.mode}")
    try:
        results = {}
        for sync in ((True,) if args.mode == "sync" else (False,) if args.mode == "local"
                     else (True, False)):
            label = "sync BN" if sync else "local BN"
            results[sync] = report(args, rank, world, run(args, device, rank, world, sync),
                                   label)
        if len(results) == 2 and rank == 0:
            extra = results[True] - results[False]
            print(f"synchronisation: {extra * 1e3:+.2f} ms/step "
                  f"({100 * extra / results[False]:+.1f}% over the local-BN step)")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
