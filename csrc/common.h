// Shared by the CPU (ops.cpp) and CUDA (cuda/*.cu, cuda/*.cpp) translation units:
// input validation with messages a user can act on, and the physical-layout helpers
// the kernels use. Kept header-only and light so every TU compiles quickly.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace resnet_fused {

// Where activation element i (physical offset in memory) finds its channel:
//   NCHW: ch = (i / HW) % C        NHWC (channels_last): ch = i % C
// `inner` is the run length of one channel in memory (HW for NCHW, 1 for NHWC).
struct Layout {
  bool nhwc;
  int64_t N, C, H, W;
  int64_t HW() const { return H * W; }
  int64_t numel() const { return N * C * H * W; }
  int64_t inner() const { return nhwc ? 1 : H * W; }
};

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (d) s += ", ";
    s += std::to_string(t.size(d));
  }
  return s + "]";
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// An activation: 4-D, float64/32/16/bf16, NCHW- or channels_last-contiguous.
// When both layouts hold (C == 1 or H == W == 1) they are the same order in
// memory, so NCHW indexing is used.
inline Layout check_activation(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be a 4-D (N, C, H, W) tensor, got ",
              t.dim(), "-D with shape ", shape_str(t));
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name,
              " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a strided (dense) tensor");
  Layout l;
  l.N = t.size(0); l.C = t.size(1); l.H = t.size(2); l.W = t.size(3);
  if (t.is_contiguous()) {
    l.nhwc = false;
  } else if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    l.nhwc = true;
  } else {
    TORCH_CHECK(false, op, ": ", name,
                " must be contiguous in NCHW or channels_last memory format, got strides ",
                t.strides(), " for shape ", shape_str(t), " (call .contiguous() first)");
  }
  return l;
}

inline at::MemoryFormat format_of(const Layout& l) {
  return l.nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// A second activation that must match `ref` (shape, dtype, device, memory format).
inline void check_like(const char* op, const char* name, const at::Tensor& t,
                       const char* ref_name, const at::Tensor& ref, const Layout& l) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " must have the same shape as ",
              ref_name, ", got ", shape_str(t), " and ", shape_str(ref));
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name,
              " must have the same dtype as ", ref_name, ", got ", t.scalar_type(), " and ",
              ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the same device as ",
              ref_name, ", got ", t.device(), " and ", ref.device());
  TORCH_CHECK(t.is_contiguous(format_of(l)), op, ": ", name,
              " must be contiguous in the same memory format as ", ref_name, " (",
              l.nhwc ? "channels_last" : "NCHW", "), got strides ", t.strides());
}

// A per-channel vector of C elements on ref's device. `stat` requires the
// statistics dtype (float32, or float64 for float64 activations).
inline void check_channel_vec(const char* op, const char* name, const at::Tensor& t, int64_t C,
                              const at::Tensor& ref, std::optional<at::ScalarType> stat) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, op, ": ", name,
              " must be a 1-D tensor with one value per channel (", C, "), got shape ",
              shape_str(t));
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the same device as ",
              "the activation (", ref.device(), "), got ", t.device());
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name,
              " must be a floating tensor, got ", t.scalar_type());
  if (stat) {
    TORCH_CHECK(t.scalar_type() == *stat, op, ": ", name, " must be ", *stat,
                " (the statistics dtype for ", ref.scalar_type(), " activations), got ",
                t.scalar_type());
  }
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// Statistics dtype for an activation dtype: float64 stays float64, else float32.
inline at::ScalarType stat_dtype(at::ScalarType act) {
  return act == at::kDouble ? at::kDouble : at::kFloat;
}

inline int64_t mask_bytes(int64_t numel) { return (numel + 7) / 8; }

inline void check_mask(const char* op, const at::Tensor& mask, const at::Tensor& ref) {
  TORCH_CHECK(mask.defined(), op, ": mask is undefined");
  TORCH_CHECK(mask.scalar_type() == at::kByte, op, ": mask must be uint8 (the packed ReLU mask), got ",
              mask.scalar_type());
  TORCH_CHECK(mask.device() == ref.device(), op, ": mask must be on the same device as c, got ",
              mask.device(), " and ", ref.device());
  TORCH_CHECK(mask.is_contiguous() && mask.numel() == mask_bytes(ref.numel()), op,
              ": mask must be a contiguous uint8 tensor of ceil(numel / 8) = ",
              mask_bytes(ref.numel()), " bytes for c of shape ", shape_str(ref), ", got ",
              mask.numel(), " elements");
}

