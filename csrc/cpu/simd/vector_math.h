// Elementwise math on the vectors of vector_types.h: log (float and double), exp (float) and
// sqrt, with the same result in every lane position, so a value's result does not depend on where
// it falls in a row.
#pragma once

#include "external_headers.h"
#include "vector_types.h"

namespace bimi::cpu::BIMI_CPU_ISA {
namespace {

// Natural log of every lane (double), for lanes in the positive normal range (others: see
// log_lanes). With x = m 2^e, m in [sqrt(1/2), sqrt(2)] and s = (m - 1) / (m + 1) (|s| <= 0.1716),
// log(m) = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...) to s^21 (truncation 4e-18, below double's
// half ulp); ln 2 is split so that e * ln2_hi is exact.
inline Vec<double>::type vector_log(const Vec<double>::type& x) {
  using V = Vec<double>::type;
  using I = IntVec<double>::type;
  constexpr int mantissa_bits = 52;
  constexpr int64_t exponent_mask = 0x7ff, bias = 1023, mantissa_mask = 0x000fffffffffffffLL;
  constexpr int64_t one_bits = 0x3ff0000000000000LL;
  constexpr double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
  constexpr int terms = 11;
  I bits;
  __builtin_memcpy(&bits, &x, sizeof(bits));
  I exponent = ((bits >> mantissa_bits) & exponent_mask) - bias;
  I mantissa = (bits & mantissa_mask) | one_bits;
  V m;
  __builtin_memcpy(&m, &mantissa, sizeof(m));  // m in [1, 2)
  const I high = m > 1.4142135623730951;         // all ones where m > sqrt(2)
  m = high ? m * 0.5 : m;
  exponent -= high;  // -(-1) = +1 where halved
  const V f = m - 1.0;
  const V s = f / (f + 2.0);
  const V s2 = s * s;
  V series = broadcast<double>(1.0 / double(2 * terms - 1));
  for (int t = terms - 2; t >= 0; --t) series = series * s2 + 1.0 / double(2 * t + 1);
  const V log_m = 2.0 * s * series;
  const V e = __builtin_convertvector(exponent, V);
  return e * ln2_hi + (log_m + e * ln2_lo);
}

// float: no division (the series above needs one per call, the costliest instruction of the
// uncertainty map). Cephes' logf: with x = m 2^e, m in [sqrt(1/2), sqrt(2)) and f = m - 1,
// log x = f - f^2/2 + f^3 P(f) + e ln 2, P of degree 8; largest relative error 7.9e-8 against
// the float64 log over 2^20 uniform values in (0.001, 1) (a standalone check of this function).
inline Vec<float>::type vector_log(const Vec<float>::type& x) {
  using V = Vec<float>::type;
  using I = IntVec<float>::type;
  I bits;
  __builtin_memcpy(&bits, &x, sizeof(bits));
  I exponent = ((bits >> 23) & 0xff) - 127;
  const I mantissa_bits = (bits & 0x007fffff) | 0x3f800000;
  V m;
  __builtin_memcpy(&m, &mantissa_bits, sizeof(m));  // m in [1, 2)
  const I high = m > 1.41421356f;                     // all ones where m > sqrt(2)
  m = high ? m * 0.5f : m;
  exponent -= high;
  const V f = m - 1.0f;
  const V f2 = f * f;
  V poly = broadcast<float>(7.0376836292e-2f);
  poly = poly * f - 1.1514610310e-1f;
  poly = poly * f + 1.1676998740e-1f;
  poly = poly * f - 1.2420140846e-1f;
  poly = poly * f + 1.4249322787e-1f;
  poly = poly * f - 1.6668057665e-1f;
  poly = poly * f + 2.0000714765e-1f;
  poly = poly * f - 2.4999993993e-1f;
  poly = poly * f + 3.3333331174e-1f;
  const V e = __builtin_convertvector(exponent, V);
  V y = f * f2 * poly;
  y += e * -2.12194440e-4f;  // ln 2 = 0.693359375 - 2.12194440e-4, the first part exact in e * .
  y += f2 * -0.5f;
  return (f + y) + e * 0.693359375f;
}

// log of every lane through the vector path (tails use it too, so every element's result is the
// same wherever it falls); lanes outside the positive normal range (0, negative, inf, NaN,
// subnormal) use the scalar log, which gives them their IEEE results.
template <typename acc_t>
inline typename Vec<acc_t>::type log_lanes(const typename Vec<acc_t>::type& x) {
  using I = typename IntVec<acc_t>::type;
  constexpr int lanes = static_cast<int>(vector_lanes<acc_t>());
  typename Vec<acc_t>::type result = vector_log(x);
  const I normal = (x >= std::numeric_limits<acc_t>::min()) & (x <= std::numeric_limits<acc_t>::max());
  if (__builtin_expect(!all_lanes(normal), 0)) {
    for (int l = 0; l < lanes; ++l)
      if (normal[l] == 0) result[l] = std::log(x[l]);
  }
  return result;
}

// Square root of every lane.
#if defined(BIMI_CPU_ISA_IS_AVX2)
inline Vec<float>::type vector_sqrt(const Vec<float>::type& x) { return _mm256_sqrt_ps(x); }
inline Vec<double>::type vector_sqrt(const Vec<double>::type& x) { return _mm256_sqrt_pd(x); }
#else
template <typename V>
inline V vector_sqrt(V x) {
  constexpr int lanes = static_cast<int>(sizeof(V) / sizeof(x[0]));
  for (int l = 0; l < lanes; ++l) x[l] = std::sqrt(x[l]);
  return x;
}
#endif

// exp of every lane (float), for x = g log v with v in [0, 1] and g > 0 (so x <= 0; below
// -87.3 the result is the smallest normal). Cephes' expf: x = n ln 2 + r, |r| <= ln 2 / 2,
// exp(r) by a polynomial, times 2^n (its error: see normalized_power_row in edge_rows.h).
inline Vec<float>::type vector_exp(Vec<float>::type x) {
  using V = Vec<float>::type;
  using I = IntVec<float>::type;
  x = x < -87.3365448f ? broadcast<float>(-87.3365448f) : x;
  x = x > 88.3762626f ? broadcast<float>(88.3762626f) : x;
  // round(x / ln 2) with the 1.5 * 2^23 trick (exact for |x / ln 2| < 2^22)
  const V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const V r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  V poly = broadcast<float>(1.9875691500e-4f);
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const V y = (poly * (r * r) + r) + 1.0f;
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  V scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

}  // namespace
}  // namespace bimi::cpu::BIMI_CPU_ISA
