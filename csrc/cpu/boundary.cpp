// CPU boundary cross-correlation term (SPEC §5): CC(U(p), E) of one cluster map and its backward.
//
// Forward: U = -sum_k p_k log(p_k + 1e-16) per pixel, its per-sample min and max, the normalised
// map, then per region of rows the five box sums (separable: along x, then y, then z, each an
// ordered window sum) and the clamped NCC of each window centre, summed per region. Backward:
// per region, the box sums on the region plus a halo give each window centre's coefficients of
// S(UE), S(U), S(U^2) (common/boundary_math.h); their box sums give dL/dU at every pixel, times
// dU/dp. Regions depend only on the shape and their partial sums are added in region order, so the
// result is the same for any thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/boundary_math.h"
#include "../common/host_checks.h"
#include "simd_kernels.h"

namespace bimi {
namespace cpu {
namespace {

constexpr int64_t kRegionRows = 16;
constexpr int64_t kRegionPlanes3D = 4;

// A block of whole rows of one sample: planes [z0, z1) x rows [y0, y1) x all x.
struct Region {
  int64_t b, z0, z1, y0, y1;
};

struct RegionGrid {
  int64_t planes_per_region, planes_blocks, row_blocks, count;

  RegionGrid(const Volume& v, bool is_3d) {
    planes_per_region = is_3d ? kRegionPlanes3D : 1;
    planes_blocks = ceil_div(v.depth, planes_per_region);
    row_blocks = ceil_div(v.height, kRegionRows);
    count = v.batch * planes_blocks * row_blocks;
  }

  Region at(const Volume& v, int64_t r) const {
    Region region;
    region.b = r / (planes_blocks * row_blocks);
    const int64_t zb = (r / row_blocks) % planes_blocks;
    const int64_t yb = r % row_blocks;
    region.z0 = zb * planes_per_region;
    region.z1 = std::min(v.depth, region.z0 + planes_per_region);
    region.y0 = yb * kRegionRows;
    region.y1 = std::min(v.height, region.y0 + kRegionRows);
    return region;
  }
};

// Box sums (window (2rz+1) x (2ry+1) x (2rx+1), zero outside the volume) of `channels` maps over
// the output block planes [z0, z1) x rows [y0, y1) x all x. The maps are read through
// load(z, y, rows), called once per image row inside the volume, which writes the row's W values
// of channel c to rows[c]. Result layout: out[c][z - z0][y - y0][x].
template <typename acc_t>
class BoxSums {
 public:
  static constexpr int64_t kMaxChannels = 5;

  BoxSums(const Volume& v, int64_t rz, int64_t ry, int64_t rx, int64_t channels)
      : v_(v), rz_(rz), ry_(ry), rx_(rx), channels_(channels) {}

  template <typename Load>
  const std::vector<acc_t>& run(int64_t z0, int64_t z1, int64_t y0, int64_t y1, Load load) {
    const int64_t w = v_.width;
    const int64_t nz = z1 - z0, ny = y1 - y0;
    const int64_t ez = nz + 2 * rz_, ey = ny + 2 * ry_, ex = w + 2 * rx_;
    ext_.assign(channels_ * ez * ey * ex, acc_t(0));
    acc_t* rows[kMaxChannels];
    for (int64_t zz = 0; zz < ez; ++zz) {
      const int64_t z = z0 - rz_ + zz;
      if (z < 0 || z >= v_.depth) continue;
      for (int64_t yy = 0; yy < ey; ++yy) {
        const int64_t y = y0 - ry_ + yy;
        if (y < 0 || y >= v_.height) continue;
        for (int64_t c = 0; c < channels_; ++c) rows[c] = ext_.data() + ((c * ez + zz) * ey + yy) * ex + rx_;
        load(z, y, rows);
      }
    }
    // along x
    along_x_.assign(channels_ * ez * ey * w, acc_t(0));
    for (int64_t line = 0; line < channels_ * ez * ey; ++line) {
      const acc_t* src = ext_.data() + line * ex;
      acc_t* dst = along_x_.data() + line * w;
      for (int64_t t = 0; t <= 2 * rx_; ++t)
        for (int64_t x = 0; x < w; ++x) dst[x] += src[x + t];
    }
    // along y
    along_y_.assign(channels_ * ez * ny * w, acc_t(0));
    for (int64_t c = 0; c < channels_; ++c)
      for (int64_t zz = 0; zz < ez; ++zz)
        for (int64_t y = 0; y < ny; ++y) {
          acc_t* dst = along_y_.data() + ((c * ez + zz) * ny + y) * w;
          for (int64_t t = 0; t <= 2 * ry_; ++t) {
            const acc_t* src = along_x_.data() + ((c * ez + zz) * ey + y + t) * w;
            for (int64_t x = 0; x < w; ++x) dst[x] += src[x];
          }
        }
    // along z
    out_.assign(channels_ * nz * ny * w, acc_t(0));
    for (int64_t c = 0; c < channels_; ++c)
      for (int64_t z = 0; z < nz; ++z)
        for (int64_t t = 0; t <= 2 * rz_; ++t) {
          const acc_t* src = along_y_.data() + (c * ez + z + t) * ny * w;
          acc_t* dst = out_.data() + (c * nz + z) * ny * w;
          for (int64_t e = 0; e < ny * w; ++e) dst[e] += src[e];
        }
    return out_;
  }

