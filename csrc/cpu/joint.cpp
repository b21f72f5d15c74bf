// CPU joint counts (docs/contract.md §3):
// J[o, i, j] = sum_{b, s} m[s] m[s+d_o] p1[b, i, s] p2[b, j, s + d_o]
// and its backward, every offset in one pass over the pixels, without shifted copies.
//
// The pixels are cut into tiles of kTileRows image rows. A tile loads its rows of p1 and the band
// of p2 rows its offsets reach (converted to the accumulation dtype, masked, zero-padded; one run
// of rows per distinct row shift, so far-apart offsets stage no rows between them), or reads them
// where they are when no copy is needed (BandStager), and the vectorised loops of
// simd/joint_tiles.h accumulate every offset's K x K block from them.
// Determinism: the tiles are grouped into at most kMaxChunks chunks by the shape alone; each chunk
// owns its partial J and the partials are summed in chunk order, so the result is bitwise the
// same for any thread count and on every run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common/host_checks.h"
#include "kernels.h"

namespace bimi::cpu {
namespace {

constexpr int64_t kTileRows = 8;

constexpr int64_t kMaxChunks = 64;
// The per-chunk partial J stay under this fraction of the two input maps' elements (but at
// least kMinChunks chunks, for parallelism), so the extra memory stays small for many offsets.
constexpr double kPartialsFraction = 0.05;
constexpr int64_t kMinChunks = 4;

// A run of consecutive rows of the second map that one tile stages: rows y0 + dy .. y0 + dy +
// rows - 1 of plane z + dz (tile rows y0 .., plane z), stored from band row `band_row` on.
struct BandSegment {
  int64_t dz, dy, rows, band_row;
};

// What a tile stages of the second map for a set of offsets: for each distinct (dz, dy), the
// kTileRows rows that offsets with that row shift read, runs that overlap or touch merged into
// one segment. The staged rows (and with them the copy cost) follow the number of distinct row
// shifts, not the spread between the lowest and the highest offset. Each band row is padded
// with zeros for the largest |dx|.
struct BandLayout {
  std::vector<BandSegment> segments;  // ascending (dz, dy)
  std::vector<int64_t> offset_band_row;  // per offset: the band row of tile row 0
  int64_t pad_left = 0, pad_right = 0;
  int64_t row_length = 0;       // padded tile row: width rounded up to 2 vectors
  int64_t band_row_length = 0;  // pad_left + row_length + pad_right
  int64_t band_rows = 0;        // rows of all segments
};

template <typename acc_t>
BandLayout band_layout(const Volume& v, const std::vector<Offset3>& offsets) {
  BandLayout layout;
  int64_t dx_min = 0, dx_max = 0;
  std::vector<std::pair<int64_t, int64_t>> shifts;  // distinct (dz, dy), ascending
  for (const Offset3& d : offsets) {
    shifts.emplace_back(d.dz, d.dy);
    dx_min = std::min(dx_min, d.dx);
    dx_max = std::max(dx_max, d.dx);
  }
  std::sort(shifts.begin(), shifts.end());
  shifts.erase(std::unique(shifts.begin(), shifts.end()), shifts.end());
  for (const auto& [dz, dy] : shifts) {
    BandSegment* last = layout.segments.empty() ? nullptr : &layout.segments.back();
    if (last != nullptr && last->dz == dz && dy <= last->dy + last->rows) {
      layout.band_rows += dy + kTileRows - (last->dy + last->rows);
      last->rows = dy + kTileRows - last->dy;
    } else {
      layout.segments.push_back(BandSegment{dz, dy, kTileRows, layout.band_rows});
      layout.band_rows += kTileRows;
    }
  }
  for (const Offset3& d : offsets) {
    // the last segment of d's plane that starts at or above d.dy holds d's rows
    const auto after = std::upper_bound(
        layout.segments.begin(), layout.segments.end(), std::make_pair(d.dz, d.dy),
        [](const std::pair<int64_t, int64_t>& key, const BandSegment& s) {
          return key < std::make_pair(s.dz, s.dy);
        });
    const BandSegment& s = *(after - 1);
    layout.offset_band_row.push_back(s.band_row + d.dy - s.dy);
  }
  const int64_t step = 2 * vector_lanes<acc_t>();
  layout.pad_left = -dx_min;
  layout.pad_right = dx_max;
  layout.row_length = ceil_div(v.width, step) * step;
  layout.band_row_length = layout.pad_left + layout.row_length + layout.pad_right;
  return layout;
}

// Rows y0 .. y0+rows-1 (inside the image) of plane z of sample b, every channel, as acc_t times
// the mask, each channel row written at dst[k * row_stride + pad_left + x]. The zeros around each
// row are not written: `dst` is a buffer made zero (BandStager's band, TileRowsBuffer) whose
// padding nothing else writes, so it stays zero from tile to tile, and a far dx costs no fill.
template <typename scalar_t, typename acc_t>
void load_rows(const scalar_t* p, const scalar_t* mask, const Volume& v, int64_t b, int64_t z,
               int64_t y0, int64_t rows, int64_t pad_left, int64_t row_stride, acc_t* dst) {
  const int64_t k_count = v.channels;
  const int64_t voxels = v.voxels();
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* row = dst + r * k_count * row_stride;
    const int64_t pixel0 = v.voxel_index(z, y0 + r, 0);
    const scalar_t* m = mask != nullptr ? mask + b * voxels + pixel0 : nullptr;
    for (int64_t k = 0; k < k_count; ++k) {
      const scalar_t* src = p + (b * k_count + k) * voxels + pixel0;
      acc_t* out = row + k * row_stride;
      if (m != nullptr) {
        for (int64_t x = 0; x < v.width; ++x)
          out[pad_left + x] = static_cast<acc_t>(src[x]) * static_cast<acc_t>(m[x]);
      } else {
        for (int64_t x = 0; x < v.width; ++x) out[pad_left + x] = static_cast<acc_t>(src[x]);
      }
    }
  }
}

// One tile of the image: sample b, plane z, rows y0 .. y0+rows-1.
struct TileIndex {
  int64_t b, z, y0, rows;
};

TileIndex tile_index(const Volume& v, int64_t t) {
  const int64_t tiles_per_plane = ceil_div(v.height, kTileRows);
  const int64_t plane = t / tiles_per_plane;
  TileIndex tile;
  tile.b = plane / v.depth;
  tile.z = plane % v.depth;
  tile.y0 = (t % tiles_per_plane) * kTileRows;
  tile.rows = std::min(kTileRows, v.height - tile.y0);
  return tile;
}

int64_t tile_count(const Volume& v) {
  return v.batch * v.depth * ceil_div(v.height, kTileRows);
}

// Zero-initialised work space for tile rows of whole vector pairs (the first map's copy, the
// gradient before conversion), starting on a cache line: then no vector load or store of a row
// straddles two lines. With malloc's 16-byte alignment half of them could, in some runs and not
// in others, and the forward with a copied first map was measurably slower in those runs.
template <typename T>
class TileRowsBuffer {
 public:
  explicit TileRowsBuffer(int64_t size) : storage_(size + kCacheLine / sizeof(T), T(0)) {
    const uintptr_t address = reinterpret_cast<uintptr_t>(storage_.data());
    offset_ = static_cast<int64_t>((kCacheLine - address % kCacheLine) % kCacheLine / sizeof(T));
  }
  T* data() { return storage_.data() + offset_; }

