// CUDA kernels of the gate ops (schemas.py GATE_OPS; README.md, Design, "Gates and pooled
// shortcuts"), the twins of the CPU kernels in ../gate_ops.cpp:
//   bn_pool               one reduction pass over c: per (n, c) sum_hw xhat, then
//                         pooled = w * sum / (H*W) + b as the sums are written;
//   bn_pool_backward      the same reduction, a per-channel finish over n, then one
//                         apply pass: training BN's backward of grad_pooled[n, c] / (H*W);
//   bn_gate_act           one pass, relu(gate[n, c] * bn(c) + residual) and the packed mask;
//   bn_gate_act_backward  one reduction pass over grad_out, mask and c giving per (n, c)
//                         sum_hw g and sum_hw g * xhat (g = mask ? grad_out : 0), a
//                         per-channel finish over n that yields the BN's sums of
//                         gy = g * gate and the gate's gradient sum_hw g * y =
//                         w * sum g * xhat + b * sum g, then one apply pass;
//   gate_shortcut_relu    the projection through ATen (cuDNN), then one pass
//                         relu(gate[n, c] * y + shortcut + shortcut_bias[c]).
// The gate is (N|1, C|1, 1, 1) in the statistics dtype: element (n, c) at n*sN + c*sC.
//
// Elementwise passes walk groups of 8 physical elements as bn_kernels.cu does (16-byte
// vector path when NHWC has C % 8 == 0 or NCHW H*W % 8 == 0 and the pointers are
// aligned; a scalar path otherwise); a group of the vector path lies in one sample, so
// its gate values are gate[n, ch0 + j] (NHWC) or gate[n, ch] (NCHW). The per-(n, c)
// reductions: NCHW, one warp per (n, c) plane (vector loads when H*W % 8 == 0); NHWC, a
// block per (sample, 32 channels), threads down the rows, a tree over them in shared
// memory. Deterministic (no atomics), no host synchronisation.
//
// Compiled into the emulation of csrc/emu like bn_kernels.cu (RF_* macros in
// kernel_util.cuh), so tests/test_native_emulation.py runs these kernels on the CPU.
#include "kernel_util.cuh"

