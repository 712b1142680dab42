"""The op schemas and namespaces of every backend: the single source of truth.

Each backend registers the ops under its own namespace (NAMESPACES):

    native  resnet_fused        the C++/CUDA extension (csrc/ops.cpp; CPU and CUDA kernels)
    torch   resnet_fused_torch  the portable composite of ATen ops (backends/torch_ops.py)
    triton  resnet_fused_triton Triton kernels (backends/triton/)

Every backend implements the ops of COMMON_OPS; the triton backend also the fused
training block, BLOCK_OPS (block_train and its backward); the torch and native backends
also the gated join, GATE_OPS; the triton backend the gated ops of TRITON_GATE_OPS and
the pooled join of POOL_OPS. Adding an op = its schema
here, its fake (and autograd, if differentiable) in resnet_fused/ops.py, and its
kernels in each backend, registered with ops.define_op (Python) or TORCH_LIBRARY (C++).

The C++ schemas (csrc/schemas.h, included by csrc/ops.cpp and the CUDA emulation
csrc/emu/) are character-for-character the native backend's strings, COMMON_OPS then
GATE_OPS (tests/test_op_contract.py checks it).

Conventions shared by every op:
- Activations (c, x, y, residual, grad_out, out) are 4-D, NCHW-contiguous or
  channels_last-contiguous. Outputs keep the memory format of the first
  activation argument. Callers make the other activations contiguous in that
  same format before the call.
- Per-channel statistics (mean, var, invstd, scale, shift) are float32, or
  float64 when the activation is float64 (the torch backend's gradcheck path).
- `mask` is the packed ReLU mask: a uint8 tensor of ceil(numel / 8) bytes; bit
  (i % 8) of byte (i // 8) is 1 when the output element at *physical* offset i
  (offset in memory, so NHWC order for channels_last) is > 0.
- BN parameters and running buffers may be any floating dtype (a `.half()`
  module has half running statistics); kernels read and write them in their
  own dtype and compute in float32.
"""

