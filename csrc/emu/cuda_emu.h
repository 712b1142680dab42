// A host emulation of the little CUDA that csrc/cuda/bn_kernels.cu uses, so that file
// compiles as plain C++ (with RESNET_FUSED_EMULATE) and its kernels run on CPU
// tensors: every CUDA thread of a block is a host thread (std::thread), blocks run
// one after another, __syncthreads is a std::barrier over the block, and the warp
// shuffles exchange values through a per-warp buffer between two warp barriers.
//
// What it checks beyond the results (each a std::runtime_error out of the launch,
// which the op turns into a Python RuntimeError):
//   - grid and block limits of a real GPU (gridDim.y/z <= 65535, <= 1024 threads,
//     at least one block and one thread), and 48 KiB of static shared memory is the
//     kernels' own business (ptxas reports it; see bench/NOTES.md);
//   - the threads of a block meet at each __syncthreads at the same source line, and
//     none has returned while others wait there (a barrier in divergent code);
//   - every lane of a warp takes part in each full-mask shuffle, at the same line;
//   - __ldg loads and __stwb stores (the kernels' 16-byte vector accesses) are
//     aligned to their size, as the hardware requires.
// What it cannot see: timing-dependent races (threads interleave differently from a
// GPU), memory-model subtleties, and anything about speed.
//
// Not part of the shipped extension: tests/test_native_emulation.py builds it with
// torch.utils.cpp_extension.load.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Blocks run one at a time, so one static array per declaration is the block's
// shared memory (zeroed once, not per block: unlike a GPU, reading shared memory
// before writing it is not caught).
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {  // aligned as CUDA's
  unsigned x, y, z, w;
};

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 gridDim, blockDim;

using std::fmax;
using std::sqrt;

namespace emu {
// A GPU faults on a global access of 2, 4, 8 or 16 bytes whose address is not a
// multiple of its size ("misaligned address"); plain host loads and stores do not,
// so the emulated ones check, and a wrong alignment test in a launcher fails here.
template <typename T>
inline void check_aligned(const T* p, const char* what) {
  constexpr std::size_t n = sizeof(T);
  static_assert(n == 1 || n == 2 || n == 4 || n == 8 || n == 16, "GPU accesses are 1-16 bytes");
  if (reinterpret_cast<std::uintptr_t>(p) % n != 0)
    throw std::runtime_error(std::string("emu: misaligned ") + std::to_string(n) + "-byte " + what +
                             " (address % " + std::to_string(n) + " = " +
                             std::to_string(reinterpret_cast<std::uintptr_t>(p) % n) + ")");
}
}  // namespace emu

template <typename T>
inline T __ldg(const T* p) {
  emu::check_aligned(p, "load");
  return *p;
}
// Store through the default (write-back) cache policy: on a GPU the same as `*p = v`.
template <typename T>
inline void __stwb(T* p, T v) {
  emu::check_aligned(p, "store");
  *p = v;
}

