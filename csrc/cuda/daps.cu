// daps_weights and solve_eta on CUDA. Semantics: the torch backends in
// dvae_kernels/daps_weights.py and dvae_kernels/solve_eta.py.
//
// A warp computes one row of K samples (K is 8 in the paper; any K works, lanes stride over it).
// solve_eta runs the whole bisection in one single-block launch: at each step every warp takes
// rows, the block sums their ESS, and thread 0 decides the next interval. eta never leaves the
// device: no host synchronisation.
#include "common.cuh"

namespace dvae_kernels {
namespace cuda {
namespace {

constexpr int ITERS = 48;  // dvae_kernels/solve_eta.py ITERS
constexpr int kSolveThreads = 1024;

// One row (all lanes take part, all get the result): weights into w unless null, returns
// ess = 1/Σw². s = (r - max r - beta·logq)/denom, w = softmax(s). A NaN anywhere in the row
// makes the softmax sum NaN, hence every weight and the ESS NaN, as in torch.
__device__ float warp_row_weights(const float* __restrict__ r, const float* __restrict__ lq,
                                  int64_t K, float beta, float denom, int lane,
                                  float* __restrict__ w) {
  float rmax = -INFINITY;
  for (int64_t k = lane; k < K; k += 32) rmax = fmaxf(rmax, r[k]);
  rmax = warp_max(rmax);
  float smax = -INFINITY;
  for (int64_t k = lane; k < K; k += 32) smax = fmaxf(smax, (r[k] - rmax - beta * lq[k]) / denom);
  smax = warp_max(smax);
  float z = 0.f;
  for (int64_t k = lane; k < K; k += 32) z += expf((r[k] - rmax - beta * lq[k]) / denom - smax);
  z = warp_sum(z);
  float q = 0.f;
  for (int64_t k = lane; k < K; k += 32) {
    const float wk = expf((r[k] - rmax - beta * lq[k]) / denom - smax) / z;
    if (w != nullptr) w[k] = wk;
    q += wk * wk;
  }
  return 1.f / warp_sum(q);
}

__global__ void __launch_bounds__(kWarpRowBlock)
daps_weights_kernel(const float* __restrict__ rewards, const float* __restrict__ logq,
                    const float* __restrict__ beta_p, const float* __restrict__ eta_p,
                    float* __restrict__ weights, float* __restrict__ ess, int64_t N, int64_t K) {
  const int64_t row = group_row<32>();
  if (row >= N) return;
  const int lane = group_lane<32>();
  const float beta = *beta_p;
  const float e = warp_row_weights(rewards + row * K, logq + row * K, K, beta, *eta_p + beta,
                                   lane, weights + row * K);
  if (lane == 0) ess[row] = e;
}

__global__ void __launch_bounds__(kSolveThreads)
solve_eta_kernel(const float* __restrict__ rewards, const float* __restrict__ logq,
                 const float* __restrict__ beta_p, float target, float log_lo, float log_hi,
                 float eta_max, float* __restrict__ out, int64_t N, int64_t K) {
  constexpr int WARPS = kSolveThreads / 32;
  __shared__ double partial[WARPS];
  __shared__ float mean;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (N == 0) {
    if (threadIdx.x == 0) *out = eta_max;
    return;
  }
  const float beta = *beta_p;
  // Mean ESS over the rows at eta; every thread gets the same value (so control stays uniform).
  auto mean_ess = [&](float eta) {
    double acc = 0.0;
    for (int64_t row = warp; row < N; row += WARPS) {
      acc += warp_row_weights(rewards + row * K, logq + row * K, K, beta, eta + beta, lane,
                              nullptr);
    }
    if (lane == 0) partial[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      double total = 0.0;
      for (int k = 0; k < WARPS; ++k) total += partial[k];
      mean = static_cast<float>(total / static_cast<double>(N));
    }
    __syncthreads();
    const float m = mean;
    __syncthreads();  // everyone has read `mean` before the next call overwrites it
    return m;
  };
  const float e = mean_ess(eta_max);
  float result;
  if (isnan(e)) {
    result = e;
  } else if (e < target) {
    result = eta_max;
  } else {
    float lo = log_lo, hi = log_hi;
    for (int it = 0; it < ITERS; ++it) {
      const float mid = 0.5f * (lo + hi);
      if (mean_ess(expf(mid)) >= target) {
        hi = mid;
      } else {
        lo = mid;
      }
    }
    result = expf(hi);
  }
  if (threadIdx.x == 0) *out = result;
}

}  // namespace

cudaError_t daps_weights_fwd(const float* rewards, const float* logq, const float* beta,
                             const float* eta, float* weights, float* ess, int64_t N, int64_t K,
                             cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  daps_weights_kernel<<<row_blocks(N, true), kWarpRowBlock, 0, stream>>>(
      rewards, logq, beta, eta, weights, ess, N, K);
  return cudaGetLastError();
}

cudaError_t solve_eta(const float* rewards, const float* logq, const float* beta, float target,
                      float log_lo, float log_hi, float eta_max, float* out, int64_t N,
                      int64_t K, cudaStream_t stream) {
  solve_eta_kernel<<<1, kSolveThreads, 0, stream>>>(rewards, logq, beta, target, log_lo, log_hi,
                                                    eta_max, out, N, K);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dvae_kernels
