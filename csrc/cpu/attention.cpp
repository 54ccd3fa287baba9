// Scaled dot-product attention on the CPU for the small heads of the latent transformers
// (head size 16-64, tens of positions): forward and backward. Semantics: dvae/models/fused.py
// (``attention``), which matches F.scaled_dot_product_attention (is_causal: query t sees keys
// 0..t, the top-left alignment SDPA uses).
//
// PyTorch's CPU flash kernel tiles for long sequences; at T = 8 and head size 16 its blocking
// costs far more than the arithmetic (the MNIST step spent about a quarter of its time there).
// Here one task owns a (batch, head) pair: its keys and values are a few KiB and stay in L1,
// each query row is one pass over them (scores, exp over the row at once, weighted sum of the
// values), and the backward recomputes the probabilities from the saved log-sum-exp (no [T, S]
// matrix is stored). Arithmetic in float32, vectorised over the head size.
//
// Layouts: q [B, H, T, D], k and v [B, H, S, D] with unit stride along D (any other strides: the
// views the models make by splitting heads); out and the gradients are written as [B, T, H, D]
// in memory (returned as [B, H, T, D] views), so merging the heads back is free.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../checks.h"
#include "common.h"

namespace dvae_kernels {
namespace cpu {
namespace {

constexpr const char* kFwd = "dvae_kernels::attention_fwd";
constexpr const char* kBwd = "dvae_kernels::attention_bwd";

#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
inline float hsum(const Vec& v) {
  const __m256 x = v;
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  return _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)));
}
inline float hmax(const Vec& v) {
  const __m256 x = v;
  __m128 r = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  r = _mm_max_ps(r, _mm_movehl_ps(r, r));
  return _mm_cvtss_f32(_mm_max_ss(r, _mm_movehdup_ps(r)));
}
// lanes at and beyond k (0 <= k <= 8) set to -inf
inline Vec mask_from(const Vec& v, int64_t k) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 past = _mm256_castsi256_ps(
      _mm256_cmpgt_epi32(lane, _mm256_set1_epi32(static_cast<int>(k) - 1)));
  return Vec(_mm256_blendv_ps(v, _mm256_set1_ps(kNegInf), past));
}
#else
inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, v);
}
inline float hmax(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, v);
}
inline Vec mask_from(const Vec& v, int64_t k) {
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  for (int64_t i = std::max<int64_t>(k, 0); i < Vec::size(); ++i) lanes[i] = kNegInf;
  return Vec::loadu(lanes);
}
#endif

inline float dot(const float* a, const float* b, int64_t D) {
  constexpr int64_t W = Vec::size();
  Vec acc(0.f);
  int64_t i = 0;
  for (; i + W <= D; i += W) acc = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc);
  float s = hsum(acc);
  for (; i < D; ++i) s += a[i] * b[i];
  return s;
}

// y += c·x over D values.
inline void axpy(float c, const float* x, float* y, int64_t D) {
  constexpr int64_t W = Vec::size();
  const Vec vc(c);
  int64_t i = 0;
  for (; i + W <= D; i += W) at::vec::fmadd(vc, Vec::loadu(x + i), Vec::loadu(y + i)).store(y + i);
  for (; i < D; ++i) y[i] += c * x[i];
}

// The rows of a [S, D] block (row stride rs) transposed into [D, S8] (S8: S rounded up to the
// vector width, zero columns beyond S), so that a query's scores against 8 keys are D
// multiply-adds of a broadcast query element, with no horizontal sums.
inline void transpose_rows(const float* src, int64_t rs, int64_t S, int64_t D, int64_t S8,
                           float* dst) {
  if (S8 > S)  // only the padding columns need zeros
    for (int64_t d = 0; d < D; ++d) std::fill(dst + d * S8 + S, dst + (d + 1) * S8, 0.f);
  for (int64_t j = 0; j < S; ++j)
    for (int64_t d = 0; d < D; ++d) dst[d * S8 + j] = src[j * rs + d];
}

