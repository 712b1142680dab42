// The op schemas of resnet_fused/schemas.py (the native backend's, BACKEND_OPS["native"]:
// COMMON_OPS then GATE_OPS), character for character:
// the one C++ copy, included by ops.cpp (TORCH_LIBRARY resnet_fused) and by the CUDA
// emulation emu/bn_kernels_emu.cpp (TORCH_LIBRARY resnet_fused_emu).
// tests/test_op_contract.py compares these strings with schemas.py; the registered
// ops of resnet_fused are compared there too.
#pragma once

#include <torch/library.h>

namespace resnet_fused {

// The BatchNorm ops, training and frozen (CPU kernels in ops.cpp, CUDA kernels in cuda/bn_kernels.cu).
inline void define_bn_schemas(torch::Library& m) {
  m.def("channel_stats(Tensor x) -> (Tensor mean, Tensor var)");
  m.def("bn_finalize(Tensor mean, Tensor var, Tensor weight, Tensor bias, "
        "Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!) num_batches_tracked, "
        "float momentum, float eps, int count) -> (Tensor invstd, Tensor scale, Tensor shift)");
  m.def("bn_act(Tensor c, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, "
        "Tensor? residual) -> (Tensor out, Tensor mask)");
  m.def("bn_act_backward(Tensor grad_out, Tensor mask, Tensor c, Tensor mean, Tensor invstd, "
        "Tensor weight, bool residual_grad) -> (Tensor grad_c, Tensor grad_weight, "
        "Tensor grad_bias, Tensor grad_residual)");
  m.def("bn_frozen_act(Tensor c, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, "
        "Tensor? residual) -> (Tensor out, Tensor mask)");
  m.def("bn_frozen_act_backward(Tensor grad_out, Tensor mask, Tensor c, Tensor mean, "
        "Tensor invstd, Tensor weight, bool residual_grad, bool param_grads) -> "
        "(Tensor grad_c, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");
}

// The eval ops (CPU kernels in ops.cpp, cuDNN in cuda/conv_cudnn.cpp).
inline void define_conv_schemas(torch::Library& m) {
  m.def("conv_bias_relu(Tensor x, Tensor weight, Tensor bias, int stride, int padding, "
        "int dilation=1, int groups=1) -> Tensor");
  m.def("conv_bias_shortcut_relu(Tensor y, Tensor weight, Tensor bias, Tensor x, "
        "Tensor? shortcut_weight, int padding, int shortcut_stride, int shortcut_padding, "
        "int dilation=1, int groups=1) -> Tensor");
}

// The gated join and the pooled branch (README.md, Design, "Gates and pooled shortcuts"):
// CPU kernels in gate_ops.cpp, CUDA kernels in cuda/gate_kernels.cu.
inline void define_gate_schemas(torch::Library& m) {
  m.def("bn_pool(Tensor c, Tensor mean, Tensor invstd, Tensor weight, Tensor bias) -> "
        "Tensor");
  m.def("bn_pool_backward(Tensor grad_pooled, Tensor c, Tensor mean, Tensor invstd, "
        "Tensor weight) -> (Tensor grad_c, Tensor grad_weight, Tensor grad_bias)");
  m.def("bn_gate_act(Tensor c, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, "
        "Tensor gate, Tensor? residual) -> (Tensor out, Tensor mask)");
  m.def("bn_gate_act_backward(Tensor grad_out, Tensor mask, Tensor c, Tensor mean, Tensor "
        "invstd, Tensor weight, Tensor bias, Tensor gate, bool residual_grad) -> (Tensor "
        "grad_c, Tensor grad_weight, Tensor grad_bias, Tensor grad_gate, Tensor "
        "grad_residual)");
  m.def("gate_shortcut_relu(Tensor y, Tensor gate, Tensor x, Tensor? shortcut_weight, "
        "Tensor? shortcut_bias, int shortcut_stride, int shortcut_padding) -> Tensor");
}

}  // namespace resnet_fused
