// daps_weights and solve_eta on the CPU. Semantics: the torch backends in
// dvae_kernels/daps_weights.py and dvae_kernels/solve_eta.py (the bisection is the same
// algorithm, step for step, in float32).
//
// K is small (8 in the paper), so a row is a short scalar loop; rows run in parallel when the
// batch is large enough to pay for it.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "common.h"

namespace dvae_kernels {
namespace cpu {
namespace {

constexpr const char* kWeights = "dvae_kernels::daps_weights_fwd";
constexpr const char* kSolve = "dvae_kernels::solve_eta_fwd";
constexpr int ITERS = 48;  // dvae_kernels/solve_eta.py ITERS
// Below this many samples a batch is done on one thread (a task costs more than the rows).
constexpr int64_t kParallelSamples = 65536;

// Maximum that propagates NaN (as torch's max and softmax do).
inline float nan_max(float m, float v) { return (std::isnan(v) || v > m) ? v : m; }

// One row: s = (r - max r - beta·logq)/(eta + beta), w = softmax(s) (written to w unless
// nullptr; s is kept in `scores`), returns ess = 1/Σw².
inline float row_weights(const float* r, const float* lq, int64_t K, float beta, float denom,
                         float* scores, float* w) {
  float rmax = kNegInf;
  for (int64_t k = 0; k < K; ++k) rmax = nan_max(rmax, r[k]);
  float smax = kNegInf;
  for (int64_t k = 0; k < K; ++k) {
    scores[k] = (r[k] - rmax - beta * lq[k]) / denom;
    smax = nan_max(smax, scores[k]);
  }
  float z = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    scores[k] = std::exp(scores[k] - smax);
    z += scores[k];
  }
  float sum_w2 = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const float wk = scores[k] / z;
    if (w != nullptr) w[k] = wk;
    sum_w2 += wk * wk;
  }
  return 1.f / sum_w2;
}

// ess[i] for every row, in parallel over rows when the batch is large.
void all_ess(const float* r, const float* lq, int64_t N, int64_t K, float beta, float denom,
             float* w, float* ess) {
  const int64_t grain = N * K >= kParallelSamples ? std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1))
                                                  : std::max<int64_t>(N, 1);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(static_cast<size_t>(K));
    for (int64_t i = begin; i < end; ++i) {
      ess[i] = row_weights(r + i * K, lq + i * K, K, beta, denom, scores.data(),
                           w != nullptr ? w + i * K : nullptr);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> daps_weights_fwd(const at::Tensor& rewards,
                                                   const at::Tensor& logq,
                                                   const at::Tensor& beta,
                                                   const at::Tensor& eta) {
  check_daps_inputs(kWeights, rewards, logq, beta);
  check_scalar_tensor(kWeights, "eta", eta, rewards.device());
  const int64_t N = rewards.size(0), K = rewards.size(1);
  at::Tensor w = at::empty({N, K}, rewards.options());
  at::Tensor ess = at::empty({N}, rewards.options());
  const float b = *beta.const_data_ptr<float>(), e = *eta.const_data_ptr<float>();
  all_ess(rewards.const_data_ptr<float>(), logq.const_data_ptr<float>(), N, K, b, e + b,
          w.data_ptr<float>(), ess.data_ptr<float>());
  return {w, ess};
}

at::Tensor solve_eta(const at::Tensor& rewards, const at::Tensor& logq, const at::Tensor& beta,
                     double ess_target, double eta_min, double eta_max) {
  check_daps_inputs(kSolve, rewards, logq, beta);
  TORCH_CHECK(ess_target > 0.0 && ess_target <= 1.0, kSolve,
              ": ess_target must be a fraction of K in (0, 1], got ", ess_target);
  TORCH_CHECK(std::isfinite(eta_min) && std::isfinite(eta_max) && eta_min > 0.0 &&
                  eta_min < eta_max,
              kSolve, ": need finite 0 < eta_min < eta_max, got eta_min = ", eta_min,
              ", eta_max = ", eta_max);
  const int64_t N = rewards.size(0), K = rewards.size(1);
  const float eta_hi = static_cast<float>(eta_max);
  at::Tensor out = at::empty({}, rewards.options());
  if (N == 0) {
    *out.data_ptr<float>() = eta_hi;
    return out;
  }
  const float b = *beta.const_data_ptr<float>();
  const float* r = rewards.const_data_ptr<float>();
  const float* lq = logq.const_data_ptr<float>();
  std::vector<float> ess(static_cast<size_t>(N));
  auto mean_ess = [&](float eta) {
    all_ess(r, lq, N, K, b, eta + b, nullptr, ess.data());
    double total = 0.0;  // in row order: the same result on any number of threads
    for (int64_t i = 0; i < N; ++i) total += ess[i];
    return static_cast<float>(total / static_cast<double>(N));
  };
  const float target = static_cast<float>(ess_target * static_cast<double>(K));
  const float e = mean_ess(eta_hi);
  float result;
  if (std::isnan(e)) {
    result = std::numeric_limits<float>::quiet_NaN();
  } else if (e < target) {
    result = eta_hi;
  } else {
    float lo = static_cast<float>(std::log(eta_min));
    float hi = static_cast<float>(std::log(eta_max));
    for (int it = 0; it < ITERS; ++it) {
      const float mid = 0.5f * (lo + hi);
      if (mean_ess(std::exp(mid)) >= target) {
        hi = mid;
      } else {
        lo = mid;
      }
    }
    result = std::exp(hi);
  }
  *out.data_ptr<float>() = result;
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dvae_kernels, CPU, m) {
  m.impl("daps_weights_fwd", &daps_weights_fwd);
  m.impl("solve_eta_fwd", &solve_eta);
}

}  // namespace cpu
}  // namespace dvae_kernels