 private:
  static constexpr uintptr_t kCacheLine = 64;  // bytes
  std::vector<T> storage_;
  int64_t offset_ = 0;
};

// One thread's band of the second map and the offsets' plans, loaded tile by tile.
//
// With `in_place` (the forward, where no offset moves along x and the first map is read in place:
// rows of whole vectors, no mask, no dtype conversion), the band is the second map itself: no copy, which with few
// offsets (the authors' setting: offset 0 alone) is a large part of the forward's time. The
// backward keeps its copy: in the map itself channel rows lie a multiple of 4 KB apart at the
// usual sizes (128^2, 224^2, 256^2 floats), so the same pixels of all channels fall in one L1 set.
// The forward reads 5 of them at a time (its register block), within the set's 8 ways; the
// backward all K per pixel vector, which measured no faster than copying them first.
template <typename scalar_t, typename acc_t>
class BandStager {
 public:
  BandStager(const scalar_t* second, const scalar_t* mask, const Volume& v,
             const std::vector<Offset3>& offsets, const BandLayout& layout, bool in_place)
      : second_(second), mask_(mask), v_(v), offsets_(offsets), layout_(layout),
        in_place_(in_place && std::is_same_v<scalar_t, acc_t>),
        band_(in_place_ ? 0 : layout.band_rows * v.channels * layout.band_row_length), plans_(offsets.size()) {}