// bn_finalize's arguments (shared by the CPU and CUDA entries).
inline void check_finalize(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& weight,
                           const at::Tensor& bias, const at::Tensor& rm, const at::Tensor& rv,
                           const at::Tensor& nbt, double eps, int64_t count) {
  const char* op = "bn_finalize";
  TORCH_CHECK(mean.defined() && mean.dim() == 1, op, ": mean must be a 1-D per-channel tensor, got shape ",
              mean.defined() ? shape_str(mean) : std::string("undefined"));
  TORCH_CHECK(mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble, op,
              ": mean must be float32 (or float64), got ", mean.scalar_type());
  const int64_t C = mean.size(0);
  check_channel_vec(op, "var", var, C, mean, mean.scalar_type());
  check_channel_vec(op, "weight", weight, C, mean, std::nullopt);
  check_channel_vec(op, "bias", bias, C, mean, std::nullopt);
  check_channel_vec(op, "running_mean", rm, C, mean, std::nullopt);
  check_channel_vec(op, "running_var", rv, C, mean, std::nullopt);
  TORCH_CHECK(rv.scalar_type() == rm.scalar_type(), op,
              ": running_mean and running_var must have the same dtype, got ", rm.scalar_type(),
              " and ", rv.scalar_type());
  TORCH_CHECK(nbt.defined() && nbt.numel() == 1 && nbt.scalar_type() == at::kLong, op,
              ": num_batches_tracked must be a one-element int64 tensor, got ",
              nbt.defined() ? shape_str(nbt) : std::string("undefined"), " ",
              nbt.defined() ? c10::toString(nbt.scalar_type()) : "");
  TORCH_CHECK(nbt.device() == mean.device(), op,
              ": num_batches_tracked must be on the same device as mean, got ", nbt.device(), " and ",
              mean.device());
  TORCH_CHECK(count > 1, op, ": count (N*H*W) must be > 1 to normalise with batch statistics, got ",
              count, " (BatchNorm needs more than 1 value per channel when training)");
  TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", eps);
}

// bn_act / bn_act_backward's per-channel statistics arguments.
inline void check_stats_args(const char* op, const at::Tensor& c, const Layout& l,
                             const at::Tensor& mean, const at::Tensor& invstd,
                             const at::Tensor& weight) {
  const auto sdt = stat_dtype(c.scalar_type());
  check_channel_vec(op, "mean", mean, l.C, c, sdt);
  check_channel_vec(op, "invstd", invstd, l.C, c, sdt);
  check_channel_vec(op, "weight", weight, l.C, c, std::nullopt);
}

// ---- eval convolutions (shared by the CPU and CUDA implementations) ----

inline void check_conv(const char* op, const char* xname, const at::Tensor& x, const char* wname,
                       const at::Tensor& w, int64_t stride, int64_t padding, int64_t dilation = 1,
                       int64_t groups = 1) {
  check_activation(op, xname, x);
  TORCH_CHECK(w.defined() && w.dim() == 4, op, ": ", wname,
              " must be a 4-D (C_out, C_in / groups, kH, kW) tensor, got shape ",
              w.defined() ? shape_str(w) : std::string("undefined"));
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  TORCH_CHECK(dilation >= 1, op, ": dilation must be >= 1, got ", dilation);
  TORCH_CHECK(w.size(1) * groups == x.size(1) && w.size(0) % groups == 0, op, ": ", wname,
              " expects ", w.size(1) * groups, " input channels (", w.size(1), " per group, ",
              groups, " groups) and a multiple of ", groups, " output channels, but ", xname,
              " has ", x.size(1), " (", xname, " shape ", shape_str(x), ", ", wname, " shape ",
              shape_str(w), ")");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), op, ": ", wname,
              " must have the same dtype as ", xname, ", got ", w.scalar_type(), " and ",
              x.scalar_type());
  TORCH_CHECK(w.device() == x.device(), op, ": ", wname, " must be on the same device as ", xname,
              ", got ", w.device(), " and ", x.device());
  TORCH_CHECK(stride >= 1, op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(padding >= 0, op, ": padding must be >= 0, got ", padding);
  // The dilated kernel spans (k - 1) * dilation + 1 input rows and columns.
  const int64_t kh = (w.size(2) - 1) * dilation + 1, kw = (w.size(3) - 1) * dilation + 1;
  const int64_t ho = (x.size(2) + 2 * padding - kh) / stride + 1;
  const int64_t wo = (x.size(3) + 2 * padding - kw) / stride + 1;
  TORCH_CHECK(x.size(2) + 2 * padding >= kh && x.size(3) + 2 * padding >= kw && ho > 0 && wo > 0,
              op, ": ", xname, " of shape ", shape_str(x), " is smaller than the ", w.size(2),
              "x", w.size(3), " kernel (dilation ", dilation, ") with padding ", padding);
}

