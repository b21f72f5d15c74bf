// Definitions of the boundary term's row kernels (BoundaryRowKernels in simd_kernels.h). Included
// after simd_kernels_impl.h (its vector helpers) by one translation unit per ISA, with
// BIMI_CPU_ISA naming the namespace; no include guard on purpose. The per-window math is
// common/boundary_math.h's, called lane by lane in loops the compiler vectorises; the log and the
// window sums are written with vectors.
namespace bimi {
namespace cpu {
namespace BIMI_CPU_ISA {
namespace {

// The pixels [x, x + L) of a row that may end inside the vector: full vectors are read in place,
// the last partial one through a zero-padded copy.
template <typename acc_t>
struct RowTail {
  static constexpr int64_t L = vector_lanes<acc_t>();
  acc_t values[L];
  RowTail(const acc_t* row, int64_t x, int64_t n) {
    for (int64_t l = 0; l < L; ++l) values[l] = x + l < n ? row[x + l] : acc_t(0);
  }
};

template <typename acc_t>
inline typename Vec<acc_t>::type load_part(const acc_t* row, int64_t x, int64_t n) {
  if (x + vector_lanes<acc_t>() <= n) return load(row + x);
  return load(RowTail<acc_t>(row, x, n).values);
}

template <typename acc_t>
inline void store_part(acc_t* row, int64_t x, int64_t n, const typename Vec<acc_t>::type& v) {
  constexpr int64_t L = vector_lanes<acc_t>();
  if (x + L <= n) return store(row + x, v);
  acc_t values[L];
  store(values, v);
  for (int64_t l = 0; x + l < n; ++l) row[x + l] = values[l];
}

// Min and max over vectors of values, then over single values (a row's tail).
template <typename acc_t>
struct RunningRange {
  using V = typename Vec<acc_t>::type;
  V low, high;
  acc_t lo, hi;

  // Written out: an implicit constructor would not get the AVX2 target of this unit.
  RunningRange()
      : low(broadcast<acc_t>(std::numeric_limits<acc_t>::infinity())),
        high(broadcast<acc_t>(-std::numeric_limits<acc_t>::infinity())),
        lo(std::numeric_limits<acc_t>::infinity()),
        hi(-std::numeric_limits<acc_t>::infinity()) {}