namespace resnet_fused {
namespace {

// The sample of a grid-stride loop's group, advanced by D elements per step with
// additions only, as ChanIter advances the channel (a sample is C*H*W consecutive
// elements in both layouts).
struct SampleIter {
  int64_t n, r, chw, d_n, d_r;
  __device__ __forceinline__ SampleIter(int64_t base, int64_t D, int64_t CHW) : chw(CHW) {
    n = base / CHW;
    r = base % CHW;
    d_n = D / CHW;
    d_r = D % CHW;
  }
  __device__ __forceinline__ void advance() {
    r += d_r;
    n += d_n;
    if (r >= chw) {
      r -= chw;
      ++n;
    }
  }
};

__device__ __forceinline__ void step_sample(int64_t& n, int64_t& r, int64_t chw) {
  if (++r == chw) {
    r = 0;
    ++n;
  }
}

// A per-(n, c) operand: the gate (sN = C or 0, sC = 1 or 0), or grad_pooled (C, 1).
template <typename A>
struct NcRef {
  const A* p;
  int64_t sN, sC;
  __device__ __forceinline__ A at(int64_t n, int64_t c) const { return p[n * sN + c * sC]; }
};

template <typename A>
__device__ __forceinline__ A relu_keep_nan(A v) {
  return v > A(0) || v != v ? v : A(0);  // NaN stays NaN, as F.relu
}

// ============================================================ per-(n, c) reductions
// kXhat: a = sum_hw xhat;  kGrad: a = sum_hw g, b = sum_hw g * xhat;
// xhat = (c - mean) * invstd, g = mask ? dy : 0.
enum PlaneMode { kXhat = 0, kGrad = 1 };

template <typename A, int MODE>
struct PlaneAcc {
  A k, s, a, b;
  __device__ __forceinline__ void add(A x, A dy, bool bit) {
    const A xh = (x - k) * s;
    if constexpr (MODE == kXhat) {
      a += xh;
    } else {
      const A g = bit ? dy : A(0);
      a += g;
      b += g * xh;
    }
  }
};

// What the reductions write for plane p = n*C + c: out_a[p] = a, or, with an affine
// (bn_pool), w[c] * a * inv_hw + bias[c]; out_b[p] = b (kGrad).
template <typename A>
struct PlaneOut {
  A* a;
  A* b;
  const A* w;  // null: the raw sum
  const A* bias;
  A inv_hw;
  __device__ __forceinline__ void write(int64_t p, int64_t c, A va, A vb) const {
    a[p] = w != nullptr ? w[c] * va * inv_hw + bias[c] : va;
    if (b != nullptr) b[p] = vb;
  }
};

// NCHW: a warp per plane (8 per block), lanes striding over its H*W elements (groups of
// 8 with VEC), then a warp shuffle sum. Every lane reaches the shuffles.
template <typename T, typename A, int MODE, bool VEC>
__global__ void __launch_bounds__(kThreads) plane_reduce_nchw_kernel(
    const T* __restrict__ x, const T* __restrict__ dy, const uint8_t* __restrict__ mask,
    const A* __restrict__ mean, const A* __restrict__ invstd, int64_t planes, int64_t C, int64_t HW,
    PlaneOut<A> out) {
  const int lane = threadIdx.x & 31;
  const int64_t p = int64_t(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  const int64_t c = p % C;
  PlaneAcc<A, MODE> acc{A(0), A(0), A(0), A(0)};
  if (p < planes) {
    acc.k = mean[c];
    acc.s = invstd[c];
    const int64_t base = p * HW;
    if constexpr (VEC) {
      for (int64_t j = int64_t(lane) * 8; j < HW; j += 32 * 8) {
        const Vec8<T> xv = ldg8(x + base + j);
        Vec8<T> dv;
        uint8_t bits = 0;
        if constexpr (MODE == kGrad) {
          dv = ldg8(dy + base + j);
          bits = mask[(base + j) >> 3];  // base + j % 8 == 0: the group's own byte
        }
#pragma unroll
        for (int v = 0; v < 8; ++v)
          acc.add(static_cast<A>(xv.v[v]), MODE == kGrad ? static_cast<A>(dv.v[v]) : A(0), (bits >> v) & 1);
      }
    } else {
      for (int64_t j = lane; j < HW; j += 32) {
        const int64_t i = base + j;
        if constexpr (MODE == kGrad)
          acc.add(static_cast<A>(x[i]), static_cast<A>(dy[i]), (mask[i >> 3] >> (i & 7)) & 1);
        else
          acc.add(static_cast<A>(x[i]), A(0), false);
      }
    }
  }
  A a = acc.a, b = acc.b;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, o);
    b += __shfl_down_sync(0xffffffffu, b, o);
  }
  if (lane == 0 && p < planes) out.write(p, c, a, b);
}

// NHWC: block (TX, TY), TX * TY = kThreads; block x = (sample n, channel block): thread
// (tx, ty) owns channel cb * TX + tx and walks rows ty, ty + TY, ... of sample n (each row
// is C consecutive elements, so a warp's loads are contiguous), then a tree over ty.
template <typename T, typename A, int MODE>
__global__ void __launch_bounds__(kThreads) plane_reduce_nhwc_kernel(
    const T* __restrict__ x, const T* __restrict__ dy, const uint8_t* __restrict__ mask,
    const A* __restrict__ mean, const A* __restrict__ invstd, int64_t C, int64_t HW, int64_t cblocks,
    PlaneOut<A> out) {
  __shared__ A sa[kThreads];
  __shared__ A sb[kThreads];
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int64_t n = blockIdx.x / cblocks;
  const int64_t c = (blockIdx.x % cblocks) * TX + tx;
  PlaneAcc<A, MODE> acc{A(0), A(0), A(0), A(0)};
  if (c < C) {
    acc.k = mean[c];
    acc.s = invstd[c];
    for (int64_t hw = ty; hw < HW; hw += TY) {
      const int64_t i = (n * HW + hw) * C + c;
      if constexpr (MODE == kGrad)
        acc.add(static_cast<A>(x[i]), static_cast<A>(dy[i]), (mask[i >> 3] >> (i & 7)) & 1);
      else
        acc.add(static_cast<A>(x[i]), A(0), false);
    }
  }
  const int tid = ty * TX + tx;
  sa[tid] = acc.a;
  sb[tid] = acc.b;
  __syncthreads();
  for (int s = TY / 2; s > 0; s >>= 1) {
    if (ty < s) {
      sa[tid] += sa[tid + s * TX];
      sb[tid] += sb[tid + s * TX];
    }
    __syncthreads();
  }
  if (ty == 0 && c < C) out.write(n * C + c, c, sa[tx], sb[tx]);
}

template <typename T, typename A, int MODE>
void plane_reduce(const Layout& l, const T* x, const T* dy, const uint8_t* mask, const A* mean,
                  const A* invstd, bool aligned, PlaneOut<A> out) {
  auto stream = RF_STREAM();
  if (l.nhwc) {
    int TX = 1;
    while (TX < l.C && TX < 32) TX *= 2;
    const int TY = kThreads / TX;
    const int64_t cblocks = (l.C + TX - 1) / TX;
    const int64_t blocks = l.N * cblocks;
    TORCH_CHECK(blocks <= 2147483647, "per-(n, c) reduction: N * ceil(C / 32) = ", blocks,
                " blocks exceed the grid limit");
    auto kernel = plane_reduce_nhwc_kernel<T, A, MODE>;
    RF_LAUNCH(kernel, dim3(static_cast<unsigned>(blocks)), dim3(TX, TY), stream, x, dy, mask, mean, invstd,
              l.C, l.HW(), cblocks, out);
  } else {
    const int64_t planes = l.N * l.C;
    const int64_t blocks = (planes + kThreads / 32 - 1) / (kThreads / 32);
    TORCH_CHECK(blocks <= 2147483647, "per-(n, c) reduction: N * C = ", planes, " planes exceed the grid limit");
    const bool vec = aligned && l.HW() % 8 == 0;
    auto kernel = vec ? plane_reduce_nchw_kernel<T, A, MODE, true> : plane_reduce_nchw_kernel<T, A, MODE, false>;
    RF_LAUNCH(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), stream, x, dy, mask, mean, invstd,
              planes, l.C, l.HW(), out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ============================================================ per-channel finish over n
// A thread per channel sums over the N samples in order (deterministic; N is small next to
// C*H*W, and consecutive threads read consecutive channels):
//   sum1[c] = sum_n u[n, c] * a[n, c]  (a null: 1),  sum2[c] = sum_n u[n, c] * b[n, c] * scale_b,
// and, when gg is given, gg[n, c] = w[c] * b[n, c] + bias[c] * a[n, c].
//   bn_gate_act_backward: u = gate, a = sum_hw g, b = sum_hw g * xhat, scale_b = 1: the BN's
//     sums of gy = g * gate, and gg the gate's gradient per (n, c) (sum_hw g * y), summed
//     to the gate's shape afterwards where the gate broadcasts;
//   bn_pool_backward: u = grad_pooled, a = null, b = sum_hw xhat, scale_b = 1 / (H*W):
//     grad_bias and grad_weight.
template <typename A>
__global__ void __launch_bounds__(kThreads) channel_finish_kernel(
    NcRef<A> u, const A* __restrict__ a, const A* __restrict__ b, A scale_b, const A* __restrict__ w,
    const A* __restrict__ bias, int64_t N, int64_t C, A* __restrict__ sum1, A* __restrict__ sum2,
    A* __restrict__ gg) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  A s1 = A(0), s2 = A(0);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t p = n * C + c;
    const A un = u.at(n, c);
    const A an = a != nullptr ? a[p] : A(1);
    s1 += un * an;
    s2 += un * b[p] * scale_b;
    if (gg != nullptr) gg[p] = w[c] * b[p] + bias[c] * an;
  }
  sum1[c] = s1;
  sum2[c] = s2;
}

template <typename A>
void channel_finish(NcRef<A> u, const A* a, const A* b, A scale_b, const A* w, const A* bias, int64_t N,
                    int64_t C, A* sum1, A* sum2, A* gg) {
  auto kernel = channel_finish_kernel<A>;
  RF_LAUNCH(kernel, dim3(static_cast<unsigned>((C + kThreads - 1) / kThreads)), dim3(kThreads), RF_STREAM(),
            u, a, b, scale_b, w, bias, N, C, sum1, sum2, gg);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ============================================================ joins
// v = gate[n, c] * (s * x + t) + r + u: bn_gate_act (BN: s = w*invstd, t = b - mean*s, u = 0;
// r the residual), gate_shortcut_relu (not BN: s = 1, t = 0, u = the shortcut's bias or 0;
// r the shortcut). out = relu(v); the mask of out > 0 when MASK.
template <typename A, bool BN>
struct JoinParams {
  const A* mean;
  const A* invstd;
  const A* weight;
  const A* bias;  // BN: the BN's bias; else the shortcut's bias, or null
  __device__ __forceinline__ void coeffs(int64_t ch, A& s, A& t, A& u) const {
    if constexpr (BN) {
      s = weight[ch] * invstd[ch];
      t = bias[ch] - mean[ch] * s;
      u = A(0);
    } else {
      s = A(1);
      t = A(0);
      u = bias != nullptr ? bias[ch] : A(0);
    }
  }
};

template <typename T, typename A, bool BN, bool MASK>
__global__ void __launch_bounds__(kThreads) gate_join_vec_kernel(
    const T* __restrict__ x, const T* __restrict__ res, JoinParams<A, BN> jp, NcRef<A> gate,
    T* __restrict__ out, uint8_t* __restrict__ mask, int64_t ngroups, int64_t C, int64_t HW, bool nhwc) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t g0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  ChanIter it(g0 * 8, stride * 8, nhwc, C, HW);
  SampleIter sn(g0 * 8, stride * 8, C * HW);
  int64_t cached = -1;  // channel (NHWC: first channel) whose coefficients are in s/t/u
  A s[8], t[8], u[8];
  for (int64_t g = g0; g < ngroups; g += stride, it.advance(), sn.advance()) {
    const Vec8<T> xv = ldg8(x + g * 8);
    Vec8<T> rv{};
    if (res != nullptr) rv = ldg8(res + g * 8);
    if (it.ch != cached) {
#pragma unroll
      for (int j = 0; j < 8; ++j) jp.coeffs(nhwc ? it.ch + j : it.ch, s[j], t[j], u[j]);
      cached = it.ch;
    }
    Vec8<T> ov;
    uint8_t bits = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      A v = gate.at(sn.n, nhwc ? it.ch + j : it.ch) * (s[j] * static_cast<A>(xv.v[j]) + t[j]) + u[j];
      if (res != nullptr) v += static_cast<A>(rv.v[j]);
      const T o = static_cast<T>(relu_keep_nan(v));
      ov.v[j] = o;
      bits |= static_cast<uint8_t>(static_cast<A>(o) > A(0)) << j;
    }
    stg8(out + g * 8, ov);
    if constexpr (MASK) mask[g] = bits;
  }
}

