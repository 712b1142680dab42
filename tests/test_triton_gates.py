"""Gated branches on the triton backend (README.md, Design, "Gates and pooled
shortcuts"): the eval gate ops (conv_bias_pool, gate_shortcut_relu) and block_train's
sample `gate` against float64 PyTorch; single SE / ECA / torchvision SqueezeExcitation /
drop-path blocks against the plain block by the tolerance rule (tests/blockcheck.py,
BN randomised), eval and training; and that the forward runs no ATen op over a
feature map (only the gate modules on (N, C, 1, 1)).
Without a GPU through Triton's interpreter (tests/conftest.py), on tiny shapes.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from blockcheck import check_block, randomize_bn
from test_gated_blocks import BLOCKS, _shape
from tolerance import assert_within

import resnet_fused.backends.triton  # noqa: F401  (defines the resnet_fused_triton ops)
from resnet_fused import FusedResidual

CL = torch.channels_last
OPS = torch.ops.resnet_fused_triton


def _fmt(channels_last):
    return CL if channels_last else torch.contiguous_format


def _rand(dtype, *shape, scale=1.0, fmt=torch.contiguous_format):
    return (torch.randn(*shape) * scale).to(dtype).contiguous(memory_format=fmt)


# --------------------------------------------------------------------------- the ops
@pytest.mark.parametrize("hw", [3, 9], ids=["tiles_span_images", "images_span_tiles"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_conv_bias_pool(hw, channels_last, dtype):
    """The branch and its per-(n, k) mean from the epilogue's sums: 3x3 images put
    several images in one 32-row tile, 9x9 ones spread an image over three tiles."""
    fmt = _fmt(channels_last)
    x = _rand(dtype, 5, 24, hw, hw, fmt=fmt)
    w = _rand(dtype, 40, 24, 3, 3, scale=1 / 15, fmt=fmt)
    b = _rand(dtype, 40)
    out, pooled = OPS.conv_bias_pool(x, w, b, 1, 1)
    assert out.is_contiguous(memory_format=fmt) and pooled.dtype == torch.float32
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    lp = F.conv2d(x, w, b, padding=1)
    assert_within("branch", out, lp, ref)
    assert_within("pooled", pooled, lp.float().mean((2, 3)), ref.mean((2, 3)))


@pytest.mark.parametrize("gshape", [(3, 40, 1, 1), (3, 1, 1, 1), (1, 1, 1, 1)],
                         ids=["channel", "sample", "scalar"])
@pytest.mark.parametrize("shortcut", ["identity", "proj1x1s2"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gate_shortcut_relu(gshape, shortcut, channels_last, dtype):
    fmt = _fmt(channels_last)
    y = _rand(dtype, 3, 40, 5, 5, fmt=fmt)
    gate = torch.rand(gshape) + 0.25
    if shortcut == "identity":
        x, w3, b3, s3 = _rand(dtype, 3, 40, 5, 5, fmt=fmt), None, None, 1
    else:
        x, s3 = _rand(dtype, 3, 24, 9, 9, fmt=fmt), 2
        w3, b3 = _rand(dtype, 40, 24, 1, 1, scale=1 / 5, fmt=fmt), _rand(dtype, 40)
    out = OPS.gate_shortcut_relu(y, gate, x, w3, b3, s3, 0)
    assert out.is_contiguous(memory_format=fmt) and out.dtype == dtype

    def ref(y, gate, x, w3, b3):
        sc = x if w3 is None else F.conv2d(x, w3, b3, stride=s3)
        return torch.relu(gate.to(y.dtype) * y + sc)

    d = [None if t is None else t.double() for t in (y, gate, x, w3, b3)]
    assert_within("gated join", out, ref(y, gate, x, w3, b3), ref(*d))


def test_gate_shortcut_relu_rejects_a_gate_of_the_wrong_shape():
    y = torch.randn(2, 8, 3, 3)
    with pytest.raises(ValueError, match="gate_shortcut_relu: gate must be .* got \\(2, 4, 1, 1\\)"):
        OPS.gate_shortcut_relu(y, torch.rand(2, 4, 1, 1), y, None, None, 1, 0)


# --------------------------------------------------------------------------- blocks
@pytest.mark.parametrize("kind", ["se", "tv_se_stochastic_depth", "eca_identity", "drop_path"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_eval(kind, channels_last):
    check_block(BLOCKS[kind], backend="triton", train=False, channels_last=channels_last,
                shape=_shape(kind), grads=False)


@pytest.mark.parametrize("kind", ["se", "eca_identity"])
def test_eval_float16(kind):
    check_block(BLOCKS[kind], backend="triton", dtype=torch.float16, train=False,
                shape=_shape(kind), grads=False)


class _FeatureMapOps(TorchDispatchMode):
    """Records every ATen op (at the top level: not those inside our ops) that takes or
    returns a 4-D tensor larger than 1x1 in H, W: a pass over a feature map. Views
    (detach, view) read nothing and are not recorded."""

    def __init__(self):
        super().__init__()
        self.seen, self.ours = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if name.startswith("resnet_fused_triton."):
            self.ours.append(name.split(".")[1])
        elif not getattr(func, "is_view", False) and any(
                isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[2] * t.shape[3] > 1
                for t in tree_leaves((args, kwargs, out))):
            self.seen.append(name)
        return out


@pytest.mark.parametrize("kind", ["se", "eca_identity"])
def test_eval_forward_runs_no_aten_op_over_a_feature_map(kind):
    torch.manual_seed(0)
    plain = BLOCKS[kind]().eval()
    randomize_bn(plain)
    fused = FusedResidual.from_residual(copy.deepcopy(plain), backend="triton").eval()
    x = torch.randn(_shape(kind)).contiguous(memory_format=CL)
    with torch.no_grad():
        fused(x)  # folds the weights (ATen ops on the weights) outside the recording
        with _FeatureMapOps() as rec:
            fused(x)
    assert rec.seen == []
    assert rec.ours == ["conv_bias_relu", "conv_bias_relu", "conv_bias_pool",
                        "gate_shortcut_relu"]


# --------------------------------------------------------------------------- training
def _gated_block_ref(x, w1, b1, g1, beta1, w2, b2, g2, beta2, w3, b3, g3, beta3, gate,
                     stride):
    """relu(gate * bn2(conv2(relu(bn1(conv1(x))))) + shortcut), BNs on batch statistics."""
    def bn(c, g, b):
        return F.batch_norm(c, None, None, g, b, True, 0.0, 1e-5)

    y1 = torch.relu(bn(F.conv2d(x, w1, b1, stride, 1), g1, beta1))
    y2 = bn(F.conv2d(y1, w2, b2, 1, 1), g2, beta2)
    sc = x if w3 is None else F.conv2d(x, w3, b3, stride, w3.shape[-1] // 2)
    if g3 is not None:
        sc = bn(sc, g3, beta3)
    return torch.relu(gate.to(y2.dtype) * y2 + sc)


@pytest.mark.parametrize("name", ["identity", "bn/2", "1x1/2", "1x1/2-k12"])
def test_block_train_with_a_sample_gate(name):
    """block_train's `gate` on every join: identity and BN'd projection (elementwise
    pass), D2L projection (the projection GEMM's epilogue; K = 12: the elementwise
    pass): output and every gradient against float64 by the tolerance rule."""
    from test_triton_train import CONFIGS, _functional
    names, vals, _ = _functional(name)
    stride = CONFIGS[name][2]
    vals[0] = torch.randn(3, CONFIGS[name][0], 5, 4).contiguous(memory_format=CL)
    gate = torch.tensor([0.0, 1 / 0.7, 1 / 0.7]).view(3, 1, 1, 1)   # one sample dropped

    def fused(x, w1, b1, g1, beta1, w2, b2, g2, beta2, w3, b3, g3, beta3):
        return OPS.block_train(x, [w1, w2], [b1, b2], [g1, g2], [beta1, beta2], [stride, 1],
                               [1e-5, 1e-5], w3, b3, g3, beta3, 1e-5, gate=gate)[0]

    def ref(*v):
        return _gated_block_ref(*v, gate, stride)

    runs = []
    for fn, dt in ((fused, torch.float32), (ref, torch.float32), (ref, torch.float64)):
        leaves = [None if v is None else v.detach().to(dt).clone().requires_grad_()
                  for v in vals]
        out = fn(*leaves)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                                 dtype=torch.float64).to(dt))
        runs.append((out, leaves))
    (out_f, lf), (out_p, lp), (out_r, lr) = runs
    assert_within("output", out_f, out_p, out_r, factor=2)
    for n, a, b, c in zip(names, lf, lp, lr):
        if a is not None:
            assert_within(f"grad {n}", a.grad, b.grad, c.grad, factor=3)


@pytest.mark.parametrize("kind", ["se", "tv_se_stochastic_depth", "eca_identity", "drop_path"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_train(kind, channels_last):
    """Two seeded training steps against the plain block (the same RNG seed before each
    forward: a drop path draws the same mask): output, every gradient (the gate
    module's own parameters included) and the running statistics. Channel gates run
    train_gated.py's two ops around the gate's f, sample gates block_train's `gate`."""
    check_block(BLOCKS[kind], backend="triton", train=True, channels_last=channels_last,
                shape=_shape(kind), steps=2, reseed=True)


def test_train_float16_and_frozen_bn():
    for kind in ("se", "drop_path"):
        check_block(BLOCKS[kind], backend="triton", dtype=torch.float16, train=True,
                    shape=_shape(kind), steps=1, reseed=True)
    for kind in ("se", "drop_path"):   # frozen BN: se the composite path, drop path fused
        check_block(BLOCKS[kind], backend="triton", train=True, bn_eval=True,
                    shape=_shape(kind), steps=1, reseed=True)


@pytest.mark.parametrize("kind,first_ops", [("drop_path", ["block_train"]),
                                            ("se", ["block_branch", "gate_join_train"])])
def test_train_forward_runs_no_aten_op_over_a_feature_map(kind, first_ops):
    torch.manual_seed(0)
    plain = BLOCKS[kind]()
    randomize_bn(plain)
    fused = FusedResidual.from_residual(plain, backend="triton").train()
    x = torch.randn(_shape(kind)).contiguous(memory_format=CL)
    with _FeatureMapOps() as rec:
        fused(x)
    assert rec.seen == []
    assert rec.ours[:len(first_ops)] == first_ops, rec.ours
    assert set(rec.ours[len(first_ops):]) == {"bn_finalize"}, rec.ours
