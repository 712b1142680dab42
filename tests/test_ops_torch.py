"""The torch backend's ops beyond the op contract (tests/test_op_contract.py: schemas,
opcheck, float64 reference): the packed mask format, and the ops against PyTorch's
own BatchNorm and convolutions (they are the contract's reference themselves)."""
import pytest
import torch
from torch.nn import functional as F

from resnet_fused.backends import torch_ops

ops = torch_ops.ops


def _c(shape=(3, 5, 7, 6), dtype=torch.float32, channels_last=False):
    c = torch.randn(shape, dtype=torch.float64).to(dtype)
    return c.contiguous(memory_format=torch.channels_last) if channels_last else c


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("numel_shape", [(2, 3, 5, 7), (1, 8, 4, 4), (3, 1, 1, 1)])
def test_mask_roundtrip_and_physical_order(channels_last, numel_shape):
    b = torch.rand(numel_shape) > 0.5
    if channels_last:
        b = b.contiguous(memory_format=torch.channels_last)
    packed = torch_ops.pack_mask(b)
    assert packed.dtype == torch.uint8 and packed.numel() == (b.numel() + 7) // 8
    assert torch.equal(torch_ops.unpack_mask(packed, b), b)
    physical = (b.permute(0, 2, 3, 1) if channels_last else b).reshape(-1)
    i = int(torch.nonzero(physical)[0])
    assert (int(packed[i // 8]) >> (i % 8)) & 1 == 1


def test_bn_act_gradient_is_training_batchnorm():
    """bn_act's registered autograd equals autograd through F.batch_norm(training=True)."""
    c = _c((3, 4, 5, 5), torch.float64).requires_grad_()
    r = torch.randn_like(c, requires_grad=True)
    w = torch.rand(4, dtype=torch.float64).add(0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    mean, var = ops.channel_stats(c.detach())
    out, _ = ops.bn_act(c, mean, torch.rsqrt(var + 1e-5), w, b, r)
    ref = F.relu(F.batch_norm(c, None, None, w, b, True, 0.0, 1e-5) + r)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (c, w, b, r), g)
    ref_grads = torch.autograd.grad(ref, (c, w, b, r), g)
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("which", ["conv_bias_relu", "conv_bias_shortcut_relu"])
def test_eval_ops_gradcheck(which):
    d = torch.float64
    x = torch.randn(2, 3, 5, 5, dtype=d, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=d, requires_grad=True)
    b = torch.randn(4, dtype=d, requires_grad=True)
    if which == "conv_bias_relu":
        torch.autograd.gradcheck(lambda *a: ops.conv_bias_relu(*a, 2, 1), (x, w, b))
    else:
        y = torch.randn(2, 4, 3, 3, dtype=d, requires_grad=True)
        w2 = torch.randn(4, 4, 3, 3, dtype=d, requires_grad=True)
        w3 = torch.randn(4, 3, 1, 1, dtype=d, requires_grad=True)
        torch.autograd.gradcheck(
            lambda y, w2, b, x, w3: ops.conv_bias_shortcut_relu(y, w2, b, x, w3, 1, 2, 0),
            (y, w2, b, x, w3))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_finalize_updates_running_stats_like_batchnorm(momentum):
    bn = torch.nn.BatchNorm2d(5, momentum=momentum, eps=1e-3).double().train()
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    nbt = bn.num_batches_tracked.clone()
    for _ in range(3):
        c = torch.randn(4, 5, 3, 3, dtype=torch.float64) * 2 + 1
        mean, var = ops.channel_stats(c)
        ops.bn_finalize(mean, var, bn.weight.detach(), bn.bias.detach(), rm, rv, nbt,
                        -1.0 if momentum is None else momentum, bn.eps, c.numel() // 5)
        bn(c)
    torch.testing.assert_close(rm, bn.running_mean)
    torch.testing.assert_close(rv, bn.running_var)
    assert nbt.item() == bn.num_batches_tracked.item() == 3