namespace emu {

// Number of SMs the launchers see: RESNET_FUSED_EMU_SMS (default 2), so tests can
// make the grid-size logic take its different branches.
inline int num_sms() {
  const char* s = std::getenv("RESNET_FUSED_EMU_SMS");
  const int n = s ? std::atoi(s) : 2;
  return n > 0 ? n : 2;
}

// Per-thread state: 0 running, 1 waiting at a barrier or shuffle, 2 returned.
struct BlockState;
struct PhaseCheck {
  BlockState* b;
  int first, count;  // the threads this barrier spans
  void operator()() noexcept;
};

struct BlockState {
  int nthreads = 0;
  std::unique_ptr<std::barrier<PhaseCheck>> bar;
  std::vector<std::unique_ptr<std::barrier<PhaseCheck>>> warp_bars;
  std::unique_ptr<std::atomic<int>[]> state, sync_line;
  std::vector<uint64_t> shfl_buf;  // per thread: the value offered to a shuffle
  std::mutex err_mu;
  std::string error;
  void fail(const std::string& e) {
    std::lock_guard<std::mutex> g(err_mu);
    if (error.empty()) error = e;
  }
};

// Runs when a barrier phase completes: the threads waiting must all be at the same
// source line, and none of the span may have returned while others wait (a barrier
// inside divergent code; on a GPU that hangs or is undefined).
inline void PhaseCheck::operator()() noexcept {
  int line = -1, waiting = 0, exited = 0;
  for (int t = first; t < first + count; ++t) {
    const int st = b->state[t].load();
    if (st == 2) {
      ++exited;
      continue;
    }
    if (st != 1) continue;
    ++waiting;
    const int l = b->sync_line[t].load();
    if (line == -1) line = l;
    if (l != line)
      b->fail("threads met at different barriers/shuffles (lines " + std::to_string(line) + " and " +
              std::to_string(l) + ")");
    b->state[t].store(0);
  }
  if (waiting && exited)
    b->fail("a barrier or full-warp shuffle at line " + std::to_string(line) +
            " was reached after other threads returned (divergent barrier)");
}

inline BlockState* g_block = nullptr;
inline thread_local int t_tid = 0;

inline void syncthreads(int line) {
  BlockState& b = *g_block;
  b.sync_line[t_tid].store(line);
  b.state[t_tid].store(1);
  b.bar->arrive_and_wait();
}

template <typename V>
inline V shfl_down(unsigned mask, V v, unsigned delta, int line) {
  static_assert(sizeof(V) <= 8, "shuffle of at most 8 bytes");
  BlockState& b = *g_block;
  const int warp = t_tid / 32, lane = t_tid % 32;
  if (mask != 0xffffffffu || b.nthreads - warp * 32 < 32) b.fail("shuffle with a partial mask or warp");
  std::memcpy(&b.shfl_buf[t_tid], &v, sizeof(V));
  b.sync_line[t_tid].store(line);
  b.state[t_tid].store(1);
  b.warp_bars[warp]->arrive_and_wait();
  V r = v;
  if (lane + static_cast<int>(delta) < 32) std::memcpy(&r, &b.shfl_buf[t_tid + delta], sizeof(V));
  b.sync_line[t_tid].store(line);
  b.state[t_tid].store(1);
  b.warp_bars[warp]->arrive_and_wait();  // nobody overwrites its slot before all have read
  return r;
}

template <typename... P, typename... Args>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, Args&&... args) {
  static_assert(sizeof...(P) == sizeof...(Args), "kernel launched with the wrong number of arguments");
  if (grid.x < 1 || grid.y < 1 || grid.z < 1) throw std::runtime_error("emu: empty grid");
  if (grid.y > 65535 || grid.z > 65535)
    throw std::runtime_error("emu: gridDim.y/z over 65535 (" + std::to_string(grid.y) + ", " +
                             std::to_string(grid.z) + ")");
  if (grid.x > 2147483647u) throw std::runtime_error("emu: gridDim.x over 2^31-1");
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  if (nthreads < 1 || nthreads > 1024 || block.z > 64)
    throw std::runtime_error("emu: bad block size " + std::to_string(nthreads));
  gridDim = grid;
  blockDim = block;
  std::tuple<P...> params(static_cast<P>(args)...);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        BlockState b;
        b.nthreads = nthreads;
        b.state.reset(new std::atomic<int>[nthreads]);
        b.sync_line.reset(new std::atomic<int>[nthreads]);
        for (int t = 0; t < nthreads; ++t) {
          b.state[t].store(0);
          b.sync_line[t].store(-1);
        }
        b.shfl_buf.assign(nthreads, 0);
        b.bar = std::make_unique<std::barrier<PhaseCheck>>(nthreads, PhaseCheck{&b, 0, nthreads});
        for (int w = 0; w * 32 < nthreads; ++w) {
          const int n = nthreads - w * 32 < 32 ? nthreads - w * 32 : 32;
          b.warp_bars.push_back(std::make_unique<std::barrier<PhaseCheck>>(n, PhaseCheck{&b, w * 32, n}));
        }
        g_block = &b;
        std::vector<std::thread> threads;
        threads.reserve(nthreads);
        for (int t = 0; t < nthreads; ++t) {
          threads.emplace_back([&, t, bx, by, bz]() {
            t_tid = t;
            threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            blockIdx = dim3(bx, by, bz);
            try {
              std::apply(kernel, params);
            } catch (const std::exception& e) {
              b.fail(std::string("exception in a kernel thread: ") + e.what());
            }
            b.state[t].store(2);
            b.warp_bars[t / 32]->arrive_and_drop();
            b.bar->arrive_and_drop();
          });
        }
        for (auto& th : threads) th.join();
        g_block = nullptr;
        if (!b.error.empty())
          throw std::runtime_error("emu: block (" + std::to_string(bx) + ", " + std::to_string(by) +
                                   ", " + std::to_string(bz) + "): " + b.error);
      }
}

}  // namespace emu

// The launch itself checks; nothing is asynchronous here.
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
#define __syncthreads() ::emu::syncthreads(__LINE__)
#define __shfl_down_sync(mask, v, delta) ::emu::shfl_down((mask), (v), (delta), __LINE__)