// Scalar path (any C, H*W, alignment; numel need not be a multiple of 8): a thread owns
// whole groups of 8, so it alone writes the group's mask byte.
template <typename T, typename A, bool BN, bool MASK>
__global__ void __launch_bounds__(kThreads) gate_join_scalar_kernel(
    const T* __restrict__ x, const T* __restrict__ res, JoinParams<A, BN> jp, NcRef<A> gate,
    T* __restrict__ out, uint8_t* __restrict__ mask, int64_t numel, int64_t C, int64_t HW, bool nhwc) {
  const int64_t ngroups = (numel + 7) / 8;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t g0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  ChanIter it(g0 * 8, stride * 8, nhwc, C, HW);
  SampleIter sn(g0 * 8, stride * 8, C * HW);
  for (int64_t g = g0; g < ngroups; g += stride, it.advance(), sn.advance()) {
    const int64_t base = g * 8;
    int64_t ch = it.ch, pos = it.pos, n = sn.n, r = sn.r;
    uint8_t bits = 0;
    for (int j = 0; j < 8 && base + j < numel; ++j, step1(ch, pos, it.inner, C), step_sample(n, r, sn.chw)) {
      const int64_t i = base + j;
      A s, t, u;
      jp.coeffs(ch, s, t, u);
      A v = gate.at(n, ch) * (s * static_cast<A>(x[i]) + t) + u;
      if (res != nullptr) v += static_cast<A>(res[i]);
      const T o = static_cast<T>(relu_keep_nan(v));
      out[i] = o;
      bits |= static_cast<uint8_t>(static_cast<A>(o) > A(0)) << j;
    }
    if constexpr (MASK) mask[g] = bits;
  }
}