  // Loads the band for tile t (or points at the map), fills the offset plans and returns the tile
  // (no first map, no scratch). Band rows outside the volume are left as they are: no plan reads
  // them.
  JointTile<acc_t> stage(const TileIndex& t) {
    if (in_place_) return in_place(t);
    const Volume& v = v_;
    const int64_t band_row_stride = v.channels * layout_.band_row_length;
    for (const BandSegment& s : layout_.segments) {
      const int64_t z = t.z + s.dz;
      if (z < 0 || z >= v.depth) continue;
      // the segment's rows inside the image
      const int64_t first = std::max<int64_t>(0, t.y0 + s.dy);
      const int64_t last = std::min(v.height, t.y0 + s.dy + s.rows);
      if (first >= last) continue;
      acc_t* dst = band_.data() + (s.band_row + first - (t.y0 + s.dy)) * band_row_stride;
      load_rows(second_, mask_, v, t.b, z, first, last - first, layout_.pad_left,
                layout_.band_row_length, dst);
    }
    for (size_t o = 0; o < offsets_.size(); ++o)
      plans_[o].band_start = layout_.offset_band_row[o] * band_row_stride + layout_.pad_left + offsets_[o].dx;
    return tile_with_plans(t, band_.data(), band_row_stride, layout_.band_row_length);
  }

 private:
  // The second map of sample t.b as the band: offset o's partner of tile row y is map row
  // y0 + y + dy of plane z + dz (band_start may be negative: a row above the tile, never read).
  JointTile<acc_t> in_place(const TileIndex& t) {
    const Volume& v = v_;
    for (size_t o = 0; o < offsets_.size(); ++o)
      plans_[o].band_start = v.voxel_index(t.z + offsets_[o].dz, t.y0 + offsets_[o].dy, 0);
    const acc_t* band = nullptr;
    if constexpr (std::is_same_v<scalar_t, acc_t>) band = second_ + t.b * v.channels * v.voxels();
    return tile_with_plans(t, band, v.width, v.voxels());
  }

  // The tile over `band`, with each offset's rows and columns whose partner is inside the image.
  JointTile<acc_t> tile_with_plans(const TileIndex& t, const acc_t* band, int64_t band_row_stride,
                                   int64_t band_channel_stride) {
    const Volume& v = v_;
    for (size_t o = 0; o < offsets_.size(); ++o) {
      const Offset3& d = offsets_[o];
      OffsetPlan& plan = plans_[o];
      const bool plane_inside = t.z + d.dz >= 0 && t.z + d.dz < v.depth;
      // tile rows y with 0 <= y0 + y + dy < H
      plan.row_begin = std::max<int64_t>(0, -d.dy - t.y0);
      plan.row_end = plane_inside ? std::min<int64_t>(t.rows, v.height - d.dy - t.y0) : 0;
      plan.col_begin = std::max<int64_t>(0, -d.dx);
      plan.col_end = std::min<int64_t>(v.width, v.width - d.dx);
    }
    JointTile<acc_t> tile;
    tile.channels = v.channels;
    tile.rows = t.rows;
    tile.row_length = layout_.row_length;
    tile.first = nullptr;
    tile.first_row_stride = tile.first_channel_stride = 0;
    tile.band = band;
    tile.band_row_stride = band_row_stride;
    tile.band_channel_stride = band_channel_stride;
    tile.plans = plans_.data();
    tile.num_offsets = static_cast<int64_t>(offsets_.size());
    tile.scratch = nullptr;
    tile.column_scratch = nullptr;
    return tile;
  }