SCHEMAS = {
    # Per-channel batch mean and biased variance over N, H, W (float32 accumulation,
    # numerically stable: Welford / shifted sums).
    "channel_stats": "channel_stats(Tensor x) -> (Tensor mean, Tensor var)",
    # invstd = rsqrt(var + eps); scale = weight * invstd; shift = bias - mean * scale.
    # Updates the running statistics exactly as nn.BatchNorm2d in training does:
    #   num_batches_tracked += 1
    #   f = momentum if momentum >= 0 else 1 / num_batches_tracked   (momentum=None is passed as -1)
    #   running_mean = (1 - f) * running_mean + f * mean
    #   running_var  = (1 - f) * running_var  + f * var * count / (count - 1)
    # count = N * H * W of the batch (> 1). No host synchronisation: f is read on the device.
    "bn_finalize": (
        "bn_finalize(Tensor mean, Tensor var, Tensor weight, Tensor bias, "
        "Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!) num_batches_tracked, "
        "float momentum, float eps, int count) -> (Tensor invstd, Tensor scale, Tensor shift)"
    ),
    # out = relu((c - mean) * invstd * weight + bias [+ residual]), in c's dtype and
    # memory format, plus the packed mask of out > 0.
    # Differentiable (registered autograd) in c, weight, bias and residual, on the
    # contract that mean/invstd ARE the batch statistics of c (training BatchNorm):
    # the gradient of c includes the path through mean and invstd.
    "bn_act": (
        "bn_act(Tensor c, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, "
        "Tensor? residual) -> (Tensor out, Tensor mask)"
    ),
    # Backward of bn_act (training BatchNorm + optional residual + ReLU), two passes:
    #   g = grad_out * mask;  grad_bias = sum(g);  grad_weight = sum(g * xhat)
    #   grad_c = weight * invstd * (g - grad_bias / M - xhat * grad_weight / M),  M = N*H*W
    #   grad_residual = g  (c's dtype) when residual_grad, else an empty tensor of shape [0]
    # grad_weight / grad_bias are float32 (float64 for float64 c).
    "bn_act_backward": (
        "bn_act_backward(Tensor grad_out, Tensor mask, Tensor c, Tensor mean, Tensor invstd, "
        "Tensor weight, bool residual_grad) -> (Tensor grad_c, Tensor grad_weight, "
        "Tensor grad_bias, Tensor grad_residual)"
    ),
    # Frozen BatchNorm (running statistics, in training too: torchvision's
    # FrozenBatchNorm2d, or an nn.BatchNorm2d in eval while autograd records) + optional
    # residual + ReLU: bn_act's computation, with mean = running_mean and
    # invstd = rsqrt(running_var + eps), on the contract that they are constants, so
    # its gradient has no path through them (bn_frozen_act_backward).
    "bn_frozen_act": (
        "bn_frozen_act(Tensor c, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, "
        "Tensor? residual) -> (Tensor out, Tensor mask)"
    ),
    # Backward of bn_frozen_act, one pass (two with param_grads):
    #   g = grad_out * mask;  grad_c = weight * invstd * g
    #   grad_residual = g (c's dtype) when residual_grad, else an empty tensor of shape [0]
    #   param_grads: grad_weight = sum(g * xhat), grad_bias = sum(g) (float32, float64 for
    #   float64 c), xhat = (c - mean) * invstd; else both empty tensors of shape [0].
    "bn_frozen_act_backward": (
        "bn_frozen_act_backward(Tensor grad_out, Tensor mask, Tensor c, Tensor mean, "
        "Tensor invstd, Tensor weight, bool residual_grad, bool param_grads) -> "
        "(Tensor grad_c, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)"
    ),
    # Eval stage (every stage of the main path but the last):
    # relu(conv2d(x, weight, stride, padding, dilation, groups) + bias). BN already folded.
    "conv_bias_relu": (
        "conv_bias_relu(Tensor x, Tensor weight, Tensor bias, int stride, int padding, "
        "int dilation=1, int groups=1) -> Tensor"
    ),
    # Eval last stage: relu(conv2d(y, weight, 1, padding, dilation, groups) + bias +
    # shortcut), where shortcut = conv2d(x, shortcut_weight, shortcut_stride,
    # shortcut_padding) (dilation 1, groups 1) when a shortcut weight is given (its
    # folded bias is already inside `bias`), else x.
    "conv_bias_shortcut_relu": (
        "conv_bias_shortcut_relu(Tensor y, Tensor weight, Tensor bias, Tensor x, "
        "Tensor? shortcut_weight, int padding, int shortcut_stride, int shortcut_padding, "
        "int dilation=1, int groups=1) -> Tensor"
    ),

    # Gated branches (README.md, Design, "Gates and pooled shortcuts"): the torch and
    # native backends' ops for the last stage of a block whose branch a gate multiplies,
    # out = relu(gate * bn(c) + residual).
    # pooled[n, k] = mean over H, W of (c - mean) * invstd * weight + bias: the BN'd
    # branch pooled for a channel gate, float32 (float64 for float64 c), shape (N, C).
    # Differentiable (through bn_pool_backward) in c, weight and bias on bn_act's
    # contract (mean/invstd are c's batch statistics).
    "bn_pool": (
        "bn_pool(Tensor c, Tensor mean, Tensor invstd, Tensor weight, Tensor bias) -> Tensor"
    ),
    # Backward of bn_pool: the per-(n, k) gradient spread over H, W (/ H*W) through
    # training BN:  gy = grad_pooled / (H*W) broadcast;  grad_bias = sum(gy);
    # grad_weight = sum(gy * xhat);  grad_c = weight * invstd * (gy - grad_bias / M -
    # xhat * grad_weight / M), M = N*H*W.
    "bn_pool_backward": (
        "bn_pool_backward(Tensor grad_pooled, Tensor c, Tensor mean, Tensor invstd, "
        "Tensor weight) -> (Tensor grad_c, Tensor grad_weight, Tensor grad_bias)"
    ),
    # out = relu(gate * ((c - mean) * invstd * weight + bias) [+ residual]) in c's dtype
    # and memory format, plus the packed mask of out > 0. gate: (N, C, 1, 1) for a
    # channel gate, (N, 1, 1, 1) or (1, 1, 1, 1) for a sample gate, any float dtype.
    # Differentiable (bn_gate_act_backward) in c, weight, bias, gate and residual, on
    # bn_act's contract.
    "bn_gate_act": (
        "bn_gate_act(Tensor c, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, "
        "Tensor gate, Tensor? residual) -> (Tensor out, Tensor mask)"
    ),
    # Backward of bn_gate_act: g = grad_out * mask;  grad_gate = sum of g * y over the
    # dimensions gate broadcasts (y the BN'd c; float32, gate's shape);  then
    # bn_act_backward's formulas on g * gate;  grad_residual = g as in bn_act_backward.
    "bn_gate_act_backward": (
        "bn_gate_act_backward(Tensor grad_out, Tensor mask, Tensor c, Tensor mean, "
        "Tensor invstd, Tensor weight, Tensor bias, Tensor gate, bool residual_grad) -> "
        "(Tensor grad_c, Tensor grad_weight, Tensor grad_bias, Tensor grad_gate, "
        "Tensor grad_residual)"
    ),
    # Eval branch of a gated block: out = conv2d(x, weight, bias, stride, padding,
    # dilation, groups) (no ReLU) in x's dtype and memory format, and pooled = its mean
    # over H, W as written, float32 (float64 for float64 x), shape (N, K).
    "conv_bias_pool": (
        "conv_bias_pool(Tensor x, Tensor weight, Tensor bias, int stride, int padding, "
        "int dilation=1, int groups=1) -> (Tensor out, Tensor pooled)"
    ),
    # Eval join of a gated block: relu(gate * y + shortcut), shortcut = x, or
    # conv2d(x, shortcut_weight, shortcut_stride, shortcut_padding) + shortcut_bias
    # (BN folded; a pooled shortcut's pool already applied to x).
    "gate_shortcut_relu": (
        "gate_shortcut_relu(Tensor y, Tensor gate, Tensor x, Tensor? shortcut_weight, "
        "Tensor? shortcut_bias, int shortcut_stride, int shortcut_padding) -> Tensor"
    ),
    # The triton backend's eval join of a gated block beside ResNet-D's pooled shortcut:
    # relu(gate * y + conv2d(avg_pool2d(x, pool_kernel, pool_stride, 0, ceil_mode,
    # count_include_pad=False), shortcut_weight) + shortcut_bias), shortcut_weight 1x1;
    # the window average is taken as the projection GEMM loads x.
    "gate_pool_shortcut_relu": (
        "gate_pool_shortcut_relu(Tensor y, Tensor gate, Tensor x, Tensor shortcut_weight, "
        "Tensor? shortcut_bias, int pool_kernel, int pool_stride, bool ceil_mode) -> Tensor"
    ),

    # The triton backend's eval last stage with ResNet-D's pooled shortcut (README.md,
    # Design, "Gates and pooled shortcuts"): relu(conv2d(y, weight, 1, padding) + bias +
    # conv2d(avg_pool2d(x, pool_kernel, pool_stride, 0, ceil_mode,
    # count_include_pad=False), shortcut_weight)), shortcut_weight 1x1 (its folded bias
    # inside `bias`); the window average is taken as the projection GEMM loads x.
    "conv_bias_pool_shortcut_relu": (
        "conv_bias_pool_shortcut_relu(Tensor y, Tensor weight, Tensor bias, Tensor x, "
        "Tensor shortcut_weight, int padding, int pool_kernel, int pool_stride, "
        "bool ceil_mode) -> Tensor"
    ),

    # The triton backend's fused training block (backends/triton/train.py): the whole
    # residual block's training forward as one functional op, for any chain of S stages
    # (basic block S = 2, bottleneck S = 3), differentiable through block_train_backward:
    #   c_0 = conv(x, w[0]) + b[0];  c_i = conv(relu(bn_{i-1}(c_{i-1})), w[i]) + b[i]
    #   out = relu(bn_{S-1}(c_{S-1}) + shortcut)
    # Per-stage lists (one entry per stage, in order): w, b (all tensors or all None),
    # g / beta (the BN's weight and bias), stride, eps. Every kernel is 1x1 or 3x3 with
    # 'same' padding (kernel // 2), groups 1, dilation 1.
    # The shortcut: w_sc None for the identity; else conv(x, w_sc) + b_sc with stride
    # prod(stride) and 'same' padding, and g_sc / beta_sc / eps_sc its BN (None: none).
    # group: the process group name of a synchronized block ("" for none).
    # running: None (batch statistics), or a frozen block (every BN normalising with its
    # running statistics: FrozenBatchNorm2d, or BNs in eval while autograd records): one
    # [2, C] float32 tensor per BN (the stages', then the shortcut BN's), its running
    # mean and running variance, which then stand for the batch statistics everywhere
    # (stats returns them); group must be "".
    # sc_pool: 0, or ResNet-D's pooled shortcut: x averaged over sc_pool x sc_pool windows
    # at stride prod(stride), no padding, each window divided by its taps inside the
    # image, before the 1x1 stride-1 w_sc (the pool's output is the block's output size).
    # gate: None, or a sample gate drawn before the call (drop path: (N, 1, 1, 1) or
    # (1, 1, 1, 1), any float dtype; no gradient): out = relu(gate * bn_{S-1}(c_{S-1}) +
    # shortcut).
    # x and the activations returned are channels_last-contiguous.
    # Returns out, and for the backward and the running statistics: c (every stage's
    # conv output before its BN), c_sc (the shortcut BN's input; an empty [0] tensor
    # without a shortcut BN), the packed mask of out, and stats: one [3, C_i] float32
    # tensor per BN (the stages', then the shortcut BN's when there is one): batch mean,
    # biased variance, and the count of values per channel (over the whole group when
    # synchronized) broadcast over the row.
    "block_train": (
        "block_train(Tensor x, Tensor[] w, Tensor?[] b, Tensor[] g, Tensor[] beta, "
        "int[] stride, float[] eps, Tensor? w_sc, Tensor? b_sc, Tensor? g_sc, "
        "Tensor? beta_sc, float eps_sc, str group=\"\", Tensor[]? running=None, "
        "int sc_pool=0, Tensor? gate=None) -> (Tensor out, Tensor[] c, Tensor c_sc, "
        "Tensor mask, Tensor[] stats)"
    ),
    # Gradients of block_train's out with respect to its tensor inputs (d<input name>;
    # a list for a list input), from what it saved; has_b / has_b_sc say which conv
    # biases exist. The gradients of absent parameters are empty [0] tensors.
    # frozen: block_train ran with `running` (the statistics are constants: no
    # gradient through them). gate: block_train's (the last BN's gradient is gate times
    # the masked grad_out; the shortcut's is not gated).
    "block_train_backward": (
        "block_train_backward(Tensor grad_out, Tensor x, Tensor[] c, Tensor c_sc, "
        "Tensor mask, Tensor[] stats, Tensor[] w, Tensor[] g, Tensor[] beta, Tensor? w_sc, "
        "Tensor? g_sc, bool[] has_b, bool has_b_sc, int[] stride, float[] eps, "
        "float eps_sc, str group=\"\", bool frozen=False, int sc_pool=0, Tensor? gate=None) "
        "-> (Tensor dx, Tensor[] dw, Tensor[] db, Tensor[] dg, Tensor[] dbeta, Tensor dw_sc, "
        "Tensor db_sc, Tensor dg_sc, Tensor dbeta_sc)"
    ),

    # A channel-gated block's training on the triton backend (backends/triton/
    # train_gated.py): block_train split around the gate's f, which autograd runs.
    # block_branch: block_train's stages without the join; c_last (the last conv's
    # output) and pooled = bn_{S-1}(mean over H, W of c_last), float32 (N, C), are
    # differentiable; c: the other stages' conv outputs; stats: every stage's [3, C].
    "block_branch": (
        "block_branch(Tensor x, Tensor[] w, Tensor?[] b, Tensor[] g, Tensor[] beta, "
        "int[] stride, float[] eps) -> (Tensor c_last, Tensor pooled, Tensor[] c, "
        "Tensor[] stats)"
    ),
    "block_branch_backward": (
        "block_branch_backward(Tensor grad_c_last, Tensor? grad_pooled, Tensor x, "
        "Tensor[] c, Tensor c_last, Tensor[] stats, Tensor[] w, Tensor[] g, Tensor[] beta, "
        "bool[] has_b, int[] stride, float[] eps) -> (Tensor dx, Tensor[] dw, Tensor[] db, "
        "Tensor[] dg, Tensor[] dbeta)"
    ),
    # out = relu(gate * bn(c) + shortcut) with bn on c's batch statistics `stats`
    # (block_branch's [3, C] row; differentiable in c on bn_act's contract), the
    # shortcut as block_train's (w_sc None: x; sc_pool: its pooled shortcut, stride_sc
    # the pool's stride). c_sc / stats_sc: the shortcut BN's input and statistics
    # (empty [0] without one).
    "gate_join_train": (
        "gate_join_train(Tensor c, Tensor stats, Tensor weight, Tensor bias, float eps, "
        "Tensor gate, Tensor x, Tensor? w_sc, Tensor? b_sc, Tensor? g_sc, Tensor? beta_sc, "
        "float eps_sc, int stride_sc, int sc_pool=0) -> (Tensor out, Tensor mask, "
        "Tensor c_sc, Tensor stats_sc)"
    ),
    "gate_join_train_backward": (
        "gate_join_train_backward(Tensor grad_out, Tensor mask, Tensor c, Tensor stats, "
        "Tensor weight, Tensor bias, float eps, Tensor gate, Tensor x, Tensor? w_sc, "
        "Tensor? g_sc, Tensor c_sc, Tensor stats_sc, bool has_b_sc, int stride_sc, "
        "float eps_sc, int sc_pool=0) -> (Tensor grad_c, Tensor grad_weight, Tensor grad_bias, "
        "Tensor grad_gate, Tensor grad_x, Tensor grad_w_sc, Tensor grad_b_sc, "
        "Tensor grad_g_sc, Tensor grad_beta_sc)"
    ),
}

