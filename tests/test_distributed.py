"""Synchronized BatchNorm in FusedResidual: nn.SyncBatchNorm blocks (either conversion
order) under DDP on 2 and 3 gloo ranks with uneven batches match one process on the
concatenated batch (tests/distributed_worker.py); the errors; world size 1."""
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import distributed_worker as worker
from distharness import run_ranks
from resnet_fused import FusedResidual, Residual, backends, distributed, fuse_model

# One spawn per world size runs every case (a spawn costs seconds of imports).
CASES = [
    dict(backend="torch", dtype="float64", block="identity", order="sync_then_fuse"),
    dict(backend="torch", dtype="float32", block="proj1x1_s2", order="fuse_then_sync",
         channels_last=True),
    dict(backend="torch", dtype="float64", block="basic_downsample", order="fuse_then_sync",
         momentum_none=True),
    dict(backend="native", dtype="float64", block="proj1x1_s2", order="sync_then_fuse"),
    dict(backend="native", dtype="float32", block="basic_downsample", order="sync_then_fuse",
         channels_last=True),
    # eager: PyTorch's kernels with the statistics synchronized (auto's CPU choice).
    dict(backend="eager", dtype="float64", block="basic_downsample", order="sync_then_fuse",
         momentum_none=True),
    dict(backend="eager", dtype="float32", block="proj1x1_s2", order="fuse_then_sync",
         channels_last=True),
    # A gated branch (SE) and a pooled shortcut: the gate's pool and f see the rank's
    # own samples, the BNs the group's statistics.
    dict(backend="torch", dtype="float64", block="se_avg_down", order="sync_then_fuse"),
    dict(backend="eager", dtype="float32", block="se_avg_down", order="fuse_then_sync",
         channels_last=True),
    # Triton through its interpreter on CPU: float32 (its float16 is exercised on GPUs).
    dict(backend="triton", dtype="float32", block="proj1x1_s2", order="sync_then_fuse"),
    dict(backend="triton", dtype="float32", block="basic_downsample", order="fuse_then_sync",
         channels_last=True),
]


# torch.compile(fullgraph=True) traces the block with its collectives (no graph break).
COMPILED = [dict(backend=b, dtype="float32", block=k, order="sync_then_fuse", compile=True)
            for b, k in (("torch", "identity"), ("native", "basic_downsample"),
                         ("triton", "identity"), ("eager", "basic_downsample"))]


# A process group named at conversion: ranks 0 and 1 synchronise with each other, rank 2
# (a group of one) normalises alone; DDP still averages the gradients over all three.
SUBGROUPS = [dict(backend="triton", dtype="float32", block="identity", order="fuse_then_sync",
                  groups=[[0, 1], [2]])]


@pytest.mark.parametrize("sizes, cases", [((3, 2), CASES + COMPILED),
                                          ((1, 3, 2), CASES + SUBGROUPS)],
                         ids=["2ranks", "3ranks"])
def test_sync_bn_matches_one_process_on_the_concatenated_batch(sizes, cases, tmp_path):
    report = tmp_path / "ran.json"
    run_ranks(worker.check_cases, len(sizes), sizes, cases, str(report), timeout=300)
    ran = json.loads(report.read_text())
    assert [r["case"] for r in ran] == cases
    for r in ran:
        if "skipped" in r:  # only a backend that cannot run here may be skipped
            assert backends.unavailable_reason(r["case"]["backend"], "cpu") is not None, r


# Two ranks sharing one GPU over gloo (NCCL needs a GPU per rank); also compared with
# torch's own nn.SyncBatchNorm, which runs on CUDA only. TF32 off: the references are
# computed in float32 on the CPU.
CUDA_CASES = [dict(c, device="cuda") for c in (
    dict(backend="torch", dtype="float32", block="proj1x1_s2", order="sync_then_fuse"),
    dict(backend="native", dtype="float32", block="basic_downsample", order="fuse_then_sync",
         channels_last=True),
    dict(backend="triton", dtype="float32", block="identity", order="sync_then_fuse",
         channels_last=True),
)]


@pytest.mark.cuda
def test_sync_bn_on_one_gpu_shared_by_two_ranks(tmp_path):
    report = tmp_path / "ran.json"
    run_ranks(worker.check_cases, 2, (3, 2), CUDA_CASES, str(report), timeout=600)
    ran = json.loads(report.read_text())
    for r in ran:
        if "skipped" in r:
            assert backends.unavailable_reason(r["case"]["backend"], "cuda") is not None, r


