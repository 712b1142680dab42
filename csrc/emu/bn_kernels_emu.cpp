// The CUDA BatchNorm kernels of csrc/cuda/bn_kernels.cu compiled as host C++ through
// the emulation in cuda_emu.h, registered as the ops of a separate namespace,
// torch.ops.resnet_fused_emu, on CPU tensors. Test-only: tests/test_native_emulation.py
// builds this file with torch.utils.cpp_extension.load and compares each op with the
// CPU kernels of torch.ops.resnet_fused on shapes that take every branch (tails, odd
// channel counts, misaligned views, multi-block grids).
#define RESNET_FUSED_EMULATE 1
#include "../cuda/bn_kernels.cu"

TORCH_LIBRARY(resnet_fused_emu, m) {
  m.def("channel_stats(Tensor x) -> (Tensor mean, Tensor var)");
  m.def("bn_finalize(Tensor mean, Tensor var, Tensor weight, Tensor bias, "
        "Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!) num_batches_tracked, "
        "float momentum, float eps, int count) -> (Tensor invstd, Tensor scale, Tensor shift)");
  m.def("bn_act(Tensor c, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, "
        "Tensor? residual) -> (Tensor out, Tensor mask)");
  m.def("bn_act_backward(Tensor grad_out, Tensor mask, Tensor c, Tensor mean, Tensor invstd, "
        "Tensor weight, bool residual_grad) -> (Tensor grad_c, Tensor grad_weight, "
        "Tensor grad_bias, Tensor grad_residual)");
}

TORCH_LIBRARY_IMPL(resnet_fused_emu, CPU, m) {
  m.impl("channel_stats", &resnet_fused::channel_stats_cuda);
  m.impl("bn_finalize", &resnet_fused::bn_finalize_cuda);
  m.impl("bn_act", &resnet_fused::bn_act_cuda);
  m.impl("bn_act_backward", &resnet_fused::bn_act_backward_cuda);
}
