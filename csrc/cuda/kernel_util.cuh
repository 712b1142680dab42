// Shared by the CUDA kernel files (bn_kernels.cu, gate_kernels.cu): the switch between
// nvcc and the host emulation of csrc/emu (the RF_* macros), the 16-byte vector access,
// the elementwise grid size and the grid-stride channel iterator. In an anonymous
// namespace: each translation unit (the emulation includes both .cu files in one) gets
// its own copy.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#ifdef RESNET_FUSED_EMULATE
#include "../emu/cuda_emu.h"
#define RF_LAUNCH(kernel, grid, block, stream, ...) ::emu::launch(kernel, grid, block, __VA_ARGS__)
#define RF_STREAM() 0
#define RF_DEVICE_GUARD(dev) ((void)0)
#define RF_IS_DEVICE(t) ((t).is_cpu())
#define RF_NUM_SMS() ::emu::num_sms()
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#define RF_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#define RF_STREAM() at::cuda::getCurrentCUDAStream()
#define RF_DEVICE_GUARD(dev) const c10::cuda::CUDAGuard rf_device_guard_(dev)
#define RF_IS_DEVICE(t) ((t).is_cuda())
#define RF_NUM_SMS() at::cuda::getCurrentDeviceProperties()->multiProcessorCount
#endif

#include <algorithm>
#include <numeric>

#include "../common.h"

namespace resnet_fused {
namespace {

using at::Tensor;

constexpr int kThreads = 256;

// ---- 8-element vector access: 16-byte transactions (1 for 2-byte types, 2 for float,
// 4 for double). Callers guarantee 16-byte alignment (the emulation checks it: all
// vector accesses go through __ldg and __stwb).
// 8 elements as they sit in their 16-byte words, in registers. T's default
// constructor is trivial (float, double, c10::Half, c10::BFloat16), so this is a
// plain union.
template <typename T>
union Vec8 {
  uint4 w[8 * sizeof(T) / 16];
  T v[8];
};

template <typename T>
__device__ __forceinline__ Vec8<T> ldg8(const T* __restrict__ p) {
  Vec8<T> u;
#pragma unroll
  for (int k = 0; k < int(8 * sizeof(T) / 16); ++k) u.w[k] = __ldg(reinterpret_cast<const uint4*>(p) + k);
  return u;
}

template <typename T>
__device__ __forceinline__ void stg8(T* __restrict__ p, const Vec8<T>& u) {
#pragma unroll
  for (int k = 0; k < int(8 * sizeof(T) / 16); ++k) __stwb(reinterpret_cast<uint4*>(p) + k, u.w[k]);
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int num_sms() { return RF_NUM_SMS(); }

// Grid size for the elementwise kernels: enough blocks for the groups, at most a
// few waves (grid-stride loop). For NHWC, the block count is rounded so that the
// grid stride is a multiple of C: each thread then always sees the same channels
// and loads their parameters once.
int64_t elementwise_blocks(int64_t ngroups, const Layout& l) {
  int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((ngroups + kThreads - 1) / kThreads,
                                                          int64_t(num_sms()) * 16));
  if (l.nhwc && l.C % 8 == 0) {
    const int64_t cg = l.C / 8;
    const int64_t q = cg / std::gcd<int64_t>(cg, kThreads);
    if (q > 1 && q <= 4096) blocks = (blocks + q - 1) / q * q;
  }
  return blocks;
}

// The channel of a grid-stride loop's group (and, for the scalar path, the position
// of its first element in the channel's run), advanced by D elements per step with
// additions only: a 64-bit division per group would cost a large share of the issue
// slots of these bandwidth-bound kernels. inner = HW (NCHW) or 1 (NHWC).
struct ChanIter {
  int64_t ch, pos, inner, C, d_pos, d_ch;
  __device__ __forceinline__ ChanIter(int64_t base, int64_t D, bool nhwc, int64_t C_, int64_t HW)
      : inner(nhwc ? 1 : HW), C(C_) {
    pos = base % inner;
    ch = (base / inner) % C;
    d_pos = D % inner;
    d_ch = (D / inner) % C;
  }
  __device__ __forceinline__ void advance() {
    pos += d_pos;
    int64_t carry = d_ch;  // <= C - 1
    if (pos >= inner) {
      pos -= inner;
      carry += 1;
    }
    ch += carry;  // < 2C
    if (ch >= C) ch -= C;
  }
};

// One element forward from (ch, pos): the scalar paths' per-element channel.
__device__ __forceinline__ void step1(int64_t& ch, int64_t& pos, int64_t inner, int64_t C) {
  if (++pos == inner) {
    pos = 0;
    if (++ch == C) ch = 0;
  }
}

// The vector kernels' layout condition; it implies numel % 8 == 0 (no partial group).
bool vec_layout_ok(const Layout& l) { return l.nhwc ? l.C % 8 == 0 : l.HW() % 8 == 0; }

}  // namespace
}  // namespace resnet_fused
