// The per-voxel steps of the CUDA boundary kernels (docs/contract.md §5), as __host__ __device__
// functions of a voxel's flat index so that the kernels (boundary.cu) and a host emulation
// (tests/emulate_boundary.cpp) run the same code. The window math itself is
// common/boundary_math.h, shared with the CPU kernels.
//
// Layout: p (B, K, voxels), edge and the uncertainty map u (B, voxels) in the accumulation dtype,
// u_range (B, 2) = per-sample [min, max] of the raw U, coefficients (3, B, voxels).
#pragma once

#include <cstdint>

#include "../common/boundary_math.h"
#include "../common/geometry.h"
#include "reductions.h"

namespace bimi {
namespace cuda {

// Window radii: 2-D maps have no extent along z; count = window^ndim (fixed at the borders too).
struct BoxWindow {
  int64_t rz, r;
  double count;
};

struct VoxelAt {
  int64_t b, s, z, y, x;
};

BIMI_HD VoxelAt voxel_at(const Volume& v, int64_t index) {
  VoxelAt a;
  const int64_t voxels = v.voxels();
  a.b = index / voxels;
  a.s = index % voxels;
  a.x = a.s % v.width;
  a.y = (a.s / v.width) % v.height;
  a.z = a.s / (v.width * v.height);
  return a;
}

// U = -sum_k p_k log(p_k + 1e-16) of voxel `index` (of B * voxels), summed by sum_plogp.
template <typename scalar_t, typename acc_t>
BIMI_HD acc_t uncertainty_at(const scalar_t* p, const Volume& v, int64_t index) {
  const int64_t voxels = v.voxels();
  const int64_t b = index / voxels, s = index % voxels;
  return -sum_plogp<acc_t>(p + b * v.channels * voxels + s, voxels, v.channels);
}

// Voxels per thread of one part of a sample in the uncertainty pass: each sample is cut into
// range_parts(v) parts of about kThreads * this voxels, one block each.
constexpr int64_t kRangeVoxelsPerThread = 8;

inline int64_t range_parts(const Volume& v) { return ceil_div(v.voxels(), kThreads * kRangeVoxelsPerThread); }

// The per-sample range reduction: part `part` of `parts` of sample b covers these voxels.
BIMI_HD int64_t range_part_begin(const Volume& v, int64_t parts, int64_t part) {
  return chunk_begin(v.voxels(), parts, part);
}

// u_range[b] = [min, max] of sample b over its parts' minima and maxima, in part order.
template <typename acc_t>
BIMI_HD void sample_range_of_parts(const acc_t* part_lo, const acc_t* part_hi, int64_t b, int64_t parts,
                                   acc_t* u_range) {
  acc_t lo = part_lo[b * parts], hi = part_hi[b * parts];
  for (int64_t part = 1; part < parts; ++part) {
    lo = lower_of(lo, part_lo[b * parts + part]);
    hi = higher_of(hi, part_hi[b * parts + part]);
  }
  u_range[2 * b] = lo;
  u_range[2 * b + 1] = hi;
}

// (u - min) / (max - min + 1e-6) with the sample's range, the reference's order of operations.
template <typename acc_t>
BIMI_HD acc_t normalized(acc_t u, const acc_t* u_range, int64_t b) {
  const acc_t lo = u_range[2 * b], hi = u_range[2 * b + 1];
  return (u - lo) / minmax_denominator(lo, hi);
}

// The window's steps [first, last] along one axis that stay inside [0, size) from `centre`: the
// voxels (and their order) that testing each of the w^ndim steps would keep, without the tests
// where a wide window overhangs a small map.
struct WindowSpan {
  int64_t first, last;
};
BIMI_HD WindowSpan clipped_span(int64_t centre, int64_t radius, int64_t size) {
  return {centre - radius < 0 ? -centre : -radius, centre + radius > size - 1 ? size - 1 - centre : radius};
}

// The five window sums around voxel `a` of the normalised u and the edge map, in a fixed order.
template <typename acc_t>
BIMI_HD WindowSums<acc_t> window_sums_at(const acc_t* u, const acc_t* e, const Volume& v,
                                         const BoxWindow& w, const VoxelAt& a) {
  const int64_t base = a.b * v.voxels();
  WindowSums<acc_t> s{0, 0, 0, 0, 0};
  const WindowSpan z = clipped_span(a.z, w.rz, v.depth), y = clipped_span(a.y, w.r, v.height),
                   x = clipped_span(a.x, w.r, v.width);
  for (int64_t tz = z.first; tz <= z.last; ++tz)
    for (int64_t ty = y.first; ty <= y.last; ++ty)
      for (int64_t tx = x.first; tx <= x.last; ++tx) {
        const int64_t i = base + v.voxel_index(a.z + tz, a.y + ty, a.x + tx);
        const acc_t uu = u[i], ee = e[i];
        s.u += uu;
        s.e += ee;
        s.uu += uu * uu;
        s.ee += ee * ee;
        s.ue += uu * ee;
      }
  return s;
}

// The clamped NCC term of the window centred at voxel `index`.
template <typename acc_t>
BIMI_HD acc_t ncc_at(const acc_t* u, const acc_t* e, const Volume& v, const BoxWindow& w, int64_t index) {
  return window_ncc(window_stats(window_sums_at(u, e, v, w, voxel_at(v, index)), static_cast<acc_t>(w.count)));
}

// dL/dS(UE), dL/dS(U), dL/dS(U^2) of the window centred at voxel `index`, with scale = dL/d(ncc)
// of every window (-dL/dCC / N), into coefficients[c * total + index].
template <typename acc_t>
BIMI_HD void coefficients_at(const acc_t* u, const acc_t* e, const Volume& v, const BoxWindow& w,
                             acc_t scale, int64_t index, acc_t* coefficients) {
  const int64_t total = v.batch * v.voxels();
  const WindowCoefficients<acc_t> c = window_coefficients(
      window_stats(window_sums_at(u, e, v, w, voxel_at(v, index)), static_cast<acc_t>(w.count)), scale);
  coefficients[index] = c.ue;
  coefficients[total + index] = c.u;
  coefficients[2 * total + index] = c.uu;
}

// dL/dp of every channel at voxel `index`: the window sums of the three coefficient maps give
// dL/dU_normalised, through the (detached) min-max and the entropy's derivative.
template <typename scalar_t, typename acc_t>
BIMI_HD void gradient_at(const scalar_t* p, const acc_t* u, const acc_t* e, const acc_t* u_range,
                         const acc_t* coefficients, const Volume& v, const BoxWindow& w, int64_t index,
                         scalar_t* grad_p) {
  const int64_t voxels = v.voxels();
  const int64_t total = v.batch * voxels;
  const VoxelAt a = voxel_at(v, index);
  const int64_t base = a.b * voxels;
  acc_t sum_ue = 0, sum_u = 0, sum_uu = 0;
  const WindowSpan z = clipped_span(a.z, w.rz, v.depth), y = clipped_span(a.y, w.r, v.height),
                   x = clipped_span(a.x, w.r, v.width);
  for (int64_t tz = z.first; tz <= z.last; ++tz)
    for (int64_t ty = y.first; ty <= y.last; ++ty)
      for (int64_t tx = x.first; tx <= x.last; ++tx) {
        const int64_t i = base + v.voxel_index(a.z + tz, a.y + ty, a.x + tx);
        sum_ue += coefficients[i];
        sum_u += coefficients[total + i];
        sum_uu += coefficients[2 * total + i];
      }
  const acc_t grad_u = normalized_uncertainty_gradient(e[index], u[index], sum_ue, sum_u, sum_uu) /
                       minmax_denominator(u_range[2 * a.b], u_range[2 * a.b + 1]);
  for (int64_t k = 0; k < v.channels; ++k) {
    const int64_t i = (a.b * v.channels + k) * voxels + a.s;
    grad_p[i] = static_cast<scalar_t>(grad_u * uncertainty_derivative(static_cast<acc_t>(p[i])));
  }
}

}  // namespace cuda
}  // namespace bimi