def test_a_raising_rank_fails_the_run_without_hanging():
    # The first error join() sees is either rank 1's own or rank 0's collective failing
    # because rank 1 went away; either way the run fails fast, not at the timeout.
    with pytest.raises(mp.ProcessRaisedException, match="fails on purpose|gloo"):
        run_ranks(worker.raise_on_last_rank, 2, timeout=60)


# --------------------------------------------------------------------------- one process
def _sync_block(backend="torch"):
    return nn.SyncBatchNorm.convert_sync_batchnorm(
        fuse_model(Residual(4, 4), backend=backend))


def test_training_without_a_process_group_says_so():
    assert not dist.is_initialized()
    block = _sync_block()
    with pytest.raises(RuntimeError, match="bn1 is an nn.SyncBatchNorm.*not initialised"):
        block(torch.randn(2, 4, 5, 5))
    block.eval()  # eval never communicates: no process group needed
    with torch.no_grad():
        block(torch.randn(2, 4, 5, 5))


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_world_size_one_is_plain_batchnorm_without_collectives(one_rank_group, monkeypatch):
    monkeypatch.setattr(distributed, "all_reduce_sum",
                        lambda *a: pytest.fail("a collective with world size 1"))
    torch.manual_seed(0)
    plain = Residual(4, 4).double()
    fused = _sync_block()
    fused.load_state_dict(plain.state_dict())
    fused.double()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(fused(x), plain(x))
    torch.testing.assert_close(fused.bn2.running_var, plain.bn2.running_var)


def test_a_group_that_cannot_reduce_the_device_says_so(one_rank_group, monkeypatch):
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cuda:nccl")
    with pytest.raises(ValueError, match="reduces cuda tensors with nccl.*runs on cpu"):
        distributed.check_reducible(dist.group.WORLD, torch.device("cpu"), "bn1")
    distributed.check_reducible(dist.group.WORLD, torch.device("cuda"), "bn1")


def test_conversion_orders_keep_syncbatchnorm_children():
    first = fuse_model(nn.SyncBatchNorm.convert_sync_batchnorm(Residual(4, 8, True, 2)),
                       backend="torch")
    then = nn.SyncBatchNorm.convert_sync_batchnorm(fuse_model(Residual(4, 8, True, 2),
                                                              backend="torch"))
    for block in (first, then):
        assert isinstance(block, FusedResidual)
        assert type(block.bn1) is nn.SyncBatchNorm and type(block.bn2) is nn.SyncBatchNorm


def test_triton_runs_a_block_with_mixed_groups_the_composite_way(one_rank_group, monkeypatch):
    """The fused training op takes one process group for the whole block; a block whose
    BNs are synchronized over different groups (here bn1 over the world, bn2 local)
    goes through CompositeBackend.forward_train: ATen convolutions around the triton
    namespace's BN ops (channel_stats, bn_finalize, bn_act and its backward)."""
    pytest.importorskip("triton")
    import copy

    import resnet_fused.backends.triton as triton_backend
    from tolerance import assert_within

    monkeypatch.setattr(triton_backend, "train_block",
                        lambda *a: pytest.fail("the fused op cannot take mixed groups"))
    torch.manual_seed(0)
    plain = Residual(4, 4).train()
    ref = copy.deepcopy(plain).double()
    fused = fuse_model(copy.deepcopy(plain), backend="triton")
    backend = backends.get("triton", torch.device("cpu"))
    assert backend.ops is torch.ops.resnet_fused_triton
    x = torch.randn(3, 4, 5, 5)
    xs = [x.clone().requires_grad_() for _ in range(2)] + [x.double().requires_grad_()]
    outs = [backend.forward_train(fused.parts(), xs[0], groups=(dist.group.WORLD, None, None)),
            plain(xs[1]), ref(xs[2])]
    assert_within("out", *outs)
    g = torch.randn_like(outs[2])
    for o, xi in zip(outs, xs):
        o.backward(g.to(o.dtype))
    assert_within("grad x", *(xi.grad for xi in xs), factor=3)
    for name in ("bn1", "bn2"):
        assert_within(f"{name} running_var", *(getattr(m, name).running_var
                                              for m in (fused, plain, ref)))
