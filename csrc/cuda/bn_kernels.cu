// CUDA kernels of the BatchNorm ops: channel_stats, bn_finalize, bn_act, bn_act_backward
// (and bn_frozen_act / bn_frozen_act_backward on the same kernels).
//
// Layout handling: activations are NCHW- or channels_last-contiguous (physical
// offset i; channel (i / HW) % C or i % C). Elementwise kernels work on groups of
// 8 consecutive physical elements, which is one byte of the packed ReLU mask, and
// load/store each group with 16-byte vector accesses when the group is aligned and
// shares a channel pattern (NHWC: C % 8 == 0; NCHW: H*W % 8 == 0); anything else
// (tails, odd C, misaligned views) takes a scalar path. Indices are int64.
//
// Reductions (channel_stats and pass 1 of bn_act_backward) are two-stage: a grid of
// blocks writes per-block partials per channel, then one small kernel combines the
// partials per channel (in double) and writes the result. channel_stats carries
// (count, mean, M2) throughout (Welford per thread, Chan's combine within a block, a
// two-pass weighted combine of the blocks' partials), so neither a large mean nor an
// outlier cancels the variance. No host synchronisation anywhere.
//
// The file also compiles as plain C++ with RESNET_FUSED_EMULATE defined (csrc/emu/):
// every CUDA thread then runs as a host thread, with real barriers and warp shuffles,
// on CPU tensors, so tests/test_native_emulation.py checks the kernels' index maths,
// launch configurations and reductions against the CPU kernels without a GPU. The
// RF_* macros (kernel_util.cuh) are the only places where the two builds differ.
#include "kernel_util.cuh"

namespace resnet_fused {
namespace {

using at::Tensor;

// ============================================================ per-channel reductions
// Mode kStats: per channel (count, mean, M2 = sum (x - mean)^2): Welford within a
//   thread, then Chan's pairwise combine of threads, warps and blocks; the blocks'
//   partials in two weighted passes (stage 2). Every
//   quantity is centred on a mean of the data it summarises, so one outlier (also the
//   channel's first element) costs no more than it does in torch.var in fp32. Sums of
//   (x - k)^2 around a fixed shift k do not have that property: with k an outlier v the
//   sums are ~M v^2 and var = E[(x-k)^2] - E[x-k]^2 cancels (5e-4 relative error at
//   v = 100 sigma in fp32).
// Mode kBwd:   a = sum(g), b = sum(g * (c - mean) * invstd), g = mask ? dy : 0: sums
//   around the known mean, which the forward's statistics already centred.
enum Mode { kStats = 0, kBwd = 1 };

// Chan et al.'s combination of summary b = (nb, mb, m2b) into a = (na, ma, m2a):
//   n = na + nb, d = mb - ma, mean = ma + d nb / n, M2 = M2a + M2b + d^2 na nb / n.
// nb == 0 leaves a as it is; na == 0 (with ma = m2a = 0) yields b exactly.
template <typename A>
__device__ __forceinline__ void chan_merge(int64_t& na, A& ma, A& m2a, int64_t nb, A mb, A m2b) {
  if (nb == 0) return;
  const int64_t n = na + nb;
  const A fb = static_cast<A>(nb) / static_cast<A>(n);
  const A d = mb - ma;
  ma += d * fb;
  m2a += m2b + d * d * (static_cast<A>(na) * fb);
  na = n;
}

// Resident blocks of 256 threads per SM the reduction grids are sized for (and the
// NHWC kernels are compiled for: __launch_bounds__ min-blocks caps them at 64 registers;
// float64, the gradcheck path, gets 2 so it does not spill).
constexpr int kReduceBlocksPerSM = 4;

// A thread's accumulator of one mode over V lanes (NHWC: V consecutive channels c0 + v;
// NCHW: V consecutive elements of one channel c0), fed one row of V values at a time.
// to_shared/merge_shared are the NHWC block's tree steps over slots of V lanes; fold
// and block_reduce the NCHW block's (lanes into lane 0, then threads into thread 0).
template <int MODE, typename A, int V>
struct Acc;

template <typename A, int V>
struct Acc<kStats, A, V> {
  int64_t n;  // rows seen, the same for every lane
  A inv;      // 1 / n
  A mean[V], m2[V];
  __device__ __forceinline__ void init(bool, int64_t, int64_t, const A*, const A*) {
    n = 0;
    inv = A(0);
#pragma unroll
    for (int v = 0; v < V; ++v) mean[v] = m2[v] = A(0);
  }
  __device__ __forceinline__ void next_row() {
    ++n;
    inv = A(1) / static_cast<A>(n);  // one division per row, shared by the V lanes
  }
  __device__ __forceinline__ void add(int v, A x, A, bool) {
    const A d = x - mean[v];
    mean[v] += d * inv;
    m2[v] += d * (x - mean[v]);
  }
  __device__ __forceinline__ void to_shared(A* s0, A* s1, int64_t* sn, int slot) const {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      s0[slot * V + v] = mean[v];
      s1[slot * V + v] = m2[v];
    }
    sn[slot] = n;
  }
  static __device__ __forceinline__ void merge_shared(A* s0, A* s1, int64_t* sn, int dst, int src) {
    const int64_t na = sn[dst], nb = sn[src];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      int64_t n_ = na;
      chan_merge(n_, s0[dst * V + v], s1[dst * V + v], nb, s0[src * V + v], s1[src * V + v]);
    }
    sn[dst] = na + nb;
  }
  // Lanes hold equal counts: a pairwise tree of merges, lane 0 ends with all V.
  __device__ __forceinline__ void fold() {
    int64_t cnt = n;
#pragma unroll
    for (int w = 1; w < V; w *= 2) {
#pragma unroll
      for (int v = 0; v + w < V; v += 2 * w) {
        int64_t na = cnt;
        chan_merge(na, mean[v], m2[v], cnt, mean[v + w], m2[v + w]);
      }
      cnt *= 2;
    }
    n = cnt;
  }
  __device__ __forceinline__ void block_reduce();
  __device__ __forceinline__ A out0() const { return mean[0]; }
  __device__ __forceinline__ A out1() const { return m2[0]; }
};