BLOCK_OPS = ("block_train", "block_train_backward")
# The torch and native backends' gated join (README.md, Design, "Gates and pooled
# shortcuts").
GATE_OPS = ("bn_pool", "bn_pool_backward", "bn_gate_act", "bn_gate_act_backward",
            "gate_shortcut_relu")
# The branch conv + bias with its pool in one op: the torch and triton backends' (the
# native backend's eval convolutions are ATen's, and so is its branch pool).
EVAL_POOL_OPS = ("conv_bias_pool",)
# The triton backend's: the eval of a gated last stage, and a channel-gated block's
# training (a sample gate is block_train's `gate`).
TRITON_GATE_OPS = ("conv_bias_pool", "gate_shortcut_relu", "gate_pool_shortcut_relu",
                   "block_branch", "block_branch_backward", "gate_join_train",
                   "gate_join_train_backward")
# The triton backend's pooled-shortcut join (the others run the user's AvgPool2d).
POOL_OPS = ("conv_bias_pool_shortcut_relu",)
COMMON_OPS = tuple(name for name in SCHEMAS
                   if name not in BLOCK_OPS + GATE_OPS + TRITON_GATE_OPS + POOL_OPS)

# backend name -> the namespace its ops are registered under.
NAMESPACES = {
    "native": "resnet_fused",
    "torch": "resnet_fused_torch",
    "triton": "resnet_fused_triton",
}

# The ops each backend's namespace holds.
BACKEND_OPS = {"native": COMMON_OPS + GATE_OPS, "torch": COMMON_OPS + GATE_OPS + EVAL_POOL_OPS,
               "triton": COMMON_OPS + BLOCK_OPS + TRITON_GATE_OPS + POOL_OPS}
