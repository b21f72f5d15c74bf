// CPU boundary cross-correlation term (docs/contract.md §5): CC(U(p), E) of one cluster map and
// its backward.
//
// Forward: U = -sum_k p_k log(p_k + 1e-16) of every pixel and its per-sample min and max; then per
// region of rows the five box sums of the normalised U and E (separable: along x, then y, then z;
// each an ordered sum) and the clamped NCC of every window centre, summed per region. Backward:
// U again; per region, the box sums on the region plus a halo give each window centre's
// coefficients of S(UE), S(U), S(U^2) (common/boundary_math.h); their box sums give dL/dU at every
// pixel, times dU/dp. The row loops are the vectorised BoundaryRowKernels (kernels.h).
// Regions depend only on the shape and their partial sums are added in region order, so the
// result is the same for any thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/boundary_math.h"
#include "../common/host_checks.h"
#include "kernels.h"

namespace bimi::cpu {
namespace {

constexpr int64_t kRegionRows = 32;
constexpr int64_t kRegionPlanes3D = 4;
constexpr int64_t kRegionRows3D = 16;

// A block of whole rows of one sample: planes [z0, z1) x rows [y0, y1) x all x.
struct Region {
  int64_t b, z0, z1, y0, y1;
};

struct RegionGrid {
  int64_t planes_per_region, rows_per_region, planes_blocks, row_blocks, count;

  RegionGrid(const Volume& v, bool is_3d) {
    planes_per_region = is_3d ? kRegionPlanes3D : 1;
    rows_per_region = is_3d ? kRegionRows3D : kRegionRows;
    planes_blocks = ceil_div(v.depth, planes_per_region);
    row_blocks = ceil_div(v.height, rows_per_region);
    count = v.batch * planes_blocks * row_blocks;
  }

  Region at(const Volume& v, int64_t r) const {
    Region region;
    region.b = r / (planes_blocks * row_blocks);
    const int64_t zb = (r / row_blocks) % planes_blocks;
    const int64_t yb = r % row_blocks;
    region.z0 = zb * planes_per_region;
    region.z1 = std::min(v.depth, region.z0 + planes_per_region);
    region.y0 = yb * rows_per_region;
    region.y1 = std::min(v.height, region.y0 + rows_per_region);
    return region;
  }
};

// Box sums (window (2rz+1) x (2r+1) x (2r+1), zero outside the volume) of `channels` maps over
// the output block planes [z0, z1) x rows [y0, y1) x all x. row_sums(z, y, out) writes the
// window sums along x of image row (z, y) of every channel c to out[c] (W values); for_each_row
// then hands consume(z, y, sums) each output row's box sums (sums[c], W values), rows in order.
// 2-D maps stream: the sums along x of the 2r + 1 rows of the current window sit in a ring (in
// L1), each row computed once. 3-D maps sum a whole block along x, y, then z.
template <typename acc_t>
class BoxSums {
 public:
  static constexpr int64_t kMaxChannels = 5;

  BoxSums(const Volume& v, int64_t rz, int64_t r, int64_t channels, const BoundaryRowKernels<acc_t>& k)
      : v_(v), rz_(rz), r_(r), channels_(channels), k_(k), rows_(2 * std::max(r, rz) + 1) {}

  template <typename RowSums, typename Consume>
  void for_each_row(int64_t z0, int64_t z1, int64_t y0, int64_t y1, RowSums row_sums, Consume consume) {
    if (rz_ == 0) {
      for (int64_t z = z0; z < z1; ++z) stream_plane(z, y0, y1, row_sums, consume);
      return;
    }
    run_block(z0, z1, y0, y1, row_sums);
    const acc_t* sums[kMaxChannels];
    for (int64_t z = z0; z < z1; ++z)
      for (int64_t y = y0; y < y1; ++y) {
        for (int64_t c = 0; c < channels_; ++c)
          sums[c] = along_z_.data() + ((c * nz_ + z - z0_) * ny_ + y - y0_) * v_.width;
        consume(z, y, sums);
      }
  }