template <typename A, int V>
struct Acc<kBwd, A, V> {
  A k[V], s[V], a[V], b[V];  // mean, invstd of the lane's channel; the two sums
  // cstep: 1 when lane v is channel c0 + v (NHWC), 0 when every lane is channel c0.
  __device__ __forceinline__ void init(bool active, int64_t c0, int64_t cstep, const A* __restrict__ mean,
                                       const A* __restrict__ invstd) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      a[v] = b[v] = A(0);
      k[v] = active ? mean[c0 + v * cstep] : A(0);
      s[v] = active ? invstd[c0 + v * cstep] : A(0);
    }
  }
  __device__ __forceinline__ void next_row() {}
  __device__ __forceinline__ void add(int v, A x, A dy, bool bit) {
    const A g = bit ? dy : A(0);
    a[v] += g;
    b[v] += g * (x - k[v]) * s[v];
  }
  __device__ __forceinline__ void to_shared(A* s0, A* s1, int64_t*, int slot) const {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      s0[slot * V + v] = a[v];
      s1[slot * V + v] = b[v];
    }
  }
  static __device__ __forceinline__ void merge_shared(A* s0, A* s1, int64_t*, int dst, int src) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      s0[dst * V + v] += s0[src * V + v];
      s1[dst * V + v] += s1[src * V + v];
    }
  }
  __device__ __forceinline__ void fold() {
#pragma unroll
    for (int v = 1; v < V; ++v) {
      a[0] += a[v];
      b[0] += b[v];
    }
  }
  __device__ __forceinline__ void block_reduce();
  __device__ __forceinline__ A out0() const { return a[0]; }
  __device__ __forceinline__ A out1() const { return b[0]; }
};

// One row's worth of a thread's input, loaded but not yet converted: V consecutive
// elements of x (and of dy plus their mask bits in kBwd). Kept raw so that a thread
// can have several rows' loads in flight for the price of 4 registers (2-byte types)
// per 16-byte load.
template <typename T, int MODE, int V>
struct RowLoad {
  Vec8<T> xv, dv;  // V == 8
  T x1, d1;        // V == 1
  uint8_t bits;
  __device__ __forceinline__ void load(const T* __restrict__ x, const T* __restrict__ dy,
                                       const uint8_t* __restrict__ mask, int64_t off) {
    if constexpr (V == 8) {
      xv = ldg8(x + off);
      if constexpr (MODE == kBwd) {
        dv = ldg8(dy + off);
        bits = mask[off >> 3];  // off % 8 == 0: the group's own byte
      }
    } else {
      x1 = x[off];
      if constexpr (MODE == kBwd) {
        d1 = dy[off];
        bits = (mask[off >> 3] >> (off & 7)) & 1;
      }
    }
  }
  template <typename A>
  __device__ __forceinline__ void accumulate(Acc<MODE, A, V>& acc) const {
    acc.next_row();
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const A xa = static_cast<A>(V == 8 ? xv.v[v] : x1);
      if constexpr (MODE == kBwd) {
        acc.add(v, xa, static_cast<A>(V == 8 ? dv.v[v] : d1), (bits >> v) & 1);
      } else {
        acc.add(v, xa, A(0), false);
      }
    }
  }
};

// NHWC: block = TX x TY threads (TX * TY == 256, both powers of two); thread (tx, ty)
// owns V consecutive channels (V = 8: vector path, C % 8 == 0; V = 1: any C) and walks
// rows ty, ty + TY, ... of its block's row range (rows r = n*H*W + hw), unroll_rows
// rows per iteration with all their loads issued before any is used: for the
// statistics 4 rows of a 2-byte x, 2 of float, 1 of double (one, two, four 16-byte
// loads per row), for the backward 2 rows of x and dy (and mask bytes), i.e. about four
// 16-byte loads in flight per thread, at <= 64 registers so that 4 blocks fit an SM
// (kReduceBlocksPerSM; bench/NOTES.md has the ptxas numbers). 4 float rows would need
// 32 registers of loads next to the 8 Welford (mean, M2) pairs: ptxas spills.
// partial: [2][S][C], S = gridDim.x; kStats also writes count[S] (rows per block).
template <int MODE, typename T>
constexpr int unroll_rows() {
  if constexpr (MODE == kStats) return sizeof(T) >= 8 ? 1 : int(8 / sizeof(T));
  return 2;
}

template <typename T, typename A, int MODE, int V>
__global__ void __launch_bounds__(kThreads, sizeof(A) == 8 ? 2 : kReduceBlocksPerSM) reduce_nhwc_kernel(
    const T* __restrict__ x, const T* __restrict__ dy, const uint8_t* __restrict__ mask,
    const A* __restrict__ mean, const A* __restrict__ invstd, int64_t M, int64_t C,
    A* __restrict__ partial, int64_t* __restrict__ count) {
  __shared__ A sm0[kThreads * V];
  __shared__ A sm1[kThreads * V];
  __shared__ int64_t smn[kThreads];  // kStats: rows per slot
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int64_t c0 = (int64_t(blockIdx.y) * TX + tx) * V;
  const bool active = c0 < C;  // V == 8 implies C % 8 == 0, so all V channels are valid
  Acc<MODE, A, V> acc;
  acc.init(active, c0, 1, mean, invstd);
  if (active) {
    const int64_t step = int64_t(gridDim.x) * TY;
    int64_t r = int64_t(blockIdx.x) * TY + ty;
    constexpr int U = unroll_rows<MODE, T>();
    for (; r + (U - 1) * step < M; r += U * step) {
      RowLoad<T, MODE, V> rows[U];
#pragma unroll
      for (int u = 0; u < U; ++u) rows[u].load(x, dy, mask, (r + u * step) * C + c0);
#pragma unroll
      for (int u = 0; u < U; ++u) rows[u].accumulate(acc);
    }
    for (; r < M; r += step) {
      RowLoad<T, MODE, V> row;
      row.load(x, dy, mask, r * C + c0);
      row.accumulate(acc);
    }
  }
  // Tree reduction over ty (threads with the same tx hold the same channels).
  const int tid = ty * TX + tx;
  acc.to_shared(sm0, sm1, smn, tid);
  __syncthreads();
  for (int s = TY / 2; s > 0; s >>= 1) {
    if (ty < s) Acc<MODE, A, V>::merge_shared(sm0, sm1, smn, tid, (ty + s) * TX + tx);
    __syncthreads();
  }
  if (ty == 0 && active) {
    const int64_t S = gridDim.x;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      partial[int64_t(blockIdx.x) * C + c0 + v] = sm0[tx * V + v];
      partial[(S + blockIdx.x) * C + c0 + v] = sm1[tx * V + v];
    }
    // Every active column of the block saw the same rows; tx == 0 is always active.
    if constexpr (MODE == kStats)
      if (tx == 0 && blockIdx.y == 0) count[blockIdx.x] = smn[0];
  }
}

