// resnet_fused._C: the op schemas (TORCH_LIBRARY) and their CPU kernels.
//
// The schemas come from schemas.h, character-for-character those of
// resnet_fused/schemas.py (tests/test_op_contract.py checks it). CUDA kernels for the
// same ops live in cuda/ and register under the CUDA dispatch key; fake (meta)
// implementations and the autograd of bn_act and the eval ops are registered from
// Python (resnet_fused.ops.register_op_layer), as extension-cpp does.
//
// CPU kernels accumulate in float64 (cheap on CPU, and exact enough that the CPU
// path is a good twin of the float64 reference); elementwise maths runs in float32
// for float32/float16/bfloat16 activations (as ATen's CPU BatchNorm does) and in
// float64 for float64 activations, so gradcheck works.
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "cpu_util.h"
#include "schemas.h"

#ifndef RESNET_FUSED_WITH_CUDA
#define RESNET_FUSED_WITH_CUDA 0
#endif

// SM versions the CUDA kernels were compiled for (e.g. 90 for sm_90a), from setup.py.
#ifndef RESNET_FUSED_SM_LIST
#define RESNET_FUSED_SM_LIST
#endif

// The extension must be importable as a Python module so that `import resnet_fused._C`
// runs the static initialisers that register the ops. No pybind11: it costs compile
// time and nothing here needs it. `built_with_cuda` tells Python whether the CUDA
// kernels were compiled in, `cuda_archs` for which SM versions (a tuple of ints).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "resnet_fused C++/CUDA ops (torch.ops.resnet_fused)", -1,
      nullptr,
  };
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  PyObject* flag = RESNET_FUSED_WITH_CUDA ? Py_True : Py_False;
  Py_INCREF(flag);
  if (PyModule_AddObject(m, "built_with_cuda", flag) < 0) {
    Py_DECREF(flag);
    Py_DECREF(m);
    return nullptr;
  }
  static const int archs[] = {0, RESNET_FUSED_SM_LIST};  // leading 0: never empty
  const Py_ssize_t n_archs = static_cast<Py_ssize_t>(sizeof(archs) / sizeof(archs[0])) - 1;
  PyObject* tuple = PyTuple_New(n_archs);
  if (tuple == nullptr) {
    Py_DECREF(m);
    return nullptr;
  }
  // PyTuple_SetItem, not the PyTuple_SET_ITEM macro: the stable ABI (Py_LIMITED_API,
  // setup.py) has only the function.
  for (Py_ssize_t i = 0; i < n_archs; ++i) {
    PyObject* v = PyLong_FromLong(archs[i + 1]);
    if (v == nullptr || PyTuple_SetItem(tuple, i, v) < 0) {
      Py_DECREF(tuple);
      Py_DECREF(m);
      return nullptr;
    }
  }
  if (PyModule_AddObject(m, "cuda_archs", tuple) < 0) {
    Py_DECREF(tuple);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
}

namespace resnet_fused {
namespace {

using at::Tensor;

// Per-channel sums over all elements: a[c] = sum f_a(i), b[c] = sum f_b(i), in
// float64, split into chunks of the physical range run in parallel, then merged in
// a fixed order (deterministic). f(i, ch, a, b) adds element i's contributions.
template <typename F>
void channel_sums(const Layout& l, std::vector<double>& a, std::vector<double>& b, F f) {
  const int64_t numel = l.numel(), C = l.C;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(64, numel / 16384));
  std::vector<double> pa(chunks * C, 0.0), pb(chunks * C, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t k = cb; k < ce; ++k) {
      const int64_t begin = numel * k / chunks, end = numel * (k + 1) / chunks;
      double* ka = pa.data() + k * C;
      double* kb = pb.data() + k * C;
      ChannelCursor cur(l, begin);
      for (int64_t i = begin; i < end; ++i, cur.next()) f(i, cur.ch, ka[cur.ch], kb[cur.ch]);
    }
  });
  a.assign(C, 0.0);
  b.assign(C, 0.0);
  for (int64_t k = 0; k < chunks; ++k)
    for (int64_t c = 0; c < C; ++c) {
      a[c] += pa[k * C + c];
      b[c] += pb[k * C + c];
    }
}

