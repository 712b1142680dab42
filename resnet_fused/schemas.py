"""The op schemas every backend implements: the single source of truth.

Each backend registers the same ops under its own namespace:

    resnet_fused        the C++/CUDA extension (csrc/ops.cpp TORCH_LIBRARY; CPU and CUDA kernels)
    resnet_fused_torch  the portable composite of ATen ops (resnet_fused/backends/torch_ops.py)
    resnet_fused_triton Triton kernels (resnet_fused/backends/triton/)

The C++ schemas must be character-for-character these strings (a test checks it).

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
    # Eval kernel K1: relu(conv2d(x, weight, stride, padding) + bias). BN already folded.
    "conv_bias_relu": (
        "conv_bias_relu(Tensor x, Tensor weight, Tensor bias, int stride, int padding) -> Tensor"
    ),
    # Eval kernel K2: relu(conv2d(y, weight, 1, padding) + bias + shortcut), where
    # shortcut = conv2d(x, shortcut_weight, shortcut_stride, shortcut_padding) when a
    # shortcut weight is given (its folded bias is already inside `bias`), else x.
    "conv_bias_shortcut_relu": (
        "conv_bias_shortcut_relu(Tensor y, Tensor weight, Tensor bias, Tensor x, "
        "Tensor? shortcut_weight, int padding, int shortcut_stride, int shortcut_padding) -> Tensor"
    ),
}

# Ops whose schema mutates arguments (declared with (a!) above).
MUTATING = {"bn_finalize": ("running_mean", "running_var", "num_batches_tracked")}