// Block-wide sum of two values over a 1-D block of kThreads threads; result in thread 0.
// Every thread of the block must call it (it has a barrier).
template <typename A>
__device__ __forceinline__ void block_sum2(A& a, A& b) {
  __shared__ A wa[kThreads / 32], wb[kThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, o);
    b += __shfl_down_sync(0xffffffffu, b, o);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    wa[warp] = a;
    wb[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < kThreads / 32 ? wa[lane] : A(0);
    b = lane < kThreads / 32 ? wb[lane] : A(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      a += __shfl_down_sync(0xffffffffu, a, o);
      b += __shfl_down_sync(0xffffffffu, b, o);
    }
  }
}

// Warp-wide Chan combine of (n, mean, M2); result in lane 0.
template <typename A>
__device__ __forceinline__ void warp_chan(int64_t& n, A& mean, A& m2) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const int64_t nb = __shfl_down_sync(0xffffffffu, n, o);
    const A mb = __shfl_down_sync(0xffffffffu, mean, o);
    const A qb = __shfl_down_sync(0xffffffffu, m2, o);
    chan_merge(n, mean, m2, nb, mb, qb);
  }
}

// Block-wide Chan combine of (n, mean, M2) over a 1-D block of kThreads threads, the
// same shape as block_sum2; result in thread 0.
template <typename A>
__device__ __forceinline__ void block_chan(int64_t& n, A& mean, A& m2) {
  __shared__ int64_t wn[kThreads / 32];
  __shared__ A wm[kThreads / 32], wq[kThreads / 32];
  warp_chan(n, mean, m2);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    wn[warp] = n;
    wm[warp] = mean;
    wq[warp] = m2;
  }
  __syncthreads();
  if (warp == 0) {
    const bool has = lane < kThreads / 32;
    n = has ? wn[lane] : 0;
    mean = has ? wm[lane] : A(0);
    m2 = has ? wq[lane] : A(0);
    warp_chan(n, mean, m2);
  }
}

template <typename A, int V>
__device__ __forceinline__ void Acc<kStats, A, V>::block_reduce() {
  block_chan(n, mean[0], m2[0]);
}

template <typename A, int V>
__device__ __forceinline__ void Acc<kBwd, A, V>::block_reduce() {
  block_sum2(a[0], b[0]);
}

// NCHW: grid (C, S), 1-D block; block (c, s) reduces the planes n = s, s + S, ... of
// channel c as one flat range of items (groups of 8 elements when VEC: H*W % 8 == 0
// and 16-byte aligned pointers; single elements otherwise), so every thread is busy
// whatever H*W is (7x7 = 49 elements would leave 207 of 256 threads idle if a block
// walked one plane at a time). The item's (plane, offset) is advanced by additions.
template <typename T, typename A, int MODE, bool VEC>
__global__ void __launch_bounds__(kThreads) reduce_nchw_kernel(
    const T* __restrict__ x, const T* __restrict__ dy, const uint8_t* __restrict__ mask,
    const A* __restrict__ mean, const A* __restrict__ invstd, int64_t N, int64_t C, int64_t HW,
    A* __restrict__ partial, int64_t* __restrict__ count) {
  constexpr int V = VEC ? 8 : 1;
  const int64_t c = blockIdx.x, s = blockIdx.y, S = gridDim.y;
  Acc<MODE, A, V> acc;
  acc.init(true, c, 0, mean, invstd);
  const int64_t per_plane = HW / V;
  const int64_t nplanes = (N - s + S - 1) / S;  // s < S <= N: at least one
  const int64_t total = nplanes * per_plane;
  const int64_t bd = blockDim.x;
  int64_t q = threadIdx.x / per_plane, j = threadIdx.x % per_plane;
  const int64_t dq = bd / per_plane, dj = bd % per_plane;
  for (int64_t i = threadIdx.x; i < total; i += bd) {
    RowLoad<T, MODE, V> it;
    it.load(x, dy, mask, ((s + q * S) * C + c) * HW + j * V);
    it.accumulate(acc);
    j += dj;
    q += dq;
    if (j >= per_plane) {
      j -= per_plane;
      ++q;
    }
  }
  acc.fold();
  acc.block_reduce();
  if (threadIdx.x == 0) {
    partial[s * C + c] = acc.out0();
    partial[(S + s) * C + c] = acc.out1();
    if constexpr (MODE == kStats)
      if (c == 0) count[s] = acc.n;
  }
}