 private:
  template <typename RowSums, typename Consume>
  void stream_plane(int64_t z, int64_t y0, int64_t y1, RowSums row_sums, Consume consume) {
    const int64_t w = v_.width, slots = 2 * r_ + 1;
    along_x_.resize(channels_ * slots * w);
    along_y_.resize(channels_ * w);
    acc_t* out[kMaxChannels];
    const acc_t* sums[kMaxChannels];
    for (int64_t c = 0; c < channels_; ++c) sums[c] = along_y_.data() + c * w;
    const auto slot_row = [&](int64_t c, int64_t yy) { return along_x_.data() + (c * slots + yy % slots) * w; };
    int64_t next = std::max<int64_t>(0, y0 - r_);  // the next image row to sum along x
    const acc_t** rows = rows_.data();
    for (int64_t y = y0; y < y1; ++y) {
      const int64_t first = std::max<int64_t>(0, y - r_), last = std::min(v_.height, y + r_ + 1);
      for (; next < last; ++next) {
        for (int64_t c = 0; c < channels_; ++c) out[c] = slot_row(c, next);
        row_sums(z, next, out);
      }
      // rows y - r .. y + r inside the image, in order
      for (int64_t c = 0; c < channels_; ++c) {
        for (int64_t yy = first; yy < last; ++yy) rows[yy - first] = slot_row(c, yy);
        k_.add_rows(rows, last - first, w, along_y_.data() + c * w);
      }
      consume(z, y, sums);
    }
  }

  template <typename RowSums>
  void run_block(int64_t z0, int64_t z1, int64_t y0, int64_t y1, RowSums row_sums) {
    const int64_t w = v_.width;
    z0_ = z0, y0_ = y0, nz_ = z1 - z0, ny_ = y1 - y0;
    // image rows whose windows reach the block
    const int64_t ez0 = std::max<int64_t>(0, z0 - rz_), ey0 = std::max<int64_t>(0, y0 - r_);
    const int64_t enz = std::min(v_.depth, z1 + rz_) - ez0, eny = std::min(v_.height, y1 + r_) - ey0;
    along_x_.resize(channels_ * enz * eny * w);
    acc_t* out[kMaxChannels];
    for (int64_t zz = 0; zz < enz; ++zz)
      for (int64_t yy = 0; yy < eny; ++yy) {
        for (int64_t c = 0; c < channels_; ++c) out[c] = along_x_.data() + ((c * enz + zz) * eny + yy) * w;
        row_sums(ez0 + zz, ey0 + yy, out);
      }
    // along y: rows y - r .. y + r that are inside the image, in order
    along_y_.resize(channels_ * enz * ny_ * w);
    for (int64_t c = 0; c < channels_; ++c)
      for (int64_t zz = 0; zz < enz; ++zz)
        for (int64_t y = 0; y < ny_; ++y) {
          const int64_t first = std::max(y0 + y - r_, ey0), last = std::min(y0 + y + r_ + 1, ey0 + eny);
          add_strided_rows(along_x_.data() + ((c * enz + zz) * eny + first - ey0) * w, w, last - first,
                           along_y_.data() + ((c * enz + zz) * ny_ + y) * w);
        }
    // along z
    along_z_.resize(channels_ * nz_ * ny_ * w);
    for (int64_t c = 0; c < channels_; ++c)
      for (int64_t z = 0; z < nz_; ++z)
        for (int64_t y = 0; y < ny_; ++y) {
          const int64_t first = std::max(z0 + z - rz_, ez0), last = std::min(z0 + z + rz_ + 1, ez0 + enz);
          add_strided_rows(along_y_.data() + ((c * enz + first - ez0) * ny_ + y) * w, ny_ * w, last - first,
                           along_z_.data() + ((c * nz_ + z) * ny_ + y) * w);
        }
  }

  // out = the sum of `count` rows, the first at `first` and each `stride` after the one before.
  void add_strided_rows(const acc_t* first, int64_t stride, int64_t count, acc_t* out) {
    const acc_t** rows = rows_.data();
    for (int64_t i = 0; i < count; ++i) rows[i] = first + i * stride;
    k_.add_rows(rows, count, v_.width, out);
  }

