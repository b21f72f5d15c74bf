// The edge map's row kernels (EdgeRowKernels of kernels.h, used by cpu/edge.cpp): the gradient
// magnitude of image rows, the channel mean with its range, and the normalised power.
#pragma once

#include "external_headers.h"
#include "vector_math.h"
#include "vector_types.h"

namespace bimi::cpu::BIMI_CPU_ISA {
namespace {

// dz^2 + dy^2 + dx^2 at pixel x of an image row (wrap-around backward differences: dy = row -
// above, dz = row - before (3-D only, else nullptr), dx = row[x] - row[left]), the squares added
// in the reference's order (dims in order).
template <typename acc_t>
inline acc_t edge_squares(const acc_t* row, const acc_t* above, const acc_t* before, int64_t x,
                          int64_t left) {
  const acc_t here = row[x];
  const acc_t dy = here - above[x], dx = here - row[left];
  acc_t sum = acc_t(0);
  if (before != nullptr) {
    const acc_t dz = here - before[x];
    sum = dz * dz;
  }
  return (sum + dy * dy) + dx * dx;
}

// magnitude[x] += sqrt(dz^2 + dy^2 + dx^2) of one image row (edge_squares; the left neighbour of
// x = 0 is row[n - 1]).
template <typename acc_t>
void edge_magnitude_row(const acc_t* row, const acc_t* above, const acc_t* before, int64_t n,
                        acc_t* magnitude) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = vector_lanes<acc_t>();
  magnitude[0] += std::sqrt(edge_squares(row, above, before, 0, n - 1));
  int64_t x = 1;
  for (; x + L <= n; x += L) {
    const V here = load(row + x), dy = here - load(above + x), dx = here - load(row + x - 1);
    V sum = broadcast<acc_t>(0);
    if (before != nullptr) {
      const V dz = here - load(before + x);
      sum = dz * dz;
    }
    store(magnitude + x, load(magnitude + x) + vector_sqrt((sum + dy * dy) + dx * dx));
  }
  for (; x < n; ++x) magnitude[x] += std::sqrt(edge_squares(row, above, before, x, x - 1));
}

// m[x] /= channels (the mean over the image's channels); *lo, *hi: min and max of the result.
template <typename acc_t>
void channel_mean_range_row(acc_t* m, int64_t n, acc_t channels, acc_t* lo, acc_t* hi) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = vector_lanes<acc_t>();
  RunningRange<acc_t> range;
  int64_t x = 0;
  for (; x + L <= n; x += L) {
    const V value = load(m + x) / channels;
    store(m + x, value);
    range.add(value);
  }
  for (; x < n; ++x) {
    m[x] /= channels;
    range.add(m[x]);
  }
  range.result(lo, hi);
}

// out[x] = ((m[x] - lo) / denominator) ^ gamma: the edge map's min-max normalisation and power.
// float: exp(gamma log v) with the vectorised log and exp (1.8e-7 of the largest value from
// torch's pow on random images; the tests allow 1e-6: EDGE_RTOL in tests/backends/cases.py);
// float64: std::pow.
template <typename acc_t>
void normalized_power_row(const acc_t* m, int64_t n, acc_t lo, acc_t denominator, acc_t gamma, acc_t* out) {
  if constexpr (std::is_same_v<acc_t, float>) {
    using V = typename Vec<float>::type;
    constexpr int64_t L = vector_lanes<float>();
    for (int64_t x = 0; x < n; x += L) {
      const V v = (load_part(m, x, n) - lo) / denominator;
      const V power = vector_exp(gamma * log_lanes<float>(v));
      store_part(out, x, n, v > 0.0f ? power : v * 0.0f);  // 0^gamma = 0; a NaN stays NaN
    }
  } else {
    for (int64_t x = 0; x < n; ++x) out[x] = std::pow((m[x] - lo) / denominator, gamma);
  }
}

template <typename acc_t>
EdgeRowKernels<acc_t> edge_row_kernels() {
  return {&edge_magnitude_row<acc_t>, &channel_mean_range_row<acc_t>, &normalized_power_row<acc_t>};
}

}  // namespace
}  // namespace bimi::cpu::BIMI_CPU_ISA