inline void check_bias(const char* op, const at::Tensor& b, const at::Tensor& w,
                       const at::Tensor& x) {
  TORCH_CHECK(b.defined() && b.dim() == 1 && b.size(0) == w.size(0), op,
              ": bias must be a 1-D tensor of C_out = ", w.size(0), " values, got shape ",
              b.defined() ? shape_str(b) : std::string("undefined"));
  TORCH_CHECK(b.device() == x.device(), op, ": bias must be on the same device as the input, got ",
              b.device(), " and ", x.device());
  TORCH_CHECK(b.scalar_type() == x.scalar_type(), op,
              ": bias must have the same dtype as the input, got ", b.scalar_type(), " and ",
              x.scalar_type());
}

inline std::vector<int64_t> conv_out_shape(const at::Tensor& x, const at::Tensor& w,
                                           int64_t stride, int64_t padding, int64_t dilation = 1) {
  return {x.size(0), w.size(0), (x.size(2) + 2 * padding - (w.size(2) - 1) * dilation - 1) / stride + 1,
          (x.size(3) + 2 * padding - (w.size(3) - 1) * dilation - 1) / stride + 1};
}

// Validates conv_bias_shortcut_relu's arguments; returns nothing, throws on error.
inline void check_conv_shortcut(const at::Tensor& y, const at::Tensor& weight, const at::Tensor& bias,
                                const at::Tensor& x, const std::optional<at::Tensor>& sw,
                                int64_t padding, int64_t sstride, int64_t spadding,
                                int64_t dilation, int64_t groups) {
  const char* op = "conv_bias_shortcut_relu";
  check_conv(op, "y", y, "weight", weight, 1, padding, dilation, groups);
  check_bias(op, bias, weight, y);
  auto out = conv_out_shape(y, weight, 1, padding, dilation);
  if (sw.has_value() && sw->defined()) {
    check_conv(op, "x", x, "shortcut_weight", *sw, sstride, spadding);
    TORCH_CHECK(x.scalar_type() == y.scalar_type(), op,
                ": x must have the same dtype as y, got ", x.scalar_type(), " and ", y.scalar_type());
    auto sc = conv_out_shape(x, *sw, sstride, spadding);
    TORCH_CHECK(sc == out, op, ": the projection shortcut conv2d(x, shortcut_weight, stride=", sstride,
                ", padding=", spadding, ") has shape ", at::IntArrayRef(sc),
                " but the main branch output has shape ", at::IntArrayRef(out));
  } else {
    check_activation(op, "x", x);
    TORCH_CHECK(x.scalar_type() == y.scalar_type(), op,
                ": x must have the same dtype as y, got ", x.scalar_type(), " and ", y.scalar_type());
    TORCH_CHECK(x.device() == y.device(), op, ": x must be on the same device as y, got ",
                x.device(), " and ", y.device());
    TORCH_CHECK(x.sizes() == at::IntArrayRef(out), op,
                ": the identity shortcut x must have the main branch output shape ",
                at::IntArrayRef(out), ", got ", shape_str(x),
                " (pass shortcut_weight for a projection shortcut)");
  }
}

// relu(conv(x, w) + b [+ z]) with plain ATen ops: the CPU implementation, and the CUDA
// fallback where cuDNN's fused op does not apply. Output in x's memory format.
inline at::Tensor conv_add_relu_aten(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                     int64_t stride, int64_t padding, int64_t dilation,
                                     int64_t groups, const std::optional<at::Tensor>& z) {
  // The output format rule of the schemas (and of the fakes in resnet_fused/ops.py):
  // NCHW whenever x is NCHW-contiguous, channels_last otherwise.
  const auto fmt = x.is_contiguous() ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  at::Tensor out = at::convolution(x, w, b, {stride, stride}, {padding, padding},
                                   {dilation, dilation}, false, {0, 0}, groups);
  out = out.contiguous(fmt);
  if (z.has_value()) out.add_(*z);
  out.relu_();
  return out;
}

inline at::Tensor shortcut_of(const at::Tensor& x, const std::optional<at::Tensor>& sw,
                              int64_t sstride, int64_t spadding) {
  if (sw.has_value() && sw->defined()) {
    return at::convolution(x, *sw, std::nullopt, {sstride, sstride}, {spadding, spadding}, {1, 1},
                           false, {0, 0}, 1);
  }
  return x;
}

// ---- gated branches (README.md, Design, "Gates and pooled shortcuts") ----

