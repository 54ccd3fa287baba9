// token_logprobs on CUDA: forward (logp, lse, entropy) and backward. Semantics: the torch
// backend in dvae_kernels/token_logprobs.py.
//
// Forward: one read of each row with online statistics (common.cuh), one rescale per 16-byte
// pack; the sampled token's logit is one extra load. Backward: one read of the row and one
// write of its gradient, p = exp(x - lse) recomputed from the saved lse and entropy.
// Short rows: a warp per row; long rows: a block per row. 16-byte loads when rows are aligned.
#include "common.cuh"

namespace dvae_kernels {
namespace cuda {
namespace {

template <typename E, int THREADS>
__global__ void __launch_bounds__(THREADS == 32 ? kWarpRowBlock : THREADS)
token_logprobs_fwd_kernel(const typename E::storage* __restrict__ logits, int64_t stride,
                          const void* __restrict__ tokens, bool tokens64, int64_t R, int64_t V,
                          bool vec, float* __restrict__ logp, float* __restrict__ lse_out,
                          float* __restrict__ ent_out) {
  using P = Pack<E>;
  const int64_t row = group_row<THREADS>();
  if (row >= R) return;  // uniform over the group: a warp, or the whole block (R blocks)
  const int lane = group_lane<THREADS>();
  const typename E::storage* x = logits + row * stride;
  Stats st = stats_empty();
  int64_t done = 0;
  if (vec) {
    const int64_t packs = V / P::N;
    const P* xp = reinterpret_cast<const P*>(x);
    for_each_pack<THREADS>(xp, packs, lane, [&](const P& pk, int64_t) {
      float f[P::N];
#pragma unroll
      for (int k = 0; k < P::N; ++k) f[k] = E::load(pk.v[k]);
      stats_add_values<true>(st, f);
    });
    done = packs * P::N;
  }
  for (int64_t j = done + lane; j < V; j += THREADS) {
    const float f[1] = {E::load(x[j])};
    stats_add_values<true>(st, f);
  }
  st = group_reduce<true, THREADS>(st);
  if (lane == 0) {
    const float log_s = logf(st.s);
    const float shift = stats_shift(st);
    const int64_t t = load_token(tokens, tokens64, row);
    lse_out[row] = shift + log_s;
    ent_out[row] = log_s - st.a / st.s;
    // (x - shift) - log s, never x - lse: lse is rounded at the logits' magnitude.
    logp[row] = (t >= 0 && t < V) ? (E::load(x[t]) - shift) - log_s : __int_as_float(0x7fc00000);
  }
}

// grad = g_lp·(onehot - p) - g_H·p·(x - lse + H), the second term 0 where x = -inf.
struct BwdRow {
  float lse, H, glp, gh;
  int64_t t;
  bool has_lp, has_h;
  __device__ __forceinline__ float operator()(float x, int64_t j) const {
    const float d = x - lse;
    const float p = fast_exp(d);
    float g = 0.f;
    if (has_lp) g = (j == t ? glp : 0.f) - glp * p;
    if (has_h) g -= gh * p * (fmaxf(d, -3.0e38f) + H);  // p = 0 at x = -inf: no 0·(-inf)
    return g;
  }
};

template <typename E, int THREADS>
__global__ void __launch_bounds__(THREADS == 32 ? kWarpRowBlock : THREADS)
token_logprobs_bwd_kernel(const float* __restrict__ glp, int64_t glp_stride,
                          const float* __restrict__ gh, int64_t gh_stride,
                          const typename E::storage* __restrict__ logits, int64_t stride,
                          const void* __restrict__ tokens, bool tokens64,
                          const float* __restrict__ lse, const float* __restrict__ ent,
                          typename E::storage* __restrict__ grad, int64_t R, int64_t V,
                          bool vec) {
  using P = Pack<E>;
  const int64_t row = group_row<THREADS>();
  if (row >= R) return;
  const int lane = group_lane<THREADS>();
  const typename E::storage* x = logits + row * stride;
  typename E::storage* out = grad + row * V;
  BwdRow f;
  f.lse = lse[row];
  f.H = ent[row];
  f.has_lp = glp != nullptr;
  f.has_h = gh != nullptr;
  f.glp = f.has_lp ? glp[row * glp_stride] : 0.f;
  f.gh = f.has_h ? gh[row * gh_stride] : 0.f;
  f.t = load_token(tokens, tokens64, row);
  int64_t done = 0;
  if (vec) {
    const int64_t packs = V / P::N;
    const P* xp = reinterpret_cast<const P*>(x);
    P* op = reinterpret_cast<P*>(out);
    for_each_pack<THREADS>(xp, packs, lane, [&](const P& pk, int64_t j) {
      P o;
#pragma unroll
      for (int k = 0; k < P::N; ++k) o.v[k] = E::store(f(E::load(pk.v[k]), j * P::N + k));
      op[j] = o;
    });
    done = packs * P::N;
  }
  for (int64_t j = done + lane; j < V; j += THREADS) out[j] = E::store(f(E::load(x[j]), j));
}

template <typename E>
cudaError_t launch_fwd(const void* logits, int64_t stride, const void* tokens, bool tokens64,
                       int64_t R, int64_t V, float* logp, float* lse, float* ent,
                       cudaStream_t stream) {
  using S = typename E::storage;
  const S* x = static_cast<const S*>(logits);
  const bool vec = rows_aligned<E>(logits, stride);
  if (V <= kWarpRowMaxV) {
    token_logprobs_fwd_kernel<E, 32><<<row_blocks(R, true), kWarpRowBlock, 0, stream>>>(
        x, stride, tokens, tokens64, R, V, vec, logp, lse, ent);
  } else {
    token_logprobs_fwd_kernel<E, kBlockRow><<<row_blocks(R, false), kBlockRow, 0, stream>>>(
        x, stride, tokens, tokens64, R, V, vec, logp, lse, ent);
  }
  return cudaGetLastError();
}

template <typename E>
cudaError_t launch_bwd(const float* glp, int64_t glp_stride, const float* gh, int64_t gh_stride,
                       const void* logits, int64_t stride, const void* tokens, bool tokens64,
                       const float* lse, const float* ent, void* grad, int64_t R, int64_t V,
                       cudaStream_t stream) {
  using S = typename E::storage;
  const S* x = static_cast<const S*>(logits);
  S* g = static_cast<S*>(grad);
  const bool vec = rows_aligned<E>(logits, stride) && rows_aligned<E>(grad, V);
  if (V <= kWarpRowMaxV) {
    token_logprobs_bwd_kernel<E, 32><<<row_blocks(R, true), kWarpRowBlock, 0, stream>>>(
        glp, glp_stride, gh, gh_stride, x, stride, tokens, tokens64, lse, ent, g, R, V, vec);
  } else {
    token_logprobs_bwd_kernel<E, kBlockRow><<<row_blocks(R, false), kBlockRow, 0, stream>>>(
        glp, glp_stride, gh, gh_stride, x, stride, tokens, tokens64, lse, ent, g, R, V, vec);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t token_logprobs_fwd(DType dtype, const void* logits, int64_t stride,
                               const void* tokens, bool tokens64, int64_t R, int64_t V,
                               float* logp, float* lse, float* entropy, cudaStream_t stream) {
  if (R == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return launch_fwd<F32>(logits, stride, tokens, tokens64, R, V, logp, lse, entropy, stream);
    case DType::kBFloat16:
      return launch_fwd<BF16>(logits, stride, tokens, tokens64, R, V, logp, lse, entropy, stream);
    case DType::kFloat16:
      return launch_fwd<F16>(logits, stride, tokens, tokens64, R, V, logp, lse, entropy, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t token_logprobs_bwd(DType dtype, const float* grad_logp, int64_t glp_stride,
                               const float* grad_entropy, int64_t gh_stride,
                               const void* logits, int64_t stride, const void* tokens,
                               bool tokens64, const float* lse, const float* entropy,
                               void* grad, int64_t R, int64_t V, cudaStream_t stream) {
  if (R == 0 || V == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return launch_bwd<F32>(grad_logp, glp_stride, grad_entropy, gh_stride, logits, stride,
                             tokens, tokens64, lse, entropy, grad, R, V, stream);
    case DType::kBFloat16:
      return launch_bwd<BF16>(grad_logp, glp_stride, grad_entropy, gh_stride, logits, stride,
                              tokens, tokens64, lse, entropy, grad, R, V, stream);
    case DType::kFloat16:
      return launch_bwd<F16>(grad_logp, glp_stride, grad_entropy, gh_stride, logits, stride,
                             tokens, tokens64, lse, entropy, grad, R, V, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace dvae_kernels