 private:
  Volume v_;
  int64_t rz_, ry_, rx_, channels_;
  std::vector<acc_t> ext_, along_x_, along_y_, out_;
};

template <typename acc_t>
PlogpFn<acc_t> plogp_kernel() {
#if defined(BIMI_HAVE_AVX2_KERNELS)
  if (use_avx2()) return &avx2::accumulate_plogp<acc_t>;
#endif
  return &generic::accumulate_plogp<acc_t>;
}

template <typename acc_t>
UncertaintyDerivativeFn<acc_t> uncertainty_derivative_kernel() {
#if defined(BIMI_HAVE_AVX2_KERNELS)
  if (use_avx2()) return &avx2::scaled_uncertainty_derivative<acc_t>;
#endif
  return &generic::scaled_uncertainty_derivative<acc_t>;
}

// U = -sum_k p_k log(p_k + 1e-16) of every pixel: (B, voxels).
template <typename scalar_t, typename acc_t>
void uncertainty_map(const scalar_t* p, const Volume& v, acc_t* u) {
  const int64_t voxels = v.voxels();
  const int64_t rows = v.batch * v.depth * v.height;
  const PlogpFn<acc_t> accumulate = plogp_kernel<acc_t>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q(v.width);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (v.depth * v.height);
      const int64_t pixel0 = (row % (v.depth * v.height)) * v.width;
      acc_t* dst = u + b * voxels + pixel0;
      std::fill(dst, dst + v.width, acc_t(0));
      for (int64_t k = 0; k < v.channels; ++k) {
        const scalar_t* src = p + (b * v.channels + k) * voxels + pixel0;
        for (int64_t x = 0; x < v.width; ++x) q[x] = static_cast<acc_t>(src[x]);
        accumulate(q.data(), v.width, dst);
      }
      for (int64_t x = 0; x < v.width; ++x) dst[x] = -dst[x];
    }
  });
}

// U -> (U - min) / (max - min + 1e-6) per sample, in place.
template <typename acc_t>
void normalize_uncertainty(acc_t* u, const acc_t* u_range, const Volume& v) {
  const int64_t voxels = v.voxels();
  at::parallel_for(0, v.batch * voxels, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin / voxels; b * voxels < end; ++b) {
      const acc_t lo = u_range[2 * b], denominator = minmax_denominator(u_range[2 * b], u_range[2 * b + 1]);
      const int64_t first = std::max(begin, b * voxels), last = std::min(end, (b + 1) * voxels);
      for (int64_t i = first; i < last; ++i) u[i] = (u[i] - lo) / denominator;
    }
  });
}

// The five window sums' channels at a voxel: U, E, U^2, E^2, U E.
template <typename acc_t>
struct StatsLoader {
  const acc_t* u;
  const acc_t* e;
  const Volume* v;
  void operator()(int64_t z, int64_t y, acc_t* const* rows) const {
    const int64_t i0 = v->voxel_index(z, y, 0);
    for (int64_t x = 0; x < v->width; ++x) {
      const acc_t uu = u[i0 + x], ee = e[i0 + x];
      rows[0][x] = uu;
      rows[1][x] = ee;
      rows[2][x] = uu * uu;
      rows[3][x] = ee * ee;
      rows[4][x] = uu * ee;
    }
  }
};

template <typename acc_t>
WindowSums<acc_t> sums_at(const std::vector<acc_t>& s, int64_t plane, int64_t e) {
  return WindowSums<acc_t>{s[e], s[plane + e], s[2 * plane + e], s[3 * plane + e], s[4 * plane + e]};
}

