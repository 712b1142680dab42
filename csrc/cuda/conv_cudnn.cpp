// CUDA implementations of the eval convolutions: relu(conv(x, w) + b [+ z]).
// Host code only, so it is compiled by the host compiler, not nvcc.
//
// Default: ATen's convolution (cuDNN, honouring every TF32 switch itself), then add_
// and relu_ (conv_add_relu_aten). ReLU keeps NaN there, as the plain PyTorch block does.
//
// Opt-in (RESNET_FUSED_CUDNN_FUSED_RELU=1): cuDNN's fused conv + bias (+ add) + ReLU
// through ATen (at::cudnn_convolution_add_relu, in 2.11-2.14 unchanged). It saves one
// or two elementwise passes, but cuDNN's fused ReLU maps NaN to 0 where PyTorch keeps
// NaN, which is why it is not the default (README.md, Numerics).
// When opted in:
//   - at::cudnn_convolution_relu is never called: it hands cuDNN its uninitialised
//     output as the added tensor z with weight 0, and 0 * NaN from reused memory is
//     NaN (which the fused ReLU then turns into a silent 0). conv_bias_relu passes a
//     zero-filled z instead: the same memory traffic as relu_ after an unfused conv;
//   - fp32 is fused only when the conv operator's precision is TF32 (cuDNN's
//     runtime-fusion engines compute fp32 in TF32), asked for as ATen's own
//     convolutions do: allowTF32CuDNN(Float32Op::CONV) (torch >= 2.9 throws on the
//     operator-less form once torch.backends.cudnn.conv.fp32_precision is set);
//   - fusion is tried only where cuDNN has fused engines (channels_last, channel
//     counts a multiple of 8), and a shape cuDNN rejects anyway (cudnn-frontend
//     throws std::runtime_error, ATen c10::Error; both caught) is remembered, so the
//     graph is not rebuilt and retried on every call.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <set>
#include <tuple>
#include <vector>

#include "../common.h"

