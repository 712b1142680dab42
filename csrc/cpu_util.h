// Shared by the CPU kernel files (ops.cpp, gate_ops.cpp): walking an activation's
// physical offsets with its channel (and sample) known without a division per element,
// and the per-channel BN coefficients in the op-math dtype.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "common.h"

namespace resnet_fused {
namespace {

using at::Tensor;

// Walks physical offsets [begin, end) keeping track of the channel of each element
// without a division per element.
struct ChannelCursor {
  int64_t ch, pos, inner, C;
  ChannelCursor(const Layout& l, int64_t begin) : inner(l.inner()), C(l.C) {
    ch = (begin / inner) % C;
    pos = begin % inner;
  }
  inline void next() {
    if (++pos == inner) {
      pos = 0;
      if (++ch == C) ch = 0;
    }
  }
};

// The sample n of each physical offset (both layouts hold one sample in C*H*W
// consecutive elements), walked as ChannelCursor walks the channel.
struct SampleCursor {
  int64_t n, r, chw;
  SampleCursor(const Layout& l, int64_t begin) : chw(l.C * l.HW()) {
    n = begin / chw;
    r = begin % chw;
  }
  inline void next() {
    if (++r == chw) {
      r = 0;
      ++n;
    }
  }
};

// Per-channel scale/shift in the op-math dtype: scale = weight*invstd, shift = bias - mean*scale.
template <typename acc_t>
void scale_shift(const Tensor& mean, const Tensor& invstd, const Tensor& weight, const Tensor& bias,
                 std::vector<acc_t>& sc, std::vector<acc_t>& sh) {
  const auto adt = c10::CppTypeToScalarType<acc_t>::value;
  Tensor m = mean.to(adt), is = invstd.to(adt), w = weight.to(adt), b = bias.to(adt);
  const int64_t C = m.numel();
  sc.resize(C);
  sh.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    sc[c] = w.const_data_ptr<acc_t>()[c] * is.const_data_ptr<acc_t>()[c];
    sh[c] = b.const_data_ptr<acc_t>()[c] - m.const_data_ptr<acc_t>()[c] * sc[c];
  }
}

}  // namespace
}  // namespace resnet_fused