// Where the gate value of element (n, c) sits in the gate made contiguous: n * sN + c * sC.
struct GateIndex {
  int64_t sN, sC;
};

// A gate multiplying activation `act` (N, C, H, W): (N, C, 1, 1) per sample and channel
// (SE, ECA), (N, 1, 1, 1) per sample (drop path), or 1 where it is shared: (1, C, 1, 1),
// (1, 1, 1, 1). Any floating dtype, on act's device.
inline GateIndex check_gate(const char* op, const at::Tensor& gate, const char* act_name,
                            const at::Tensor& act, const Layout& l) {
  TORCH_CHECK(gate.defined(), op, ": gate is undefined");
  TORCH_CHECK(gate.dim() == 4 && (gate.size(0) == l.N || gate.size(0) == 1) &&
                  (gate.size(1) == l.C || gate.size(1) == 1) && gate.size(2) == 1 && gate.size(3) == 1,
              op, ": gate must have shape (N, C, 1, 1) = [", l.N, ", ", l.C, ", 1, 1], or 1 in the N "
              "or C dimension it is shared over (a sample gate is [", l.N, ", 1, 1, 1]), for ", act_name,
              " of shape ", shape_str(act), ", got ", shape_str(gate));
  TORCH_CHECK(is_float_dtype(gate.scalar_type()), op, ": gate must be a floating tensor, got ",
              gate.scalar_type());
  TORCH_CHECK(gate.layout() == at::kStrided, op, ": gate must be a strided (dense) tensor");
  TORCH_CHECK(gate.device() == act.device(), op, ": gate must be on the same device as ", act_name,
              ", got ", gate.device(), " and ", act.device());
  return {gate.size(0) == 1 ? 0 : gate.size(1), gate.size(1) == 1 ? 0 : 1};
}

// bn_pool_backward's grad_pooled: (N, C), one value per sample and channel, on c's device.
inline void check_pooled(const char* op, const at::Tensor& gp, const at::Tensor& c, const Layout& l) {
  TORCH_CHECK(gp.defined() && gp.dim() == 2 && gp.size(0) == l.N && gp.size(1) == l.C, op,
              ": grad_pooled must have shape (N, C) = [", l.N, ", ", l.C, "] for c of shape ",
              shape_str(c), ", got ", gp.defined() ? shape_str(gp) : std::string("undefined"));
  TORCH_CHECK(is_float_dtype(gp.scalar_type()), op, ": grad_pooled must be a floating tensor, got ",
              gp.scalar_type());
  TORCH_CHECK(gp.device() == c.device(), op, ": grad_pooled must be on the same device as c, got ",
              gp.device(), " and ", c.device());
}

// gate_shortcut_relu's arguments but the gate (check_gate): y, and x (the identity, y's shape, dtype and memory
// format) or the projection conv2d(x, shortcut_weight, stride, padding) (+ shortcut_bias)
// of y's shape. Returns y's layout.
inline Layout check_gate_shortcut(const at::Tensor& y, const at::Tensor& x,
                                  const std::optional<at::Tensor>& sw,
                                  const std::optional<at::Tensor>& sb, int64_t sstride,
                                  int64_t spadding) {
  const char* op = "gate_shortcut_relu";
  const Layout l = check_activation(op, "y", y);
  const bool proj = sw.has_value() && sw->defined();
  const bool has_bias = sb.has_value() && sb->defined();
  if (proj) {
    check_conv(op, "x", x, "shortcut_weight", *sw, sstride, spadding);
    TORCH_CHECK(x.scalar_type() == y.scalar_type(), op, ": x must have the same dtype as y, got ",
                x.scalar_type(), " and ", y.scalar_type());
    TORCH_CHECK(x.device() == y.device(), op, ": x must be on the same device as y, got ",
                x.device(), " and ", y.device());
    auto sc = conv_out_shape(x, *sw, sstride, spadding);
    TORCH_CHECK(at::IntArrayRef(sc) == y.sizes(), op, ": the projection shortcut conv2d(x, "
                "shortcut_weight, stride=", sstride, ", padding=", spadding, ") has shape ",
                at::IntArrayRef(sc), " but y has shape ", shape_str(y));
    if (has_bias) check_channel_vec(op, "shortcut_bias", *sb, l.C, y, std::nullopt);
  } else {
    TORCH_CHECK(!has_bias, op, ": shortcut_bias is given without shortcut_weight (the identity "
                "shortcut has no bias)");
    check_like(op, "x", x, "y", y, l);
  }
  return l;
}

}  // namespace resnet_fused