template <typename T, typename A, bool BN, bool MASK>
void gate_join(const Layout& l, const T* x, const T* res, JoinParams<A, BN> jp, NcRef<A> gate, T* out,
               uint8_t* mask, bool aligned) {
  const int64_t numel = l.numel();
  const bool vec = aligned && vec_layout_ok(l);
  const int64_t blocks = elementwise_blocks(mask_bytes(numel), l);
  const dim3 grid(static_cast<unsigned>(blocks)), block(kThreads);
  auto stream = RF_STREAM();
  if (vec) {
    auto kernel = gate_join_vec_kernel<T, A, BN, MASK>;
    RF_LAUNCH(kernel, grid, block, stream, x, res, jp, gate, out, mask, numel / 8, l.C, l.HW(), l.nhwc);
  } else {
    auto kernel = gate_join_scalar_kernel<T, A, BN, MASK>;
    RF_LAUNCH(kernel, grid, block, stream, x, res, jp, gate, out, mask, numel, l.C, l.HW(), l.nhwc);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ============================================================ backward apply
// grad_c = ka * (v - sum1 * inv_m) - kb * (c - mean), ka = w * invstd,
// kb = ka * invstd * sum2 * inv_m: training BN's backward of the branch gradient
// v = g * gate[n, c] (FROM_DY: bn_gate_act_backward, g = mask ? dy : 0, grad_res = g when
// asked) or v = q[n, c] * inv_hw (bn_pool_backward: q = grad_pooled).
template <typename A>
struct ApplyParams {
  const A* mean;
  const A* invstd;
  const A* weight;
  const A* sum1;
  const A* sum2;
  A inv_m, inv_hw;
  __device__ __forceinline__ void coeffs(int64_t ch, A& ka, A& kmb, A& kb, A& mu) const {
    const A is = invstd[ch];
    ka = weight[ch] * is;
    kmb = sum1[ch] * inv_m;
    kb = ka * is * sum2[ch] * inv_m;
    mu = mean[ch];
  }
};

template <typename T, typename A, bool FROM_DY>
__global__ void __launch_bounds__(kThreads) gate_apply_vec_kernel(
    const T* __restrict__ dy, const uint8_t* __restrict__ mask, const T* __restrict__ c, ApplyParams<A> ap,
    NcRef<A> q, T* __restrict__ grad_c, T* __restrict__ grad_res, int64_t ngroups, int64_t C, int64_t HW,
    bool nhwc) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t g0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  ChanIter it(g0 * 8, stride * 8, nhwc, C, HW);
  SampleIter sn(g0 * 8, stride * 8, C * HW);
  int64_t cached = -1;
  A ka[8], kmb[8], kb[8], mu[8];
  for (int64_t g = g0; g < ngroups; g += stride, it.advance(), sn.advance()) {
    const Vec8<T> cv = ldg8(c + g * 8);
    Vec8<T> dv{};
    uint8_t bits = 0;
    if constexpr (FROM_DY) {
      dv = ldg8(dy + g * 8);
      bits = mask[g];
    }
    if (it.ch != cached) {
#pragma unroll
      for (int j = 0; j < 8; ++j) ap.coeffs(nhwc ? it.ch + j : it.ch, ka[j], kmb[j], kb[j], mu[j]);
      cached = it.ch;
    }
    Vec8<T> gc, gr;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const A qv = q.at(sn.n, nhwc ? it.ch + j : it.ch);
      A gval = A(0), v;
      if constexpr (FROM_DY) {
        gval = ((bits >> j) & 1) ? static_cast<A>(dv.v[j]) : A(0);
        v = gval * qv;
      } else {
        v = qv * ap.inv_hw;
      }
      gc.v[j] = static_cast<T>(ka[j] * (v - kmb[j]) - kb[j] * (static_cast<A>(cv.v[j]) - mu[j]));
      gr.v[j] = static_cast<T>(gval);
    }
    stg8(grad_c + g * 8, gc);
    if (grad_res != nullptr) stg8(grad_res + g * 8, gr);
  }
}