template <typename scalar_t, typename acc_t>
void boundary_forward(const scalar_t* p, const acc_t* edge, const Volume& v, bool is_3d,
                      int64_t window, acc_t* u, acc_t* cc, acc_t* u_range) {
  const int64_t voxels = v.voxels();
  uncertainty_map(p, v, u);
  for (int64_t b = 0; b < v.batch; ++b) {
    const acc_t* ub = u + b * voxels;
    u_range[2 * b] = *std::min_element(ub, ub + voxels);
    u_range[2 * b + 1] = *std::max_element(ub, ub + voxels);
  }
  normalize_uncertainty(u, u_range, v);
  const int64_t r = window / 2;
  const int64_t rz = is_3d ? r : 0;
  const acc_t n = static_cast<acc_t>(is_3d ? window * window * window : window * window);
  const RegionGrid grid(v, is_3d);
  std::vector<acc_t> partials(grid.count, acc_t(0));
  at::parallel_for(0, grid.count, 1, [&](int64_t begin, int64_t end) {
    BoxSums<acc_t> box(v, rz, r, r, 5);
    for (int64_t ri = begin; ri < end; ++ri) {
      const Region g = grid.at(v, ri);
      const StatsLoader<acc_t> loader{u + g.b * voxels, edge + g.b * voxels, &v};
      const std::vector<acc_t>& sums = box.run(g.z0, g.z1, g.y0, g.y1, loader);
      const int64_t plane = (g.z1 - g.z0) * (g.y1 - g.y0) * v.width;
      acc_t total = 0;
      for (int64_t e = 0; e < plane; ++e) total += window_ncc(window_stats(sums_at(sums, plane, e), n));
      partials[ri] = total;
    }
  });
  acc_t total = 0;
  for (const acc_t t : partials) total += t;
  *cc = -(total / static_cast<acc_t>(v.batch * voxels));
}

