"""An empty batch (N = 0; detection code paths feed them) gives what the plain block
gives, in eval and in training: an empty output of the same shape and memory format,
and the BN buffers as nn.BatchNorm2d leaves them (num_batches_tracked counts the call,
the running statistics stay)."""
import copy

import pytest
import torch

from resnet_fused import FusedResidual
from resnet_fused.reference import Residual
from test_conversion_zoo import randomize_bns


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_empty_batch_as_the_plain_block(train, fmt):
    plain = randomize_bns(Residual(4, 8, True, 2))
    fused = FusedResidual.from_residual(copy.deepcopy(plain), backend="torch")
    x = torch.randn(0, 4, 6, 6).contiguous(memory_format=fmt)
    outs = []
    for m in (plain, fused):
        m.train(train)
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.sum().backward()
        outs.append((y, xi.grad))
    (y0, g0), (y1, g1) = outs
    assert y1.shape == y0.shape == (0, 8, 3, 3)
    assert y1.stride() == y0.stride() and g1.shape == g0.shape
    for (n, b0), (_, b1) in zip(plain.named_buffers(), fused.named_buffers()):
        torch.testing.assert_close(b1, b0, rtol=0, atol=0, msg=n)
    if train:
        assert int(fused.bn1.num_batches_tracked) == 1


def test_empty_channels_still_raise():
    fused = FusedResidual(4, 4)
    with pytest.raises(ValueError, match="expects 4 input channels"):
        fused(torch.randn(2, 0, 6, 6))
    with pytest.raises(ValueError, match=r"input of shape \(2, 4, 0, 6\) is empty"):
        fused(torch.randn(2, 4, 0, 6))