// ---------------------------------------------------------------- channel_stats
std::tuple<Tensor, Tensor> channel_stats_cpu(const Tensor& x) {
  const Layout l = check_activation("channel_stats", "x", x);
  TORCH_CHECK(x.device().is_cpu(), "channel_stats: expected a CPU tensor, got ", x.device());
  TORCH_CHECK(l.numel() > 0, "channel_stats: x must not be empty, got shape ", shape_str(x));
  const auto sdt = stat_dtype(x.scalar_type());
  Tensor mean = at::empty({l.C}, x.options().dtype(sdt));
  Tensor var = at::empty({l.C}, x.options().dtype(sdt));
  const int64_t M = l.N * l.HW();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats_cpu", [&] {
    const scalar_t* p = x.const_data_ptr<scalar_t>();
    // Shifted sums: subtracting the channel's first element keeps sum((x-k)^2) free
    // of the cancellation that plain sum(x^2) - sum(x)^2 suffers when |mean| >> std.
    std::vector<double> shift(l.C);
    for (int64_t c = 0; c < l.C; ++c) shift[c] = static_cast<double>(p[c * (l.nhwc ? 1 : l.HW())]);
    std::vector<double> sa, sb;
    channel_sums(l, sa, sb, [&](int64_t i, int64_t ch, double& a, double& b) {
      const double d = static_cast<double>(p[i]) - shift[ch];
      a += d;
      b += d * d;
    });
    AT_DISPATCH_FLOATING_TYPES(sdt, "channel_stats_cpu_out", [&] {
      scalar_t* m = mean.data_ptr<scalar_t>();
      scalar_t* v = var.data_ptr<scalar_t>();
      for (int64_t c = 0; c < l.C; ++c) {
        const double dm = sa[c] / M;
        m[c] = static_cast<scalar_t>(shift[c] + dm);
        v[c] = static_cast<scalar_t>(std::max(sb[c] / M - dm * dm, 0.0));
      }
    });
  });
  return {mean, var};
}

// ---------------------------------------------------------------- bn_finalize
// Signature and shared checks mirror bn_finalize_cuda (cuda/bn_kernels.cu): the two
// kernels of one schema.
std::tuple<Tensor, Tensor, Tensor> bn_finalize_cpu(const Tensor& mean, const Tensor& var,
                                                   const Tensor& weight, const Tensor& bias,
                                                   Tensor& running_mean, Tensor& running_var,
                                                   Tensor& num_batches_tracked, double momentum,
                                                   double eps, int64_t count) {
  check_finalize(mean, var, weight, bias, running_mean, running_var, num_batches_tracked, eps, count);
  TORCH_CHECK(mean.device().is_cpu(), "bn_finalize: expected CPU tensors, got ", mean.device());
  const int64_t C = mean.size(0);
  Tensor invstd = at::empty_like(mean), scale = at::empty_like(mean), shift = at::empty_like(mean);
  int64_t* nbt = num_batches_tracked.data_ptr<int64_t>();
  const int64_t n_new = nbt[0] + 1;
  nbt[0] = n_new;
  const double f = momentum >= 0 ? momentum : 1.0 / static_cast<double>(n_new);
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  // Everything in double, cast on store: tensors may each have their own dtype.
  Tensor m64 = mean.to(at::kDouble), v64 = var.to(at::kDouble), w64 = weight.to(at::kDouble),
         b64 = bias.to(at::kDouble), rm64 = running_mean.to(at::kDouble),
         rv64 = running_var.to(at::kDouble);
  const double *m = m64.const_data_ptr<double>(), *v = v64.const_data_ptr<double>(),
               *w = w64.const_data_ptr<double>(), *b = b64.const_data_ptr<double>();
  double *rm = rm64.data_ptr<double>(), *rv = rv64.data_ptr<double>();
  Tensor is64 = at::empty({C}, m64.options()), sc64 = at::empty({C}, m64.options()),
         sh64 = at::empty({C}, m64.options());
  double *is = is64.data_ptr<double>(), *sc = sc64.data_ptr<double>(), *sh = sh64.data_ptr<double>();
  for (int64_t c = 0; c < C; ++c) {
    // Rounded to the statistics dtype first, so the CPU kernel matches the CUDA
    // one, which computes invstd in that dtype.
    const double inv = mean.scalar_type() == at::kFloat
                           ? static_cast<double>(1.0f / std::sqrt(static_cast<float>(v[c]) + static_cast<float>(eps)))
                           : 1.0 / std::sqrt(v[c] + eps);
    is[c] = inv;
    sc[c] = w[c] * inv;
    sh[c] = b[c] - m[c] * sc[c];
    rm[c] = (1.0 - f) * rm[c] + f * m[c];
    rv[c] = (1.0 - f) * rv[c] + f * v[c] * unbias;
  }
  invstd.copy_(is64);
  scale.copy_(sc64);
  shift.copy_(sh64);
  running_mean.copy_(rm64);
  running_var.copy_(rv64);
  return {invstd, scale, shift};
}