// Stage 2: one block per channel combines the S partials in double and writes
//   kStats: out0 = mean, out1 = var (biased) from the partials' (count, mean, M2):
//           two passes, mean = sum(n_s mean_s) / n, then
//           M2 = sum(M2_s + n_s (mean_s - mean)^2), all terms >= 0;
//   kBwd:   out0 = sum(g) = A, out1 = sum(g * xhat) = B.
// A block per channel (not a warp) so that the S loads of a channel are spread over
// 256 threads: with S ~ 500 partials one warp would make ~16 dependent trips to L2.
template <typename A, int MODE>
__global__ void __launch_bounds__(kThreads) reduce_finish_kernel(
    const A* __restrict__ partial, const int64_t* __restrict__ count, int64_t S, int64_t C,
    A* __restrict__ out0, A* __restrict__ out1) {
  const int64_t c = blockIdx.x;
  if constexpr (MODE == kStats) {
    __shared__ double mean_sh, n_sh;
    double a = 0.0, n = 0.0;
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
      const double ns = static_cast<double>(count[s]);
      a += ns * static_cast<double>(partial[s * C + c]);
      n += ns;
    }
    block_sum2(a, n);
    if (threadIdx.x == 0) {
      mean_sh = a / n;
      n_sh = n;
    }
    __syncthreads();  // also: warp 0 is done reading block_sum2's shared words
    const double mean = mean_sh;
    double m2 = 0.0, unused = 0.0;
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
      const double d = static_cast<double>(partial[s * C + c]) - mean;
      m2 += static_cast<double>(partial[(S + s) * C + c]) + static_cast<double>(count[s]) * d * d;
    }
    block_sum2(m2, unused);
    if (threadIdx.x == 0) {
      out0[c] = static_cast<A>(mean);
      out1[c] = static_cast<A>(m2 / n_sh);
    }
  } else {
    double a = 0.0, b = 0.0;
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
      a += static_cast<double>(partial[s * C + c]);
      b += static_cast<double>(partial[(S + s) * C + c]);
    }
    block_sum2(a, b);
    if (threadIdx.x == 0) {
      out0[c] = static_cast<A>(a);
      out1[c] = static_cast<A>(b);
    }
  }
}

// Runs both stages. For kStats dy/mask/mean/invstd are unused.
//
// Grid of stage 1: about one wave of resident blocks (kReduceBlocksPerSM per SM: the
// V = 8 kernels use ~50-64 registers, so 4 blocks of 256 threads fit an SM), but at
// least kMinRowsPerThread rows per thread so that the partials stay small next to the
// input. One wave, not several: every extra block is S more partials for stage 2.
constexpr int kMinRowsPerThread = 8;

