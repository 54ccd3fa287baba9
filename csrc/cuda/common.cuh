// Device helpers shared by the CUDA kernels: element types and 16-byte packs, the online
// softmax statistics of a row, and warp/block reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"

namespace dvae_kernels {
namespace cuda {

// Element types: storage in memory, float arithmetic. 16-bit types are kept as their bits so
// that packs are plain trivially-copyable structs.
struct F32 {
  using storage = float;
  static __device__ __forceinline__ float load(storage v) { return v; }
  static __device__ __forceinline__ storage store(float f) { return f; }
};
struct BF16 {
  using storage = unsigned short;
  static __device__ __forceinline__ float load(storage v) {
    return __uint_as_float(static_cast<unsigned int>(v) << 16);
  }
  static __device__ __forceinline__ storage store(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
};
struct F16 {
  using storage = unsigned short;
  static __device__ __forceinline__ float load(storage v) { return __half2float(__ushort_as_half(v)); }
  static __device__ __forceinline__ storage store(float f) {
    return __half_as_ushort(__float2half_rn(f));
  }
};

// 16 bytes of elements: one vector load/store instruction.
template <typename E>
struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(typename E::storage);
  typename E::storage v[N];
};

// Whether rows starting at `base` with row stride `stride` (elements) are 16-byte aligned.
template <typename E>
inline bool rows_aligned(const void* base, int64_t stride) {
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 &&
         (stride * static_cast<int64_t>(sizeof(typename E::storage))) % 16 == 0;
}

__device__ __forceinline__ int64_t load_token(const void* tokens, bool tokens64, int64_t row) {
  return tokens64 ? static_cast<const int64_t*>(tokens)[row]
                  : static_cast<int64_t>(static_cast<const int32_t*>(tokens)[row]);
}

// Online softmax statistics: m is the largest value seen (-inf while none is finite), and with
// shift = (m == -inf ? 0 : m): s = Σ exp(x - shift), a = Σ exp(x - shift)·(x - shift), where a
// -inf value contributes 0 to a. NaN or +inf values make s NaN (the torch backend's NaN).
// exp through one MUFU.EX2 (flush-to-zero): exp(d) = 2^(d·log2 e). expf wraps the same
// instruction in range reduction and subnormal fix-ups; results below 2^-126 become 0 here.
constexpr float kLog2e = 1.4426950408889634f;
__device__ __forceinline__ float fast_exp(float d) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(d * kLog2e));
  return y;
}

// Calls f(pack, j) for j = lane, lane + THREADS, ... < packs, loading kInFlight 16-byte packs
// before using any of them (a row's loads overlap instead of waiting one by one; the compiler
// does not hoist them itself across the running statistics' branches or the stores).
constexpr int kInFlight = 4;
template <int THREADS, typename P, typename F>
__device__ __forceinline__ void for_each_pack(const P* __restrict__ xp, int64_t packs, int lane,
                                              F&& f) {
  int64_t j = lane;
  for (; j + (kInFlight - 1) * THREADS < packs; j += kInFlight * THREADS) {
    P pk[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) pk[u] = xp[j + u * THREADS];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) f(pk[u], j + u * THREADS);
  }
  for (; j < packs; j += THREADS) f(xp[j], j);
}

struct Stats {
  float m;
  float s;
  float a;
};

__device__ __forceinline__ Stats stats_empty() { return {-INFINITY, 0.f, 0.f}; }
__device__ __forceinline__ float stats_shift(const Stats& st) {
  return st.m == -INFINITY ? 0.f : st.m;
}

// Move st to a larger maximum m_new (no-op when m_new is not larger).
template <bool WITH_A>
__device__ __forceinline__ void stats_raise(Stats& st, float m_new) {
  if (m_new > st.m) {
    if (st.s != 0.f) {  // s == 0: nothing accumulated yet (and exp below could overflow)
      const float d = st.m - m_new;
      const float alpha = fast_exp(d);
      if (WITH_A) st.a = alpha * (st.a + st.s * d);
      st.s *= alpha;
    }
    st.m = m_new;
  }
}

template <bool WITH_A>
__device__ __forceinline__ void stats_add(Stats& st, float x, float shift) {
  const float d = x - shift;
  const float e = fast_exp(d);
  st.s += e;
  if (WITH_A) st.a += e * fmaxf(d, -3.0e38f);  // x = -inf: e = 0 and the clamp keeps 0·(-inf) out
}

// Adds n values (one pack): one rescale per pack rather than per value.
template <bool WITH_A, int N>
__device__ __forceinline__ void stats_add_values(Stats& st, const float (&x)[N]) {
  float mv = x[0];
#pragma unroll
  for (int k = 1; k < N; ++k) mv = fmaxf(mv, x[k]);
  stats_raise<WITH_A>(st, mv);
  const float shift = stats_shift(st);
#pragma unroll
  for (int k = 0; k < N; ++k) stats_add<WITH_A>(st, x[k], shift);
}

template <bool WITH_A>
__device__ __forceinline__ Stats stats_merge(Stats p, Stats q) {
  const float m = fmaxf(p.m, q.m);
  stats_raise<WITH_A>(p, m);
  stats_raise<WITH_A>(q, m);
  return {m, p.s + q.s, WITH_A ? p.a + q.a : 0.f};
}

template <bool WITH_A>
__device__ __forceinline__ Stats warp_reduce(Stats st) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Stats o;
    o.m = __shfl_xor_sync(0xffffffffu, st.m, off);
    o.s = __shfl_xor_sync(0xffffffffu, st.s, off);
    o.a = WITH_A ? __shfl_xor_sync(0xffffffffu, st.a, off) : 0.f;
    st = stats_merge<WITH_A>(st, o);
  }
  return st;
}

// Reduction over a group of THREADS threads working on one row: a warp (no shared memory) or
// the whole block. Every thread of the group gets the result.
template <bool WITH_A, int THREADS>
__device__ __forceinline__ Stats group_reduce(Stats st) {
  st = warp_reduce<WITH_A>(st);
  if constexpr (THREADS == 32) {
    return st;
  } else {
    constexpr int WARPS = THREADS / 32;
    __shared__ Stats partial[WARPS];
    __shared__ Stats result;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) partial[warp] = st;
    __syncthreads();
    if (warp == 0) {
      Stats v = lane < WARPS ? partial[lane] : stats_empty();
      v = warp_reduce<WITH_A>(v);
      if (lane == 0) result = v;
    }
    __syncthreads();
    return result;
  }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Row layout shared by the row kernels: warp-per-row (THREADS == 32, 8 rows per 256-thread
// block) for short rows, block-per-row (THREADS == kBlockRow) for long ones.
constexpr int kWarpRowBlock = 256;
constexpr int kBlockRow = 512;
constexpr int64_t kWarpRowMaxV = 4096;

template <int THREADS>
__device__ __forceinline__ int64_t group_row() {
  if constexpr (THREADS == 32) {
    return static_cast<int64_t>(blockIdx.x) * (kWarpRowBlock / 32) + threadIdx.x / 32;
  } else {
    return blockIdx.x;
  }
}

template <int THREADS>
__device__ __forceinline__ int group_lane() {
  return THREADS == 32 ? threadIdx.x % 32 : threadIdx.x;
}

inline unsigned int row_blocks(int64_t R, bool warp_per_row) {
  return static_cast<unsigned int>(warp_per_row ? (R + kWarpRowBlock / 32 - 1) / (kWarpRowBlock / 32)
                                                : R);
}

}  // namespace cuda
}  // namespace dvae_kernels