template <typename T, typename A, bool FROM_DY>
__global__ void __launch_bounds__(kThreads) gate_apply_scalar_kernel(
    const T* __restrict__ dy, const uint8_t* __restrict__ mask, const T* __restrict__ c, ApplyParams<A> ap,
    NcRef<A> q, T* __restrict__ grad_c, T* __restrict__ grad_res, int64_t numel, int64_t C, int64_t HW,
    bool nhwc) {
  const int64_t ngroups = (numel + 7) / 8;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t g0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  ChanIter it(g0 * 8, stride * 8, nhwc, C, HW);
  SampleIter sn(g0 * 8, stride * 8, C * HW);
  for (int64_t g = g0; g < ngroups; g += stride, it.advance(), sn.advance()) {
    const int64_t base = g * 8;
    const uint8_t bits = FROM_DY ? mask[g] : uint8_t(0);
    int64_t ch = it.ch, pos = it.pos, n = sn.n, r = sn.r;
    for (int j = 0; j < 8 && base + j < numel; ++j, step1(ch, pos, it.inner, C), step_sample(n, r, sn.chw)) {
      const int64_t i = base + j;
      A ka, kmb, kb, mu;
      ap.coeffs(ch, ka, kmb, kb, mu);
      const A qv = q.at(n, ch);
      A gval = A(0), v;
      if constexpr (FROM_DY) {
        gval = ((bits >> j) & 1) ? static_cast<A>(dy[i]) : A(0);
        v = gval * qv;
      } else {
        v = qv * ap.inv_hw;
      }
      grad_c[i] = static_cast<T>(ka * (v - kmb) - kb * (static_cast<A>(c[i]) - mu));
      if (grad_res != nullptr) grad_res[i] = static_cast<T>(gval);
    }
  }
}

