// Input checks shared by the CPU and CUDA registrations: one precise message per constraint.
// The Python layer (dvae_kernels/_validate.py) already gives users friendly errors; these guard
// the kernels themselves against a caller that goes straight to torch.ops.dvae_kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace dvae_kernels {

inline std::string describe(const at::Tensor& t) {
  std::string s = "shape [";
  for (int64_t i = 0; i < t.dim(); ++i) {
    s += (i ? ", " : "") + std::to_string(t.size(i));
  }
  s += "], dtype " + std::string(c10::toString(t.scalar_type())) + ", device " + t.device().str();
  return s;
}

// logits [R, V] in float32/bfloat16/float16 with unit column stride (any row stride), tokens [R]
// contiguous int32/int64, on one device.
inline void check_logits_tokens(const char* op, const at::Tensor& logits, const at::Tensor& tokens) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [R, V], got ", describe(logits));
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": logits must be float32, bfloat16 or float16 (float64 is served by the torch "
              "backend), got ", describe(logits));
  TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1, op,
              ": logits must have unit stride along V, got strides [", logits.stride(0), ", ",
              logits.stride(1), "] for ", describe(logits));
  TORCH_CHECK(logits.size(0) <= 1 || logits.stride(0) >= 0, op,
              ": logits must have a non-negative row stride, got ", logits.stride(0));
  TORCH_CHECK(tokens.dim() == 1, op, ": tokens must be 1-D [R], got ", describe(tokens));
  TORCH_CHECK(tokens.scalar_type() == at::kLong || tokens.scalar_type() == at::kInt, op,
              ": tokens must be int64 or int32, got ", describe(tokens));
  TORCH_CHECK(tokens.is_contiguous(), op, ": tokens must be contiguous, got strides [",
              tokens.stride(0), "] for ", describe(tokens));
  TORCH_CHECK(tokens.size(0) == logits.size(0), op, ": tokens must have R = ", logits.size(0),
              " entries (the rows of logits ", describe(logits), "), got ", describe(tokens));
  TORCH_CHECK(tokens.device() == logits.device(), op, ": logits and tokens must be on one device, "
              "got logits on ", logits.device().str(), " and tokens on ", tokens.device().str());
}

// A float32 vector of R entries on `device` (any stride: autograd hands in expanded gradients).
inline void check_row_vector(const char* op, const char* name, const at::Tensor& t, int64_t R,
                             const at::Device& device, bool need_contiguous) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == R, op, ": ", name, " must have shape [", R,
              "], got ", describe(t));
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
              describe(t));
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device.str(), ", got ",
              describe(t));
  TORCH_CHECK(!need_contiguous || t.is_contiguous(), op, ": ", name,
              " must be contiguous, got stride ", t.stride(0), " for ", describe(t));
}

// rewards and logq [N, K] float32 contiguous, beta (and eta) 0-d float32, all on one device.
inline void check_daps_inputs(const char* op, const at::Tensor& rewards, const at::Tensor& logq,
                              const at::Tensor& beta) {
  TORCH_CHECK(rewards.dim() == 2, op, ": rewards must be 2-D [N, K], got ", describe(rewards));
  TORCH_CHECK(rewards.scalar_type() == at::kFloat && rewards.is_contiguous(), op,
              ": rewards must be contiguous float32, got ", describe(rewards));
  TORCH_CHECK(logq.sizes() == rewards.sizes(), op, ": logq must have the shape of rewards ",
              describe(rewards), ", got ", describe(logq));
  TORCH_CHECK(logq.scalar_type() == at::kFloat && logq.is_contiguous(), op,
              ": logq must be contiguous float32, got ", describe(logq));
  TORCH_CHECK(logq.device() == rewards.device(), op, ": logq must be on ",
              rewards.device().str(), ", got ", describe(logq));
  TORCH_CHECK(beta.dim() == 0 && beta.scalar_type() == at::kFloat, op,
              ": beta must be a 0-d float32 tensor, got ", describe(beta));
  TORCH_CHECK(beta.device() == rewards.device(), op, ": beta must be on ",
              rewards.device().str(), ", got ", describe(beta));
}

inline void check_scalar_tensor(const char* op, const char* name, const at::Tensor& t,
                                const at::Device& device) {
  TORCH_CHECK(t.dim() == 0 && t.scalar_type() == at::kFloat, op, ": ", name,
              " must be a 0-d float32 tensor, got ", describe(t));
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device.str(), ", got ",
              describe(t));
}

}  // namespace dvae_kernels
