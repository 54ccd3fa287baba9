// weighted_token_nll on CUDA: loss = -w·logp and, when asked, grad = w·(softmax - onehot) in the
// same launch. Semantics: the torch backend in dvae_kernels/weighted_token_nll.py.
//
// Short aligned rows (up to kCache packs per lane: V <= 1024 float32, 2048 16-bit) stay in
// registers: each logit is read once and its exponential is reused for the gradient. Longer
// rows are read twice (statistics, then gradient); the second read mostly hits L2.
#include "common.cuh"

namespace dvae_kernels {
namespace cuda {
namespace {

constexpr int kCache = 8;  // packs per lane kept in registers by the one-read kernel
constexpr float kNaN = __builtin_nanf("");

// One warp per row, the row in registers. Host guarantees: rows aligned, V % Pack::N == 0,
// V <= 32·kCache·Pack::N.
template <typename E>
__global__ void __launch_bounds__(kWarpRowBlock)
nll_cached_kernel(const typename E::storage* __restrict__ logits, int64_t stride,
                  const void* __restrict__ tokens, bool tokens64,
                  const float* __restrict__ weights, float* __restrict__ loss,
                  typename E::storage* __restrict__ grad, int64_t R, int64_t V) {
  using P = Pack<E>;
  const int64_t row = group_row<32>();
  if (row >= R) return;
  const int lane = group_lane<32>();
  const typename E::storage* x = logits + row * stride;
  const P* xp = reinterpret_cast<const P*>(x);
  const int64_t packs = V / P::N;
  float f[kCache][P::N];
  float mx = -INFINITY;
#pragma unroll
  for (int c = 0; c < kCache; ++c) {
    const int64_t j = lane + c * 32;
    if (j < packs) {
      const P pk = xp[j];
#pragma unroll
      for (int k = 0; k < P::N; ++k) {
        f[c][k] = E::load(pk.v[k]);
        mx = fmaxf(mx, f[c][k]);
      }
    } else {
#pragma unroll
      for (int k = 0; k < P::N; ++k) f[c][k] = -INFINITY;
    }
  }
  mx = warp_max(mx);
  const float shift = mx == -INFINITY ? 0.f : mx;
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < kCache; ++c) {
#pragma unroll
    for (int k = 0; k < P::N; ++k) {
      f[c][k] = fast_exp(f[c][k] - shift);
      s += f[c][k];
    }
  }
  s = warp_sum(s);
  const float w = weights[row];
  const int64_t t = load_token(tokens, tokens64, row);
  // (x - shift) - log s, never x - lse: lse is rounded at the logits' magnitude.
  if (lane == 0) loss[row] = -w * ((t >= 0 && t < V) ? (E::load(x[t]) - shift) - logf(s) : kNaN);
  if (grad == nullptr) return;
  const float scale = w / s;  // softmax = e / s
  P* op = reinterpret_cast<P*>(grad + row * V);
#pragma unroll
  for (int c = 0; c < kCache; ++c) {
    const int64_t j = lane + c * 32;
    if (j < packs) {
      P o;
#pragma unroll
      for (int k = 0; k < P::N; ++k) {
        o.v[k] = E::store(f[c][k] * scale - (j * P::N + k == t ? w : 0.f));
      }
      op[j] = o;
    }
  }
}

// Any row: statistics in one streaming read, then the gradient in a second.
template <typename E, int THREADS>
__global__ void __launch_bounds__(THREADS == 32 ? kWarpRowBlock : THREADS)
nll_stream_kernel(const typename E::storage* __restrict__ logits, int64_t stride,
                  const void* __restrict__ tokens, bool tokens64,
                  const float* __restrict__ weights, float* __restrict__ loss,
                  typename E::storage* __restrict__ grad, int64_t R, int64_t V, bool vec) {
  using P = Pack<E>;
  const int64_t row = group_row<THREADS>();
  if (row >= R) return;
  const int lane = group_lane<THREADS>();
  const typename E::storage* x = logits + row * stride;
  const int64_t packs = vec ? V / P::N : 0;
  Stats st = stats_empty();
  const P* xp = reinterpret_cast<const P*>(x);
  for_each_pack<THREADS>(xp, packs, lane, [&](const P& pk, int64_t) {
    float f[P::N];
#pragma unroll
    for (int k = 0; k < P::N; ++k) f[k] = E::load(pk.v[k]);
    stats_add_values<false>(st, f);
  });
  for (int64_t j = packs * P::N + lane; j < V; j += THREADS) {
    const float f[1] = {E::load(x[j])};
    stats_add_values<false>(st, f);
  }
  st = group_reduce<false, THREADS>(st);
  const float shift = stats_shift(st);
  const float log_s = logf(st.s);
  const float lse = shift + log_s;
  const float w = weights[row];
  const int64_t t = load_token(tokens, tokens64, row);
  if (lane == 0) loss[row] = -w * ((t >= 0 && t < V) ? (E::load(x[t]) - shift) - log_s : kNaN);
  if (grad == nullptr) return;
  typename E::storage* out = grad + row * V;
  P* op = reinterpret_cast<P*>(out);
  for_each_pack<THREADS>(xp, packs, lane, [&](const P& pk, int64_t j) {
    P o;
#pragma unroll
    for (int k = 0; k < P::N; ++k) {
      const int64_t col = j * P::N + k;
      o.v[k] = E::store(w * (fast_exp(E::load(pk.v[k]) - lse) - (col == t ? 1.f : 0.f)));
    }
    op[j] = o;
  });
  for (int64_t j = packs * P::N + lane; j < V; j += THREADS) {
    out[j] = E::store(w * (fast_exp(E::load(x[j]) - lse) - (j == t ? 1.f : 0.f)));
  }
}

template <typename E>
cudaError_t launch(const void* logits, int64_t stride, const void* tokens, bool tokens64,
                   const float* weights, float* loss, void* grad, int64_t R, int64_t V,
                   cudaStream_t stream) {
  using S = typename E::storage;
  using P = Pack<E>;
  const S* x = static_cast<const S*>(logits);
  S* g = static_cast<S*>(grad);
  const bool vec = rows_aligned<E>(logits, stride) && (g == nullptr || rows_aligned<E>(g, V));
  if (vec && V % P::N == 0 && V <= 32 * kCache * P::N) {
    nll_cached_kernel<E><<<row_blocks(R, true), kWarpRowBlock, 0, stream>>>(
        x, stride, tokens, tokens64, weights, loss, g, R, V);
  } else if (V <= kWarpRowMaxV) {
    nll_stream_kernel<E, 32><<<row_blocks(R, true), kWarpRowBlock, 0, stream>>>(
        x, stride, tokens, tokens64, weights, loss, g, R, V, vec);
  } else {
    nll_stream_kernel<E, kBlockRow><<<row_blocks(R, false), kBlockRow, 0, stream>>>(
        x, stride, tokens, tokens64, weights, loss, g, R, V, vec);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t weighted_token_nll_fwd(DType dtype, const void* logits, int64_t stride,
                                   const void* tokens, bool tokens64, const float* weights,
                                   float* loss, void* grad, int64_t R, int64_t V,
                                   cudaStream_t stream) {
  if (R == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return launch<F32>(logits, stride, tokens, tokens64, weights, loss, grad, R, V, stream);
    case DType::kBFloat16:
      return launch<BF16>(logits, stride, tokens, tokens64, weights, loss, grad, R, V, stream);
    case DType::kFloat16:
      return launch<F16>(logits, stride, tokens, tokens64, weights, loss, grad, R, V, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace dvae_kernels