template <typename T, typename A, bool FROM_DY>
void gate_apply(const Layout& l, const T* dy, const uint8_t* mask, const T* c, ApplyParams<A> ap, NcRef<A> q,
                T* grad_c, T* grad_res, bool aligned) {
  const int64_t numel = l.numel();
  const bool vec = aligned && vec_layout_ok(l);
  const int64_t blocks = elementwise_blocks(mask_bytes(numel), l);
  const dim3 grid(static_cast<unsigned>(blocks)), block(kThreads);
  auto stream = RF_STREAM();
  if (vec) {
    auto kernel = gate_apply_vec_kernel<T, A, FROM_DY>;
    RF_LAUNCH(kernel, grid, block, stream, dy, mask, c, ap, q, grad_c, grad_res, numel / 8, l.C, l.HW(), l.nhwc);
  } else {
    auto kernel = gate_apply_scalar_kernel<T, A, FROM_DY>;
    RF_LAUNCH(kernel, grid, block, stream, dy, mask, c, ap, q, grad_c, grad_res, numel, l.C, l.HW(), l.nhwc);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ============================================================ entries
void check_device(const char* op, const Tensor& t) {
  TORCH_CHECK(RF_IS_DEVICE(t), op, ": expected a CUDA tensor, got ", t.device());
}

// The gate in the statistics dtype, contiguous, with its (n, c) strides.
template <typename A>
NcRef<A> gate_ref(const Tensor& g, const GateIndex& gi) {
  return {g.const_data_ptr<A>(), gi.sN, gi.sC};
}

Tensor bn_pool_cuda(const Tensor& c, const Tensor& mean, const Tensor& invstd, const Tensor& weight,
                    const Tensor& bias) {
  const char* op = "bn_pool";
  const Layout l = check_activation(op, "c", c);
  check_device(op, c);
  check_stats_args(op, c, l, mean, invstd, weight);
  check_channel_vec(op, "bias", bias, l.C, c, std::nullopt);
  TORCH_CHECK(l.HW() > 0, op, ": c must have H, W > 0 to be pooled, got shape ", shape_str(c));
  RF_DEVICE_GUARD(c.device());
  const auto sdt = stat_dtype(c.scalar_type());
  Tensor pooled = at::empty({l.N, l.C}, c.options().dtype(sdt));
  if (l.N == 0) return pooled;
  const Tensor w = weight.to(sdt), b = bias.to(sdt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "bn_pool_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const PlaneOut<A> out{pooled.data_ptr<A>(), nullptr, w.const_data_ptr<A>(), b.const_data_ptr<A>(),
                          A(1) / static_cast<A>(l.HW())};
    plane_reduce<scalar_t, A, kXhat>(l, c.const_data_ptr<scalar_t>(), nullptr, nullptr, mean.const_data_ptr<A>(),
                                     invstd.const_data_ptr<A>(), aligned16(c.const_data_ptr()), out);
  });
  return pooled;
}

std::tuple<Tensor, Tensor, Tensor> bn_pool_backward_cuda(const Tensor& grad_pooled, const Tensor& c,
                                                         const Tensor& mean, const Tensor& invstd,
                                                         const Tensor& weight) {
  const char* op = "bn_pool_backward";
  const Layout l = check_activation(op, "c", c);
  check_device(op, c);
  check_pooled(op, grad_pooled, c, l);
  check_stats_args(op, c, l, mean, invstd, weight);
  TORCH_CHECK(c.numel() > 0, op, ": c must not be empty");
  RF_DEVICE_GUARD(c.device());
  const auto sdt = stat_dtype(c.scalar_type());
  const Tensor w = weight.to(sdt), gp = grad_pooled.to(sdt).contiguous();
  Tensor grad_c = at::empty_like(c);
  Tensor gw = at::empty({l.C}, c.options().dtype(sdt)), gb = at::empty({l.C}, c.options().dtype(sdt));
  Tensor sx = at::empty({l.N, l.C}, c.options().dtype(sdt));
  const bool aligned = aligned16(c.const_data_ptr()) && aligned16(grad_c.data_ptr());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "bn_pool_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const A inv_hw = A(1) / static_cast<A>(l.HW());
    const A* pm = mean.const_data_ptr<A>();
    const A* pi = invstd.const_data_ptr<A>();
    // Pass 1: sum_hw xhat per (n, c).
    plane_reduce<scalar_t, A, kXhat>(l, c.const_data_ptr<scalar_t>(), nullptr, nullptr, pm, pi, aligned,
                                     PlaneOut<A>{sx.data_ptr<A>(), nullptr, nullptr, nullptr, A(0)});
    // grad_bias = sum_n gp;  grad_weight = sum_n gp * sum_hw xhat / (H*W).
    const NcRef<A> gpr{gp.const_data_ptr<A>(), l.C, 1};
    channel_finish<A>(gpr, nullptr, sx.const_data_ptr<A>(), inv_hw, nullptr, nullptr, l.N, l.C,
                      gb.data_ptr<A>(), gw.data_ptr<A>(), nullptr);
    // Pass 2: training BN's backward of gp[n, c] / (H*W).
    const ApplyParams<A> ap{pm, pi, w.const_data_ptr<A>(), gb.const_data_ptr<A>(), gw.const_data_ptr<A>(),
                            A(1) / static_cast<A>(l.N * l.HW()), inv_hw};
    gate_apply<scalar_t, A, false>(l, nullptr, nullptr, c.const_data_ptr<scalar_t>(), ap, gpr,
                                   grad_c.data_ptr<scalar_t>(), nullptr, aligned);
  });
  return {grad_c, gw, gb};
}

