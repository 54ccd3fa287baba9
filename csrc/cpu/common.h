// Row primitives shared by the CPU kernels: float conversion of a chunk, vectorised max and
// exponential sums, and the online (chunked) softmax statistics of one row.
//
// Why chunks: a row is read from memory once. Each chunk of kChunk values (16 KiB as float) is
// scanned twice while it sits in L1 (its maximum, then the exponentials), and the running
// statistics are rescaled when a later chunk raises the maximum. That costs one exp per element,
// where a per-element online update costs two.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace dvae_kernels {
namespace cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kChunk = 4096;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Rows handed to one task at least hold this many logits, so that a task outweighs its cost.
constexpr int64_t kGrainElements = 32768;

inline int64_t row_grain(int64_t V) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(V, 1)); }

// Calls f(tag) with tag's ::type the C++ type of dtype (float, BFloat16, Half).
template <typename T>
struct TypeTag { using type = T; };

template <typename F>
void dispatch_float(at::ScalarType dt, const char* op, F&& f) {
  switch (dt) {
    case at::kFloat: f(TypeTag<float>{}); break;
    case at::kBFloat16: f(TypeTag<at::BFloat16>{}); break;
    case at::kHalf: f(TypeTag<at::Half>{}); break;
    default: TORCH_CHECK(false, op, ": unsupported logits dtype ", c10::toString(dt));
  }
}

#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
// exp for 8 floats, inlined (Sleef's exp is an out-of-line call through a dispatch pointer,
// which costs more than the arithmetic here). exp(x) = 2^n · e^r with n = round(x·log2 e) and
// r = x - n·ln 2 (ln 2 in two parts, so r is exact to float precision), |r| <= ln2/2, and e^r
// by its Taylor polynomial of degree 7 (truncation error < 1e-8 relative, below float's ulp).
// 2^n is built in the exponent field. Below -87.3 the result is flushed to 0 (the denormals
// lost are < 1e-38, nothing next to a softmax sum >= 1); above 88.3 it is +inf (the kernels
// only take exp(d) of d <= 0, up to rounding); NaN stays NaN.
inline Vec vexp(const Vec& xv) {
  const __m256 x = xv;
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ));
  y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, _mm256_set1_ps(88.3f), _CMP_GT_OQ));
  y = _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  return Vec(y);
}
#else
inline Vec vexp(const Vec& x) { return x.exp(); }
#endif

// n values of src as float: src itself for float, else converted into buf (vectorised).
inline const float* as_float(const float* src, int64_t /*n*/, float* /*buf*/) { return src; }

template <typename T>
inline const float* as_float(const T* src, int64_t n, float* buf) {
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec v;
    at::vec::load_to_float<T>(src + i, v);
    v.store(buf + i);
  }
  for (; i < n; ++i) buf[i] = static_cast<float>(src[i]);
  return buf;
}

// Stores n floats into dst (rounding to nearest even for the 16-bit types).
inline void store_from_float(const float* src, float* dst, int64_t n) {
  if (src != dst) std::copy(src, src + n, dst);
}

template <typename T>
inline void store_from_float(const float* src, T* dst, int64_t n) {
  at::vec::convert(src, dst, n);
}

