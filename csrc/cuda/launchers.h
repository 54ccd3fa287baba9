// Launchers of the CUDA kernels, callable from plain C++: raw pointers and a stream, no ATen
// types, so that the .cu files include only CUDA headers (they compile in seconds rather than
// a minute per architecture). ops_cuda.cpp checks tensors and calls these.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace dvae_kernels {
namespace cuda {

enum class DType { kFloat32, kBFloat16, kFloat16 };

// logits [R, V] with row stride `stride` (elements), tokens [R] (int64 when tokens64 else
// int32) -> logp, lse, entropy [R] float32.
cudaError_t token_logprobs_fwd(DType dtype, const void* logits, int64_t stride,
                               const void* tokens, bool tokens64, int64_t R, int64_t V,
                               float* logp, float* lse, float* entropy, cudaStream_t stream);

// grad [R, V] contiguous, in the logits dtype. grad_logp / grad_entropy may be null (absent);
// their strides are in elements (0 for an expanded gradient).
cudaError_t token_logprobs_bwd(DType dtype, const float* grad_logp, int64_t glp_stride,
                               const float* grad_entropy, int64_t gh_stride,
                               const void* logits, int64_t stride, const void* tokens,
                               bool tokens64, const float* lse, const float* entropy,
                               void* grad, int64_t R, int64_t V, cudaStream_t stream);

// loss [R] = -w·logp; grad [R, V] contiguous = w·(softmax - onehot) unless grad is null.
cudaError_t weighted_token_nll_fwd(DType dtype, const void* logits, int64_t stride,
                                   const void* tokens, bool tokens64, const float* weights,
                                   float* loss, void* grad, int64_t R, int64_t V,
                                   cudaStream_t stream);

// rewards, logq [N, K] contiguous float32; beta, eta device scalars -> weights [N, K], ess [N].
cudaError_t daps_weights_fwd(const float* rewards, const float* logq, const float* beta,
                             const float* eta, float* weights, float* ess, int64_t N, int64_t K,
                             cudaStream_t stream);

// The whole bisection of dvae_kernels/solve_eta.py in one single-block launch; eta -> *out.
cudaError_t solve_eta(const float* rewards, const float* logq, const float* beta, float target,
                      float log_lo, float log_hi, float eta_max, float* out, int64_t N,
                      int64_t K, cudaStream_t stream);

}  // namespace cuda
}  // namespace dvae_kernels