// ---------------------------------------------------------------- bn_act
// bn_act's kernel, for bn_act and bn_frozen_act (`op` names the caller in errors).
std::tuple<Tensor, Tensor> bn_act_cpu_impl(const char* op, const Tensor& c, const Tensor& mean,
                                           const Tensor& invstd, const Tensor& weight, const Tensor& bias,
                                           const std::optional<Tensor>& residual) {
  const Layout l = check_activation(op, "c", c);
  TORCH_CHECK(c.device().is_cpu(), op, ": expected a CPU tensor, got ", c.device());
  check_stats_args(op, c, l, mean, invstd, weight);
  check_channel_vec(op, "bias", bias, l.C, c, std::nullopt);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) check_like(op, "residual", *residual, "c", c, l);
  Tensor out = at::empty_like(c);
  const int64_t numel = c.numel();
  Tensor mask = at::empty({mask_bytes(numel)}, c.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "bn_act_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> sc, sh;
    scale_shift<acc_t>(mean, invstd, weight, bias, sc, sh);
    const scalar_t* pc = c.const_data_ptr<scalar_t>();
    const scalar_t* pr = has_res ? residual->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* po = out.data_ptr<scalar_t>();
    uint8_t* pm = mask.data_ptr<uint8_t>();
    at::parallel_for(0, mask_bytes(numel), 2048, [&](int64_t gb, int64_t ge) {
      ChannelCursor cur(l, gb * 8);
      for (int64_t g = gb; g < ge; ++g) {
        uint8_t bits = 0;
        const int64_t end = std::min(numel, g * 8 + 8);
        for (int64_t i = g * 8; i < end; ++i, cur.next()) {
          acc_t v = sc[cur.ch] * static_cast<acc_t>(pc[i]) + sh[cur.ch];
          if (pr) v += static_cast<acc_t>(pr[i]);
          const scalar_t o = static_cast<scalar_t>(v > acc_t(0) || v != v ? v : acc_t(0));  // NaN stays NaN, as F.relu
          po[i] = o;
          // The mask is of the stored output: a tiny positive v can round to 0.
          bits |= static_cast<uint8_t>(static_cast<acc_t>(o) > acc_t(0)) << (i - g * 8);
        }
        pm[g] = bits;
      }
    });
  });
  return {out, mask};
}

std::tuple<Tensor, Tensor> bn_act_cpu(const Tensor& c, const Tensor& mean, const Tensor& invstd,
                                       const Tensor& weight, const Tensor& bias,
                                       const std::optional<Tensor>& residual) {
  return bn_act_cpu_impl("bn_act", c, mean, invstd, weight, bias, residual);
}