std::tuple<Tensor, Tensor> bn_gate_act_cuda(const Tensor& c, const Tensor& mean, const Tensor& invstd,
                                            const Tensor& weight, const Tensor& bias, const Tensor& gate,
                                            const std::optional<Tensor>& residual) {
  const char* op = "bn_gate_act";
  const Layout l = check_activation(op, "c", c);
  check_device(op, c);
  check_stats_args(op, c, l, mean, invstd, weight);
  check_channel_vec(op, "bias", bias, l.C, c, std::nullopt);
  const GateIndex gi = check_gate(op, gate, "c", c, l);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) check_like(op, "residual", *residual, "c", c, l);
  RF_DEVICE_GUARD(c.device());
  Tensor out = at::empty_like(c);
  const int64_t numel = c.numel();
  Tensor mask = at::empty({mask_bytes(numel)}, c.options().dtype(at::kByte));
  if (numel == 0) return {out, mask};
  const auto sdt = stat_dtype(c.scalar_type());
  const Tensor w = weight.to(sdt), b = bias.to(sdt), g = gate.to(sdt).contiguous();
  const bool aligned = aligned16(c.const_data_ptr()) && aligned16(out.data_ptr()) &&
                       (!has_res || aligned16(residual->const_data_ptr()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "bn_gate_act_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const JoinParams<A, true> jp{mean.const_data_ptr<A>(), invstd.const_data_ptr<A>(), w.const_data_ptr<A>(),
                                 b.const_data_ptr<A>()};
    gate_join<scalar_t, A, true, true>(l, c.const_data_ptr<scalar_t>(),
                                       has_res ? residual->const_data_ptr<scalar_t>() : nullptr, jp,
                                       gate_ref<A>(g, gi), out.data_ptr<scalar_t>(), mask.data_ptr<uint8_t>(),
                                       aligned);
  });
  return {out, mask};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bn_gate_act_backward_cuda(
    const Tensor& grad_out, const Tensor& mask, const Tensor& c, const Tensor& mean, const Tensor& invstd,
    const Tensor& weight, const Tensor& bias, const Tensor& gate, bool residual_grad) {
  const char* op = "bn_gate_act_backward";
  const Layout l = check_activation(op, "c", c);
  check_device(op, c);
  check_like(op, "grad_out", grad_out, "c", c, l);
  check_mask(op, mask, c);
  check_stats_args(op, c, l, mean, invstd, weight);
  check_channel_vec(op, "bias", bias, l.C, c, std::nullopt);
  const GateIndex gi = check_gate(op, gate, "c", c, l);
  TORCH_CHECK(c.numel() > 0, op, ": c must not be empty");
  RF_DEVICE_GUARD(c.device());
  const auto sdt = stat_dtype(c.scalar_type());
  const Tensor w = weight.to(sdt), b = bias.to(sdt), g = gate.to(sdt).contiguous();
  Tensor grad_c = at::empty_like(c);
  Tensor grad_res = residual_grad ? at::empty_like(c) : at::empty({0}, c.options());
  Tensor gw = at::empty({l.C}, c.options().dtype(sdt)), gb = at::empty({l.C}, c.options().dtype(sdt));
  Tensor sg = at::empty({l.N, l.C}, c.options().dtype(sdt)), sgx = at::empty({l.N, l.C}, c.options().dtype(sdt));
  Tensor gg = at::empty({l.N, l.C}, c.options().dtype(sdt));
  const bool aligned = aligned16(c.const_data_ptr()) && aligned16(grad_out.const_data_ptr()) &&
                       aligned16(grad_c.data_ptr()) && (!residual_grad || aligned16(grad_res.data_ptr()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "bn_gate_act_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const A* pm = mean.const_data_ptr<A>();
    const A* pi = invstd.const_data_ptr<A>();
    const scalar_t* pdy = grad_out.const_data_ptr<scalar_t>();
    const uint8_t* pmask = mask.const_data_ptr<uint8_t>();
    // Pass 1: sum_hw g and sum_hw g * xhat per (n, c), one read of grad_out, mask and c.
    plane_reduce<scalar_t, A, kGrad>(l, c.const_data_ptr<scalar_t>(), pdy, pmask, pm, pi, aligned,
                                     PlaneOut<A>{sg.data_ptr<A>(), sgx.data_ptr<A>(), nullptr, nullptr, A(0)});
    // The BN's sums of gy = g * gate, and the gate's gradient per (n, c).
    const NcRef<A> gr = gate_ref<A>(g, gi);
    channel_finish<A>(gr, sg.const_data_ptr<A>(), sgx.const_data_ptr<A>(), A(1), w.const_data_ptr<A>(),
                      b.const_data_ptr<A>(), l.N, l.C, gb.data_ptr<A>(), gw.data_ptr<A>(), gg.data_ptr<A>());
    // Pass 2: training BN's backward of gy.
    const ApplyParams<A> ap{pm, pi, w.const_data_ptr<A>(), gb.const_data_ptr<A>(), gw.const_data_ptr<A>(),
                            A(1) / static_cast<A>(l.N * l.HW()), A(0)};
    gate_apply<scalar_t, A, true>(l, pdy, pmask, c.const_data_ptr<scalar_t>(), ap, gr,
                                  grad_c.data_ptr<scalar_t>(), residual_grad ? grad_res.data_ptr<scalar_t>() : nullptr,
                                  aligned);
  });
  // The gate's gradient in its own shape: summed over the dimensions it broadcasts along
  // (an (N, C) -> (N, 1) or (1, C) sum of the small per-(n, c) tensor).
  std::vector<int64_t> dims;
  if (gate.size(0) == 1 && l.N != 1) dims.push_back(0);
  if (gate.size(1) == 1 && l.C != 1) dims.push_back(1);
  const Tensor grad_gate = (dims.empty() ? gg : gg.sum(dims, /*keepdim=*/true)).reshape(gate.sizes());
  return {grad_c, gw, gb, grad_gate, grad_res};
}

