// weighted_token_nll on the CPU: loss = -w·logp per row and, when asked, the gradient
// w·(softmax(x) - onehot(t)) in the same call. Semantics: the torch backend in
// dvae_kernels/weighted_token_nll.py.
//
// With the gradient, each row is read from memory once: it is converted into a float buffer
// (L1/L2 resident for the vocabularies we meet), whose exponentials are kept, so the gradient
// costs one multiply per element and no second exp.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../checks.h"
#include "common.h"

namespace dvae_kernels {
namespace cpu {
namespace {

constexpr const char* kOp = "dvae_kernels::weighted_token_nll_fwd";
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// dst = exp(src - shift) (dst may be src), returns Σ dst.
inline float exp_to(const float* src, float* x, int64_t n, float shift) {
  constexpr int64_t W = Vec::size();
  const Vec vshift(shift);
  Vec s0(0.f), s1(0.f);
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const Vec e0 = vexp(Vec::loadu(src + i) - vshift);
    const Vec e1 = vexp(Vec::loadu(src + i + W) - vshift);
    e0.store(x + i);
    e1.store(x + i + W);
    s0 = s0 + e0;
    s1 = s1 + e1;
  }
  float lanes[W];
  (s0 + s1).store(lanes);
  float s = 0.f;
  for (int64_t k = 0; k < W; ++k) s += lanes[k];
  for (; i < n; ++i) {
    x[i] = std::exp(src[i] - shift);
    s += x[i];
  }
  return s;
}

inline void scale_inplace(float* x, int64_t n, float c) {
  constexpr int64_t W = Vec::size();
  const Vec vc(c);
  int64_t i = 0;
  for (; i + W <= n; i += W) (Vec::loadu(x + i) * vc).store(x + i);
  for (; i < n; ++i) x[i] *= c;
}

std::tuple<at::Tensor, at::Tensor> weighted_token_nll_fwd(const at::Tensor& logits,
                                                         const at::Tensor& tokens,
                                                         const at::Tensor& weights,
                                                         bool compute_grad) {
  check_logits_tokens(kOp, logits, tokens);
  const int64_t R = logits.size(0), V = logits.size(1), stride = logits.stride(0);
  check_row_vector(kOp, "weights", weights, R, logits.device(), true);
  at::Tensor loss = at::empty({R}, logits.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? at::empty({R, V}, logits.options())
                                 : at::empty({0}, logits.options());
  float* loss_p = loss.data_ptr<float>();
  const float* w_p = weights.const_data_ptr<float>();
  dispatch_float(logits.scalar_type(), kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* base = logits.const_data_ptr<T>();
    T* out = compute_grad ? grad.data_ptr<T>() : nullptr;
    at::parallel_for(0, R, row_grain(V), [&](int64_t begin, int64_t end) {
      alignas(64) float chunk[kChunk];
      std::vector<float> row_buf(compute_grad ? static_cast<size_t>(V) : 0);
      for (int64_t r = begin; r < end; ++r) {
        const T* row = base + r * stride;
        const int64_t t = read_token(tokens, r);
        const bool valid = t >= 0 && t < V;
        const float w = w_p[r];
        if (!compute_grad) {
          const RowStats st = row_stats<false>(row, V, chunk);
          loss_p[r] = -w * (valid ? st.logp(static_cast<float>(row[t])) : kNaN);
          continue;
        }
        float* x = row_buf.data();
        const float* xf = as_float(row, V, x);  // the row itself for float32
        const float m = max_of(xf, V);
        const float shift = m == kNegInf ? 0.f : m;
        const float s = exp_to(xf, x, V, shift);
        // (x - shift) - log s, never x - lse (see RowStats::logp)
        loss_p[r] = -w * (valid ? (static_cast<float>(row[t]) - shift) - std::log(s) : kNaN);
        // grad = w·e/s - w·onehot; e/s is softmax(x) = exp(x - lse).
        scale_inplace(x, V, w / s);
        if (valid) x[t] -= w;
        store_from_float(x, out + r * V, V);
      }
    });
  });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(dvae_kernels, CPU, m) {
  m.impl("weighted_token_nll_fwd", &weighted_token_nll_fwd);
}

}  // namespace cpu
}  // namespace dvae_kernels