template <typename T, typename A, int MODE>
void channel_reduce(const Layout& l, const T* x, const T* dy, const uint8_t* mask, const A* mean,
                    const A* invstd, bool vec_ok, A* out0, A* out1, const at::TensorOptions& opts) {
  auto stream = RF_STREAM();
  const int64_t M = l.N * l.HW();
  const int64_t target = int64_t(num_sms()) * kReduceBlocksPerSM;
  Tensor partial, counts;
  int64_t S;
  // kStats: rows (elements) each partial summarises, written by the stage-1 blocks.
  auto count_ptr = [&](int64_t n) -> int64_t* {
    if constexpr (MODE != kStats) return nullptr;
    counts = at::empty({n}, opts.dtype(at::kLong));
    return counts.data_ptr<int64_t>();
  };
  if (l.nhwc) {
    const bool v8 = vec_ok && l.C % 8 == 0;
    const int V = v8 ? 8 : 1;
    const int64_t cgroups = (l.C + V - 1) / V;
    int TX = 1;
    while (TX < cgroups && TX < 32) TX *= 2;
    const int TY = kThreads / TX;
    const int64_t gy = (cgroups + TX - 1) / TX;
    TORCH_CHECK(gy <= 65535, "channel reduction: too many channels (", l.C, ")");
    S = std::max<int64_t>(1, std::min<int64_t>((M + TY * kMinRowsPerThread - 1) / (TY * kMinRowsPerThread),
                                               (target + gy - 1) / gy));
    partial = at::empty({2, S, l.C}, opts);
    int64_t* pc = count_ptr(S);
    const dim3 grid(static_cast<unsigned>(S), static_cast<unsigned>(gy)), block(TX, TY);
    auto kernel = v8 ? reduce_nhwc_kernel<T, A, MODE, 8> : reduce_nhwc_kernel<T, A, MODE, 1>;
    RF_LAUNCH(kernel, grid, block, stream, x, dy, mask, mean, invstd, M, l.C, partial.data_ptr<A>(), pc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    // Channels on grid.x (up to 2^31 - 1), batch splits on grid.y (<= 65535).
    const bool v8 = vec_ok && l.HW() % 8 == 0;
    const int64_t items = l.N * (v8 ? l.HW() / 8 : l.HW());  // per channel
    S = std::min<int64_t>({l.N, (target + l.C - 1) / l.C,
                           (items + kThreads * kMinRowsPerThread - 1) / (kThreads * kMinRowsPerThread),
                           int64_t(65535)});
    S = std::max<int64_t>(S, 1);
    partial = at::empty({2, S, l.C}, opts);
    int64_t* pc = count_ptr(S);
    const dim3 grid(static_cast<unsigned>(l.C), static_cast<unsigned>(S));
    auto kernel = v8 ? reduce_nchw_kernel<T, A, MODE, true> : reduce_nchw_kernel<T, A, MODE, false>;
    RF_LAUNCH(kernel, grid, dim3(kThreads), stream, x, dy, mask, mean, invstd, l.N, l.C, l.HW(),
              partial.data_ptr<A>(), pc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto finish = reduce_finish_kernel<A, MODE>;
  const int64_t* pcc = MODE == kStats ? counts.const_data_ptr<int64_t>() : nullptr;
  RF_LAUNCH(finish, dim3(static_cast<unsigned>(l.C)), dim3(kThreads), stream, partial.data_ptr<A>(), pcc, S,
            l.C, out0, out1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ============================================================ channel_stats
std::tuple<Tensor, Tensor> channel_stats_cuda(const Tensor& x) {
  const Layout l = check_activation("channel_stats", "x", x);
  TORCH_CHECK(RF_IS_DEVICE(x), "channel_stats: expected a CUDA tensor, got ", x.device());
  TORCH_CHECK(l.numel() > 0, "channel_stats: x must not be empty, got shape ", shape_str(x));
  RF_DEVICE_GUARD(x.device());
  const auto sdt = stat_dtype(x.scalar_type());
  Tensor mean = at::empty({l.C}, x.options().dtype(sdt));
  Tensor var = at::empty({l.C}, x.options().dtype(sdt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    channel_reduce<scalar_t, A, kStats>(l, x.const_data_ptr<scalar_t>(), nullptr, nullptr, nullptr,
                                        nullptr, aligned16(x.const_data_ptr()), mean.data_ptr<A>(),
                                        var.data_ptr<A>(), x.options().dtype(sdt));
  });
  return {mean, var};
}

// ============================================================ bn_finalize
// One block: every thread reads num_batches_tracked before thread 0 increments it
// (the __syncthreads between), so the momentum=None factor 1/n needs no host sync.
template <typename A, typename R>
__global__ void __launch_bounds__(1024) bn_finalize_kernel(const A* __restrict__ mean, const A* __restrict__ var,
                                   const A* __restrict__ weight, const A* __restrict__ bias,
                                   R* __restrict__ rm, R* __restrict__ rv, int64_t* __restrict__ nbt,
                                   double momentum, double eps, int64_t count, int64_t C,
                                   A* __restrict__ invstd, A* __restrict__ scale, A* __restrict__ shift) {
  const int64_t n_new = nbt[0] + 1;
  const A f = momentum >= 0.0 ? static_cast<A>(momentum) : A(1) / static_cast<A>(n_new);
  const A unbias = static_cast<A>(static_cast<double>(count) / static_cast<double>(count - 1));
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const A m = mean[c], v = var[c];
    const A is = A(1) / sqrt(v + static_cast<A>(eps));
    const A sc = weight[c] * is;
    invstd[c] = is;
    scale[c] = sc;
    shift[c] = bias[c] - m * sc;
    rm[c] = static_cast<R>((A(1) - f) * static_cast<A>(rm[c]) + f * m);
    rv[c] = static_cast<R>((A(1) - f) * static_cast<A>(rv[c]) + f * v * unbias);
  }
  __syncthreads();
  if (threadIdx.x == 0) nbt[0] = n_new;
}

// Signature and shared checks mirror bn_finalize_cpu (ops.cpp): the two kernels of one
// schema.
std::tuple<Tensor, Tensor, Tensor> bn_finalize_cuda(const Tensor& mean, const Tensor& var,
                                                    const Tensor& weight, const Tensor& bias,
                                                    Tensor& running_mean, Tensor& running_var,
                                                    Tensor& num_batches_tracked, double momentum,
                                                    double eps, int64_t count) {
  check_finalize(mean, var, weight, bias, running_mean, running_var, num_batches_tracked, eps, count);
  TORCH_CHECK(RF_IS_DEVICE(mean), "bn_finalize: expected CUDA tensors, got ", mean.device());
  RF_DEVICE_GUARD(mean.device());
  const int64_t C = mean.size(0);
  // weight/bias in the statistics dtype (a no-op unless the module is half precision).
  const Tensor w = weight.to(mean.scalar_type()), b = bias.to(mean.scalar_type());
  Tensor invstd = at::empty_like(mean), scale = at::empty_like(mean), shift = at::empty_like(mean);
  const int threads = static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(32, (C + 31) / 32 * 32)));
  auto stream = RF_STREAM();
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bn_finalize_cuda", [&] {
    using A = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(), "bn_finalize_running", [&] {
      using R = scalar_t;
      auto kernel = bn_finalize_kernel<A, R>;
      RF_LAUNCH(kernel, dim3(1), dim3(threads), stream,
          mean.const_data_ptr<A>(), var.const_data_ptr<A>(), w.const_data_ptr<A>(), b.const_data_ptr<A>(),
          running_mean.data_ptr<R>(), running_var.data_ptr<R>(), num_batches_tracked.data_ptr<int64_t>(),
          momentum, eps, count, C, invstd.data_ptr<A>(), scale.data_ptr<A>(), shift.data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {invstd, scale, shift};
}

// ============================================================ bn_act
// scale/shift of the 8 channels of a vector group starting at channel ch0 (NHWC:
// ch0..ch0+7; NCHW: ch0 eight times).
template <typename A>
__device__ __forceinline__ void act_params(int64_t ch0, bool nhwc, const A* __restrict__ mean,
                                           const A* __restrict__ invstd, const A* __restrict__ weight,
                                           const A* __restrict__ bias, A (&sc)[8], A (&sh)[8]) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int64_t ch = nhwc ? ch0 + j : ch0;
    sc[j] = weight[ch] * invstd[ch];
    sh[j] = bias[ch] - mean[ch] * sc[j];
  }
}

// relu(sc*c + sh [+ r]) of one group, stored; returns its mask byte. The mask is of
// the stored value: a tiny positive v may round to 0 in T.
template <typename T, typename A, bool HAS_RES>
__device__ __forceinline__ uint8_t act8(const Vec8<T>& cv, const Vec8<T>& rv, const A (&sc)[8],
                                        const A (&sh)[8], T* __restrict__ out) {
  Vec8<T> ov;
  uint8_t bits = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    A v = sc[j] * static_cast<A>(cv.v[j]) + sh[j];
    if constexpr (HAS_RES) v += static_cast<A>(rv.v[j]);
    const T o = static_cast<T>(v > A(0) || v != v ? v : A(0));  // NaN stays NaN, as F.relu
    ov.v[j] = o;
    bits |= static_cast<uint8_t>(static_cast<A>(o) > A(0)) << j;
  }
  stg8(out, ov);
  return bits;
}

// Vector path: every group is 8 elements (numel % 8 == 0, which C % 8 == 0 in NHWC or
// H*W % 8 == 0 in NCHW implies), 16-byte aligned, with channels ch0..ch0+7 (NHWC) or
// one channel (NCHW). Two groups per iteration, all loads first, so each thread has
// 2 (4 with a residual) 16-byte loads in flight. mask byte g belongs to group g's
// thread alone. bn_act_backward_vec_kernel mirrors this walk with its own operands.
template <typename T, typename A, bool HAS_RES>
__global__ void __launch_bounds__(kThreads) bn_act_vec_kernel(
    const T* __restrict__ c, const T* __restrict__ res, const A* __restrict__ mean,
    const A* __restrict__ invstd, const A* __restrict__ weight, const A* __restrict__ bias,
    T* __restrict__ out, uint8_t* __restrict__ mask, int64_t ngroups, int64_t C, int64_t HW, bool nhwc) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t cached = -1;  // channel (NHWC: first channel) whose parameters are in sc/sh
  A sc[8], sh[8];
  const int64_t g0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  ChanIter it(g0 * 8, stride * 8, nhwc, C, HW);
  int64_t g = g0;
  for (; g + stride < ngroups; g += 2 * stride) {
    const int64_t g1 = g + stride;
    const Vec8<T> c0 = ldg8(c + g * 8), c1 = ldg8(c + g1 * 8);
    Vec8<T> r0, r1;
    if constexpr (HAS_RES) {
      r0 = ldg8(res + g * 8);
      r1 = ldg8(res + g1 * 8);
    }
    const int64_t ch0 = it.ch;
    it.advance();
    const int64_t ch1 = it.ch;
    it.advance();
    if (ch0 != cached) {
      act_params(ch0, nhwc, mean, invstd, weight, bias, sc, sh);
      cached = ch0;
    }
    mask[g] = act8<T, A, HAS_RES>(c0, r0, sc, sh, out + g * 8);
    if (ch1 != cached) {
      act_params(ch1, nhwc, mean, invstd, weight, bias, sc, sh);
      cached = ch1;
    }
    mask[g1] = act8<T, A, HAS_RES>(c1, r1, sc, sh, out + g1 * 8);
  }
  if (g < ngroups) {
    const Vec8<T> c0 = ldg8(c + g * 8);
    Vec8<T> r0;
    if constexpr (HAS_RES) r0 = ldg8(res + g * 8);
    if (it.ch != cached) act_params(it.ch, nhwc, mean, invstd, weight, bias, sc, sh);
    mask[g] = act8<T, A, HAS_RES>(c0, r0, sc, sh, out + g * 8);
  }
}

