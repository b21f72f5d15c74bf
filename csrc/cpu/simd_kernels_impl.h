// Definitions of the joint-count inner loops (declared in simd_kernels.h). Included by one
// translation unit per ISA, with BIMI_CPU_ISA naming the namespace; no include guard on purpose.
//
// The loops use GCC/Clang vector extensions with 32-byte vectors: the compiler emits AVX2+FMA
// instructions in the AVX2 unit and pairs of SSE2 instructions in the generic one.

#ifndef BIMI_UNROLL
#if defined(__clang__)
#define BIMI_UNROLL _Pragma("unroll")
#else
#define BIMI_UNROLL _Pragma("GCC unroll 16")
#endif
#endif

namespace bimi {
namespace cpu {
namespace BIMI_CPU_ISA {
namespace {

template <typename acc_t>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
};

template <typename acc_t>
inline typename Vec<acc_t>::type load(const acc_t* p) {
  typename Vec<acc_t>::type v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename acc_t>
inline void store(acc_t* p, const typename Vec<acc_t>::type& v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

template <typename acc_t>
inline typename Vec<acc_t>::type broadcast(acc_t s) {
  typename Vec<acc_t>::type v = {};
  return v + s;
}

// One value loaded from memory into every lane. The AVX2 unit uses vbroadcastss/sd straight from
// memory: GCC lowers `v + s` to a scalar add plus a shuffle, two extra FP-pipe ops per use.
#if defined(BIMI_CPU_ISA_IS_AVX2)
inline Vec<float>::type broadcast_load(const float* p) { return _mm256_broadcast_ss(p); }
inline Vec<double>::type broadcast_load(const double* p) { return _mm256_broadcast_sd(p); }
#else
template <typename acc_t>
inline typename Vec<acc_t>::type broadcast_load(const acc_t* p) {
  return broadcast<acc_t>(*p);
}
#endif

// Lanes summed pairwise in a fixed order.
template <typename acc_t>
inline acc_t horizontal_sum(const typename Vec<acc_t>::type& v) {
  constexpr int lanes = static_cast<int>(vector_lanes<acc_t>());
  acc_t t[lanes];
  __builtin_memcpy(t, &v, sizeof(v));
  for (int width = lanes / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) t[l] += t[l + width];
  return t[0];
}

template <typename acc_t>
struct IntVec;
template <>
struct IntVec<float> {
  typedef int32_t lane;
  typedef int32_t type __attribute__((vector_size(32)));
};
template <>
struct IntVec<double> {
  typedef int64_t lane;
  typedef int64_t type __attribute__((vector_size(32)));
};

// Constants of the vectorised log: exponent layout, ln 2 split so that e * ln2_hi is exact, and
// the coefficients 1/3, 1/5, ... of log(m) = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...) with
// s = (m - 1) / (m + 1), |s| <= 0.1716 for m in [sqrt(1/2), sqrt(2)].
template <typename acc_t>
struct LogConstants;
template <>
struct LogConstants<float> {
  static constexpr int mantissa_bits = 23;
  static constexpr int32_t exponent_mask = 0xff, bias = 127, mantissa_mask = 0x007fffff;
  static constexpr int32_t one_bits = 0x3f800000;
  static constexpr float ln2_hi = 0.693145751953125f, ln2_lo = 1.428606765330187045e-06f;
  static constexpr int terms = 5;  // s^9: truncation 2e-9, below float's half ulp
};
template <>
struct LogConstants<double> {
  static constexpr int mantissa_bits = 52;
  static constexpr int64_t exponent_mask = 0x7ff, bias = 1023, mantissa_mask = 0x000fffffffffffffLL;
  static constexpr int64_t one_bits = 0x3ff0000000000000LL;
  static constexpr double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
  static constexpr int terms = 11;  // s^21: truncation 4e-18, below double's half ulp
};

// Natural log of every lane, for lanes in the positive normal range (others: see log_lanes).
template <typename acc_t>
inline typename Vec<acc_t>::type vector_log(const typename Vec<acc_t>::type& x) {
  using V = typename Vec<acc_t>::type;
  using I = typename IntVec<acc_t>::type;
  using C = LogConstants<acc_t>;
  I bits;
  __builtin_memcpy(&bits, &x, sizeof(bits));
  I exponent = ((bits >> C::mantissa_bits) & C::exponent_mask) - C::bias;
  I mantissa_bits = (bits & C::mantissa_mask) | C::one_bits;
  V m;
  __builtin_memcpy(&m, &mantissa_bits, sizeof(m));  // m in [1, 2)
  const I high = m > acc_t(1.4142135623730951);       // all ones where m > sqrt(2)
  m = high ? m * acc_t(0.5) : m;
  exponent -= high;  // -(-1) = +1 where halved
  const V f = m - acc_t(1);
  const V s = f / (f + acc_t(2));
  const V s2 = s * s;
  V series = broadcast<acc_t>(acc_t(1) / acc_t(2 * C::terms - 1));
  for (int t = C::terms - 2; t >= 0; --t) series = series * s2 + acc_t(1) / acc_t(2 * t + 1);
  const V log_m = acc_t(2) * s * series;
  const V e = __builtin_convertvector(exponent, V);
  return e * C::ln2_hi + (log_m + e * C::ln2_lo);
}

// float: no division (the series above needs one per call, the costliest instruction of the
// uncertainty map). Cephes' logf: with x = m 2^e, m in [sqrt(1/2), sqrt(2)) and f = m - 1,
// log x = f - f^2/2 + f^3 P(f) + e ln 2, P of degree 8; largest relative error 7.9e-8 against
// the float64 log over 2^20 uniform values in (0.001, 1) (a standalone check of this function).
template <>
inline Vec<float>::type vector_log<float>(const Vec<float>::type& x) {
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
// exp(r) by a polynomial, times 2^n (its error: see normalized_power_row).
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

// Whether every lane of a comparison result is true (all bits set).
#if defined(BIMI_CPU_ISA_IS_AVX2)
inline bool all_lanes(const IntVec<float>::type& m) {
  return _mm256_movemask_ps(_mm256_castsi256_ps((__m256i)m)) == 0xff;
}
inline bool all_lanes(const IntVec<double>::type& m) {
  return _mm256_movemask_pd(_mm256_castsi256_pd((__m256i)m)) == 0xf;
}
#else
template <typename I>
inline bool all_lanes(const I& m) {
  constexpr int lanes = static_cast<int>(sizeof(I) / sizeof(m[0]));
  bool all = true;
  for (int l = 0; l < lanes; ++l) all &= m[l] != 0;
  return all;
}
#endif

// log of every lane through the vector path (tails use it too, so every element's result is the
// same wherever it falls); lanes outside the positive normal range (0, negative, inf, NaN, subnormal)
// use the scalar log, which gives them their IEEE results.
template <typename acc_t>
inline typename Vec<acc_t>::type log_lanes(const typename Vec<acc_t>::type& x) {
  using I = typename IntVec<acc_t>::type;
  constexpr int lanes = static_cast<int>(vector_lanes<acc_t>());
  typename Vec<acc_t>::type result = vector_log<acc_t>(x);
  const I normal = (x >= std::numeric_limits<acc_t>::min()) & (x <= std::numeric_limits<acc_t>::max());
  if (__builtin_expect(!all_lanes(normal), 0)) {
    for (int l = 0; l < lanes; ++l)
      if (normal[l] == 0) result[l] = std::log(x[l]);
  }
  return result;
}

// A KI x KJ block of J for one offset: KI*KJ vector accumulators over all tile pixels.
template <typename acc_t, int KI, int KJ>
void forward_block(const JointTile<acc_t>& tile, const OffsetPlan& plan, int64_t i0, int64_t j0,
                   acc_t* joint) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = vector_lanes<acc_t>();
  const int64_t n = tile.row_length;
  const int64_t first_channel = tile.first_channel_stride;
  V acc[KI][KJ];
  for (int i = 0; i < KI; ++i)
    for (int j = 0; j < KJ; ++j) acc[i][j] = broadcast<acc_t>(0);
  for (int64_t y = plan.row_begin; y < plan.row_end; ++y) {
    const acc_t* a = tile.first + y * tile.first_row_stride + i0 * first_channel;
    const acc_t* b = tile.band + plan.band_start + y * tile.band_row_stride + j0 * tile.band_row_length;
    for (int64_t x = 0; x < n; x += L) {
      V bv[KJ];
      for (int j = 0; j < KJ; ++j) bv[j] = load(b + j * tile.band_row_length + x);
      for (int i = 0; i < KI; ++i) {
        const V av = load(a + i * first_channel + x);
        for (int j = 0; j < KJ; ++j) acc[i][j] += av * bv[j];
      }
    }
  }
  const int64_t k = tile.channels;
  for (int i = 0; i < KI; ++i)
    for (int j = 0; j < KJ; ++j) joint[(i0 + i) * k + (j0 + j)] += horizontal_sum<acc_t>(acc[i][j]);
}

constexpr int kForwardBlockI = 4;
constexpr int kForwardBlockJ = 3;

template <typename acc_t, int KI>
void forward_block_j(const JointTile<acc_t>& tile, const OffsetPlan& plan, int64_t i0, int64_t j0,
                     int64_t kj, acc_t* joint) {
  switch (kj) {
    case 3: forward_block<acc_t, KI, 3>(tile, plan, i0, j0, joint); break;
    case 2: forward_block<acc_t, KI, 2>(tile, plan, i0, j0, joint); break;
    default: forward_block<acc_t, KI, 1>(tile, plan, i0, j0, joint); break;
  }
}

// Output rows [i0, i0 + KI) x pixels [x, x + 2 vectors) of one tile row: the sum over the row's
// active offsets a (band row b_rows[a], gradient block g_blocks[a]) and the channels j of
// g[a][i][j] * band[a][j][x ...], stored at dst[(i0 + i) * n + x ...]. The KI x 2 accumulators
// stay in registers: the unroll pragmas keep GCC from storing the array to the stack each step.
template <typename acc_t, int KI>
void backward_block(const acc_t* const* b_rows, const acc_t* const* g_blocks, int64_t active,
                    int64_t k, int64_t band_row_length, int64_t i0, int64_t x, acc_t* dst,
                    int64_t n) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = vector_lanes<acc_t>();
  V acc[KI][2];
  BIMI_UNROLL for (int i = 0; i < KI; ++i) acc[i][0] = acc[i][1] = broadcast<acc_t>(0);
  for (int64_t a = 0; a < active; ++a) {
    const acc_t* b = b_rows[a] + x;
    const acc_t* go = g_blocks[a] + i0 * k;
    for (int64_t j = 0; j < k; ++j) {
      const V b0 = load(b + j * band_row_length);
      const V b1 = load(b + j * band_row_length + L);
      BIMI_UNROLL for (int i = 0; i < KI; ++i) {
        const V gv = broadcast_load(go + i * k + j);
        acc[i][0] += gv * b0;
        acc[i][1] += gv * b1;
      }
    }
  }
  BIMI_UNROLL for (int i = 0; i < KI; ++i) {
    store(dst + (i0 + i) * n + x, acc[i][0]);
    store(dst + (i0 + i) * n + x + L, acc[i][1]);
  }
}

constexpr int kBackwardBlockI = 5;

// f(std::integral_constant<int, rows>{}) for 1 <= rows <= 5: a block size known at compile time.
template <typename F>
inline void with_block_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}
}  // namespace

template <typename acc_t>
void forward_tile(const JointTile<acc_t>& tile, acc_t* joint) {
  const int64_t k = tile.channels;
  for (int64_t o = 0; o < tile.num_offsets; ++o) {
    const OffsetPlan& plan = tile.plans[o];
    if (plan.row_begin >= plan.row_end) continue;
    acc_t* joint_o = joint + o * k * k;
    for (int64_t i0 = 0; i0 < k; i0 += kForwardBlockI) {
      const int64_t ki = k - i0 < kForwardBlockI ? k - i0 : kForwardBlockI;
      for (int64_t j0 = 0; j0 < k; j0 += kForwardBlockJ) {
        const int64_t kj = k - j0 < kForwardBlockJ ? k - j0 : kForwardBlockJ;
        switch (ki) {
          case 4: forward_block_j<acc_t, 4>(tile, plan, i0, j0, kj, joint_o); break;
          case 3: forward_block_j<acc_t, 3>(tile, plan, i0, j0, kj, joint_o); break;
          case 2: forward_block_j<acc_t, 2>(tile, plan, i0, j0, kj, joint_o); break;
          default: forward_block_j<acc_t, 1>(tile, plan, i0, j0, kj, joint_o); break;
        }
      }
    }
  }
}

template <typename acc_t>
void backward_tile(const JointTile<acc_t>& tile, const acc_t* g, acc_t* out, int64_t row_stride,
                   int64_t channel_stride) {
  constexpr int64_t L = vector_lanes<acc_t>();
  const int64_t k = tile.channels;
  const int64_t n = tile.row_length;
  // the offsets whose second pixel is inside the image for this row, as band rows and g blocks
  const acc_t** b_rows = tile.scratch;
  const acc_t** g_blocks = tile.scratch + tile.num_offsets;
  for (int64_t y = 0; y < tile.rows; ++y) {
    int64_t active = 0;
    for (int64_t o = 0; o < tile.num_offsets; ++o) {
      const OffsetPlan& plan = tile.plans[o];
      if (y < plan.row_begin || y >= plan.row_end) continue;
      b_rows[active] = tile.band + plan.band_start + y * tile.band_row_stride;
      g_blocks[active] = g + o * k * k;
      ++active;
    }
    acc_t* dst = out + y * row_stride;
    for (int64_t i0 = 0; i0 < k; i0 += kBackwardBlockI) {
      const int64_t ki = k - i0 < kBackwardBlockI ? k - i0 : kBackwardBlockI;
      for (int64_t x = 0; x < n; x += 2 * L) {
        with_block_rows(ki, [&](auto rows) {
          backward_block<acc_t, decltype(rows)::value>(b_rows, g_blocks, active, k,
                                                       tile.band_row_length, i0, x, dst,
                                                       channel_stride);
        });
      }
    }
  }
}

template void forward_tile<float>(const JointTile<float>&, float*);
template void forward_tile<double>(const JointTile<double>&, double*);
template void backward_tile<float>(const JointTile<float>&, const float*, float*, int64_t, int64_t);
template void backward_tile<double>(const JointTile<double>&, const double*, double*, int64_t,
                                    int64_t);

}  // namespace BIMI_CPU_ISA
}  // namespace cpu
}  // namespace bimi
