// The CUDA kernels of csrc/cuda/bn_kernels.cu and csrc/cuda/gate_kernels.cu compiled as
// host C++ through the emulation in cuda_emu.h, registered as the ops of a separate namespace,
// torch.ops.resnet_fused_emu, on CPU tensors. Test-only: tests/test_native_emulation.py
// builds this file with torch.utils.cpp_extension.load and compares each op with the
// CPU kernels of torch.ops.resnet_fused on shapes that take every branch (tails, odd
// channel counts, misaligned views, multi-block grids).
#define RESNET_FUSED_EMULATE 1
#include "../cuda/bn_kernels.cu"
#include "../cuda/gate_kernels.cu"
#include "../schemas.h"

namespace resnet_fused {
namespace {

// Test-only probe of the emulation itself: one thread copies 8 elements with the
// kernels' own 16-byte vector load and store (ldg8/stg8), from and to any element
// offset, so a test can check that a misaligned vector access fails as on a GPU.
template <typename T>
__global__ void vec8_copy_kernel(const T* src, T* dst) {
  stg8(dst, ldg8(src));
}

void vec8_copy(const Tensor& src, int64_t src_offset, Tensor& dst, int64_t dst_offset) {
  TORCH_CHECK(src.dim() == 1 && dst.dim() == 1 && src.is_contiguous() && dst.is_contiguous() &&
                  src.scalar_type() == dst.scalar_type(),
              "vec8_copy: src and dst must be contiguous 1-D tensors of one dtype");
  TORCH_CHECK(src_offset >= 0 && src_offset + 8 <= src.numel() && dst_offset >= 0 &&
                  dst_offset + 8 <= dst.numel(),
              "vec8_copy: offsets out of range");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "vec8_copy", [&] {
    auto kernel = vec8_copy_kernel<scalar_t>;
    RF_LAUNCH(kernel, dim3(1), dim3(1), 0, src.const_data_ptr<scalar_t>() + src_offset,
              dst.data_ptr<scalar_t>() + dst_offset);
  });
}

}  // namespace
}  // namespace resnet_fused

TORCH_LIBRARY(resnet_fused_emu, m) {
  resnet_fused::define_bn_schemas(m);  // the same schemas as resnet_fused's BN ops
  resnet_fused::define_gate_schemas(m);  // and its gate ops
  m.def("vec8_copy(Tensor src, int src_offset, Tensor(a!) dst, int dst_offset) -> ()");
}

TORCH_LIBRARY_IMPL(resnet_fused_emu, CPU, m) {
  m.impl("channel_stats", &resnet_fused::channel_stats_cuda);
  m.impl("bn_finalize", &resnet_fused::bn_finalize_cuda);
  m.impl("bn_act", &resnet_fused::bn_act_cuda);
  m.impl("bn_act_backward", &resnet_fused::bn_act_backward_cuda);
  m.impl("bn_frozen_act", &resnet_fused::bn_frozen_act_cuda);
  m.impl("bn_frozen_act_backward", &resnet_fused::bn_frozen_act_backward_cuda);
  m.impl("bn_pool", &resnet_fused::bn_pool_cuda);
  m.impl("bn_pool_backward", &resnet_fused::bn_pool_backward_cuda);
  m.impl("bn_gate_act", &resnet_fused::bn_gate_act_cuda);
  m.impl("bn_gate_act_backward", &resnet_fused::bn_gate_act_backward_cuda);
  m.impl("gate_shortcut_relu", &resnet_fused::gate_shortcut_relu_cuda);
  m.impl("vec8_copy", &resnet_fused::vec8_copy);
}
