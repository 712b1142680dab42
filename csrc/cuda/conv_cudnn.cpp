// CUDA implementations of the eval convolutions: cuDNN's fused conv + bias (+ add) +
// ReLU through ATen (at::cudnn_convolution_relu / at::cudnn_convolution_add_relu,
// present since torch 1.x and unchanged in 2.11-2.14). Host code only, so it is
// compiled by the host compiler, not nvcc.
//
// The fused op is used for float16/bfloat16, and for float32 only when the user
// allows TF32 in cuDNN (torch.backends.cudnn.allow_tf32): cuDNN's runtime-fusion
// engines compute fp32 convolutions in TF32. Elsewhere (float32 without TF32,
// float64, cuDNN disabled, or a fused plan cuDNN rejects) the same result is
// computed with at::convolution + add_ + relu_.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "../common.h"

namespace resnet_fused {
namespace {

using at::Tensor;

bool fused_applies(const Tensor& x) {
  auto& ctx = at::globalContext();
  if (!at::Context::hasCuDNN() || !ctx.userEnabledCuDNN()) return false;
  switch (x.scalar_type()) {
    case at::kHalf:
    case at::kBFloat16:
      return true;
    case at::kFloat:
      return ctx.allowTF32CuDNN();
    default:
      return false;
  }
}

Tensor conv_bias_relu_cuda(const Tensor& x, const Tensor& weight, const Tensor& bias, int64_t stride,
                           int64_t padding) {
  check_conv("conv_bias_relu", "x", x, "weight", weight, stride, padding);
  check_bias("conv_bias_relu", bias, weight, x);
  TORCH_CHECK(x.is_cuda(), "conv_bias_relu: expected CUDA tensors, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = x.is_contiguous() ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  if (fused_applies(x)) {
    try {
      return at::cudnn_convolution_relu(x, weight.contiguous(fmt), bias, {stride, stride},
                                        {padding, padding}, {1, 1}, 1)
          .contiguous(fmt);
    } catch (const c10::Error& e) {
      TORCH_WARN_ONCE("resnet_fused: cuDNN's fused conv+bias+ReLU failed (", e.what_without_backtrace(),
                      "); using convolution + ReLU instead");
    }
  }
  return conv_add_relu_aten(x, weight, bias, stride, padding, std::nullopt);
}

Tensor conv_bias_shortcut_relu_cuda(const Tensor& y, const Tensor& weight, const Tensor& bias,
                                    const Tensor& x, const std::optional<Tensor>& shortcut_weight,
                                    int64_t padding, int64_t shortcut_stride, int64_t shortcut_padding) {
  check_conv_shortcut(y, weight, bias, x, shortcut_weight, padding, shortcut_stride, shortcut_padding);
  TORCH_CHECK(y.is_cuda(), "conv_bias_shortcut_relu: expected CUDA tensors, got ", y.device());
  const c10::cuda::CUDAGuard guard(y.device());
  const auto fmt = y.is_contiguous() ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  // The projection is computed first and fed to cuDNN as the added tensor z.
  const Tensor sc = shortcut_of(x, shortcut_weight, shortcut_stride, shortcut_padding).contiguous(fmt);
  if (fused_applies(y)) {
    try {
      return at::cudnn_convolution_add_relu(y, weight.contiguous(fmt), sc, 1.0, bias, {1, 1},
                                            {padding, padding}, {1, 1}, 1)
          .contiguous(fmt);
    } catch (const c10::Error& e) {
      TORCH_WARN_ONCE("resnet_fused: cuDNN's fused conv+bias+add+ReLU failed (",
                      e.what_without_backtrace(), "); using convolution + add + ReLU instead");
    }
  }
  return conv_add_relu_aten(y, weight, bias, 1, padding, sc);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("conv_bias_relu", &conv_bias_relu_cuda);
  m.impl("conv_bias_shortcut_relu", &conv_bias_shortcut_relu_cuda);
}

}  // namespace resnet_fused