  void add(const V& v) {
    low = v < low ? v : low;
    high = v > high ? v : high;
  }
  void add(acc_t value) {
    lo = value < lo ? value : lo;
    hi = value > hi ? value : hi;
  }
  void result(acc_t* out_lo, acc_t* out_hi) const {
    constexpr int64_t L = vector_lanes<acc_t>();
    acc_t low_lanes[L], high_lanes[L];
    store(low_lanes, low);
    store(high_lanes, high);
    *out_lo = lo;
    *out_hi = hi;
    for (int64_t l = 0; l < L; ++l) {
      *out_lo = low_lanes[l] < *out_lo ? low_lanes[l] : *out_lo;
      *out_hi = high_lanes[l] > *out_hi ? high_lanes[l] : *out_hi;
    }
  }
};

// q log(q + 1e-16) + u of one vector: plogp of boundary_math.h, added to the channels before.
template <typename acc_t>
inline typename Vec<acc_t>::type add_plogp(const typename Vec<acc_t>::type& q,
                                           const typename Vec<acc_t>::type& u) {
  return u + q * log_lanes<acc_t>(q + acc_t(kEpsLogU));
}

// Channel by channel over the whole run of pixels (each channel row read front to back, u kept
// in cache): reading all channels per vector of pixels instead touches K pages per vector and
// runs 2.4x slower.
template <typename acc_t>
void uncertainty_row(const acc_t* q, int64_t stride, int64_t channels, int64_t n, acc_t* u, acc_t* lo,
                     acc_t* hi) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = vector_lanes<acc_t>();
  const int64_t full = n - n % L;
  for (int64_t x = 0; x < n; ++x) u[x] = acc_t(0);
  for (int64_t k = 0; k < channels; ++k) {
    const acc_t* qk = q + k * stride;
    for (int64_t x = 0; x < full; x += L) store(u + x, add_plogp<acc_t>(load(qk + x), load(u + x)));
    if (full < n)
      store_part(u, full, n, add_plogp<acc_t>(load(RowTail<acc_t>(qk, full, n).values),
                                              load(RowTail<acc_t>(u, full, n).values)));
  }
  RunningRange<acc_t> range;
  for (int64_t x = 0; x < full; x += L) {
    const V uv = -load(u + x);
    store(u + x, uv);
    range.add(uv);
  }
  for (int64_t x = full; x < n; ++x) {
    u[x] = -u[x];
    range.add(u[x]);
  }
  range.result(lo, hi);
}

// u + q log(q + 1e-16) (as add_plogp, so U matches the forward's bit for bit), and into *d
// dU/dq = -(log(q + 1e-16) + q / (q + 1e-16)) (uncertainty_derivative of boundary_math.h), from one
// log. A function, not a lambda: GCC does not apply `#pragma GCC target` to lambdas.
template <typename acc_t>
inline typename Vec<acc_t>::type add_plogp_with_derivative(const typename Vec<acc_t>::type& q,
                                                           const typename Vec<acc_t>::type& u,
                                                           typename Vec<acc_t>::type* d) {
  const typename Vec<acc_t>::type shifted = q + acc_t(kEpsLogU);
  const typename Vec<acc_t>::type lg = log_lanes<acc_t>(shifted);
  *d = -(lg + q / shifted);
  return u + q * lg;
}

// uncertainty_row without the min and max, plus each value's dU/dq into d[k * d_stride + x]: the
// backward's U and dU/dq from one log per value.
template <typename acc_t>
void uncertainty_with_derivative_row(const acc_t* q, int64_t stride, int64_t channels, int64_t n,
                                     acc_t* u, acc_t* d, int64_t d_stride) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = vector_lanes<acc_t>();
  const int64_t full = n - n % L;
  for (int64_t x = 0; x < n; ++x) u[x] = acc_t(0);
  for (int64_t k = 0; k < channels; ++k) {
    const acc_t* qk = q + k * stride;
    acc_t* dk = d + k * d_stride;
    V dv;
    for (int64_t x = 0; x < full; x += L) {
      store(u + x, add_plogp_with_derivative<acc_t>(load(qk + x), load(u + x), &dv));
      store(dk + x, dv);
    }
    if (full < n) {
      store_part(u, full, n,
                 add_plogp_with_derivative<acc_t>(load(RowTail<acc_t>(qk, full, n).values),
                                                  load(RowTail<acc_t>(u, full, n).values), &dv));
      store_part(dk, full, n, dv);
    }
  }
  for (int64_t x = 0; x < n; ++x) u[x] = -u[x];
}

// out[k * out_stride + x] = grad_u[x] * d[k * d_stride + x] (out may be d).
template <typename acc_t>
void scale_channels_row(const acc_t* d, int64_t d_stride, int64_t channels, int64_t n,
                        const acc_t* grad_u, acc_t* out, int64_t out_stride) {
  constexpr int64_t L = vector_lanes<acc_t>();
  const int64_t full = n - n % L;
  for (int64_t k = 0; k < channels; ++k) {
    const acc_t* dk = d + k * d_stride;
    acc_t* outk = out + k * out_stride;
    for (int64_t x = 0; x < full; x += L) store(outk + x, load(grad_u + x) * load(dk + x));
    for (int64_t x = full; x < n; ++x) outk[x] = grad_u[x] * dk[x];
  }
}

template <typename acc_t>
void window_sums_row(const acc_t* in, int64_t n, int64_t r, acc_t* out) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = vector_lanes<acc_t>();
  int64_t x = 0;
  for (; x + L <= n; x += L) {
    V sum = load(in + x);
    for (int64_t t = 1; t <= 2 * r; ++t) sum += load(in + x + t);
    store(out + x, sum);
  }
  for (; x < n; ++x) {
    acc_t sum = in[x];
    for (int64_t t = 1; t <= 2 * r; ++t) sum += in[x + t];
    out[x] = sum;
  }
}

template <typename acc_t>
void window_stats_row(const acc_t* u, const acc_t* e, int64_t n, int64_t r, acc_t* const* out) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = vector_lanes<acc_t>();
  int64_t x = 0;
  for (; x + L <= n; x += L) {
    V su = broadcast<acc_t>(0), se = su, suu = su, see = su, sue = su;
    for (int64_t t = 0; t <= 2 * r; ++t) {
      const V uv = load(u + x + t), ev = load(e + x + t);
      su += uv;
      se += ev;
      suu += uv * uv;
      see += ev * ev;
      sue += uv * ev;
    }
    store(out[0] + x, su);
    store(out[1] + x, se);
    store(out[2] + x, suu);
    store(out[3] + x, see);
    store(out[4] + x, sue);
  }
  for (; x < n; ++x) {
    acc_t su = 0, se = 0, suu = 0, see = 0, sue = 0;
    for (int64_t t = 0; t <= 2 * r; ++t) {
      const acc_t uv = u[x + t], ev = e[x + t];
      su += uv;
      se += ev;
      suu += uv * uv;
      see += ev * ev;
      sue += uv * ev;
    }
    out[0][x] = su;
    out[1][x] = se;
    out[2][x] = suu;
    out[3][x] = see;
    out[4][x] = sue;
  }
}