  const scalar_t* second_;
  const scalar_t* mask_;
  const Volume& v_;
  const std::vector<Offset3>& offsets_;
  const BandLayout& layout_;
  bool in_place_;
  std::vector<acc_t> band_;
  std::vector<OffsetPlan> plans_;
};

template <typename scalar_t, typename acc_t>
void joint_forward(const scalar_t* p1, const scalar_t* p2, const scalar_t* mask, const Volume& v,
                   const std::vector<Offset3>& offsets, acc_t* joint) {
  const BandLayout layout = band_layout<acc_t>(v, offsets);
  const int64_t k = v.channels;
  const int64_t joint_size = static_cast<int64_t>(offsets.size()) * k * k;
  const int64_t tiles = tile_count(v);
  const int64_t affordable = static_cast<int64_t>(kPartialsFraction * 2 * v.batch * k * v.voxels()) / joint_size;
  const int64_t chunks = std::min(tiles, std::max(kMinChunks, std::min(kMaxChunks, affordable)));
  std::vector<acc_t> partials(chunks * joint_size, acc_t(0));
  const auto forward_tile = selected_kernels<acc_t>().joint.forward;
  // Without a mask or a dtype conversion, and with rows of whole vectors, the first map's rows are
  // read where they are (no copy).
  const bool read_in_place = mask == nullptr && layout.row_length == v.width;
  // ... and so is the second map when, besides, no offset moves along x (no padding).
  const bool band_in_place = read_in_place && layout.pad_left == 0 && layout.pad_right == 0;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    BandStager<scalar_t, acc_t> stager(p2, mask, v, offsets, layout, band_in_place);
    TileRowsBuffer<acc_t> first(kTileRows * k * layout.row_length);
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t t = chunk_begin(tiles, chunks, c); t < chunk_begin(tiles, chunks, c + 1); ++t) {
        const TileIndex index = tile_index(v, t);
        JointTile<acc_t> tile = stager.stage(index);
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          if (read_in_place) {
            tile.first = p1 + index.b * k * v.voxels() + v.voxel_index(index.z, index.y0, 0);
            tile.first_row_stride = v.width;
            tile.first_channel_stride = v.voxels();
          }
        }
        if (tile.first == nullptr) {
          load_rows(p1, mask, v, index.b, index.z, index.y0, index.rows, 0, layout.row_length,
                    first.data());
          tile.first = first.data();
          tile.first_row_stride = k * layout.row_length;
          tile.first_channel_stride = layout.row_length;
        }
        forward_tile(tile, partials.data() + c * joint_size);
      }
    }
  });
  std::fill(joint, joint + joint_size, acc_t(0));
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t e = 0; e < joint_size; ++e) joint[e] += partials[c * joint_size + e];
}

// out[b, i, s] = m[s] sum_o sum_j g[o, i, j] m[s+d_o] second[b, j, s + d_o]: the gradient of the
// map in the first role. The second map's gradient is the same with the roles swapped, g
// transposed per offset and the offsets negated.
template <typename scalar_t, typename acc_t>
void joint_backward_first(const scalar_t* second, const scalar_t* mask, const Volume& v,
                          const std::vector<Offset3>& offsets, const acc_t* g, scalar_t* out) {
  const BandLayout layout = band_layout<acc_t>(v, offsets);
  const int64_t k = v.channels;
  const int64_t voxels = v.voxels();
  const auto backward_tile = selected_kernels<acc_t>().joint.backward;
  // Without a mask or a dtype conversion, and with rows that are whole vectors (so no padding
  // lanes spill into the next row), the kernel writes the gradient straight into `out`.
  const bool write_in_place = mask == nullptr && layout.row_length == v.width;
  at::parallel_for(0, tile_count(v), 1, [&](int64_t begin, int64_t end) {
    BandStager<scalar_t, acc_t> stager(second, mask, v, offsets, layout, /*in_place=*/false);
    TileRowsBuffer<acc_t> result(kTileRows * k * layout.row_length);
    std::vector<const acc_t*> scratch(2 * offsets.size());
    std::vector<int64_t> column_scratch(2 * offsets.size());
    for (int64_t t = begin; t < end; ++t) {
      const TileIndex index = tile_index(v, t);
      JointTile<acc_t> tile = stager.stage(index);
      tile.scratch = scratch.data();
      tile.column_scratch = column_scratch.data();
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (write_in_place) {
          backward_tile(tile, g, out + index.b * k * voxels + v.voxel_index(index.z, index.y0, 0), v.width,
                        voxels);
          continue;
        }
      }
      backward_tile(tile, g, result.data(), k * layout.row_length, layout.row_length);
      for (int64_t r = 0; r < index.rows; ++r) {
        const int64_t pixel0 = v.voxel_index(index.z, index.y0 + r, 0);
        const scalar_t* m = mask != nullptr ? mask + index.b * voxels + pixel0 : nullptr;
        for (int64_t i = 0; i < k; ++i) {
          const acc_t* src = result.data() + (r * k + i) * layout.row_length;
          scalar_t* dst = out + (index.b * k + i) * voxels + pixel0;
          if (m != nullptr) {
            for (int64_t x = 0; x < v.width; ++x)
              dst[x] = static_cast<scalar_t>(src[x] * static_cast<acc_t>(m[x]));
          } else {
            for (int64_t x = 0; x < v.width; ++x) dst[x] = static_cast<scalar_t>(src[x]);
          }
        }
      }
    }
  });
}