// ---------------------------------------------------------------- bn_act_backward
// Both backwards: bn_act's (frozen = false: batch statistics, the gradient through
// mean and invstd included) and bn_frozen_act's (frozen = true: running statistics,
// grad_c = w*invstd*g; pass 1 only when param_grads asks for sum(g), sum(g*xhat)).
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_backward_cpu(
    const char* op, const Tensor& grad_out, const Tensor& mask, const Tensor& c, const Tensor& mean,
    const Tensor& invstd, const Tensor& weight, bool residual_grad, bool frozen, bool param_grads) {
  const Layout l = check_activation(op, "c", c);
  TORCH_CHECK(c.device().is_cpu(), op, ": expected a CPU tensor, got ", c.device());
  check_like(op, "grad_out", grad_out, "c", c, l);
  check_mask(op, mask, c);
  check_stats_args(op, c, l, mean, invstd, weight);
  TORCH_CHECK(c.numel() > 0, op, ": c must not be empty");
  const auto sdt = stat_dtype(c.scalar_type());
  const int64_t numel = c.numel(), M = l.N * l.HW();
  Tensor grad_c = at::empty_like(c);
  Tensor grad_res = residual_grad ? at::empty_like(c) : at::empty({0}, c.options());
  const int64_t nparam = param_grads ? l.C : 0;
  Tensor gw = at::empty({nparam}, c.options().dtype(sdt)), gb = at::empty({nparam}, c.options().dtype(sdt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "bn_act_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pdy = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* pc = c.const_data_ptr<scalar_t>();
    const uint8_t* pm = mask.const_data_ptr<uint8_t>();
    Tensor m64 = mean.to(at::kDouble), is64 = invstd.to(at::kDouble), w64 = weight.to(at::kDouble);
    const double *m = m64.const_data_ptr<double>(), *is = is64.const_data_ptr<double>(),
                 *w = w64.const_data_ptr<double>();
    auto bit = [&](int64_t i) { return (pm[i >> 3] >> (i & 7)) & 1; };
    // Pass 1: sum(g) and sum(g * xhat) per channel.
    std::vector<double> sg(l.C, 0.0), sgx(l.C, 0.0);
    if (param_grads) {
      channel_sums(l, sg, sgx, [&](int64_t i, int64_t ch, double& a, double& b) {
        if (bit(i)) {
          const double g = static_cast<double>(pdy[i]);
          a += g;
          b += g * (static_cast<double>(pc[i]) - m[ch]) * is[ch];
        }
      });
    }
    // Pass 2: grad_c = w*invstd*(g - sum_g/M - xhat*sum_gx/M) = A*(g - mb) - B*(c - mean).
    std::vector<acc_t> A(l.C), mb(l.C), B(l.C), mu(l.C);
    for (int64_t ch = 0; ch < l.C; ++ch) {
      A[ch] = static_cast<acc_t>(w[ch] * is[ch]);
      mb[ch] = frozen ? acc_t(0) : static_cast<acc_t>(sg[ch] / M);
      B[ch] = frozen ? acc_t(0) : static_cast<acc_t>(w[ch] * is[ch] * is[ch] * sgx[ch] / M);
      mu[ch] = static_cast<acc_t>(m[ch]);
    }
    scalar_t* pgc = grad_c.data_ptr<scalar_t>();
    scalar_t* pgr = residual_grad ? grad_res.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, numel, 16384, [&](int64_t b0, int64_t e0) {
      ChannelCursor cur(l, b0);
      for (int64_t i = b0; i < e0; ++i, cur.next()) {
        const acc_t g = bit(i) ? static_cast<acc_t>(pdy[i]) : acc_t(0);
        const int64_t ch = cur.ch;
        pgc[i] = static_cast<scalar_t>(A[ch] * (g - mb[ch]) - B[ch] * (static_cast<acc_t>(pc[i]) - mu[ch]));
        if (pgr) pgr[i] = static_cast<scalar_t>(g);
      }
    });
    AT_DISPATCH_FLOATING_TYPES(sdt, "bn_act_backward_cpu_out", [&] {
      for (int64_t ch = 0; ch < nparam; ++ch) {
        gb.data_ptr<scalar_t>()[ch] = static_cast<scalar_t>(sg[ch]);
        gw.data_ptr<scalar_t>()[ch] = static_cast<scalar_t>(sgx[ch]);
      }
    });
  });
  return {grad_c, gw, gb, grad_res};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_act_backward_cpu(
    const Tensor& grad_out, const Tensor& mask, const Tensor& c, const Tensor& mean,
    const Tensor& invstd, const Tensor& weight, bool residual_grad) {
  return bn_backward_cpu("bn_act_backward", grad_out, mask, c, mean, invstd, weight, residual_grad,
                         /*frozen=*/false, /*param_grads=*/true);
}