// Scalar path (any C, H*W, alignment; numel need not be a multiple of 8): a thread
// still owns whole groups of 8 elements, so it alone writes the group's mask byte.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) bn_act_scalar_kernel(
    const T* __restrict__ c, const T* __restrict__ res, const A* __restrict__ mean,
    const A* __restrict__ invstd, const A* __restrict__ weight, const A* __restrict__ bias,
    T* __restrict__ out, uint8_t* __restrict__ mask, int64_t numel, int64_t C, int64_t HW, bool nhwc) {
  const int64_t ngroups = (numel + 7) / 8;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t g0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  ChanIter it(g0 * 8, stride * 8, nhwc, C, HW);
  for (int64_t g = g0; g < ngroups; g += stride, it.advance()) {
    const int64_t base = g * 8;
    int64_t ch = it.ch, pos = it.pos;
    uint8_t bits = 0;
    for (int j = 0; j < 8 && base + j < numel; ++j, step1(ch, pos, it.inner, C)) {
      const int64_t i = base + j;
      const A s = weight[ch] * invstd[ch];
      A v = s * static_cast<A>(c[i]) + (bias[ch] - mean[ch] * s);
      if (res != nullptr) v += static_cast<A>(res[i]);
      const T o = static_cast<T>(v > A(0) || v != v ? v : A(0));  // NaN stays NaN, as F.relu
      out[i] = o;
      bits |= static_cast<uint8_t>(static_cast<A>(o) > A(0)) << j;
    }
    mask[g] = bits;
  }
}

// bn_act's kernel, for bn_act and bn_frozen_act (`op` names the caller in errors).
std::tuple<Tensor, Tensor> bn_act_cuda_impl(const char* op, const Tensor& c, const Tensor& mean,
                                            const Tensor& invstd, const Tensor& weight, const Tensor& bias,
                                            const std::optional<Tensor>& residual) {
  const Layout l = check_activation(op, "c", c);
  TORCH_CHECK(RF_IS_DEVICE(c), op, ": expected a CUDA tensor, got ", c.device());
  check_stats_args(op, c, l, mean, invstd, weight);
  check_channel_vec(op, "bias", bias, l.C, c, std::nullopt);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) check_like(op, "residual", *residual, "c", c, l);
  RF_DEVICE_GUARD(c.device());
  Tensor out = at::empty_like(c);
  const int64_t numel = c.numel();
  Tensor mask = at::empty({mask_bytes(numel)}, c.options().dtype(at::kByte));
  if (numel == 0) return {out, mask};
  const auto sdt = stat_dtype(c.scalar_type());
  const Tensor w = weight.to(sdt), b = bias.to(sdt);
  const bool vec = vec_layout_ok(l) && aligned16(c.const_data_ptr()) && aligned16(out.data_ptr()) &&
                   (!has_res || aligned16(residual->const_data_ptr()));
  const int64_t blocks = elementwise_blocks(mask_bytes(numel), l);
  auto stream = RF_STREAM();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "bn_act_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* pr = has_res ? residual->const_data_ptr<scalar_t>() : nullptr;
    const A *pm = mean.const_data_ptr<A>(), *pi = invstd.const_data_ptr<A>(), *pw = w.const_data_ptr<A>(),
            *pb = b.const_data_ptr<A>();
    const dim3 grid(static_cast<unsigned>(blocks)), block(kThreads);
    if (vec) {
      auto kernel = has_res ? bn_act_vec_kernel<scalar_t, A, true> : bn_act_vec_kernel<scalar_t, A, false>;
      RF_LAUNCH(kernel, grid, block, stream, c.const_data_ptr<scalar_t>(), pr, pm, pi, pw, pb,
                out.data_ptr<scalar_t>(), mask.data_ptr<uint8_t>(), numel / 8, l.C, l.HW(), l.nhwc);
    } else {
      auto kernel = bn_act_scalar_kernel<scalar_t, A>;
      RF_LAUNCH(kernel, grid, block, stream, c.const_data_ptr<scalar_t>(), pr, pm, pi, pw, pb,
                out.data_ptr<scalar_t>(), mask.data_ptr<uint8_t>(), numel, l.C, l.HW(), l.nhwc);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mask};
}

