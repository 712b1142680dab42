// CPU kernels of the gate ops (schemas.py GATE_OPS; README.md, Design, "Gates and pooled
// shortcuts"): the BN'd branch pooled per (n, c) for a channel gate (bn_pool) and its
// backward, the gated join relu(gate * bn(c) + residual) with the packed mask
// (bn_gate_act) and its backward, and the eval join relu(gate * y + shortcut)
// (gate_shortcut_relu: the projection through ATen's convolution, then one pass).
// The CUDA kernels of the same ops are cuda/gate_kernels.cu; the schemas are defined in
// ops.cpp's TORCH_LIBRARY (schemas.h).
//
// As ops.cpp: sums in float64, elementwise maths in the op-math dtype (float32 for
// float32/float16/bfloat16, float64 for float64). The backward's sums are per (n, c)
// first, sum_hw g and sum_hw g * xhat, in the same pass over grad_out and c; the per-channel
// BN sums, sum_n gate * (...), and the gate's gradient, sum_hw g * y = w * sum_hw g * xhat +
// b * sum_hw g, follow from them.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common.h"
#include "cpu_util.h"

namespace resnet_fused {
namespace {

using at::Tensor;

// Per-(n, c) sums over H, W in float64, a[n * C + c] and b[n * C + c]; f(i, ch, a, b)
// adds element i's contributions. Samples run in parallel (one sample is C * H * W
// consecutive elements in both layouts), each in a fixed order: deterministic.
template <typename F>
void plane_sums(const Layout& l, std::vector<double>& a, std::vector<double>& b, F f) {
  const int64_t C = l.C, chw = l.C * l.HW();
  a.assign(l.N * C, 0.0);
  b.assign(l.N * C, 0.0);
  at::parallel_for(0, l.N, 1, [&](int64_t nb, int64_t ne) {
    for (int64_t n = nb; n < ne; ++n) {
      ChannelCursor cur(l, n * chw);
      double* pa = a.data() + n * C;
      double* pb = b.data() + n * C;
      for (int64_t i = n * chw; i < (n + 1) * chw; ++i, cur.next()) f(i, cur.ch, pa[cur.ch], pb[cur.ch]);
    }
  });
}

// t's values as float64, in contiguous order (a gate's element (n, c) at n * sN + c * sC).
std::vector<double> as_doubles(const Tensor& t) {
  const Tensor d = t.to(at::kDouble).contiguous();
  return std::vector<double>(d.const_data_ptr<double>(), d.const_data_ptr<double>() + d.numel());
}

void check_cpu(const char* op, const Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": expected a CPU tensor, got ", t.device());
}

// ---------------------------------------------------------------- bn_pool
Tensor bn_pool_cpu(const Tensor& c, const Tensor& mean, const Tensor& invstd, const Tensor& weight,
                   const Tensor& bias) {
  const char* op = "bn_pool";
  const Layout l = check_activation(op, "c", c);
  check_cpu(op, c);
  check_stats_args(op, c, l, mean, invstd, weight);
  check_channel_vec(op, "bias", bias, l.C, c, std::nullopt);
  TORCH_CHECK(l.HW() > 0, op, ": c must have H, W > 0 to be pooled, got shape ", shape_str(c));
  const auto sdt = stat_dtype(c.scalar_type());
  Tensor pooled = at::empty({l.N, l.C}, c.options().dtype(sdt));
  if (l.N == 0) return pooled;
  const std::vector<double> m = as_doubles(mean), is = as_doubles(invstd), w = as_doubles(weight),
                            b = as_doubles(bias);
  std::vector<double> sx, unused;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "bn_pool_cpu", [&] {
    const scalar_t* pc = c.const_data_ptr<scalar_t>();
    // Centred on the batch mean: mean_hw(xhat), free of the cancellation of mean_hw(c) - mean.
    plane_sums(l, sx, unused, [&](int64_t i, int64_t ch, double& a, double&) {
      a += (static_cast<double>(pc[i]) - m[ch]) * is[ch];
    });
  });
  const double inv_hw = 1.0 / static_cast<double>(l.HW());
  AT_DISPATCH_FLOATING_TYPES(sdt, "bn_pool_cpu_out", [&] {
    scalar_t* po = pooled.data_ptr<scalar_t>();
    for (int64_t n = 0; n < l.N; ++n)
      for (int64_t ch = 0; ch < l.C; ++ch)
        po[n * l.C + ch] = static_cast<scalar_t>(w[ch] * sx[n * l.C + ch] * inv_hw + b[ch]);
  });
  return pooled;
}

