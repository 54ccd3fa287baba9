// token_logprobs on the CPU: forward (logp, lse, entropy) and backward. Semantics: the torch
// backend in dvae_kernels/token_logprobs.py. Rows run in parallel (at::parallel_for); each row
// is one pass over memory (see common.h), arithmetic in float32 whatever the logits dtype.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "common.h"

namespace dvae_kernels {
namespace cpu {
namespace {

constexpr const char* kFwd = "dvae_kernels::token_logprobs_fwd";
constexpr const char* kBwd = "dvae_kernels::token_logprobs_bwd";
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd(const at::Tensor& logits,
                                                                  const at::Tensor& tokens) {
  check_logits_tokens(kFwd, logits, tokens);
  const int64_t R = logits.size(0), V = logits.size(1), stride = logits.stride(0);
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({R}, opts), lse = at::empty({R}, opts), ent = at::empty({R}, opts);
  float* logp_p = logp.data_ptr<float>();
  float* lse_p = lse.data_ptr<float>();
  float* ent_p = ent.data_ptr<float>();
  dispatch_float(logits.scalar_type(), kFwd, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* base = logits.const_data_ptr<T>();
    at::parallel_for(0, R, row_grain(V), [&](int64_t begin, int64_t end) {
      alignas(64) float buf[kChunk];
      for (int64_t r = begin; r < end; ++r) {
        const T* row = base + r * stride;
        const RowStats st = row_stats<true>(row, V, buf);
        const float l = st.lse();
        const int64_t t = read_token(tokens, r);
        lse_p[r] = l;
        ent_p[r] = st.entropy();
        logp_p[r] = (t >= 0 && t < V) ? st.logp(static_cast<float>(row[t])) : kNaN;
      }
    });
  });
  return {logp, lse, ent};
}

// grad = g_lp·(onehot - p) - g_H·p·(x - lse + H), the second term 0 where x = -inf.
template <bool LP, bool ENT, typename T>
void backward_rows(const T* base, int64_t stride, T* out, int64_t V, const at::Tensor& tokens,
                   const float* glp, int64_t glp_stride, const float* gh, int64_t gh_stride,
                   const float* lse_p, const float* ent_p, int64_t begin, int64_t end) {
  constexpr int64_t W = Vec::size();
  alignas(64) float buf[kChunk];
  alignas(64) float obuf[kChunk];
  const Vec zero(0.f), ninf(kNegInf);
  for (int64_t r = begin; r < end; ++r) {
    const T* row = base + r * stride;
    T* orow = out + r * V;
    const float l = lse_p[r], H = ent_p[r];
    const float g_lp = LP ? glp[r * glp_stride] : 0.f;
    const float g_h = ENT ? gh[r * gh_stride] : 0.f;
    const Vec vl(l), vH(H), vglp(g_lp), vgh(g_h);
    for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
      const int64_t n = std::min(kChunk, V - c0);
      const float* x = as_float(row + c0, n, buf);
      float* o = std::is_same<T, float>::value ? reinterpret_cast<float*>(orow + c0) : obuf;
      int64_t i = 0;
      for (; i + W <= n; i += W) {
        const Vec xv = Vec::loadu(x + i);
        const Vec d = xv - vl;
        const Vec p = vexp(d);
        Vec g = zero;
        if (LP) g = zero - vglp * p;
        if (ENT) g = g - vgh * Vec::blendv(p * (d + vH), zero, xv == ninf);
        g.store(o + i);
      }
      for (; i < n; ++i) {
        const float d = x[i] - l;
        const float p = std::exp(d);
        float g = 0.f;
        if (LP) g = -g_lp * p;
        if (ENT) g -= g_h * (x[i] == kNegInf ? 0.f : p * (d + H));
        o[i] = g;
      }
      store_from_float(o, orow + c0, n);
    }
    if (LP) {
      const int64_t t = read_token(tokens, r);
      if (t >= 0 && t < V) {  // the one-hot term, recomputed in full for that entry
        const float xt = static_cast<float>(row[t]);
        const float d = xt - l;
        const float p = std::exp(d);
        float g = g_lp * (1.f - p);
        if (ENT) g -= g_h * (xt == kNegInf ? 0.f : p * (d + H));
        orow[t] = static_cast<T>(g);
      }
    }
  }
}

at::Tensor token_logprobs_bwd(const c10::optional<at::Tensor>& grad_logp,
                              const c10::optional<at::Tensor>& grad_entropy,
                              const at::Tensor& logits, const at::Tensor& tokens,
                              const at::Tensor& lse, const at::Tensor& entropy) {
  check_logits_tokens(kBwd, logits, tokens);
  const int64_t R = logits.size(0), V = logits.size(1), stride = logits.stride(0);
  const at::Device dev = logits.device();
  check_row_vector(kBwd, "lse", lse, R, dev, true);
  check_row_vector(kBwd, "entropy", entropy, R, dev, true);
  const bool lp = grad_logp.has_value() && grad_logp->defined();
  const bool ent = grad_entropy.has_value() && grad_entropy->defined();
  if (lp) check_row_vector(kBwd, "grad_logp", *grad_logp, R, dev, false);
  if (ent) check_row_vector(kBwd, "grad_entropy", *grad_entropy, R, dev, false);
  at::Tensor grad = at::empty({R, V}, logits.options());
  const float* glp = lp ? grad_logp->const_data_ptr<float>() : nullptr;
  const float* gh = ent ? grad_entropy->const_data_ptr<float>() : nullptr;
  const int64_t glp_stride = lp ? grad_logp->stride(0) : 0;
  const int64_t gh_stride = ent ? grad_entropy->stride(0) : 0;
  const float* lse_p = lse.const_data_ptr<float>();
  const float* ent_p = entropy.const_data_ptr<float>();
  dispatch_float(logits.scalar_type(), kBwd, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* base = logits.const_data_ptr<T>();
    T* out = grad.data_ptr<T>();
    at::parallel_for(0, R, row_grain(V), [&](int64_t begin, int64_t end) {
      if (lp && ent) {
        backward_rows<true, true>(base, stride, out, V, tokens, glp, glp_stride, gh, gh_stride,
                                  lse_p, ent_p, begin, end);
      } else if (lp) {
        backward_rows<true, false>(base, stride, out, V, tokens, glp, glp_stride, gh, gh_stride,
                                   lse_p, ent_p, begin, end);
      } else if (ent) {
        backward_rows<false, true>(base, stride, out, V, tokens, glp, glp_stride, gh, gh_stride,
                                   lse_p, ent_p, begin, end);
      } else {
        backward_rows<false, false>(base, stride, out, V, tokens, glp, glp_stride, gh,
                                    gh_stride, lse_p, ent_p, begin, end);
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(dvae_kernels, CPU, m) {
  m.impl("token_logprobs_fwd", &token_logprobs_fwd);
  m.impl("token_logprobs_bwd", &token_logprobs_bwd);
}

}  // namespace cpu
}  // namespace dvae_kernels