  Volume v_;
  int64_t rz_, r_, channels_;
  BoundaryRowKernels<acc_t> k_;
  int64_t z0_ = 0, y0_ = 0, nz_ = 0, ny_ = 0;
  std::vector<acc_t> along_x_, along_y_, along_z_;
  std::vector<const acc_t*> rows_;  // the rows of one window along y or z
};

// window^ndim, the pixel count of every window, as acc_t. Multiplied in double: in int64,
// window^3 wraps around for windows above 2^21 (in double it is exact up to 2^17, and rounds
// beyond).
template <typename acc_t>
acc_t window_pixel_count(int64_t window, bool is_3d) {
  const double w = static_cast<double>(window);
  return static_cast<acc_t>(is_3d ? w * w * w : w * w);
}

// Pixels [pixel0, pixel0 + count) of sample b's K channels as the row kernels take them: K runs
// `stride` apart in the accumulation dtype (converted into `buffer` when the map's dtype differs).
template <typename scalar_t, typename acc_t>
const acc_t* channel_runs(const scalar_t* p, const Volume& v, int64_t b, int64_t pixel0, int64_t count,
                          std::vector<acc_t>& buffer, int64_t* stride) {
  const int64_t voxels = v.voxels();
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    *stride = voxels;
    return p + b * v.channels * voxels + pixel0;
  } else {
    buffer.resize(v.channels * count);
    for (int64_t k = 0; k < v.channels; ++k) {
      const scalar_t* src = p + (b * v.channels + k) * voxels + pixel0;
      for (int64_t x = 0; x < count; ++x) buffer[k * count + x] = static_cast<acc_t>(src[x]);
    }
    *stride = count;
    return buffer.data();
  }
}

// Pixels per chunk of the uncertainty map: long runs of each channel, in L1 with their U.
constexpr int64_t kUncertaintyChunk = 4096;

// U of every pixel into u (B, voxels); the min and max of each chunk of kUncertaintyChunk pixels
// of a sample into chunk_lo, chunk_hi (chunks_per_sample(v) per sample) when they are given.
int64_t chunks_per_sample(const Volume& v) { return ceil_div(v.voxels(), kUncertaintyChunk); }

// chunk(c, b, pixel0, count, q, stride) for every chunk c of kUncertaintyChunk pixels of every
// sample, in parallel; q: the chunk's K channel runs (channel_runs).
template <typename scalar_t, typename acc_t, typename Chunk>
void for_each_chunk(const scalar_t* p, const Volume& v, Chunk chunk) {
  const int64_t chunks = chunks_per_sample(v);
  const int64_t voxels = v.voxels();
  at::parallel_for(0, v.batch * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer;
    for (int64_t c = begin; c < end; ++c) {
      const int64_t b = c / chunks;
      const int64_t pixel0 = (c % chunks) * kUncertaintyChunk;
      const int64_t count = std::min(kUncertaintyChunk, voxels - pixel0);
      int64_t stride = 0;
      const acc_t* q = channel_runs(p, v, b, pixel0, count, buffer, &stride);
      chunk(c, b, pixel0, count, q, stride);
    }
  });
}

template <typename scalar_t, typename acc_t>
void uncertainty_map(const scalar_t* p, const Volume& v, const BoundaryRowKernels<acc_t>& k, acc_t* u,
                     acc_t* chunk_lo, acc_t* chunk_hi) {
  for_each_chunk<scalar_t, acc_t>(p, v, [&](int64_t c, int64_t b, int64_t pixel0, int64_t count,
                                             const acc_t* q, int64_t stride) {
    acc_t lo, hi;
    k.uncertainty(q, stride, v.channels, count, u + b * v.voxels() + pixel0,
                  chunk_lo != nullptr ? chunk_lo + c : &lo, chunk_hi != nullptr ? chunk_hi + c : &hi);
  });
}

// The normalised U and E of image row (z, y), zero-padded by r on each side: the box sums read
// them, and the backward its dL/dU.
template <typename acc_t>
struct StatsRows {
  const acc_t* u;  // raw U of the sample
  const acc_t* e;  // E of the sample
  acc_t lo, denominator;
  const Volume* v;
  int64_t r;
  std::vector<acc_t> u_padded, e_padded;