// ---------------------------------------------------------------- backward apply
// grad_c = ka * (u - sum1 / M) - kb * (c - mean), ka = w * invstd, kb = ka * invstd * sum2 / M:
// training BN's backward on the branch gradient u, which is g * gate[n, c] (bn_gate_act's,
// g = mask ? grad_out : 0; grad_res = g when asked) or grad_pooled[n, c] / (H * W)
// (bn_pool's). u(i, n, ch, g) gives it from element i's g.
template <typename scalar_t, typename U>
void bn_apply_cpu(const Layout& l, const scalar_t* pc, const scalar_t* pdy, const uint8_t* pm,
                  const std::vector<double>& m, const std::vector<double>& is,
                  const std::vector<double>& w, const std::vector<double>& sum1,
                  const std::vector<double>& sum2, scalar_t* pgc, scalar_t* pgr, U u) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = l.N * l.HW();
  std::vector<acc_t> A(l.C), mb(l.C), B(l.C), mu(l.C);
  for (int64_t ch = 0; ch < l.C; ++ch) {
    A[ch] = static_cast<acc_t>(w[ch] * is[ch]);
    mb[ch] = static_cast<acc_t>(sum1[ch] / M);
    B[ch] = static_cast<acc_t>(w[ch] * is[ch] * is[ch] * sum2[ch] / M);
    mu[ch] = static_cast<acc_t>(m[ch]);
  }
  at::parallel_for(0, l.numel(), 16384, [&](int64_t b0, int64_t e0) {
    ChannelCursor cur(l, b0);
    SampleCursor sc(l, b0);
    for (int64_t i = b0; i < e0; ++i, cur.next(), sc.next()) {
      const int64_t ch = cur.ch;
      const acc_t g = pdy != nullptr && ((pm[i >> 3] >> (i & 7)) & 1) ? static_cast<acc_t>(pdy[i]) : acc_t(0);
      pgc[i] = static_cast<scalar_t>(A[ch] * (u(sc.n, ch, g) - mb[ch]) -
                                     B[ch] * (static_cast<acc_t>(pc[i]) - mu[ch]));
      if (pgr) pgr[i] = static_cast<scalar_t>(g);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> bn_pool_backward_cpu(const Tensor& grad_pooled, const Tensor& c,
                                                        const Tensor& mean, const Tensor& invstd,
                                                        const Tensor& weight) {
  const char* op = "bn_pool_backward";
  const Layout l = check_activation(op, "c", c);
  check_cpu(op, c);
  check_pooled(op, grad_pooled, c, l);
  check_stats_args(op, c, l, mean, invstd, weight);
  TORCH_CHECK(c.numel() > 0, op, ": c must not be empty");
  const auto sdt = stat_dtype(c.scalar_type());
  const std::vector<double> m = as_doubles(mean), is = as_doubles(invstd), w = as_doubles(weight),
                            gp = as_doubles(grad_pooled);
  const double inv_hw = 1.0 / static_cast<double>(l.HW());
  Tensor grad_c = at::empty_like(c);
  std::vector<double> sum1(l.C, 0.0), sum2(l.C, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "bn_pool_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pc = c.const_data_ptr<scalar_t>();
    std::vector<double> sx, unused;
    plane_sums(l, sx, unused, [&](int64_t i, int64_t ch, double& a, double&) {
      a += (static_cast<double>(pc[i]) - m[ch]) * is[ch];
    });
    // grad_bias = sum_n gp;  grad_weight = sum_n gp * mean_hw(xhat).
    for (int64_t n = 0; n < l.N; ++n)
      for (int64_t ch = 0; ch < l.C; ++ch) {
        sum1[ch] += gp[n * l.C + ch];
        sum2[ch] += gp[n * l.C + ch] * sx[n * l.C + ch] * inv_hw;
      }
    std::vector<acc_t> q(gp.size());
    for (size_t k = 0; k < gp.size(); ++k) q[k] = static_cast<acc_t>(gp[k] * inv_hw);
    bn_apply_cpu<scalar_t>(l, pc, nullptr, nullptr, m, is, w, sum1, sum2, grad_c.data_ptr<scalar_t>(),
                           nullptr, [&](int64_t n, int64_t ch, acc_t) { return q[n * l.C + ch]; });
  });
  Tensor gw = at::empty({l.C}, c.options().dtype(at::kDouble)), gb = at::empty_like(gw);
  std::copy(sum2.begin(), sum2.end(), gw.data_ptr<double>());
  std::copy(sum1.begin(), sum1.end(), gb.data_ptr<double>());
  return {grad_c, gw.to(sdt), gb.to(sdt)};
}

// ---------------------------------------------------------------- bn_gate_act
// out = relu(gate[n, c] * (sc * c + sh) + residual), sc/sh the BN's; the mask of the
// stored output (NaN stays NaN, as F.relu). Parallel over mask bytes, as bn_act.
std::tuple<Tensor, Tensor> bn_gate_act_cpu(const Tensor& c, const Tensor& mean, const Tensor& invstd,
                                           const Tensor& weight, const Tensor& bias, const Tensor& gate,
                                           const std::optional<Tensor>& residual) {
  const char* op = "bn_gate_act";
  const Layout l = check_activation(op, "c", c);
  check_cpu(op, c);
  check_stats_args(op, c, l, mean, invstd, weight);
  check_channel_vec(op, "bias", bias, l.C, c, std::nullopt);
  const GateIndex gi = check_gate(op, gate, "c", c, l);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) check_like(op, "residual", *residual, "c", c, l);
  Tensor out = at::empty_like(c);
  const int64_t numel = c.numel();
  Tensor mask = at::empty({mask_bytes(numel)}, c.options().dtype(at::kByte));
  if (numel == 0) return {out, mask};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "bn_gate_act_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> sc, sh;
    scale_shift<acc_t>(mean, invstd, weight, bias, sc, sh);
    const Tensor gt = gate.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* pg = gt.const_data_ptr<acc_t>();
    const scalar_t* pc = c.const_data_ptr<scalar_t>();
    const scalar_t* pr = has_res ? residual->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* po = out.data_ptr<scalar_t>();
    uint8_t* pm = mask.data_ptr<uint8_t>();
    at::parallel_for(0, mask_bytes(numel), 2048, [&](int64_t gb, int64_t ge) {
      ChannelCursor cur(l, gb * 8);
      SampleCursor s(l, gb * 8);
      for (int64_t g = gb; g < ge; ++g) {
        uint8_t bits = 0;
        const int64_t end = std::min(numel, g * 8 + 8);
        for (int64_t i = g * 8; i < end; ++i, cur.next(), s.next()) {
          const int64_t ch = cur.ch;
          acc_t v = pg[s.n * gi.sN + ch * gi.sC] * (sc[ch] * static_cast<acc_t>(pc[i]) + sh[ch]);
          if (pr) v += static_cast<acc_t>(pr[i]);
          const scalar_t o = static_cast<scalar_t>(v > acc_t(0) || v != v ? v : acc_t(0));
          po[i] = o;
          bits |= static_cast<uint8_t>(static_cast<acc_t>(o) > acc_t(0)) << (i - g * 8);
        }
        pm[g] = bits;
      }
    });
  });
  return {out, mask};
}

