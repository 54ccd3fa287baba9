// sample_tokens on the CPU: one Gumbel-max draw per row of logits and its log-probability, in
// one pass over the row after its maximum. Semantics and the random stream: the torch backend
// in dvae_kernels/sample_tokens.py (the stream is documented there). The stream's integers and
// u are the same bits on every backend; the Gumbel noise -log(-log u) is within an ulp or two
// of torch.log's (vlog_pos below), so a token differs from the torch backend's only where two
// candidates' scores are that close.
//
// Per row: the maximum (NaN detection included) over the logits, then 8 columns at a time the
// stream's bits (two multiply-xorshift mixes in 32-bit lanes), the noise, the running best
// score per lane (strict >, so each lane keeps its first maximum) and Σ exp(z - max). The lanes
// are reduced at the end: the highest score, ties to the lowest column.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "common.h"

namespace dvae_kernels {
namespace cpu {
namespace {

constexpr const char* kOp = "dvae_kernels::sample_tokens_fwd";
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr uint32_t kM1 = 0x7FEB352Du;
constexpr uint32_t kM2 = 0x5BD1E995u;
constexpr float kUScale = 1.1920928955078125e-07f;  // 2^-23

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= kM1;
  x ^= x >> 15;
  x *= kM2;
  x ^= x >> 16;
  return x;
}

// The stream's uniform of (row key, column) -> u in (0, 1), exact in float32.
inline float stream_u(uint32_t key, uint32_t col) {
  return (static_cast<float>(mix32(key ^ col) >> 9) + 0.5f) * kUScale;
}

// out = x + b over n values (out may be x).
inline void add_to(const float* x, const float* b, float* out, int64_t n) {
  constexpr int64_t W = Vec::size();
  int64_t i = 0;
  for (; i + W <= n; i += W) (Vec::loadu(x + i) + Vec::loadu(b + i)).store(out + i);
  for (; i < n; ++i) out[i] = x[i] + b[i];
}

struct Draw {
  int64_t token;
  float logp;
};

// Temperature 0: the first maximum; logp = -log(number of maxima), NaN for an all -inf row.
inline Draw greedy_row(const float* x, int64_t V) {
  const float m = max_of(x, V);
  int64_t tok = 0;
  float count = 0.f;
  for (int64_t v = V - 1; v >= 0; --v) {
    if (x[v] == m) {
      tok = v;
      count += 1.f;
    }
  }
  return {tok, (m == kNegInf || std::isnan(m)) ? kNaN : -std::log(count)};
}

#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
// log of 8 positive normal floats, inlined (the Gumbel noise takes two per logit, and at::vec's
// log is an out-of-line Sleef call that cost three quarters of this kernel). Cephes' logf:
// x = 2^e·m with m in [sqrt(1/2), sqrt(2)), log(m) = f - f²/2 + f³·P(f) for f = m - 1, and
// e·ln2 in two parts. Within 2 ulp of the correctly rounded log over the inputs it meets here
// (u in [2^-24, 1) and -log u in (0, 16.7]); the documented stream allows an ulp or two between
// backends (dvae_kernels/sample_tokens.py).
inline __m256 vlog_pos(__m256 x) {
  const __m256i xi = _mm256_castps_si256(x);
  __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(xi, 23), _mm256_set1_epi32(127));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(
      _mm256_and_si256(xi, _mm256_set1_epi32(0x007FFFFF)), _mm256_set1_epi32(0x3F800000)));
  const __m256 big = _mm256_cmp_ps(m, _mm256_set1_ps(1.41421356237f), _CMP_GT_OQ);
  m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);
  e = _mm256_sub_epi32(e, _mm256_castps_si256(big));  // big lanes are -1 as integers: e + 1
  const __m256 f = _mm256_sub_ps(m, _mm256_set1_ps(1.f));
  const __m256 ef = _mm256_cvtepi32_ps(e);
  __m256 p = _mm256_set1_ps(7.0376836292e-2f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.1514610310e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.1676998740e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.2420140846e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.4249322787e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.6668057665e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.0000714765e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-2.4999993993e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(3.3333331174e-1f));
  const __m256 f2 = _mm256_mul_ps(f, f);
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, f), f2);
  y = _mm256_fmadd_ps(ef, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(f2, _mm256_set1_ps(0.5f), y);
  return _mm256_fmadd_ps(ef, _mm256_set1_ps(0.693359375f), _mm256_add_ps(f, y));
}