  StatsRows(const acc_t* u, const acc_t* e, acc_t lo, acc_t denominator, const Volume& v, int64_t r)
      : u(u), e(e), lo(lo), denominator(denominator), v(&v), r(r),
        u_padded(v.width + 2 * r, acc_t(0)), e_padded(v.width + 2 * r, acc_t(0)) {}

  void load(int64_t z, int64_t y) {
    const int64_t i0 = v->voxel_index(z, y, 0);
    for (int64_t x = 0; x < v->width; ++x) {
      u_padded[r + x] = (u[i0 + x] - lo) / denominator;
      e_padded[r + x] = e[i0 + x];
    }
  }
};

template <typename scalar_t, typename acc_t>
void boundary_forward(const scalar_t* p, const acc_t* edge, const Volume& v, bool is_3d,
                      int64_t window, acc_t* u, acc_t* cc, acc_t* u_range) {
  const BoundaryRowKernels<acc_t> k = selected_kernels<acc_t>().boundary;
  const int64_t voxels = v.voxels();
  const int64_t chunks = chunks_per_sample(v);
  std::vector<acc_t> chunk_lo(v.batch * chunks), chunk_hi(v.batch * chunks);
  uncertainty_map(p, v, k, u, chunk_lo.data(), chunk_hi.data());
  for (int64_t b = 0; b < v.batch; ++b) {
    u_range[2 * b] = *std::min_element(chunk_lo.begin() + b * chunks, chunk_lo.begin() + (b + 1) * chunks);
    u_range[2 * b + 1] = *std::max_element(chunk_hi.begin() + b * chunks, chunk_hi.begin() + (b + 1) * chunks);
  }
  const int64_t r = window / 2;
  const int64_t rz = is_3d ? r : 0;
  const acc_t n = window_pixel_count<acc_t>(window, is_3d);
  const RegionGrid grid(v, is_3d);
  std::vector<acc_t> partials(grid.count, acc_t(0));
  at::parallel_for(0, grid.count, 1, [&](int64_t begin, int64_t end) {
    BoxSums<acc_t> box(v, rz, r, 5, k);
    std::vector<acc_t> scratch(v.width);
    for (int64_t ri = begin; ri < end; ++ri) {
      const Region g = grid.at(v, ri);
      const acc_t lo = u_range[2 * g.b];
      StatsRows<acc_t> stats(u + g.b * voxels, edge + g.b * voxels, lo,
                             minmax_denominator(lo, u_range[2 * g.b + 1]), v, r);
      acc_t total = 0;
      box.for_each_row(
          g.z0, g.z1, g.y0, g.y1,
          [&](int64_t z, int64_t y, acc_t* const* out) {
            stats.load(z, y);
            k.window_stats(stats.u_padded.data(), stats.e_padded.data(), v.width, r, out);
          },
          [&](int64_t, int64_t, const acc_t* const* sums) { total += k.ncc_sum(sums, v.width, n, scratch.data()); });
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
  const BoundaryRowKernels<acc_t> k = selected_kernels<acc_t>().boundary;
  const int64_t voxels = v.voxels();
  // U again; for float32/float64 maps dU/dp goes straight into grad_p, which the regions below
  // then scale by dL/dU in place (one log per value). Half-precision maps cannot hold dU/dp at
  // full precision, so their regions take the log again into a float32 buffer.
  constexpr bool derivative_in_grad = std::is_same_v<scalar_t, acc_t>;
  if constexpr (derivative_in_grad) {
    for_each_chunk<scalar_t, acc_t>(p, v, [&](int64_t, int64_t b, int64_t pixel0, int64_t count,
                                               const acc_t* q, int64_t stride) {
      k.uncertainty_with_derivative(q, stride, v.channels, count, u + b * voxels + pixel0,
                                    grad_p + b * v.channels * voxels + pixel0, voxels);
    });
  } else {
    uncertainty_map<scalar_t, acc_t>(p, v, k, u, nullptr, nullptr);
  }
  const int64_t r = window / 2;
  const int64_t rz = is_3d ? r : 0;
  const int64_t w = v.width;
  const acc_t n = window_pixel_count<acc_t>(window, is_3d);
  // dL/d(ncc) of every window centre: CC = -mean(ncc)
  const acc_t scale = -grad_cc / static_cast<acc_t>(v.batch * voxels);
  const RegionGrid grid(v, is_3d);
  at::parallel_for(0, grid.count, 1, [&](int64_t begin, int64_t end) {
    BoxSums<acc_t> stats_box(v, rz, r, 5, k);
    BoxSums<acc_t> coefficient_box(v, rz, r, 3, k);
    std::vector<acc_t> coefficients, grad_u, q_buffer, grad_buffer, u_again;
    for (int64_t ri = begin; ri < end; ++ri) {
      const Region g = grid.at(v, ri);
      const acc_t lo = u_range[2 * g.b];
      const acc_t denominator = minmax_denominator(lo, u_range[2 * g.b + 1]);
      const acc_t* ub = u + g.b * voxels;
      const acc_t* eb = edge + g.b * voxels;
      // centres whose window reaches the region: the region plus a halo, inside the volume
      const int64_t hz0 = std::max<int64_t>(0, g.z0 - rz), hz1 = std::min(v.depth, g.z1 + rz);
      const int64_t hy0 = std::max<int64_t>(0, g.y0 - r), hy1 = std::min(v.height, g.y1 + r);
      const int64_t halo_rows = hy1 - hy0, halo_plane = (hz1 - hz0) * halo_rows;
      StatsRows<acc_t> stats(ub, eb, lo, denominator, v, r);
      // the three coefficient maps of the halo's centres, each row zero-padded by r for the box sums
      const int64_t padded = w + 2 * r;
      coefficients.resize(3 * halo_plane * padded);
      for (int64_t row = 0; row < 3 * halo_plane; ++row) {  // the pads; the rows are written below
        std::fill_n(coefficients.data() + row * padded, r, acc_t(0));
        std::fill_n(coefficients.data() + row * padded + r + w, r, acc_t(0));
      }
      const auto coefficient_row = [&](int64_t c, int64_t z, int64_t y) {
        return coefficients.data() + ((c * (hz1 - hz0) + z - hz0) * halo_rows + y - hy0) * padded;
      };
      stats_box.for_each_row(
          hz0, hz1, hy0, hy1,
          [&](int64_t z, int64_t y, acc_t* const* out) {
            stats.load(z, y);
            k.window_stats(stats.u_padded.data(), stats.e_padded.data(), w, r, out);
          },
          [&](int64_t z, int64_t y, const acc_t* const* sums) {
            acc_t* out[3] = {coefficient_row(0, z, y) + r, coefficient_row(1, z, y) + r,
                             coefficient_row(2, z, y) + r};
            k.coefficients(sums, w, n, scale, out);
          });
      // dL/dU of the region's pixels, then dL/dp plane by plane (its rows are one run of pixels)
      const int64_t rows = g.y1 - g.y0;
      grad_u.resize((g.z1 - g.z0) * rows * w);
      coefficient_box.for_each_row(
          g.z0, g.z1, g.y0, g.y1,
          [&](int64_t z, int64_t y, acc_t* const* out) {
            for (int64_t c = 0; c < 3; ++c) k.window_sums(coefficient_row(c, z, y), w, r, out[c]);
          },
          [&](int64_t z, int64_t y, const acc_t* const* sums) {
            stats.load(z, y);  // the stats pass is over, so its row buffers are free
            k.uncertainty_gradient(eb + v.voxel_index(z, y, 0), stats.u_padded.data() + r, sums, denominator, w,
                                   grad_u.data() + ((z - g.z0) * rows + y - g.y0) * w);
          });
      for (int64_t z = g.z0; z < g.z1; ++z) {
        const int64_t pixel0 = v.voxel_index(z, g.y0, 0);
        scalar_t* grad_first = grad_p + g.b * v.channels * voxels + pixel0;
        if constexpr (derivative_in_grad) {
          k.scale_channels(grad_first, voxels, v.channels, rows * w, grad_u.data() + (z - g.z0) * rows * w,
                           grad_first, voxels);
        } else {
          int64_t stride = 0;
          const acc_t* q = channel_runs(p, v, g.b, pixel0, rows * w, q_buffer, &stride);
          grad_buffer.resize(v.channels * rows * w);
          u_again.resize(rows * w);
          k.uncertainty_with_derivative(q, stride, v.channels, rows * w, u_again.data(), grad_buffer.data(),
                                        rows * w);
          k.scale_channels(grad_buffer.data(), rows * w, v.channels, rows * w,
                           grad_u.data() + (z - g.z0) * rows * w, grad_buffer.data(), rows * w);
          for (int64_t c = 0; c < v.channels; ++c)
            for (int64_t x = 0; x < rows * w; ++x)
              grad_first[c * voxels + x] = static_cast<scalar_t>(grad_buffer[c * rows * w + x]);
        }
      }
    }
  });
}

// The boundary ops' inputs: checked, the map contiguous, the edge map in the accumulation dtype,
// and a (B, voxels) buffer for U.
struct BoundaryInputs {
  at::Tensor p, edge, u;
  at::ScalarType acc_type;
  Volume v;

  BoundaryInputs(const at::Tensor& p_in, const at::Tensor& edge_in, int64_t window) {
    check_boundary_inputs(p_in, edge_in, window);
    p = p_in.contiguous();
    acc_type = accumulation_type(p.scalar_type());
    edge = edge_in.to(acc_type).contiguous();
    v = volume_of(p);
    u = at::empty({v.batch, v.voxels()}, p.options().dtype(acc_type));
  }
  bool is_3d() const { return p.dim() == 5; }
};

std::tuple<at::Tensor, at::Tensor> boundary_cc_cpu(const at::Tensor& p_in, const at::Tensor& edge_in,
                                                   int64_t window) {
  BoundaryInputs in(p_in, edge_in, window);
  const auto acc_options = in.p.options().dtype(in.acc_type);
  at::Tensor cc = at::empty({}, acc_options);
  at::Tensor u_range = at::empty({in.v.batch, 2}, acc_options);
  const auto dtype = in.p.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "bimi_boundary_cc_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    boundary_forward<scalar_t, acc_t>(in.p.data_ptr<scalar_t>(), in.edge.data_ptr<acc_t>(), in.v,
                                      in.is_3d(), window, in.u.data_ptr<acc_t>(), cc.data_ptr<acc_t>(),
                                      u_range.data_ptr<acc_t>());
  });
  return {cc, u_range};
}

