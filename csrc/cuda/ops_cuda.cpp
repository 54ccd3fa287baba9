// CUDA registrations of the op schemas in csrc/ops.cpp: tensor checks, output allocation and
// the launch on the current stream (no host synchronisation anywhere). The kernels live in the
// .cu files of this folder, behind the plain launchers of launchers.h.
#include <ATen/ops/empty.h>
#include <Python.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "../checks.h"
#include "launchers.h"

namespace dvae_kernels {
namespace cuda {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, "dvae_kernels: unsupported dtype ", describe(t));
  }
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void check_cuda(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": expected CUDA tensors, got ", describe(t));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd_impl(const at::Tensor& logits,
                                                                  const at::Tensor& tokens) {
  constexpr const char* op = "dvae_kernels::token_logprobs_fwd";
  check_logits_tokens(op, logits, tokens);
  check_cuda(op, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t R = logits.size(0), V = logits.size(1);
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({R}, opts), lse = at::empty({R}, opts), ent = at::empty({R}, opts);
  check_launch(op, cuda::token_logprobs_fwd(
      dtype_of(logits), logits.const_data_ptr(), logits.stride(0), tokens.const_data_ptr(),
      tokens.scalar_type() == at::kLong, R, V, logp.data_ptr<float>(), lse.data_ptr<float>(),
      ent.data_ptr<float>(), c10::cuda::getCurrentCUDAStream(logits.device().index())));
  return {logp, lse, ent};
}

at::Tensor token_logprobs_bwd_impl(const c10::optional<at::Tensor>& grad_logp,
                              const c10::optional<at::Tensor>& grad_entropy,
                              const at::Tensor& logits, const at::Tensor& tokens,
                              const at::Tensor& lse, const at::Tensor& entropy) {
  constexpr const char* op = "dvae_kernels::token_logprobs_bwd";
  check_logits_tokens(op, logits, tokens);
  check_cuda(op, logits);
  const int64_t R = logits.size(0), V = logits.size(1);
  const at::Device dev = logits.device();
  check_row_vector(op, "lse", lse, R, dev, true);
  check_row_vector(op, "entropy", entropy, R, dev, true);
  const bool lp = grad_logp.has_value() && grad_logp->defined();
  const bool ent = grad_entropy.has_value() && grad_entropy->defined();
  if (lp) check_row_vector(op, "grad_logp", *grad_logp, R, dev, false);
  if (ent) check_row_vector(op, "grad_entropy", *grad_entropy, R, dev, false);
  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor grad = at::empty({R, V}, logits.options());
  check_launch(op, cuda::token_logprobs_bwd(
      dtype_of(logits), lp ? grad_logp->const_data_ptr<float>() : nullptr,
      lp ? grad_logp->stride(0) : 0, ent ? grad_entropy->const_data_ptr<float>() : nullptr,
      ent ? grad_entropy->stride(0) : 0, logits.const_data_ptr(), logits.stride(0),
      tokens.const_data_ptr(), tokens.scalar_type() == at::kLong, lse.const_data_ptr<float>(),
      entropy.const_data_ptr<float>(), grad.data_ptr(), R, V,
      c10::cuda::getCurrentCUDAStream(dev.index())));
  return grad;
}

std::tuple<at::Tensor, at::Tensor> weighted_token_nll_fwd_impl(const at::Tensor& logits,
                                                         const at::Tensor& tokens,
                                                         const at::Tensor& weights,
                                                         bool compute_grad) {
  constexpr const char* op = "dvae_kernels::weighted_token_nll_fwd";
  check_logits_tokens(op, logits, tokens);
  check_cuda(op, logits);
  const int64_t R = logits.size(0), V = logits.size(1);
  check_row_vector(op, "weights", weights, R, logits.device(), true);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor loss = at::empty({R}, logits.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? at::empty({R, V}, logits.options())
                                 : at::empty({0}, logits.options());
  check_launch(op, cuda::weighted_token_nll_fwd(
      dtype_of(logits), logits.const_data_ptr(), logits.stride(0), tokens.const_data_ptr(),
      tokens.scalar_type() == at::kLong, weights.const_data_ptr<float>(),
      loss.data_ptr<float>(), compute_grad && grad.numel() > 0 ? grad.data_ptr() : nullptr, R,
      V, c10::cuda::getCurrentCUDAStream(logits.device().index())));
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> daps_weights_fwd_impl(const at::Tensor& rewards,
                                                   const at::Tensor& logq,
                                                   const at::Tensor& beta,
                                                   const at::Tensor& eta) {
  constexpr const char* op = "dvae_kernels::daps_weights_fwd";
  check_daps_inputs(op, rewards, logq, beta);
  check_scalar_tensor(op, "eta", eta, rewards.device());
  check_cuda(op, rewards);
  const c10::cuda::CUDAGuard guard(rewards.device());
  const int64_t N = rewards.size(0), K = rewards.size(1);
  at::Tensor w = at::empty({N, K}, rewards.options());
  at::Tensor ess = at::empty({N}, rewards.options());
  check_launch(op, cuda::daps_weights_fwd(
      rewards.const_data_ptr<float>(), logq.const_data_ptr<float>(),
      beta.const_data_ptr<float>(), eta.const_data_ptr<float>(), w.data_ptr<float>(),
      ess.data_ptr<float>(), N, K, c10::cuda::getCurrentCUDAStream(rewards.device().index())));
  return {w, ess};
}

at::Tensor solve_eta_impl(const at::Tensor& rewards, const at::Tensor& logq, const at::Tensor& beta,
                     double ess_target, double eta_min, double eta_max) {
  constexpr const char* op = "dvae_kernels::solve_eta_fwd";
  check_daps_inputs(op, rewards, logq, beta);
  check_cuda(op, rewards);
  TORCH_CHECK(ess_target > 0.0 && ess_target <= 1.0, op,
              ": ess_target must be a fraction of K in (0, 1], got ", ess_target);
  TORCH_CHECK(std::isfinite(eta_min) && std::isfinite(eta_max) && eta_min > 0.0 &&
                  eta_min < eta_max,
              op, ": need finite 0 < eta_min < eta_max, got eta_min = ", eta_min,
              ", eta_max = ", eta_max);
  const c10::cuda::CUDAGuard guard(rewards.device());
  const int64_t N = rewards.size(0), K = rewards.size(1);
  at::Tensor out = at::empty({}, rewards.options());
  // Same float32 constants as the CPU kernel and the torch backend.
  check_launch(op, cuda::solve_eta(
      rewards.const_data_ptr<float>(), logq.const_data_ptr<float>(),
      beta.const_data_ptr<float>(), static_cast<float>(ess_target * static_cast<double>(K)),
      static_cast<float>(std::log(eta_min)), static_cast<float>(std::log(eta_max)),
      static_cast<float>(eta_max), out.data_ptr<float>(), N, K,
      c10::cuda::getCurrentCUDAStream(rewards.device().index())));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dvae_kernels, CUDA, m) {
  m.impl("token_logprobs_fwd", &token_logprobs_fwd_impl);
  m.impl("token_logprobs_bwd", &token_logprobs_bwd_impl);
  m.impl("weighted_token_nll_fwd", &weighted_token_nll_fwd_impl);
  m.impl("daps_weights_fwd", &daps_weights_fwd_impl);
  m.impl("solve_eta_fwd", &solve_eta_impl);
}

}  // namespace cuda
}  // namespace dvae_kernels

// A Python module only so that `import dvae_kernels._C_cuda` loads the library (after
// dvae_kernels._C, which defines the schemas).
extern "C" PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