inline __m256i mix8(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(kM1)));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(kM2)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

// z = x·inv_t (float32, as the torch backend), m = max z, shift = m or 0 for -inf.
inline Draw gumbel_row(const float* x, int64_t V, uint32_t key, float inv_t) {
  const float mx = max_of(x, V);
  if (std::isnan(mx)) return {0, kNaN};
  const float m = mx * inv_t;  // rounding is monotone: max(x)·c rounds to max(x·c)
  const float shift = m == kNegInf ? 0.f : m;
  const Vec vinv(inv_t), vshift(shift), vhalf(0.5f), vscale(kUScale), ninf(kNegInf);
  const __m256i vkey = _mm256_set1_epi32(static_cast<int>(key));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  Vec best(kNegInf), bz(kNegInf), s(0.f);
  __m256i bidx = _mm256_setzero_si256();
  constexpr int64_t W = Vec::size();
  for (int64_t i = 0; i < V; i += W) {
    const int64_t n = std::min<int64_t>(W, V - i);
    const __m256i cols = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(i)), lane);
    Vec z = Vec::loadu(x + i, n) * vinv;
    if (n < W) {  // columns past V: z = -inf (no mass, never the best score)
      const __m256 past = _mm256_castsi256_ps(
          _mm256_cmpgt_epi32(cols, _mm256_set1_epi32(static_cast<int>(V - 1))));
      z = Vec(_mm256_blendv_ps(z, ninf, past));
    }
    const __m256i bits = _mm256_srli_epi32(mix8(_mm256_xor_si256(vkey, cols)), 9);
    const Vec u = (Vec(_mm256_cvtepi32_ps(bits)) + vhalf) * vscale;
    const __m256 nlu = _mm256_sub_ps(_mm256_setzero_ps(), vlog_pos(u));  // -log u > 0
    const Vec g = Vec(_mm256_sub_ps(_mm256_setzero_ps(), vlog_pos(nlu)));
    const Vec score = z + g;
    const __m256 better = _mm256_cmp_ps(score, best, _CMP_GT_OQ);
    best = Vec(_mm256_blendv_ps(best, score, better));
    bz = Vec(_mm256_blendv_ps(bz, z, better));
    bidx = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(bidx),
                                                _mm256_castsi256_ps(cols), better));
    s = s + vexp(z - vshift);
  }
  alignas(32) float lb[W], lz[W], ls[W];
  alignas(32) int32_t li[W];
  best.store(lb);
  bz.store(lz);
  s.store(ls);
  _mm256_store_si256(reinterpret_cast<__m256i*>(li), bidx);
  int k0 = 0;
  float sum = 0.f;
  for (int k = 0; k < W; ++k) {
    sum += ls[k];
    if (lb[k] > lb[k0] || (lb[k] == lb[k0] && li[k] < li[k0])) k0 = k;
  }
  return {li[k0], (lz[k0] - shift) - std::log(sum)};
}
#else
inline Draw gumbel_row(const float* x, int64_t V, uint32_t key, float inv_t) {
  const float mx = max_of(x, V);
  if (std::isnan(mx)) return {0, kNaN};
  const float m = mx * inv_t;
  const float shift = m == kNegInf ? 0.f : m;
  float best = kNegInf, bz = kNegInf, s = 0.f;
  int64_t tok = 0;
  for (int64_t v = 0; v < V; ++v) {
    const float z = x[v] * inv_t;
    const float score = z - std::log(-std::log(stream_u(key, static_cast<uint32_t>(v))));
    if (score > best) {
      best = score;
      bz = z;
      tok = v;
    }
    s += std::exp(z - shift);
  }
  return {tok, (bz - shift) - std::log(s)};
}
#endif