at::Tensor boundary_cc_backward_cpu(const at::Tensor& grad_cc, const at::Tensor& p_in,
                                    const at::Tensor& edge_in, const at::Tensor& u_range_in,
                                    int64_t window) {
  BoundaryInputs in(p_in, edge_in, window);
  const at::Tensor u_range = u_range_in.to(in.acc_type).contiguous();
  TORCH_CHECK(u_range.sizes() == at::IntArrayRef({in.v.batch, 2}), "bimi_C: u_range must be (B, 2)");
  TORCH_CHECK(grad_cc.numel() == 1, "bimi_C: grad_cc must hold one value");
  at::Tensor grad_p = at::empty_like(in.p);
  const auto dtype = in.p.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "bimi_boundary_cc_backward_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    boundary_backward<scalar_t, acc_t>(grad_cc.to(in.acc_type).item<acc_t>(), in.p.data_ptr<scalar_t>(),
                                       in.edge.data_ptr<acc_t>(), u_range.data_ptr<acc_t>(), in.v,
                                       in.is_3d(), window, in.u.data_ptr<acc_t>(),
                                       grad_p.data_ptr<scalar_t>());
  });
  return grad_p;
}

}  // namespace

TORCH_LIBRARY_IMPL(bimi_C, CPU, m) {
  m.impl("boundary_cc", &boundary_cc_cpu);
  m.impl("boundary_cc_backward", &boundary_cc_backward_cpu);
}

}  // namespace bimi::cpu