template <typename scalar_t, typename acc_t>
void boundary_backward(acc_t grad_cc, const scalar_t* p, const acc_t* edge, const acc_t* u_range,
                       const Volume& v, bool is_3d, int64_t window, acc_t* u, scalar_t* grad_p) {
  const int64_t voxels = v.voxels();
  uncertainty_map(p, v, u);
  normalize_uncertainty(u, u_range, v);
  const int64_t r = window / 2;
  const int64_t rz = is_3d ? r : 0;
  const acc_t n = static_cast<acc_t>(is_3d ? window * window * window : window * window);
  // dL/d(ncc) of every window centre: CC = -mean(ncc)
  const acc_t scale = -grad_cc / static_cast<acc_t>(v.batch * voxels);
  const RegionGrid grid(v, is_3d);
  const UncertaintyDerivativeFn<acc_t> derivative = uncertainty_derivative_kernel<acc_t>();
  at::parallel_for(0, grid.count, 1, [&](int64_t begin, int64_t end) {
    BoxSums<acc_t> stats_box(v, rz, r, r, 5);
    BoxSums<acc_t> coef_box(v, rz, r, r, 3);
    std::vector<acc_t> coefficients;
    std::vector<acc_t> grad_u(v.width), q(v.width), grad_row(v.width);
    for (int64_t ri = begin; ri < end; ++ri) {
      const Region g = grid.at(v, ri);
      const acc_t* ub = u + g.b * voxels;
      const acc_t* eb = edge + g.b * voxels;
      // centres whose window reaches the region: the region plus a halo, inside the volume
      const int64_t hz0 = std::max<int64_t>(0, g.z0 - rz), hz1 = std::min(v.depth, g.z1 + rz);
      const int64_t hy0 = std::max<int64_t>(0, g.y0 - r), hy1 = std::min(v.height, g.y1 + r);
      const int64_t halo_plane = (hz1 - hz0) * (hy1 - hy0) * v.width;
      const std::vector<acc_t>& sums = stats_box.run(hz0, hz1, hy0, hy1, StatsLoader<acc_t>{ub, eb, &v});
      coefficients.resize(3 * halo_plane);
      for (int64_t e = 0; e < halo_plane; ++e) {
        const WindowCoefficients<acc_t> c =
            window_coefficients(window_stats(sums_at(sums, halo_plane, e), n), scale);
        coefficients[e] = c.ue;
        coefficients[halo_plane + e] = c.u;
        coefficients[2 * halo_plane + e] = c.uu;
      }
      const int64_t halo_rows = hy1 - hy0;
      const auto coefficient_loader = [&](int64_t z, int64_t y, acc_t* const* rows) {
        const int64_t e0 = ((z - hz0) * halo_rows + (y - hy0)) * v.width;
        for (int64_t c = 0; c < 3; ++c)
          std::copy(coefficients.begin() + c * halo_plane + e0,
                    coefficients.begin() + c * halo_plane + e0 + v.width, rows[c]);
      };
      const std::vector<acc_t>& coef_sums = coef_box.run(g.z0, g.z1, g.y0, g.y1, coefficient_loader);
      const int64_t rows = g.y1 - g.y0;
      const int64_t plane = (g.z1 - g.z0) * rows * v.width;
      const acc_t denominator = minmax_denominator(u_range[2 * g.b], u_range[2 * g.b + 1]);
      for (int64_t z = g.z0; z < g.z1; ++z)
        for (int64_t y = g.y0; y < g.y1; ++y) {
          const int64_t pixel0 = v.voxel_index(z, y, 0);
          const int64_t e0 = ((z - g.z0) * rows + (y - g.y0)) * v.width;
          for (int64_t x = 0; x < v.width; ++x) {
            const int64_t e = e0 + x;
            grad_u[x] = normalized_uncertainty_gradient(eb[pixel0 + x], ub[pixel0 + x], coef_sums[e],
                                                        coef_sums[plane + e], coef_sums[2 * plane + e]) /
                        denominator;
          }
          for (int64_t k = 0; k < v.channels; ++k) {
            const int64_t row0 = (g.b * v.channels + k) * voxels + pixel0;
            for (int64_t x = 0; x < v.width; ++x) q[x] = static_cast<acc_t>(p[row0 + x]);
            derivative(q.data(), grad_u.data(), v.width, grad_row.data());
            for (int64_t x = 0; x < v.width; ++x) grad_p[row0 + x] = static_cast<scalar_t>(grad_row[x]);
          }
        }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> boundary_cc_cpu(const at::Tensor& p_in, const at::Tensor& edge_in,
                                                   int64_t window) {
  check_boundary_inputs(p_in, edge_in, window);
  const at::Tensor p = p_in.contiguous();
  const auto acc_type = accumulation_type(p.scalar_type());
  const at::Tensor edge = edge_in.to(acc_type).contiguous();
  const Volume v = volume_of(p);
  const auto acc_options = p.options().dtype(acc_type);
  at::Tensor cc = at::empty({}, acc_options);
  at::Tensor u_range = at::empty({v.batch, 2}, acc_options);
  at::Tensor u = at::empty({v.batch, v.voxels()}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "bimi_boundary_cc_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    boundary_forward<scalar_t, acc_t>(p.data_ptr<scalar_t>(), edge.data_ptr<acc_t>(), v, p.dim() == 5,
                                      window, u.data_ptr<acc_t>(), cc.data_ptr<acc_t>(),
                                      u_range.data_ptr<acc_t>());
  });
  return {cc, u_range};
}

at::Tensor boundary_cc_backward_cpu(const at::Tensor& grad_cc, const at::Tensor& p_in,
                                    const at::Tensor& edge_in, const at::Tensor& u_range_in,
                                    int64_t window) {
  check_boundary_inputs(p_in, edge_in, window);
  const at::Tensor p = p_in.contiguous();
  const auto acc_type = accumulation_type(p.scalar_type());
  const at::Tensor edge = edge_in.to(acc_type).contiguous();
  const at::Tensor u_range = u_range_in.to(acc_type).contiguous();
  const Volume v = volume_of(p);
  TORCH_CHECK(u_range.sizes() == at::IntArrayRef({v.batch, 2}), "bimi_C: u_range must be (B, 2)");
  TORCH_CHECK(grad_cc.numel() == 1, "bimi_C: grad_cc must hold one value");
  at::Tensor grad_p = at::empty_like(p);
  at::Tensor u = at::empty({v.batch, v.voxels()}, p.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "bimi_boundary_cc_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    boundary_backward<scalar_t, acc_t>(grad_cc.to(acc_type).item<acc_t>(), p.data_ptr<scalar_t>(),
                                       edge.data_ptr<acc_t>(), u_range.data_ptr<acc_t>(), v,
                                       p.dim() == 5, window, u.data_ptr<acc_t>(),
                                       grad_p.data_ptr<scalar_t>());
  });
  return grad_p;
}

}  // namespace

TORCH_LIBRARY_IMPL(bimi_C, CPU, m) {
  m.impl("boundary_cc", &boundary_cc_cpu);
  m.impl("boundary_cc_backward", &boundary_cc_backward_cpu);
}

}  // namespace cpu
}  // namespace bimi
