// Per-pixel and per-window math of the boundary cross-correlation term (docs/contract.md §5),
// written once for the CPU and CUDA kernels. Each formula follows bimi_kernels.reference term by
// term.
#pragma once

#include <math.h>
#include <stdint.h>

#include "macros.h"
#include "numerics.h"

namespace bimi {

BIMI_HD float math_log(float x) { return ::logf(x); }
BIMI_HD double math_log(double x) { return ::log(x); }

// q log(q + 1e-16): one cluster's share of the uncertainty U = -sum_k q_k log(q_k + 1e-16).
template <typename acc_t>
BIMI_HD acc_t plogp(acc_t q) {
  return q * math_log(q + acc_t(kEpsLogU));
}

// sum_k q_k log(q_k + 1e-16) over `channels` values `stride` apart (the negated U): each term in
// acc_t, their sum in float64, rounded once to acc_t. The per-sample min-max stretches U's range,
// narrow for near-uniform maps (about 150x at K = 40 early in training), and magnifies U's
// rounding by as much; the terms all have one sign, so this sum is within about one rounding of
// the exact one (a float32 sum put CC past twice the reference's own float32 error there at some
// seeds: docs/contract.md §8). The CUDA kernels use it: float64 adds cost little next to the
// loads of the memory-bound uncertainty pass. The CPU kernels stay in float32, four channels at a
// time (cpu/simd/boundary_rows.h, which says why).
template <typename acc_t, typename scalar_t>
BIMI_HD acc_t sum_plogp(const scalar_t* q, int64_t stride, int64_t channels) {
  double total = 0;
  for (int64_t k = 0; k < channels; ++k) total += static_cast<double>(plogp(static_cast<acc_t>(q[k * stride])));
  return static_cast<acc_t>(total);
}

// dU/dq for one cluster probability: -(log(q + 1e-16) + q / (q + 1e-16)).
template <typename acc_t>
BIMI_HD acc_t uncertainty_derivative(acc_t q) {
  const acc_t shifted = q + acc_t(kEpsLogU);
  return -(math_log(shifted) + q / shifted);
}

// The denominator of the per-sample min-max normalisation: max - min + 1e-6.
template <typename acc_t>
BIMI_HD acc_t minmax_denominator(acc_t lo, acc_t hi) {
  return (hi - lo) + acc_t(kEpsMinMax);
}

// Box sums of one window: S(U), S(E), S(U^2), S(E^2), S(U E).
template <typename acc_t>
struct WindowSums {
  acc_t u, e, uu, ee, ue;
};

// The window's cross term and variances before and after the clamp at eps.
template <typename acc_t>
struct WindowStats {
  acc_t mu_u, mu_e;
  acc_t cross_raw, var_u_raw, var_e_raw;
  acc_t cross, var_u, var_e;
};

template <typename acc_t>
BIMI_HD acc_t clamp_min(acc_t x, acc_t lo) {
  return x < lo ? lo : x;
}

// n is the fixed window count window^ndim.
template <typename acc_t>
BIMI_HD WindowStats<acc_t> window_stats(const WindowSums<acc_t>& s, acc_t n) {
  const acc_t eps = acc_t(kEpsCC);
  WindowStats<acc_t> w;
  w.mu_u = s.u / n;
  w.mu_e = s.e / n;
  w.cross_raw = s.ue - w.mu_e * s.u - w.mu_u * s.e + w.mu_u * w.mu_e * n;
  w.var_u_raw = s.uu - acc_t(2) * w.mu_u * s.u + w.mu_u * w.mu_u * n;
  w.var_e_raw = s.ee - acc_t(2) * w.mu_e * s.e + w.mu_e * w.mu_e * n;
  w.cross = clamp_min(w.cross_raw, eps);
  w.var_u = clamp_min(w.var_u_raw, eps);
  w.var_e = clamp_min(w.var_e_raw, eps);
  return w;
}

// cross^2 / (var_U var_E) of one window; CC is minus the mean of these over all pixels.
template <typename acc_t>
BIMI_HD acc_t window_ncc(const WindowStats<acc_t>& w) {
  return w.cross * w.cross / (w.var_u * w.var_e);
}

// d(window_ncc)/d(S(UE)), d/d(S(U)) and d/d(S(U^2)), scaled by `scale` (= dL/d(ncc) of this
// window). A clamped quantity passes no gradient (torch's clamp passes it where x >= eps).
template <typename acc_t>
struct WindowCoefficients {
  acc_t ue, u, uu;
};

template <typename acc_t>
BIMI_HD WindowCoefficients<acc_t> window_coefficients(const WindowStats<acc_t>& w, acc_t scale) {
  const acc_t eps = acc_t(kEpsCC);
  const acc_t denom = w.var_u * w.var_e;
  const acc_t d_cross = w.cross_raw >= eps ? acc_t(2) * w.cross / denom : acc_t(0);
  const acc_t d_var_u = w.var_u_raw >= eps ? -(w.cross * w.cross / denom) / w.var_u : acc_t(0);
  WindowCoefficients<acc_t> c;
  // cross = S(UE) - S(U) S(E) / n  and  var_U = S(U^2) - S(U)^2 / n, so
  // d cross / d S(U) = -mu_E and d var_U / d S(U) = -2 mu_U.
  c.ue = scale * d_cross;
  c.u = scale * (d_cross * (-w.mu_e) + d_var_u * (acc_t(-2) * w.mu_u));
  c.uu = scale * d_var_u;
  return c;
}

// dL/dU_normalised at one pixel from the box sums of the three coefficient maps around it.
template <typename acc_t>
BIMI_HD acc_t normalized_uncertainty_gradient(acc_t edge, acc_t u_normalized, acc_t sum_ue,
                                              acc_t sum_u, acc_t sum_uu) {
  return edge * sum_ue + sum_u + acc_t(2) * u_normalized * sum_uu;
}

}  // namespace bimi