// logits [R, V] (unit column stride), bias [V] float32 or none (added to every row: the
// logits of linear_sample_tokens come from a matmul without it, which saves a pass writing the
// bias under them), seeds int64 [2], rows row0 .. row0 + R of the stream
// -> (tokens int64 [R], logp float32 [R]).
std::tuple<at::Tensor, at::Tensor> sample_tokens_fwd(const at::Tensor& logits,
                                                    const c10::optional<at::Tensor>& bias,
                                                    const at::Tensor& seeds,
                                                    double temperature, int64_t row0) {
  TORCH_CHECK(logits.dim() == 2, kOp, ": logits must be 2-D [R, V], got ", describe(logits));
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, kOp,
              ": logits must be float32, bfloat16 or float16, got ", describe(logits));
  TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1, kOp,
              ": logits must have unit stride along V, got ", describe(logits));
  TORCH_CHECK(seeds.dim() == 1 && seeds.size(0) == 2 && seeds.scalar_type() == at::kLong &&
                  seeds.is_contiguous() && seeds.device() == logits.device(),
              kOp, ": seeds must be a contiguous int64 [2] tensor on ", logits.device().str(),
              ", got ", describe(seeds));
  TORCH_CHECK(temperature >= 0.0 && std::isfinite(temperature), kOp,
              ": temperature must be finite and >= 0, got ", temperature);
  TORCH_CHECK(row0 >= 0, kOp, ": row0 must be >= 0, got ", row0);
  const int64_t R = logits.size(0), V = logits.size(1), stride = logits.stride(0);
  TORCH_CHECK(V >= 1, kOp, ": logits must have V >= 1 columns, got ", describe(logits));
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == V && bias->scalar_type() == at::kFloat &&
                    bias->is_contiguous() && bias->device() == logits.device(),
                kOp, ": bias must be a contiguous float32 [", V, "] tensor on ",
                logits.device().str(), ", got ", describe(*bias));
  }
  const float* bias_p = has_bias ? bias->const_data_ptr<float>() : nullptr;
  at::Tensor tokens = at::empty({R}, logits.options().dtype(at::kLong));
  at::Tensor logp = at::empty({R}, logits.options().dtype(at::kFloat));
  int64_t* tok_p = tokens.data_ptr<int64_t>();
  float* logp_p = logp.data_ptr<float>();
  const int64_t* sp = seeds.const_data_ptr<int64_t>();
  const uint32_t s0 = static_cast<uint32_t>(sp[0]), s1 = static_cast<uint32_t>(sp[1]);
  const bool greedy = temperature == 0.0;
  const float inv_t = greedy ? 1.f : static_cast<float>(1.0 / temperature);
  dispatch_float(dt, kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* base = logits.const_data_ptr<T>();
    at::parallel_for(0, R, row_grain(V), [&](int64_t begin, int64_t end) {
      const bool convert = has_bias || !std::is_same<T, float>::value;
      std::vector<float> buf(convert ? static_cast<size_t>(V) : 0);
      for (int64_t r = begin; r < end; ++r) {
        const float* x = as_float(base + r * stride, V, buf.data());
        if (has_bias) {  // the row plus the bias, in the row buffer (L1)
          add_to(x, bias_p, buf.data(), V);
          x = buf.data();
        }
        Draw d;
        if (greedy) {
          d = greedy_row(x, V);
        } else {
          const uint32_t key = mix32(s0 ^ mix32(static_cast<uint32_t>(row0 + r) + s1));
          d = gumbel_row(x, V, key, inv_t);
        }
        tok_p[r] = d.token;
        logp_p[r] = d.logp;
      }
    });
  });
  return {tokens, logp};
}

}  // namespace

TORCH_LIBRARY_IMPL(dvae_kernels, CPU, m) { m.impl("sample_tokens_fwd", &sample_tokens_fwd); }

}  // namespace cpu
}  // namespace dvae_kernels