Tensor gate_shortcut_relu_cuda(const Tensor& y, const Tensor& gate, const Tensor& x,
                               const std::optional<Tensor>& shortcut_weight,
                               const std::optional<Tensor>& shortcut_bias, int64_t shortcut_stride,
                               int64_t shortcut_padding) {
  const char* op = "gate_shortcut_relu";
  const Layout l = check_gate_shortcut(y, x, shortcut_weight, shortcut_bias, shortcut_stride, shortcut_padding);
  check_device(op, y);
  const GateIndex gi = check_gate(op, gate, "y", y, l);
  RF_DEVICE_GUARD(y.device());
  // The projection: ATen's convolution (cuDNN), without its bias, which the pass adds.
  const Tensor sc = shortcut_of(x, shortcut_weight, shortcut_stride, shortcut_padding).contiguous(format_of(l));
  const bool has_bias = shortcut_bias.has_value() && shortcut_bias->defined();
  Tensor out = at::empty_like(y);
  if (y.numel() == 0) return out;
  const auto sdt = stat_dtype(y.scalar_type());
  const Tensor g = gate.to(sdt).contiguous();
  const Tensor sb = has_bias ? shortcut_bias->to(sdt).contiguous() : Tensor();
  const bool aligned = aligned16(y.const_data_ptr()) && aligned16(sc.const_data_ptr()) && aligned16(out.data_ptr());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "gate_shortcut_relu_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const JoinParams<A, false> jp{nullptr, nullptr, nullptr, has_bias ? sb.const_data_ptr<A>() : nullptr};
    gate_join<scalar_t, A, false, false>(l, y.const_data_ptr<scalar_t>(), sc.const_data_ptr<scalar_t>(), jp,
                                         gate_ref<A>(g, gi), out.data_ptr<scalar_t>(), nullptr, aligned);
  });
  return out;
}

}  // namespace

#ifndef RESNET_FUSED_EMULATE
TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("bn_pool", &bn_pool_cuda);
  m.impl("bn_pool_backward", &bn_pool_backward_cuda);
  m.impl("bn_gate_act", &bn_gate_act_cuda);
  m.impl("bn_gate_act_backward", &bn_gate_act_backward_cuda);
  m.impl("gate_shortcut_relu", &gate_shortcut_relu_cuda);
}
#endif

}  // namespace resnet_fused
