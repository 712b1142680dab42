"""torch.compile(fullgraph=True) of a network of FusedResidual blocks, eval and train:
no graph breaks, same outputs, same running statistics."""
import copy

import pytest
import torch
from torch import nn

from blockcheck import randomize_bn
from resnet_fused import FusedResidual, Residual


def _nets(backend):
    torch.manual_seed(0)
    plain = nn.Sequential(Residual(4, 8, True, 2), Residual(8, 8))
    randomize_bn(plain)
    fused = nn.Sequential(*(FusedResidual.from_residual(b, backend=backend)
                            for b in copy.deepcopy(plain)))
    return plain, fused


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_eval(compiler):
    torch._dynamo.reset()
    plain, fused = _nets("torch")
    plain.eval(), fused.eval()
    compiled = torch.compile(fused, fullgraph=True, backend=compiler)
    x = torch.randn(2, 4, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), plain(x), rtol=1e-4, atol=1e-4)
        # A weight change reaches the compiled model (the fold is traced, not cached).
        for m in (plain, fused):
            m[1].bn2.running_var.mul_(2.0)
        torch.testing.assert_close(compiled(x), plain(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_train_step(compiler):
    torch._dynamo.reset()
    plain, fused = _nets("torch")
    compiled = torch.compile(fused, fullgraph=True, backend=compiler)
    for step in range(2):
        x = torch.randn(2, 4, 10, 10)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        outs = [plain(xs[0]), compiled(xs[1])]
        g = torch.randn_like(outs[0])
        for o in outs:
            o.backward(g)
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-4, msg=name)
    for (name, a), b in zip(plain.named_buffers(), fused.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)