namespace resnet_fused {
namespace {

using at::Tensor;

// Read on every call (a getenv, well under a microsecond) so that tests can switch it.
bool fused_relu_opted_in() {
  const char* s = std::getenv("RESNET_FUSED_CUDNN_FUSED_RELU");
  return s != nullptr && std::strcmp(s, "1") == 0;
}

bool fused_applies(const Tensor& x, const Tensor& w, int64_t groups) {
  if (!fused_relu_opted_in()) return false;
  // Grouped convolutions (ResNeXt) take ATen's path: cuDNN's runtime fusion engines were
  // only measured on dense ones, and a failed graph build costs a throw per new shape.
  if (groups != 1) return false;
  auto& ctx = at::globalContext();
  if (!at::Context::hasCuDNN() || !ctx.userEnabledCuDNN()) return false;
  // cuDNN's runtime fusion engines take NHWC with 16-byte aligned channel rows; for NCHW
  // or other channel counts it builds a graph, finds no engine and throws, every call.
  if (x.is_contiguous() || w.size(0) % 8 != 0 || w.size(1) % 8 != 0) return false;
  switch (x.scalar_type()) {
    case at::kHalf:
    case at::kBFloat16:
      return true;
    case at::kFloat:
      return ctx.allowTF32CuDNN(at::Float32Op::CONV);
    default:
      return false;
  }
}

// Shapes cuDNN failed to fuse: (op, dtype, device, x sizes, w sizes, stride, padding, dilation).
using FailKey =
    std::tuple<int, int, int, std::vector<int64_t>, std::vector<int64_t>, int64_t, int64_t, int64_t>;

struct FailedShapes {
  std::mutex mu;
  std::set<FailKey> keys;
  bool contains(const FailKey& k) {
    std::lock_guard<std::mutex> g(mu);
    return keys.count(k) != 0;
  }
  void add(const FailKey& k) {
    std::lock_guard<std::mutex> g(mu);
    keys.insert(k);
  }
};

FailedShapes& failed_shapes() {
  static FailedShapes f;
  return f;
}

FailKey fail_key(int op, const Tensor& x, const Tensor& w, int64_t stride, int64_t padding,
                 int64_t dilation) {
  return {op, static_cast<int>(x.scalar_type()), static_cast<int>(x.device().index()), x.sizes().vec(),
          w.sizes().vec(), stride, padding, dilation};
}

// relu(conv(x, w) + b + alpha * z) by cuDNN's fused op, or an undefined tensor when
// cuDNN throws (remembered under key, warned once).
Tensor try_fused(const FailKey& key, const char* what, const Tensor& x, const Tensor& w, const Tensor& z,
                 double alpha, const Tensor& b, int64_t stride, int64_t padding, int64_t dilation,
                 at::MemoryFormat fmt) {
  if (failed_shapes().contains(key)) return Tensor();
  try {
    return at::cudnn_convolution_add_relu(x, w.contiguous(fmt), z, alpha, b, {stride, stride},
                                          {padding, padding}, {dilation, dilation}, 1)
        .contiguous(fmt);
  } catch (const std::exception& e) {  // c10::Error and cudnn-frontend's std::runtime_error
    failed_shapes().add(key);
    const c10::Error* ce = dynamic_cast<const c10::Error*>(&e);
    TORCH_WARN("resnet_fused: cuDNN's fused ", what, " failed for x ", shape_str(x), " and weight ",
               shape_str(w), " (", ce ? ce->what_without_backtrace() : e.what(),
               "); using the unfused ops for this shape from now on");
  }
  return Tensor();
}

Tensor conv_bias_relu_cuda(const Tensor& x, const Tensor& weight, const Tensor& bias, int64_t stride,
                           int64_t padding, int64_t dilation, int64_t groups) {
  check_conv("conv_bias_relu", "x", x, "weight", weight, stride, padding, dilation, groups);
  check_bias("conv_bias_relu", bias, weight, x);
  TORCH_CHECK(x.is_cuda(), "conv_bias_relu: expected CUDA tensors, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = x.is_contiguous() ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  if (fused_applies(x, weight, groups)) {
    // A zero-filled z (not at::cudnn_convolution_relu's uninitialised one, see above).
    const Tensor z = at::zeros(conv_out_shape(x, weight, stride, padding, dilation),
                               x.options().memory_format(fmt));
    Tensor out = try_fused(fail_key(0, x, weight, stride, padding, dilation), "conv+bias+ReLU", x, weight,
                           z, 0.0, bias, stride, padding, dilation, fmt);
    if (out.defined()) return out;
  }
  return conv_add_relu_aten(x, weight, bias, stride, padding, dilation, groups, std::nullopt);
}

Tensor conv_bias_shortcut_relu_cuda(const Tensor& y, const Tensor& weight, const Tensor& bias,
                                    const Tensor& x, const std::optional<Tensor>& shortcut_weight,
                                    int64_t padding, int64_t shortcut_stride, int64_t shortcut_padding,
                                    int64_t dilation, int64_t groups) {
  check_conv_shortcut(y, weight, bias, x, shortcut_weight, padding, shortcut_stride, shortcut_padding,
                      dilation, groups);
  TORCH_CHECK(y.is_cuda(), "conv_bias_shortcut_relu: expected CUDA tensors, got ", y.device());
  const c10::cuda::CUDAGuard guard(y.device());
  const auto fmt = y.is_contiguous() ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  // The projection is computed first and fed to cuDNN as the added tensor z.
  const Tensor sc = shortcut_of(x, shortcut_weight, shortcut_stride, shortcut_padding).contiguous(fmt);
  if (fused_applies(y, weight, groups)) {
    Tensor out = try_fused(fail_key(1, y, weight, 1, padding, dilation), "conv+bias+add+ReLU", y, weight,
                           sc, 1.0, bias, 1, padding, dilation, fmt);
    if (out.defined()) return out;
  }
  return conv_add_relu_aten(y, weight, bias, 1, padding, dilation, groups, sc);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("conv_bias_relu", &conv_bias_relu_cuda);
  m.impl("conv_bias_shortcut_relu", &conv_bias_shortcut_relu_cuda);
}

}  // namespace resnet_fused