std::tuple<Tensor, Tensor> bn_act_cuda(const Tensor& c, const Tensor& mean, const Tensor& invstd,
                                       const Tensor& weight, const Tensor& bias,
                                       const std::optional<Tensor>& residual) {
  return bn_act_cuda_impl("bn_act", c, mean, invstd, weight, bias, residual);
}

// ============================================================ bn_act_backward
// Pass 2: g = mask ? dy : 0; grad_c = ka*(g - sum_g/M) - kb*(c - mean) with
// ka = w*invstd, kb = w*invstd^2*sum_gx/M; grad_res = g.
template <typename A>
struct BwdParams {
  A ka[8], kmb[8], kb[8], kmu[8];
  __device__ __forceinline__ void load(int64_t ch0, bool nhwc, const A* __restrict__ mean,
                                       const A* __restrict__ invstd, const A* __restrict__ weight,
                                       const A* __restrict__ sum_g, const A* __restrict__ sum_gx, A inv_m) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t ch = nhwc ? ch0 + j : ch0;
      const A is = invstd[ch];
      ka[j] = weight[ch] * is;
      kmb[j] = sum_g[ch] * inv_m;
      kb[j] = ka[j] * is * sum_gx[ch] * inv_m;
      kmu[j] = mean[ch];
    }
  }
};

template <typename T, typename A, bool RES>
__device__ __forceinline__ void bwd8(const Vec8<T>& dv, const Vec8<T>& cv, uint8_t bits, const BwdParams<A>& p,
                                     T* __restrict__ grad_c, T* __restrict__ grad_res) {
  Vec8<T> gc, gr;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const A g = ((bits >> j) & 1) ? static_cast<A>(dv.v[j]) : A(0);
    gc.v[j] = static_cast<T>(p.ka[j] * (g - p.kmb[j]) - p.kb[j] * (static_cast<A>(cv.v[j]) - p.kmu[j]));
    gr.v[j] = static_cast<T>(g);
  }
  stg8(grad_c, gc);
  if constexpr (RES) stg8(grad_res, gr);
}

// Vector path: the conditions and the grid-stride walk (two groups per iteration,
// loads first) of bn_act_vec_kernel, mirrored with the backward's operands.
template <typename T, typename A, bool RES>
__global__ void __launch_bounds__(kThreads) bn_act_backward_vec_kernel(
    const T* __restrict__ dy, const uint8_t* __restrict__ mask, const T* __restrict__ c,
    const A* __restrict__ mean, const A* __restrict__ invstd, const A* __restrict__ weight,
    const A* __restrict__ sum_g, const A* __restrict__ sum_gx, T* __restrict__ grad_c,
    T* __restrict__ grad_res, int64_t ngroups, int64_t C, int64_t HW, bool nhwc, int64_t M) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const A inv_m = A(1) / static_cast<A>(M);
  int64_t cached = -1;
  BwdParams<A> p;
  const int64_t g0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  ChanIter it(g0 * 8, stride * 8, nhwc, C, HW);
  int64_t g = g0;
  for (; g + stride < ngroups; g += 2 * stride) {
    const int64_t g1 = g + stride;
    const Vec8<T> d0 = ldg8(dy + g * 8), d1 = ldg8(dy + g1 * 8);
    const Vec8<T> c0 = ldg8(c + g * 8), c1 = ldg8(c + g1 * 8);
    const uint8_t b0 = mask[g], b1 = mask[g1];
    const int64_t ch0 = it.ch;
    it.advance();
    const int64_t ch1 = it.ch;
    it.advance();
    if (ch0 != cached) {
      p.load(ch0, nhwc, mean, invstd, weight, sum_g, sum_gx, inv_m);
      cached = ch0;
    }
    bwd8<T, A, RES>(d0, c0, b0, p, grad_c + g * 8, grad_res + g * 8);
    if (ch1 != cached) {
      p.load(ch1, nhwc, mean, invstd, weight, sum_g, sum_gx, inv_m);
      cached = ch1;
    }
    bwd8<T, A, RES>(d1, c1, b1, p, grad_c + g1 * 8, grad_res + g1 * 8);
  }
  if (g < ngroups) {
    const Vec8<T> d0 = ldg8(dy + g * 8), c0 = ldg8(c + g * 8);
    const uint8_t b0 = mask[g];
    if (it.ch != cached) p.load(it.ch, nhwc, mean, invstd, weight, sum_g, sum_gx, inv_m);
    bwd8<T, A, RES>(d0, c0, b0, p, grad_c + g * 8, grad_res + g * 8);
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) bn_act_backward_scalar_kernel(
    const T* __restrict__ dy, const uint8_t* __restrict__ mask, const T* __restrict__ c,
    const A* __restrict__ mean, const A* __restrict__ invstd, const A* __restrict__ weight,
    const A* __restrict__ sum_g, const A* __restrict__ sum_gx, T* __restrict__ grad_c,
    T* __restrict__ grad_res, int64_t numel, int64_t C, int64_t HW, bool nhwc, int64_t M) {
  const int64_t ngroups = (numel + 7) / 8;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const A inv_m = A(1) / static_cast<A>(M);
  const int64_t g0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  ChanIter it(g0 * 8, stride * 8, nhwc, C, HW);
  for (int64_t g = g0; g < ngroups; g += stride, it.advance()) {
    const int64_t base = g * 8;
    const uint8_t bits = mask[g];
    int64_t ch = it.ch, pos = it.pos;
    for (int j = 0; j < 8 && base + j < numel; ++j, step1(ch, pos, it.inner, C)) {
      const int64_t i = base + j;
      const A is = invstd[ch];
      const A a = weight[ch] * is;
      const A gv = ((bits >> j) & 1) ? static_cast<A>(dy[i]) : A(0);
      grad_c[i] = static_cast<T>(a * (gv - sum_g[ch] * inv_m) -
                                 a * is * sum_gx[ch] * inv_m * (static_cast<A>(c[i]) - mean[ch]));
      if (grad_res != nullptr) grad_res[i] = static_cast<T>(gv);
    }
  }
}