// COUNT rows known at compile time: the row pointers stay in registers across the row.
template <typename acc_t, int COUNT>
void add_rows_fixed(const acc_t* const* rows, int64_t n, acc_t* out) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = vector_lanes<acc_t>();
  const acc_t* row[COUNT];
  BIMI_UNROLL for (int i = 0; i < COUNT; ++i) row[i] = rows[i];
  int64_t x = 0;
  for (; x + L <= n; x += L) {
    V sum = load(row[0] + x);
    BIMI_UNROLL for (int i = 1; i < COUNT; ++i) sum += load(row[i] + x);
    store(out + x, sum);
  }
  for (; x < n; ++x) {
    acc_t sum = row[0][x];
    BIMI_UNROLL for (int i = 1; i < COUNT; ++i) sum += row[i][x];
    out[x] = sum;
  }
}

template <typename acc_t>
void add_rows(const acc_t* const* rows, int64_t count, int64_t n, acc_t* out) {
  switch (count) {
    case 1: return add_rows_fixed<acc_t, 1>(rows, n, out);
    case 2: return add_rows_fixed<acc_t, 2>(rows, n, out);
    case 3: return add_rows_fixed<acc_t, 3>(rows, n, out);
    case 4: return add_rows_fixed<acc_t, 4>(rows, n, out);
    case 5: return add_rows_fixed<acc_t, 5>(rows, n, out);
    case 6: return add_rows_fixed<acc_t, 6>(rows, n, out);
    case 7: return add_rows_fixed<acc_t, 7>(rows, n, out);
    default: break;
  }
  // longer windows: the first seven rows, then one row at a time (the same order of additions)
  add_rows_fixed<acc_t, 7>(rows, n, out);
  for (int64_t i = 7; i < count; ++i) {
    const acc_t* row = rows[i];
    for (int64_t x = 0; x < n; ++x) out[x] += row[x];
  }
}

template <typename acc_t>
void ncc_loop(const acc_t* __restrict su, const acc_t* __restrict se, const acc_t* __restrict suu,
              const acc_t* __restrict see, const acc_t* __restrict sue, int64_t n, acc_t count,
              acc_t* __restrict ncc) {
  for (int64_t x = 0; x < n; ++x)
    ncc[x] = window_ncc(window_stats(WindowSums<acc_t>{su[x], se[x], suu[x], see[x], sue[x]}, count));
}

template <typename acc_t>
acc_t ncc_sum(const acc_t* const* sums, int64_t n, acc_t count, acc_t* scratch) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = vector_lanes<acc_t>();
  ncc_loop(sums[0], sums[1], sums[2], sums[3], sums[4], n, count, scratch);
  V total = broadcast<acc_t>(0);
  for (int64_t x = 0; x < n; x += L) total += load_part(scratch, x, n);
  return horizontal_sum<acc_t>(total);
}

// __restrict parameters (GCC ignores it on local pointers): without them the loop needs more
// run-time alias checks than GCC makes, and stays scalar.
template <typename acc_t>
void coefficients_loop(const acc_t* __restrict su, const acc_t* __restrict se,
                       const acc_t* __restrict suu, const acc_t* __restrict see,
                       const acc_t* __restrict sue, int64_t n, acc_t count, acc_t scale,
                       acc_t* __restrict c_ue, acc_t* __restrict c_u, acc_t* __restrict c_uu) {
  for (int64_t x = 0; x < n; ++x) {
    const WindowCoefficients<acc_t> c = window_coefficients(
        window_stats(WindowSums<acc_t>{su[x], se[x], suu[x], see[x], sue[x]}, count), scale);
    c_ue[x] = c.ue;
    c_u[x] = c.u;
    c_uu[x] = c.uu;
  }
}