// The joint-count ops' inputs: checked, contiguous, the mask in the maps' dtype, the offsets
// decoded (any number of them).
struct JointInputs {
  at::Tensor p1, p2, mask;
  Volume v;
  std::vector<Offset3> offsets;

  JointInputs(const at::Tensor& p1_in, const at::Tensor& p2_in, at::IntArrayRef flat_offsets,
              const std::optional<at::Tensor>& mask_in) {
    check_joint_inputs(p1_in, p2_in, mask_in);
    p1 = p1_in.contiguous();
    p2 = p2_in.contiguous();
    mask = mask_like(mask_in, p1);
    v = volume_of(p1);
    offsets = parse_offsets(p1, flat_offsets);
  }
  int64_t num_offsets() const { return static_cast<int64_t>(offsets.size()); }
  template <typename scalar_t>
  const scalar_t* mask_data() const {
    return mask.defined() ? mask.data_ptr<scalar_t>() : nullptr;
  }
};

at::Tensor joint_counts_cpu(const at::Tensor& p1_in, const at::Tensor& p2_in,
                            at::IntArrayRef flat_offsets, const std::optional<at::Tensor>& mask_in) {
  const JointInputs in(p1_in, p2_in, flat_offsets, mask_in);
  const int64_t k = in.v.channels;
  at::Tensor joint = at::empty({in.num_offsets(), k, k},
                               in.p1.options().dtype(accumulation_type(in.p1.scalar_type())));
  const auto dtype = in.p1.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "bimi_joint_counts_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    joint_forward<scalar_t, acc_t>(in.p1.data_ptr<scalar_t>(), in.p2.data_ptr<scalar_t>(),
                                   in.mask_data<scalar_t>(), in.v, in.offsets, joint.data_ptr<acc_t>());
  });
  return joint;
}

std::tuple<at::Tensor, at::Tensor> joint_counts_backward_cpu(
    const at::Tensor& grad_joint_in, const at::Tensor& p1_in, const at::Tensor& p2_in,
    at::IntArrayRef flat_offsets, const std::optional<at::Tensor>& mask_in) {
  const JointInputs in(p1_in, p2_in, flat_offsets, mask_in);
  const int64_t k = in.v.channels;
  TORCH_CHECK(grad_joint_in.sizes() == at::IntArrayRef({in.num_offsets(), k, k}),
              "bimi_C: grad_J must be (|O|, K, K), got ", grad_joint_in.sizes());
  const at::Tensor g = grad_joint_in.to(accumulation_type(in.p1.scalar_type())).contiguous();
  const at::Tensor g_transposed = g.transpose(1, 2).contiguous();
  std::vector<Offset3> negated;
  for (const Offset3& d : in.offsets) negated.push_back(Offset3{-d.dz, -d.dy, -d.dx});
  at::Tensor grad_p1 = at::empty_like(in.p1);
  at::Tensor grad_p2 = at::empty_like(in.p2);
  const auto dtype = in.p1.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "bimi_joint_counts_backward_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* m = in.mask_data<scalar_t>();
    joint_backward_first<scalar_t, acc_t>(in.p2.data_ptr<scalar_t>(), m, in.v, in.offsets,
                                          g.data_ptr<acc_t>(), grad_p1.data_ptr<scalar_t>());
    joint_backward_first<scalar_t, acc_t>(in.p1.data_ptr<scalar_t>(), m, in.v, negated,
                                          g_transposed.data_ptr<acc_t>(), grad_p2.data_ptr<scalar_t>());
  });
  return {grad_p1, grad_p2};
}

// The rows of the second map one tile stages, as (dz, first dy, rows) per band segment.
at::Tensor joint_counts_band_layout_cpu(const at::Tensor& p, at::IntArrayRef flat_offsets) {
  const std::vector<Offset3> offsets = parse_offsets(p, flat_offsets);
  const BandLayout layout = band_layout<float>(volume_of(p), offsets);
  at::Tensor out = at::empty({static_cast<int64_t>(layout.segments.size()), 3}, at::kLong);
  int64_t* row = out.data_ptr<int64_t>();
  for (const BandSegment& s : layout.segments) {
    *row++ = s.dz;
    *row++ = s.dy;
    *row++ = s.rows;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bimi_C, CPU, m) {
  m.impl("joint_counts", &joint_counts_cpu);
  m.impl("joint_counts_band_layout", &joint_counts_band_layout_cpu);
  m.impl("joint_counts_backward", &joint_counts_backward_cpu);
}

}  // namespace bimi::cpu