// Both backwards: bn_act's (frozen = false) and bn_frozen_act's (frozen = true: the
// apply kernels run with zero sums, so grad_c = w*invstd*g; pass 1 only for param_grads).
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_backward_cuda(
    const char* op, const Tensor& grad_out, const Tensor& mask, const Tensor& c, const Tensor& mean,
    const Tensor& invstd, const Tensor& weight, bool residual_grad, bool frozen, bool param_grads) {
  const Layout l = check_activation(op, "c", c);
  TORCH_CHECK(RF_IS_DEVICE(c), op, ": expected a CUDA tensor, got ", c.device());
  check_like(op, "grad_out", grad_out, "c", c, l);
  check_mask(op, mask, c);
  check_stats_args(op, c, l, mean, invstd, weight);
  TORCH_CHECK(c.numel() > 0, op, ": c must not be empty");
  RF_DEVICE_GUARD(c.device());
  const auto sdt = stat_dtype(c.scalar_type());
  const int64_t numel = c.numel(), M = l.N * l.HW();
  Tensor grad_c = at::empty_like(c);
  Tensor grad_res = residual_grad ? at::empty_like(c) : at::empty({0}, c.options());
  const int64_t nparam = param_grads ? l.C : 0;
  Tensor gw = at::empty({nparam}, c.options().dtype(sdt)), gb = at::empty({nparam}, c.options().dtype(sdt));
  // What the apply pass subtracts: the batch sums, or nothing for a frozen BN.
  const Tensor zero = frozen ? at::zeros({l.C}, c.options().dtype(sdt)) : Tensor();
  const Tensor& sum_g = frozen ? zero : gb;
  const Tensor& sum_gx = frozen ? zero : gw;
  const Tensor w = weight.to(sdt);
  const bool aligned = aligned16(c.const_data_ptr()) && aligned16(grad_out.const_data_ptr()) &&
                       aligned16(grad_c.data_ptr()) && (!residual_grad || aligned16(grad_res.data_ptr()));
  auto stream = RF_STREAM();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "bn_act_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    // Pass 1: gb = sum(g), gw = sum(g * xhat) per channel.
    if (param_grads)
      channel_reduce<scalar_t, A, kBwd>(l, c.const_data_ptr<scalar_t>(), grad_out.const_data_ptr<scalar_t>(),
                                        mask.const_data_ptr<uint8_t>(), mean.const_data_ptr<A>(),
                                        invstd.const_data_ptr<A>(), aligned, gb.data_ptr<A>(),
                                        gw.data_ptr<A>(), c.options().dtype(sdt));
    // Pass 2: elementwise.
    const bool vec = aligned && vec_layout_ok(l);
    const int64_t blocks = elementwise_blocks(mask_bytes(numel), l);
    const dim3 grid(static_cast<unsigned>(blocks)), block(kThreads);
    scalar_t* pgr = residual_grad ? grad_res.data_ptr<scalar_t>() : nullptr;
    if (vec) {
      auto kernel = residual_grad ? bn_act_backward_vec_kernel<scalar_t, A, true>
                                  : bn_act_backward_vec_kernel<scalar_t, A, false>;
      RF_LAUNCH(kernel, grid, block, stream, grad_out.const_data_ptr<scalar_t>(), mask.const_data_ptr<uint8_t>(),
                c.const_data_ptr<scalar_t>(), mean.const_data_ptr<A>(), invstd.const_data_ptr<A>(),
                w.const_data_ptr<A>(), sum_g.const_data_ptr<A>(), sum_gx.const_data_ptr<A>(),
                grad_c.data_ptr<scalar_t>(), pgr, numel / 8, l.C, l.HW(), l.nhwc, M);
    } else {
      auto kernel = bn_act_backward_scalar_kernel<scalar_t, A>;
      RF_LAUNCH(kernel, grid, block, stream, grad_out.const_data_ptr<scalar_t>(), mask.const_data_ptr<uint8_t>(),
                c.const_data_ptr<scalar_t>(), mean.const_data_ptr<A>(), invstd.const_data_ptr<A>(),
                w.const_data_ptr<A>(), sum_g.const_data_ptr<A>(), sum_gx.const_data_ptr<A>(),
                grad_c.data_ptr<scalar_t>(), pgr, numel, l.C, l.HW(), l.nhwc, M);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_c, gw, gb, grad_res};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_act_backward_cuda(
    const Tensor& grad_out, const Tensor& mask, const Tensor& c, const Tensor& mean,
    const Tensor& invstd, const Tensor& weight, bool residual_grad) {
  return bn_backward_cuda("bn_act_backward", grad_out, mask, c, mean, invstd, weight, residual_grad,
                          /*frozen=*/false, /*param_grads=*/true);
}

// ============================================================ frozen BN
// bn_frozen_act: bn_act's kernels (mean/invstd are the running statistics); its
// backward: the apply kernels above with zero sums.
std::tuple<Tensor, Tensor> bn_frozen_act_cuda(const Tensor& c, const Tensor& mean, const Tensor& invstd,
                                              const Tensor& weight, const Tensor& bias,
                                              const std::optional<Tensor>& residual) {
  return bn_act_cuda_impl("bn_frozen_act", c, mean, invstd, weight, bias, residual);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_frozen_act_backward_cuda(
    const Tensor& grad_out, const Tensor& mask, const Tensor& c, const Tensor& mean,
    const Tensor& invstd, const Tensor& weight, bool residual_grad, bool param_grads) {
  return bn_backward_cuda("bn_frozen_act_backward", grad_out, mask, c, mean, invstd, weight,
                          residual_grad, /*frozen=*/true, param_grads);
}

}  // namespace

#ifndef RESNET_FUSED_EMULATE
TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("channel_stats", &channel_stats_cuda);
  m.impl("bn_finalize", &bn_finalize_cuda);
  m.impl("bn_act", &bn_act_cuda);
  m.impl("bn_act_backward", &bn_act_backward_cuda);
  m.impl("bn_frozen_act", &bn_frozen_act_cuda);
  m.impl("bn_frozen_act_backward", &bn_frozen_act_backward_cuda);
}
#endif

}  // namespace resnet_fused