// ---------------------------------------------------------------- bn_gate_act_backward
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bn_gate_act_backward_cpu(
    const Tensor& grad_out, const Tensor& mask, const Tensor& c, const Tensor& mean, const Tensor& invstd,
    const Tensor& weight, const Tensor& bias, const Tensor& gate, bool residual_grad) {
  const char* op = "bn_gate_act_backward";
  const Layout l = check_activation(op, "c", c);
  check_cpu(op, c);
  check_like(op, "grad_out", grad_out, "c", c, l);
  check_mask(op, mask, c);
  check_stats_args(op, c, l, mean, invstd, weight);
  check_channel_vec(op, "bias", bias, l.C, c, std::nullopt);
  const GateIndex gi = check_gate(op, gate, "c", c, l);
  TORCH_CHECK(c.numel() > 0, op, ": c must not be empty");
  const auto sdt = stat_dtype(c.scalar_type());
  const std::vector<double> m = as_doubles(mean), is = as_doubles(invstd), w = as_doubles(weight),
                            b = as_doubles(bias), gv = as_doubles(gate);
  Tensor grad_c = at::empty_like(c);
  Tensor grad_res = residual_grad ? at::empty_like(c) : at::empty({0}, c.options());
  // Pass 1, per (n, c): sg = sum_hw g, sgx = sum_hw g * xhat.
  std::vector<double> sg, sgx, sum1(l.C, 0.0), sum2(l.C, 0.0);
  Tensor gg = at::zeros(gate.sizes(), c.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "bn_gate_act_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pdy = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* pc = c.const_data_ptr<scalar_t>();
    const uint8_t* pm = mask.const_data_ptr<uint8_t>();
    plane_sums(l, sg, sgx, [&](int64_t i, int64_t ch, double& a, double& bb) {
      if ((pm[i >> 3] >> (i & 7)) & 1) {
        const double g = static_cast<double>(pdy[i]);
        a += g;
        bb += g * (static_cast<double>(pc[i]) - m[ch]) * is[ch];
      }
    });
    // The BN's sums of gy = g * gate, and the gate's gradient sum g * y summed to the
    // gate's shape (y = w * xhat + b).
    double* pgg = gg.data_ptr<double>();
    for (int64_t n = 0; n < l.N; ++n)
      for (int64_t ch = 0; ch < l.C; ++ch) {
        const int64_t k = n * l.C + ch, gk = n * gi.sN + ch * gi.sC;
        sum1[ch] += gv[gk] * sg[k];
        sum2[ch] += gv[gk] * sgx[k];
        pgg[gk] += w[ch] * sgx[k] + b[ch] * sg[k];
      }
    std::vector<acc_t> ga(gv.size());
    for (size_t k = 0; k < gv.size(); ++k) ga[k] = static_cast<acc_t>(gv[k]);
    // Pass 2: training BN's backward of gy.
    bn_apply_cpu<scalar_t>(l, pc, pdy, pm, m, is, w, sum1, sum2, grad_c.data_ptr<scalar_t>(),
                           residual_grad ? grad_res.data_ptr<scalar_t>() : nullptr,
                           [&](int64_t n, int64_t ch, acc_t g) { return g * ga[n * gi.sN + ch * gi.sC]; });
  });
  Tensor gw = at::empty({l.C}, c.options().dtype(at::kDouble)), gb = at::empty_like(gw);
  std::copy(sum2.begin(), sum2.end(), gw.data_ptr<double>());
  std::copy(sum1.begin(), sum1.end(), gb.data_ptr<double>());
  return {grad_c, gw.to(sdt), gb.to(sdt), gg.to(sdt), grad_res};
}