// ---------------------------------------------------------------- frozen BN
// bn_frozen_act is bn_act's computation (mean/invstd the running statistics): the same
// kernel; only the autograd contract, and so the backward, differ.
std::tuple<Tensor, Tensor> bn_frozen_act_cpu(const Tensor& c, const Tensor& mean, const Tensor& invstd,
                                             const Tensor& weight, const Tensor& bias,
                                             const std::optional<Tensor>& residual) {
  return bn_act_cpu_impl("bn_frozen_act", c, mean, invstd, weight, bias, residual);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_frozen_act_backward_cpu(
    const Tensor& grad_out, const Tensor& mask, const Tensor& c, const Tensor& mean,
    const Tensor& invstd, const Tensor& weight, bool residual_grad, bool param_grads) {
  return bn_backward_cpu("bn_frozen_act_backward", grad_out, mask, c, mean, invstd, weight,
                         residual_grad, /*frozen=*/true, param_grads);
}

// ---------------------------------------------------------------- eval convolutions
Tensor conv_bias_relu_cpu(const Tensor& x, const Tensor& weight, const Tensor& bias, int64_t stride,
                          int64_t padding, int64_t dilation, int64_t groups) {
  check_conv("conv_bias_relu", "x", x, "weight", weight, stride, padding, dilation, groups);
  check_bias("conv_bias_relu", bias, weight, x);
  return conv_add_relu_aten(x, weight, bias, stride, padding, dilation, groups, std::nullopt);
}

Tensor conv_bias_shortcut_relu_cpu(const Tensor& y, const Tensor& weight, const Tensor& bias,
                                   const Tensor& x, const std::optional<Tensor>& shortcut_weight,
                                   int64_t padding, int64_t shortcut_stride, int64_t shortcut_padding,
                                   int64_t dilation, int64_t groups) {
  check_conv_shortcut(y, weight, bias, x, shortcut_weight, padding, shortcut_stride, shortcut_padding,
                      dilation, groups);
  Tensor sc = shortcut_of(x, shortcut_weight, shortcut_stride, shortcut_padding);
  return conv_add_relu_aten(y, weight, bias, 1, padding, dilation, groups, sc);
}

}  // namespace

TORCH_LIBRARY(resnet_fused, m) {
  define_bn_schemas(m);
  define_conv_schemas(m);
  define_gate_schemas(m);  // their CPU kernels: gate_ops.cpp
}

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("channel_stats", &channel_stats_cpu);
  m.impl("bn_finalize", &bn_finalize_cpu);
  m.impl("bn_act", &bn_act_cpu);
  m.impl("bn_act_backward", &bn_act_backward_cpu);
  m.impl("bn_frozen_act", &bn_frozen_act_cpu);
  m.impl("bn_frozen_act_backward", &bn_frozen_act_backward_cpu);
  m.impl("conv_bias_relu", &conv_bias_relu_cpu);
  m.impl("conv_bias_shortcut_relu", &conv_bias_shortcut_relu_cpu);
}

}  // namespace resnet_fused