// out[0, S8) = scale · Σ_d x[d]·mt[d, :]; entries at n and beyond are -inf.
inline void row_times(const float* x, const float* mt, int64_t D, int64_t S8, int64_t n,
                      float scale, float* out) {
  constexpr int64_t W = Vec::size();
  const Vec vs(scale), ninf(kNegInf);
  for (int64_t j0 = 0; j0 < S8; j0 += W) {
    // four independent sums: one chain of D multiply-adds would wait on each add's latency
    Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
    const float* col = mt + j0;
    int64_t d = 0;
    for (; d + 4 <= D; d += 4) {
      a0 = at::vec::fmadd(Vec(x[d]), Vec::loadu(col + d * S8), a0);
      a1 = at::vec::fmadd(Vec(x[d + 1]), Vec::loadu(col + (d + 1) * S8), a1);
      a2 = at::vec::fmadd(Vec(x[d + 2]), Vec::loadu(col + (d + 2) * S8), a2);
      a3 = at::vec::fmadd(Vec(x[d + 3]), Vec::loadu(col + (d + 3) * S8), a3);
    }
    for (; d < D; ++d) a0 = at::vec::fmadd(Vec(x[d]), Vec::loadu(col + d * S8), a0);
    Vec acc = ((a0 + a1) + (a2 + a3)) * vs;
    if (j0 + W > n) acc = mask_from(acc, n - j0);  // the columns past n
    acc.store(out + j0);
  }
}

// p[0, S8) = exp(p - m) in place (the -inf entries become 0), returns their sum.
inline float exp_inplace(float* p, int64_t S8, float m) {
  constexpr int64_t W = Vec::size();
  const Vec vm(m);
  Vec acc(0.f);
  for (int64_t j = 0; j < S8; j += W) {
    const Vec e = vexp(Vec::loadu(p + j) - vm);
    e.store(p + j);
    acc = acc + e;
  }
  return hsum(acc);
}

inline float max_row(const float* p, int64_t S8) {
  constexpr int64_t W = Vec::size();
  Vec m(kNegInf);
  for (int64_t j = 0; j < S8; j += W) m = at::vec::maximum(m, Vec::loadu(p + j));
  return hmax(m);
}

inline int64_t round_up(int64_t n, int64_t k) { return (n + k - 1) / k * k; }

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kFloat && t->device().is_cpu(), op,
                ": q, k and v must be 4-D float32 CPU tensors, got ", describe(*t));
    TORCH_CHECK(t->size(3) <= 1 || t->stride(3) == 1, op,
                ": q, k and v must have unit stride along the head size, got ", describe(*t));
  }
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have one shape, got ", describe(k),
              " and ", describe(v));
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3), op,
              ": q [B, H, T, D] and k [B, H, S, D] must agree in B, H and D, got ", describe(q),
              " and ", describe(k));
  TORCH_CHECK(k.size(2) >= 1, op, ": k must hold at least one position, got ", describe(k));
}

// The strides of a [B, H, T, D] tensor, read once (not through the tensor in the loops).
struct Strides {
  int64_t s0, s1, s2;
  explicit Strides(const at::Tensor& t) : s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)) {}
  int64_t at(int64_t b, int64_t h) const { return b * s0 + h * s1; }
};

// [B, H, T, D] view of a [B, T, H, D] contiguous buffer.
at::Tensor bthd(const at::Tensor& like, int64_t B, int64_t H, int64_t T, int64_t D) {
  return at::empty({B, T, H, D}, like.options()).permute({0, 2, 1, 3});
}

