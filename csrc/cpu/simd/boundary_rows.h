// The boundary term's row kernels (BoundaryRowKernels of kernels.h, used by cpu/boundary.cpp):
// the uncertainty map with its derivative, window sums along x, sums of rows, and the per-window
// NCC and its coefficients. The per-window math is common/boundary_math.h's, called lane by lane
// in loops the compiler vectorises; the log and the window sums are written with vectors.
#pragma once

#include "external_headers.h"
#include "vector_math.h"
#include "vector_types.h"

namespace bimi::cpu::BIMI_CPU_ISA {
namespace {

// u + q log(q + 1e-16) of one vector (plogp of boundary_math.h, added to the channels before)
// and, for the backward (WITH_DERIVATIVE), *d = dU/dq = -(log(q + 1e-16) + q / (q + 1e-16))
// (uncertainty_derivative of boundary_math.h) from the same log, so the backward's U matches the
// forward's bit for bit.
template <typename acc_t, bool WITH_DERIVATIVE>
inline typename Vec<acc_t>::type add_plogp(const typename Vec<acc_t>::type& q,
                                           const typename Vec<acc_t>::type& u,
                                           typename Vec<acc_t>::type* d) {
  const typename Vec<acc_t>::type shifted = q + acc_t(kEpsLogU);
  const typename Vec<acc_t>::type lg = log_lanes<acc_t>(shifted);
  if constexpr (WITH_DERIVATIVE) *d = -(lg + q / shifted);
  return u + q * lg;
}

// The sum over the channels: kPlogpChannels channels at a time, their terms added pairwise in
// registers and the group's total added to u, so u takes K / 4 additions instead of K. The
// per-sample min-max stretches U's range, narrow for near-uniform maps (about 150x at K = 40 early
// in training): a plain float32 sum over the channels (error growing with K) put the boundary
// term's gradient past the float32 tolerance there (docs/contract.md §8). The Triton and CUDA
// kernels sum in float64 (common/boundary_math.h's sum_plogp), which costs little on a GPU. Here
// it was tried: group totals added into float64 sums of 1024-pixel blocks made the boundary
// forward 6-12% slower (B=4 K=10 128x128, 1 thread: 0.63 against 0.56-0.60 ms), and all channels
// per vector of pixels with the sums in registers 25-45% slower. On the near-uniform K = 40 test
// case this float32 sum keeps CC within 0.03-1.2 times twice the reference's own error over seeds
// 4-11 (float64 sums: 0.02-0.6), all far inside the 2e-4 that §8 allows where cancellation
// dominates.
constexpr int kPlogpChannels = 4;  // add_channel_plogp handles the 1-3 channels left over

// u[x] += the COUNT channels' q log(q + 1e-16) at pixels [0, n) (q rows `stride` apart from q0;
// dU/dq rows d_stride apart from d0 with WITH_DERIVATIVE), the COUNT terms added pairwise.
template <typename acc_t, bool WITH_DERIVATIVE, int COUNT>
inline typename Vec<acc_t>::type plogp_group(const acc_t* q0, int64_t stride, int64_t x, int64_t n, bool tail,
                                              acc_t* d0, int64_t d_stride) {
  using V = typename Vec<acc_t>::type;
  const V zero = broadcast<acc_t>(0);
  V terms[COUNT];
  V dv;
  BIMI_UNROLL for (int c = 0; c < COUNT; ++c) {
    const V qv = tail ? load(RowTail<acc_t>(q0 + c * stride, x, n).values) : load(q0 + c * stride + x);
    // q log(q + 1e-16), rounded once (a fused multiply-add onto zero)
    terms[c] = add_plogp<acc_t, WITH_DERIVATIVE>(qv, zero, &dv);
    if constexpr (WITH_DERIVATIVE) {
      if (tail)
        store_part(d0 + c * d_stride, x, n, dv);
      else
        store(d0 + c * d_stride + x, dv);
    }
  }
  BIMI_UNROLL for (int width = 1; width < COUNT; width *= 2)
    BIMI_UNROLL for (int c = 0; c + width < COUNT; c += 2 * width) terms[c] += terms[c + width];
  return terms[0];
}

template <typename acc_t, bool WITH_DERIVATIVE, int COUNT>
void add_plogp_channels(const acc_t* q0, int64_t stride, int64_t n, acc_t* u, acc_t* d0, int64_t d_stride) {
  constexpr int64_t L = vector_lanes<acc_t>();
  const int64_t full = n - n % L;
  for (int64_t x = 0; x < full; x += L)
    store(u + x, load(u + x) + plogp_group<acc_t, WITH_DERIVATIVE, COUNT>(q0, stride, x, n, false, d0, d_stride));
  if (full < n)
    store_part(u, full, n,
               load_part(u, full, n) + plogp_group<acc_t, WITH_DERIVATIVE, COUNT>(q0, stride, full, n, true, d0, d_stride));
}

// u[x] = sum_k q[k][x] log(q[k][x] + 1e-16) (the negated U), a group of channels per pass over
// the whole run of pixels (each channel row read front to back, u kept in cache: reading all
// channels per vector of pixels instead touches K pages per vector and runs much slower); with
// WITH_DERIVATIVE, d[k * d_stride + x] = dU/dq too.
template <typename acc_t, bool WITH_DERIVATIVE>
void add_channel_plogp(const acc_t* q, int64_t stride, int64_t channels, int64_t n, acc_t* u,
                       acc_t* d, int64_t d_stride) {
  for (int64_t x = 0; x < n; ++x) u[x] = acc_t(0);
  int64_t k = 0;
  for (; k + kPlogpChannels <= channels; k += kPlogpChannels)
    add_plogp_channels<acc_t, WITH_DERIVATIVE, kPlogpChannels>(q + k * stride, stride, n, u, d + k * d_stride,
                                                               d_stride);
  const acc_t* q_rest = q + k * stride;
  acc_t* d_rest = d + k * d_stride;
  switch (channels - k) {
    case 1: return add_plogp_channels<acc_t, WITH_DERIVATIVE, 1>(q_rest, stride, n, u, d_rest, d_stride);
    case 2: return add_plogp_channels<acc_t, WITH_DERIVATIVE, 2>(q_rest, stride, n, u, d_rest, d_stride);
    case 3: return add_plogp_channels<acc_t, WITH_DERIVATIVE, 3>(q_rest, stride, n, u, d_rest, d_stride);
    default: return;  // the loop above leaves fewer than kPlogpChannels (4) channels
  }
}

template <typename acc_t>
void uncertainty_row(const acc_t* q, int64_t stride, int64_t channels, int64_t n, acc_t* u, acc_t* lo,
                     acc_t* hi) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = vector_lanes<acc_t>();
  const int64_t full = n - n % L;
  add_channel_plogp<acc_t, false>(q, stride, channels, n, u, nullptr, 0);
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

template <typename acc_t>
void uncertainty_with_derivative_row(const acc_t* q, int64_t stride, int64_t channels, int64_t n,
                                     acc_t* u, acc_t* d, int64_t d_stride) {
  add_channel_plogp<acc_t, true>(q, stride, channels, n, u, d, d_stride);
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

// In the member order of BoundaryRowKernels (each member's signature is distinct, so a slip does
// not compile).
template <typename acc_t>
BoundaryRowKernels<acc_t> boundary_row_kernels() {
  return {&uncertainty_row<acc_t>, &uncertainty_with_derivative_row<acc_t>, &scale_channels_row<acc_t>,
          &window_sums_row<acc_t>, &window_stats_row<acc_t>, &add_rows<acc_t>, &ncc_sum<acc_t>,
          &coefficients_row<acc_t>, &uncertainty_gradient_row<acc_t>};
}

}  // namespace
}  // namespace bimi::cpu::BIMI_CPU_ISA
