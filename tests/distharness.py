"""Run a function on N local processes joined by a gloo process group, for the tests.

    run_ranks(fn, world, *args, timeout=120)

spawns `world` processes that each call fn(rank, world, *args) inside an initialised
default process group (gloo, a free localhost port), and returns when all have
finished. A rank that raises fails the call with that rank's traceback, the other
ranks are terminated (torch.multiprocessing's join); ranks still running after
`timeout` seconds (a collective waiting for a peer that never comes) are terminated and
TimeoutError is raised: a test never hangs. `fn` must be importable by name (a
module-level function of a module on sys.path: spawn re-imports it in the child).
"""
from __future__ import annotations

import datetime
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, args: tuple, collective_timeout: float):
    torch.set_num_threads(1)  # N ranks share the few cores of a CI machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world,
                            timeout=datetime.timedelta(seconds=collective_timeout))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 120.0) -> None:
    ctx = mp.start_processes(_entry, args=(fn, world, free_port(), args, timeout),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=0.2):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} ranks of {fn.__name__} did not finish within "
                                   f"{timeout:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