// ---------------------------------------------------------------- gate_shortcut_relu
// out = relu(gate[n, c] * y + shortcut [+ shortcut_bias[c]]) in one pass, shortcut = x or
// ATen's conv2d(x, shortcut_weight) (no bias: it is added in the pass) in y's format.
Tensor gate_shortcut_relu_cpu(const Tensor& y, const Tensor& gate, const Tensor& x,
                              const std::optional<Tensor>& shortcut_weight,
                              const std::optional<Tensor>& shortcut_bias, int64_t shortcut_stride,
                              int64_t shortcut_padding) {
  const char* op = "gate_shortcut_relu";
  const Layout l = check_gate_shortcut(y, x, shortcut_weight, shortcut_bias, shortcut_stride,
                                       shortcut_padding);
  check_cpu(op, y);
  const GateIndex gi = check_gate(op, gate, "y", y, l);
  const Tensor sc = shortcut_of(x, shortcut_weight, shortcut_stride, shortcut_padding).contiguous(format_of(l));
  const bool has_bias = shortcut_bias.has_value() && shortcut_bias->defined();
  Tensor out = at::empty_like(y);
  if (y.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "gate_shortcut_relu_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto adt = c10::CppTypeToScalarType<acc_t>::value;
    const Tensor gt = gate.to(adt).contiguous();
    const Tensor bt = has_bias ? shortcut_bias->to(adt).contiguous() : at::zeros({l.C}, y.options().dtype(adt));
    const acc_t* pg = gt.const_data_ptr<acc_t>();
    const acc_t* pb = bt.const_data_ptr<acc_t>();
    const scalar_t* py = y.const_data_ptr<scalar_t>();
    const scalar_t* ps = sc.const_data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, y.numel(), 16384, [&](int64_t b0, int64_t e0) {
      ChannelCursor cur(l, b0);
      SampleCursor s(l, b0);
      for (int64_t i = b0; i < e0; ++i, cur.next(), s.next()) {
        const int64_t ch = cur.ch;
        const acc_t v = pg[s.n * gi.sN + ch * gi.sC] * static_cast<acc_t>(py[i]) +
                        static_cast<acc_t>(ps[i]) + pb[ch];
        po[i] = static_cast<scalar_t>(v > acc_t(0) || v != v ? v : acc_t(0));
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("bn_pool", &bn_pool_cpu);
  m.impl("bn_pool_backward", &bn_pool_backward_cpu);
  m.impl("bn_gate_act", &bn_gate_act_cpu);
  m.impl("bn_gate_act_backward", &bn_gate_act_backward_cpu);
  m.impl("gate_shortcut_relu", &gate_shortcut_relu_cpu);
}

}  // namespace resnet_fused