template <typename acc_t>
void coefficients_row(const acc_t* const* sums, int64_t n, acc_t count, acc_t scale, acc_t* const* out) {
  coefficients_loop(sums[0], sums[1], sums[2], sums[3], sums[4], n, count, scale, out[0], out[1], out[2]);
}

template <typename acc_t>
void uncertainty_gradient_loop(const acc_t* __restrict edge, const acc_t* __restrict u_normalized,
                               const acc_t* __restrict s_ue, const acc_t* __restrict s_u,
                               const acc_t* __restrict s_uu, acc_t denominator, int64_t n,
                               acc_t* __restrict grad_u) {
  for (int64_t x = 0; x < n; ++x)
    grad_u[x] = normalized_uncertainty_gradient(edge[x], u_normalized[x], s_ue[x], s_u[x], s_uu[x]) /
                denominator;
}

template <typename acc_t>
void uncertainty_gradient_row(const acc_t* edge, const acc_t* u_normalized,
                              const acc_t* const* coefficient_sums, acc_t denominator, int64_t n,
                              acc_t* grad_u) {
  uncertainty_gradient_loop(edge, u_normalized, coefficient_sums[0], coefficient_sums[1],
                            coefficient_sums[2], denominator, n, grad_u);
}

// magnitude[x] += sqrt(dz^2 + dy^2 + dx^2) with the wrap-around backward differences of one image
// row: dy = row - above, dz = row - before (3-D only, else nullptr), dx = row[x] - row[x - 1]
// (row[n - 1] for x = 0). The squares are added in the reference's order (dims in order).
template <typename acc_t>
void edge_magnitude_row(const acc_t* row, const acc_t* above, const acc_t* before, int64_t n,
                        acc_t* magnitude) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = vector_lanes<acc_t>();
  const auto squares = [&](acc_t here, acc_t left, int64_t x) {
    const acc_t dy = here - above[x], dx = here - left;
    acc_t sum = acc_t(0);
    if (before != nullptr) {
      const acc_t dz = here - before[x];
      sum = dz * dz;
    }
    return (sum + dy * dy) + dx * dx;
  };
  magnitude[0] += std::sqrt(squares(row[0], row[n - 1], 0));
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
  for (; x < n; ++x) magnitude[x] += std::sqrt(squares(row[x], row[x - 1], x));
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
// torch's pow on random images; tests/test_cpp.py allows 1e-6); float64: std::pow.
template <typename acc_t>
void normalized_power_row(const acc_t* m, int64_t n, acc_t lo, acc_t denominator, acc_t gamma, acc_t* out) {
  if constexpr (std::is_same_v<acc_t, float>) {
    using V = typename Vec<float>::type;
    constexpr int64_t L = vector_lanes<float>();
    for (int64_t x = 0; x < n; x += L) {
      const V v = (load_part(m, x, n) - lo) / denominator;
      const V power = vector_exp(gamma * log_lanes<float>(v));
      store_part(out, x, n, v > 0.0f ? power : broadcast<float>(0.0f));  // 0^gamma = 0
    }
  } else {
    for (int64_t x = 0; x < n; ++x) out[x] = std::pow((m[x] - lo) / denominator, gamma);
  }
}

}  // namespace

template <typename acc_t>
BoundaryRowKernels<acc_t> boundary_row_kernels() {
  BoundaryRowKernels<acc_t> k;
  k.uncertainty = &uncertainty_row<acc_t>;
  k.uncertainty_with_derivative = &uncertainty_with_derivative_row<acc_t>;
  k.scale_channels = &scale_channels_row<acc_t>;
  k.window_sums = &window_sums_row<acc_t>;
  k.window_stats = &window_stats_row<acc_t>;
  k.add_rows = &add_rows<acc_t>;
  k.ncc_sum = &ncc_sum<acc_t>;
  k.coefficients = &coefficients_row<acc_t>;
  k.uncertainty_gradient = &uncertainty_gradient_row<acc_t>;
  k.edge_magnitude = &edge_magnitude_row<acc_t>;
  k.channel_mean_range = &channel_mean_range_row<acc_t>;
  k.normalized_power = &normalized_power_row<acc_t>;
  return k;
}

template BoundaryRowKernels<float> boundary_row_kernels<float>();
template BoundaryRowKernels<double> boundary_row_kernels<double>();

}  // namespace BIMI_CPU_ISA
}  // namespace cpu
}  // namespace bimi