// (batch, head) pairs per task: enough work to outweigh a task's cost.
inline int64_t pair_grain(int64_t T, int64_t S, int64_t D) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(T * S * D, 1));
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, bool causal, double scale) {
  check_qkv(kFwd, q, k, v);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), S = k.size(2);
  const int64_t S8 = round_up(S, Vec::size());
  at::Tensor out = bthd(q, B, H, T, D);
  at::Tensor lse = at::empty({B, H, T}, q.options());
  const float* qp = q.const_data_ptr<float>();
  const float* kp = k.const_data_ptr<float>();
  const float* vp = v.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const Strides qs(q), ks(k), vs(v), os(out);
  at::parallel_for(0, B * H, pair_grain(T, S, D), [&](int64_t begin, int64_t end) {
    std::vector<float> kt(D * S8), p(S8), acc(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const float* qb = qp + qs.at(b, h);
      const float* vb = vp + vs.at(b, h);
      // one query (the decode step): its scores as dot products, no transpose to amortise
      const bool single = T == 1;
      if (!single) transpose_rows(kp + ks.at(b, h), ks.s2, S, D, S8, kt.data());
      for (int64_t t = 0; t < T; ++t) {
        const int64_t n = causal ? std::min(t + 1, S) : S;
        if (single) {
          const float* kb = kp + ks.at(b, h);
          for (int64_t j = 0; j < S8; ++j)
            p[j] = j < n ? sc * dot(qb + t * qs.s2, kb + j * ks.s2, D) : kNegInf;
        } else {
          row_times(qb + t * qs.s2, kt.data(), D, S8, n, sc, p.data());
        }
        const float m = max_row(p.data(), S8);
        const float l = exp_inplace(p.data(), S8, m);
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < n; ++j) axpy(p[j], vb + j * vs.s2, acc.data(), D);
        const float inv = 1.f / l;
        float* ot = op + os.at(b, h) + t * os.s2;
        for (int64_t d = 0; d < D; ++d) ot[d] = acc[d] * inv;
        lp[bh * T + t] = m + std::log(l);
      }
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double scale) {
  check_qkv(kBwd, q, k, v);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), S = k.size(2);
  const int64_t S8 = round_up(S, Vec::size());
  for (const auto* t : {&grad_out, &out}) {
    TORCH_CHECK(t->sizes() == q.sizes() && t->scalar_type() == at::kFloat &&
                    (D <= 1 || t->stride(3) == 1),
                kBwd, ": grad_out and out must be float32 like q ", describe(q),
                " with unit stride along D, got ", describe(*t));
  }
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == T &&
                  lse.is_contiguous() && lse.scalar_type() == at::kFloat,
              kBwd, ": lse must be contiguous float32 [B, H, T], got ", describe(lse));
  at::Tensor dq = bthd(q, B, H, T, D), dk = bthd(k, B, H, S, D), dv = bthd(v, B, H, S, D);
  const float* qp = q.const_data_ptr<float>();
  const float* kp = k.const_data_ptr<float>();
  const float* vp = v.const_data_ptr<float>();
  const float* gp = grad_out.const_data_ptr<float>();
  const float* op = out.const_data_ptr<float>();
  const float* lp = lse.const_data_ptr<float>();
  float* dqp = dq.data_ptr<float>();
  float* dkp = dk.data_ptr<float>();
  float* dvp = dv.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const Strides qs(q), ks(k), vs(v), gs(grad_out), os(out), dqs(dq), dks(dk), dvs(dv);
  at::parallel_for(0, B * H, pair_grain(T, S, D), [&](int64_t begin, int64_t end) {
    std::vector<float> kt(D * S8), vt(D * S8), p(S8), dp(S8), dkl(S * D), dvl(S * D), dql(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const float* qb = qp + qs.at(b, h);
      const float* kb = kp + ks.at(b, h);
      const float* gb = gp + gs.at(b, h);
      const float* ob = op + os.at(b, h);
      transpose_rows(kb, ks.s2, S, D, S8, kt.data());
      transpose_rows(vp + vs.at(b, h), vs.s2, S, D, S8, vt.data());
      std::fill(dkl.begin(), dkl.end(), 0.f);
      std::fill(dvl.begin(), dvl.end(), 0.f);
      for (int64_t t = 0; t < T; ++t) {
        const float* qt = qb + t * qs.s2;
        const float* gt = gb + t * gs.s2;
        const int64_t n = causal ? std::min(t + 1, S) : S;
        row_times(qt, kt.data(), D, S8, n, sc, p.data());
        exp_inplace(p.data(), S8, lp[bh * T + t]);  // p = exp(s - lse): the probabilities
        row_times(gt, vt.data(), D, S8, S8, 1.f, dp.data());  // dp_j = dO·v_j
        const float delta = dot(gt, ob + t * os.s2, D);  // Σ_d dO·O = Σ_j p·dp
        std::fill(dql.begin(), dql.end(), 0.f);
        for (int64_t j = 0; j < n; ++j) {
          const float ds = p[j] * (dp[j] - delta) * sc;
          axpy(p[j], gt, dvl.data() + j * D, D);
          axpy(ds, kb + j * ks.s2, dql.data(), D);
          axpy(ds, qt, dkl.data() + j * D, D);
        }
        std::copy(dql.begin(), dql.end(), dqp + dqs.at(b, h) + t * dqs.s2);
      }
      for (int64_t j = 0; j < S; ++j) {
        std::copy(dkl.begin() + j * D, dkl.begin() + (j + 1) * D,
                  dkp + dks.at(b, h) + j * dks.s2);
        std::copy(dvl.begin() + j * D, dvl.begin() + (j + 1) * D,
                  dvp + dvs.at(b, h) + j * dvs.s2);
      }
    }
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(dvae_kernels, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}

}  // namespace cpu
}  // namespace dvae_kernels