// Maximum of x[0, n): NaN if any value is NaN, -inf for n == 0.
inline float max_of(const float* x, int64_t n) {
  Vec m0(kNegInf), m1(kNegInf), m2(kNegInf), m3(kNegInf);
  constexpr int64_t W = Vec::size();
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    m0 = at::vec::maximum(m0, Vec::loadu(x + i));
    m1 = at::vec::maximum(m1, Vec::loadu(x + i + W));
    m2 = at::vec::maximum(m2, Vec::loadu(x + i + 2 * W));
    m3 = at::vec::maximum(m3, Vec::loadu(x + i + 3 * W));
  }
  for (; i + W <= n; i += W) m0 = at::vec::maximum(m0, Vec::loadu(x + i));
  m0 = at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3));
  float lanes[W];
  m0.store(lanes);
  float m = kNegInf;
  bool nan = false;
  for (int64_t k = 0; k < W; ++k) {
    nan |= std::isnan(lanes[k]);
    m = std::max(m, lanes[k]);
  }
  for (; i < n; ++i) {
    nan |= std::isnan(x[i]);
    m = std::max(m, x[i]);
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

// s += Σ exp(x - shift); with WITH_A also a += Σ exp(x - shift)·(x - shift), where a -inf logit
// contributes 0 (not 0·-inf). NaN or +inf logits make the sums NaN, as in the torch backend.
template <bool WITH_A>
inline void exp_sums(const float* x, int64_t n, float shift, float& s, float& a) {
  constexpr int64_t W = Vec::size();
  const Vec vshift(shift), zero(0.f), ninf(kNegInf);
  Vec s0(0.f), s1(0.f), a0(0.f), a1(0.f);
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const Vec x0 = Vec::loadu(x + i), x1 = Vec::loadu(x + i + W);
    const Vec d0 = x0 - vshift, d1 = x1 - vshift;
    const Vec e0 = vexp(d0), e1 = vexp(d1);
    s0 = s0 + e0;
    s1 = s1 + e1;
    if (WITH_A) {
      a0 = at::vec::fmadd(e0, Vec::blendv(d0, zero, x0 == ninf), a0);
      a1 = at::vec::fmadd(e1, Vec::blendv(d1, zero, x1 == ninf), a1);
    }
  }
  for (; i + W <= n; i += W) {
    const Vec x0 = Vec::loadu(x + i);
    const Vec d0 = x0 - vshift;
    const Vec e0 = vexp(d0);
    s0 = s0 + e0;
    if (WITH_A) a0 = at::vec::fmadd(e0, Vec::blendv(d0, zero, x0 == ninf), a0);
  }
  float ls[W], la[W];
  (s0 + s1).store(ls);
  (a0 + a1).store(la);
  float ss = 0.f, aa = 0.f;
  for (int64_t k = 0; k < W; ++k) {
    ss += ls[k];
    aa += la[k];
  }
  for (; i < n; ++i) {
    const float d = x[i] - shift;
    const float e = std::exp(d);
    ss += e;
    if (WITH_A && x[i] != kNegInf) aa += e * d;
  }
  s += ss;
  if (WITH_A) a += aa;
}

// Softmax statistics of one row: shift (the row maximum, 0 when the row is all -inf; NaN when
// it holds NaN), s = Σ exp(x - shift), a = Σ exp(x - shift)·(x - shift). Then
// lse = shift + log s and entropy = log s - a / s (no cancellation for large logits).
struct RowStats {
  float shift;
  float s;
  float a;
  float lse() const { return shift + std::log(s); }
  // log softmax(x) at a logit x: (x - shift) - log s, never x - lse (lse is rounded at the
  // logits' magnitude: 5e-4 at logits of 1e4, about 2000x PyTorch's own error).
  float logp(float x) const { return (x - shift) - std::log(s); }
  float entropy() const { return std::log(s) - a / s; }
};

template <bool WITH_A, typename T>
inline RowStats row_stats(const T* row, int64_t V, float* buf) {
  float m = kNegInf, shift = 0.f, s = 0.f, a = 0.f;
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    const float* x = as_float(row + c0, n, buf);
    const float cm = max_of(x, n);
    const float m_new = (std::isnan(cm) || std::isnan(m)) ? cm + m : std::max(m, cm);
    const float shift_new = m_new == kNegInf ? 0.f : m_new;
    // Rescale what was accumulated under the old shift (nothing yet while s == 0: skipping also
    // avoids exp(0 - shift_new) overflowing for very negative rows). NaN shifts poison s.
    if (shift_new != shift && s != 0.f) {
      const float alpha = std::exp(shift - shift_new);
      if (WITH_A) a = alpha * (a + s * (shift - shift_new));
      s *= alpha;
    }
    exp_sums<WITH_A>(x, n, shift_new, s, a);
    m = m_new;
    shift = shift_new;
  }
  return {shift, s, a};
}

inline int64_t read_token(const at::Tensor& tokens, int64_t i) {
  return tokens.scalar_type() == at::kLong ? tokens.const_data_ptr<int64_t>()[i]
                                           : tokens.const_data_ptr<int32_t>()[i];
}

}  // namespace cpu
}  // namespace dvae_kernels
